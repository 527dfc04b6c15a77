"""``--backend vllm`` against ``bbpt serve``'s OpenAI completions route: the client embeds the inputs from the
embedding table alone, and label log-probs agree with the local backend wherever the server returns them."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from adapters import make_backend
from adapters.vllm import VLLMBackend, label_floor, load_input_embeddings
from bbpt.prompt import PromptInit
from bbpt.tasks import load_task
from serve_helpers import ServerProcess, run_study

INIT = PromptInit("text", 4, 0, "Classify the review.")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # A top-k as large as the vocabulary lets one test read every label from the natural top-k.
    s = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("logs"), "--max-logprobs", "60000").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def task():
    return load_task(task="sst2", shots=16, seed=0)


def _scores(backend, task, deltas, n=6):
    backend.set_init(INIT)
    return backend.score(deltas, backend.encode(task.train[:n], task.template, task.label_words))


def _deltas(pop=3):
    return np.random.default_rng(0).standard_normal((pop, 4, 32)).astype(np.float32) * 0.05


def test_only_the_embedding_table_is_loaded(tiny_model_dir, tiny_backend):
    weight, config = load_input_embeddings(tiny_model_dir)
    assert config.hidden_size == 32
    assert np.array_equal(weight.numpy(), tiny_backend.embedding.weight.detach().numpy())


def test_auto_mode_finds_logprob_token_ids_and_equals_local(server, tiny_model_dir, tiny_backend, task):
    b = make_backend("vllm", endpoint=server.url + "/v1", model=tiny_model_dir)
    try:
        got = _scores(b, task, _deltas())
        assert b.mode == "token_ids"
        assert b.missing_labels == 0 and not b.last_missing.any()
        assert sum(p.numel() for p in b.local.model.parameters()) == 32 * b.info().vocab_size   # no transformer
        ref = _scores(tiny_backend, task, _deltas())
        assert np.abs(got.logprobs - ref.logprobs).max() < 1e-4
        assert got.tokens == ref.tokens and got.bytes_sent > 0
        base = _scores(b, task, None)
        assert np.abs(base.logprobs - _scores(tiny_backend, task, None).logprobs).max() < 1e-4
        assert np.allclose(b.prompt_matrix(_deltas()[0]), tiny_backend.prompt_matrix(_deltas()[0]))
    finally:
        b.close()


def test_top_k_that_holds_the_labels_equals_local(server, tiny_model_dir, tiny_backend, task):
    b = VLLMBackend(server.url, model=tiny_model_dir, label_logprobs="topk", top_logprobs=tiny_backend.info().vocab_size)
    try:
        got = _scores(b, task, _deltas(2), n=3)
        assert not b.last_missing.any()
        assert np.abs(got.logprobs - _scores(tiny_backend, task, _deltas(2), n=3).logprobs).max() < 1e-4
    finally:
        b.close()


def test_labels_outside_a_small_top_k_get_the_floor_and_are_counted(server, tiny_model_dir, tiny_backend, task,
                                                                     caplog):
    b = VLLMBackend(server.url, model=tiny_model_dir, label_logprobs="topk", top_logprobs=5)
    try:
        with caplog.at_level(logging.WARNING, logger="adapters.vllm"):
            got = _scores(b, task, _deltas())
        ref = _scores(tiny_backend, task, _deltas()).logprobs
        miss = b.last_missing
        assert miss.any() and b.missing_labels == int(miss.sum())
        assert "set to the floor" in caplog.text
        assert np.abs(got.logprobs[~miss] - ref[~miss]).max(initial=0) < 1e-4
        # the floor is the most a missing label could have: never below its true value
        assert (ref[miss] <= got.logprobs[miss] + 1e-5).all()
    finally:
        b.close()


def test_label_floor_is_below_the_top_k_and_within_the_rest():
    top = {"a": np.log(0.5), "b": np.log(0.3)}
    assert label_floor(top.values()) == pytest.approx(np.log(0.2))
    assert label_floor([np.log(0.05)] * 3) == pytest.approx(np.log(0.05))


def test_vllm_study_equals_local_study(server, tmp_path, tiny_model_dir):
    ref = run_study(tmp_path, "local", "--model", tiny_model_dir, budget=16)
    got = run_study(tmp_path, "vllm", "--backend", "vllm", "--endpoint", server.url + "/v1", "--model",
                    tiny_model_dir, budget=16)
    assert got["numbers"] == list(range(16))
    assert np.abs(np.asarray(got["losses"]) - np.asarray(ref["losses"])).max() < 1e-4
