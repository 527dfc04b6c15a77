"""The local backend on a tiny random Llama: batching and padding must not change a single score."""

import numpy as np
import pytest
import torch

from adapters import Backend, GradientBackend
from adapters.hf import label_token_ids
from bbpt.errors import ConfigError
from bbpt.prompt import PromptInit
from bbpt.tasks import Example, Template

TEXTS = ["a gorgeous, witty, seductive movie.", "dull", "the plot meanders for two long hours and never lands",
         "fine", "an utter waste of a fine cast and of my evening"]
LABELS = [" negative", " positive"]


def examples(pair=False):
    return [Example(t, i % 2, "second text" if pair else None) for i, t in enumerate(TEXTS)]


@pytest.mark.parametrize("template", ["Review: {text}\nSentiment:", "Review: {text}\n{prompt}Sentiment:",
                                      "A: {text}\nB: {text_pair}\n{prompt}Same?:"])
def test_population_scores_equal_unpadded_one_by_one(tiny_backend, template):
    b = tiny_backend
    b.set_init(PromptInit("vocab", 4, seed=1))
    tmpl = Template(template)
    exs = examples(pair=tmpl.has_pair)
    deltas = np.random.default_rng(0).normal(scale=0.05, size=(3, 4, b.info().hidden_size)).astype(np.float32)
    b.max_batch_tokens = 64          # forces several chunks with different padding
    together = b.score(deltas, b.encode(exs, tmpl, LABELS)).logprobs
    b.max_batch_tokens = 2048
    for c in range(3):
        for j, ex in enumerate(exs):
            alone = b.score(deltas[c:c + 1], b.encode([ex], tmpl, LABELS)).logprobs[0, 0]
            np.testing.assert_allclose(together[c, j], alone, atol=1e-5)


def test_no_prompt_scores_match_plain_forward(tiny_backend):
    b = tiny_backend
    tmpl = Template("Review: {text}\nSentiment:")
    got = b.score(None, b.encode(examples(), tmpl, LABELS)).logprobs[0]
    ids = label_token_ids(b.tokenizer, LABELS)
    for j, ex in enumerate(examples()):
        x = b.tokenizer(tmpl.render_plain(ex), return_tensors="pt")
        with torch.no_grad():
            ref = torch.log_softmax(b.model(**x).logits[0, -1], -1)[ids].numpy()
        np.testing.assert_allclose(got[j], ref, atol=1e-5)


def test_gradients_reach_the_prompt(tiny_backend):
    b = tiny_backend
    b.set_init(PromptInit("zeros", 2))
    d = torch.zeros(1, 2, b.info().hidden_size, requires_grad=True)
    lp, tokens = b.logprobs_torch(d, b.encode(examples(), Template("{text}:"), LABELS))
    lp[..., 0].sum().backward()
    assert d.grad is not None and d.grad.abs().sum() > 0 and tokens > 0


def test_backend_protocols(tiny_backend):
    assert isinstance(tiny_backend, Backend) and isinstance(tiny_backend, GradientBackend)
    info = tiny_backend.info()
    assert info.hidden_size == 32 and info.gradients and info.embed_std > 0


def test_label_words_must_start_with_distinct_tokens(tiny_backend):
    with pytest.raises(ConfigError, match="start with the same token"):
        label_token_ids(tiny_backend.tokenizer, [" good", " goodish"])


def test_wrong_prompt_shape_is_named(tiny_backend):
    tiny_backend.set_init(PromptInit("zeros", 2))
    with pytest.raises(ConfigError, match=r"shape \(1, 3, 32\), expected \(pop, 2, 32\)"):
        tiny_backend.score(np.zeros((1, 3, 32), np.float32), tiny_backend.encode(examples(), Template("{text}"), LABELS))


def test_text_init_repeats_the_words(tiny_backend):
    tiny_backend.set_init(PromptInit("text", 5, text="good bad"))
    ids = tiny_backend.tokenizer("good bad", add_special_tokens=False)["input_ids"]
    emb = tiny_backend.embedding.weight
    assert torch.equal(tiny_backend.p0[0], emb[ids[0]]) and torch.equal(tiny_backend.p0[len(ids)], emb[ids[0]])
