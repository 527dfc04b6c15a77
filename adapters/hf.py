"""Local backend: a transformers causal LM on CPU or CUDA, with gradients for backprop.

The prompt enters through ``inputs_embeds`` (no model code is forked or patched), so any causal LM that
transformers loads works. A population is scored in batched forwards: (candidate, example) sequences are
sorted by length and cut into chunks under a token budget so padding stays small (2,048 tokens per forward measured fastest on 2 CPU cores: 2.5 s per candidate vs 4.7 s at 8,192); sequences are left-padded
with explicit position ids so every score equals the unpadded one-example reference, and only the last
position's logits are computed (``logits_to_keep=1``), not the full vocabulary at every position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from adapters._base import ModelInfo, ScoreResult
from adapters.default_model import resolve_model
from bbpt.errors import BackendError, ConfigError
from bbpt.prompt import PromptInit, TextPrompts
from bbpt.tasks import Example, Template

log = logging.getLogger(__name__)

# BBT samples its random-vocabulary init from the first 5,000 ids (frequent tokens in BPE vocabularies).
VOCAB_INIT_RANGE = 5000


@dataclass
class EncodedBatch:
    """Token ids of each example's text before and after the prompt, and the label words' first tokens."""

    before: list[list[int]]
    after: list[list[int]]
    label_ids: list[int]
    embeds: list = None          # per example: (before embeds, after embeds), filled lazily
    examples: list = None        # the examples and template themselves, for discrete (text) prompts
    template: Template = None

    @property
    def n(self) -> int:
        return len(self.after)


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r} asked for CUDA but torch sees no GPU; use --device cpu or auto")
    return device


class HFBackend:
    """A Hugging Face causal LM on this machine. ``model`` is a bbpt model name, a directory or a hub id."""

    def __init__(self, model: str = "smollm2-135m", *, device: str = "auto", dtype: str = "float32",
                 max_batch_tokens: int = 2048, model_obj=None, tokenizer=None):
        import torch

        self.torch = torch
        self.name = model
        self.device = _pick_device(device)
        try:
            self.dtype = getattr(torch, dtype)
        except AttributeError:
            raise ConfigError(f"unknown --dtype {dtype!r}; use float32, bfloat16 or float16") from None
        if model_obj is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = resolve_model(model)
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
                model_obj = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
            except OSError as e:
                raise BackendError(f"could not load model {model!r} ({e}); pass a local directory with "
                                   "config.json and weights, or the default smollm2-135m") from None
        self.tokenizer = tokenizer
        self.model = model_obj.to(device=self.device, dtype=self.dtype).eval()
        self.model.requires_grad_(False)
        self.embedding = self.model.get_input_embeddings()
        self.max_batch_tokens = max_batch_tokens
        self.p0 = None
        self._info = ModelInfo(
            name=model, hidden_size=int(self.embedding.weight.shape[1]),
            embed_std=float(self.embedding.weight.float().std()), vocab_size=int(self.embedding.weight.shape[0]),
            gradients=True, max_batch=max(1, max_batch_tokens // 64),
            extra={"device": self.device, "dtype": dtype}, prompt_kinds=("soft", "text"))

    # -- protocol -------------------------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        return self._info

    def set_init(self, init: PromptInit | None) -> None:
        """Resolve P0 here, where the embedding matrix is."""
        torch = self.torch
        if init is None:
            self.p0 = None
            return
        weight = self.embedding.weight
        if init.kind == "zeros":
            self.p0 = torch.zeros(init.tokens, weight.shape[1], device=self.device, dtype=self.dtype)
            return
        if init.kind == "vocab":
            rng = np.random.default_rng(init.seed)
            ids = rng.choice(min(VOCAB_INIT_RANGE, weight.shape[0]), size=init.tokens, replace=False)
        else:  # text and labels: embeddings of the words, repeated to fill m rows (as PEFT's TEXT init does)
            ids = self.tokenizer(init.text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"--init {init.spec()!r} tokenizes to nothing; give some words")
            ids = (ids * (init.tokens // len(ids) + 1))[: init.tokens]
        self.p0 = weight[torch.as_tensor(np.asarray(ids), device=self.device)].detach().clone()

    def encode(self, examples: list[Example], template: Template, label_words: list[str]) -> EncodedBatch:
        if not examples:
            raise ConfigError("cannot score an empty list of examples")
        label_ids = label_token_ids(self.tokenizer, label_words)
        before, after = [], []
        for ex in examples:
            b, a = template.render(ex)
            # Special tokens (a BOS, for tokenizers that add one) go on the first text piece, as PEFT does.
            before.append(self.tokenizer(b, add_special_tokens=True)["input_ids"] if b else [])
            after.append(self.tokenizer(a, add_special_tokens=not b)["input_ids"])
        return EncodedBatch(before=before, after=after, label_ids=label_ids, examples=list(examples),
                            template=template)

    def score(self, deltas: np.ndarray | TextPrompts | None, batch: EncodedBatch) -> ScoreResult:
        torch = self.torch
        with torch.inference_mode():
            if isinstance(deltas, TextPrompts):
                lp, tokens = self._text_logprobs(deltas.texts, batch)
            else:
                d = None if deltas is None else torch.as_tensor(np.asarray(deltas), device=self.device,
                                                                dtype=self.dtype)
                lp, tokens = self._logprobs(d, batch)
        return ScoreResult(logprobs=lp.float().cpu().numpy(), tokens=tokens)

    def close(self) -> None:
        pass

    # -- white-box extras -----------------------------------------------------------------------------------
    def logprobs_torch(self, deltas, batch: EncodedBatch):
        """Differentiable ``[pop, n, C]`` label log-probs and the tokens processed."""
        return self._logprobs(deltas.to(device=self.device, dtype=self.dtype), batch)

    def prompt_matrix(self, delta: np.ndarray) -> np.ndarray:
        if self.p0 is None:
            raise ConfigError("no initial prompt set; call set_init first")
        return (self.p0.float().cpu().numpy() + np.asarray(delta, dtype=np.float32)).astype(np.float32)

    # -- internals ------------------------------------------------------------------------------------------
    def _example_embeds(self, batch: EncodedBatch):
        torch = self.torch
        if batch.embeds is None:
            with torch.no_grad():
                batch.embeds = [
                    (self.embedding(torch.tensor(b, dtype=torch.long, device=self.device)),
                     self.embedding(torch.tensor(a, dtype=torch.long, device=self.device)))
                    for b, a in zip(batch.before, batch.after)]
        return batch.embeds

    def _logprobs(self, deltas, batch: EncodedBatch):
        torch = self.torch
        if deltas is None:
            prompts = [None]
        else:
            if self.p0 is None:
                raise ConfigError("no initial prompt set; call set_init first")
            if deltas.dim() != 3 or tuple(deltas.shape[1:]) != tuple(self.p0.shape):
                raise ConfigError(f"prompt offsets have shape {tuple(deltas.shape)}, expected "
                                  f"(pop, {self.p0.shape[0]}, {self.p0.shape[1]})")
            prompts = list(self.p0.unsqueeze(0) + deltas)
        m = 0 if deltas is None else self.p0.shape[0]
        embeds = self._example_embeds(batch)
        lengths = [len(b) + m + len(a) for b, a in zip(batch.before, batch.after)]
        return self._batched(len(prompts), batch, lambda c, j: lengths[j], lambda c, j: torch.cat(
            [embeds[j][0]] + ([prompts[c]] if prompts[c] is not None else []) + [embeds[j][1]]))

    def _text_logprobs(self, texts, batch: EncodedBatch):
        """Discrete prompts: each (prompt, example) text tokenized whole, as a text API would see it."""
        if batch.examples is None:
            raise ConfigError("this batch was encoded without its examples; encode it again to score text prompts")
        ids = [[self.tokenizer(batch.template.render_text_prompt(ex, t), add_special_tokens=True)["input_ids"]
                for ex in batch.examples] for t in texts]
        return self._batched(len(texts), batch, lambda c, j: len(ids[c][j]), lambda c, j: self.embedding(
            self.torch.tensor(ids[c][j], dtype=self.torch.long, device=self.device)))

    def _batched(self, pop: int, batch: EncodedBatch, length, sequence):
        """Label log-probs ``[pop, n, C]`` of every (candidate, example) sequence, in chunks of similar length
        under the token budget."""
        torch = self.torch
        pairs = sorted(((c, j) for j in range(batch.n) for c in range(pop)), key=lambda p: length(*p))
        label_ids = torch.tensor(batch.label_ids, device=self.device)
        rows, cand_idx, ex_idx = [], [], []
        start = 0
        while start < len(pairs):
            # Pairs are sorted by length, so the chunk's last pair is its longest.
            end = start + 1
            while end < len(pairs) and (end - start + 1) * length(*pairs[end]) <= self.max_batch_tokens:
                end += 1
            chunk = pairs[start:end]
            rows.append(self._last_logprobs([sequence(c, j) for c, j in chunk])[:, label_ids])
            cand_idx += [c for c, _ in chunk]
            ex_idx += [j for _, j in chunk]
            start = end
        flat = torch.cat(rows)
        out = flat.new_zeros(pop, batch.n, len(batch.label_ids))
        out[torch.tensor(cand_idx), torch.tensor(ex_idx)] = flat
        return out, sum(length(c, j) for c, j in pairs)

    def _last_logprobs(self, seqs):
        """Full-vocabulary log-probs at the last position of each left-padded sequence."""
        torch = self.torch
        longest = max(s.shape[0] for s in seqs)
        width = seqs[0].shape[1]
        x = seqs[0].new_zeros(len(seqs), longest, width)
        mask = torch.zeros(len(seqs), longest, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            x[i, longest - s.shape[0]:] = s
            mask[i, longest - s.shape[0]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False,
                         logits_to_keep=1)
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)


def label_token_ids(tokenizer, label_words: list[str]) -> list[int]:
    """First token of each label word; they must differ, or two classes would be scored as one."""
    ids = []
    for w in label_words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ConfigError(f"label word {w!r} tokenizes to nothing; give a real word, e.g. ' positive'")
        ids.append(toks[0])
    seen: dict[int, str] = {}
    for w, i in zip(label_words, ids):
        if i in seen:
            piece = tokenizer.convert_ids_to_tokens(i)
            raise ConfigError(f"label words {seen[i]!r} and {w!r} start with the same token {piece!r}; "
                              "pick label words whose first tokens differ (e.g. ' good' vs ' bad')")
        seen[i] = w
    return ids
