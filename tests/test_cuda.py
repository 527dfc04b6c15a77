"""bbpt on CUDA: the same scores as on the CPU, and whole studies end to end. Skipped where torch sees no GPU
(CI and the developers' machines); run where one is lent (see README: "On a GPU")."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

from adapters import hf  # noqa: E402
from bbpt.cli import main  # noqa: E402
from bbpt.prompt import PromptInit  # noqa: E402
from bbpt.tasks import load_task  # noqa: E402


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    return hf.HFBackend(tiny_model_dir, device="cpu"), hf.HFBackend(tiny_model_dir, device="cuda")


@pytest.mark.parametrize("depth", ["input", "deep", "prefix"])
@pytest.mark.parametrize("position", ["prefix", "infix", "suffix"])
def test_cuda_scores_equal_cpu_scores(pair, depth, position):
    if depth == "prefix" and position != "prefix":
        pytest.skip("a prefix leads every token")
    task = load_task(task="sst2", shots=4, seed=0, max_test=8, prompt_position=position)
    scores = []
    for b in pair:
        b.set_init(PromptInit("vocab", 3, seed=1, depth=depth))
        shape = b.prompt_site().shape
        d = np.random.default_rng(0).normal(scale=0.05, size=(4, *shape)).astype(np.float32)
        batch = b.encode(task.train, task.template, task.label_words)
        scores.append(b.score(d, batch).logprobs)
    assert scores[1].shape == scores[0].shape
    np.testing.assert_allclose(scores[1], scores[0], atol=2e-4)


@pytest.mark.parametrize("optimizer,extra", [("cma", ["--popsize", "4", "--budget", "8"]),
                                             ("gn", ["--popsize", "4", "--budget", "8"]),
                                             ("cma", ["--popsize", "4", "--budget", "8", "--depth", "deep"]),
                                             ("cma", ["--popsize", "4", "--budget", "8", "--train-batches", "2"]),
                                             ("backprop", ["--budget", "3"])])
def test_a_study_runs_on_cuda_and_its_prompt_scores_the_same_on_cpu(tiny_model_dir, storage_url, tmp_path, capsys,
                                                                     optimizer, extra):
    rc = main(["-q", "optimize", "--model", tiny_model_dir, "--task", "sst2", "--shots", "4", "--max-test", "16",
               "--optimizer", optimizer, *extra, "--prompt-tokens", "3", "--intrinsic-dim", "8", "--device", "cuda",
               "--storage", storage_url, "--runs-dir", str(tmp_path / "runs"), "--study", "s", "--json",
               "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 < summary["calls"] <= summary["budget"]
    assert main(["-q", "eval", "--prompt", summary["prompt_path"], "--split", "test", "--device", "cpu",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["test"])
