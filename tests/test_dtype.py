"""Scoring in bfloat16: what `--dtype bfloat16` changes, and when bbpt warns about it on CPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest


@pytest.mark.slow
def test_bfloat16_ranks_a_population_as_float32_does_on_the_default_model(default_model_dir):
    """The search only needs the order of a population's losses: bf16 must keep it wherever float32's
    losses are told apart by more than bf16's rounding (and its scores must stay close)."""
    from adapters.hf import HFBackend
    from bbpt.objective import loss
    from bbpt.prompt import PromptInit
    from bbpt.tasks import load_task

    task = load_task(task="sst2", shots=4, seed=0, prompt_position="infix")
    labels = np.array([ex.label for ex in task.train])
    got = {}
    for dtype in ("float32", "bfloat16"):
        b = HFBackend(default_model_dir, device="cpu", dtype=dtype)
        b.set_init(PromptInit("text", 4, text=task.init_text))
        site = b.prompt_site()
        # offsets from small to large, so the losses spread well beyond bf16's rounding
        rng = np.random.default_rng(0)
        deltas = np.stack([rng.standard_normal(site.shape) * s * float(np.asarray(site.scales)[0])
                           for s in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)]).astype(np.float32)
        got[dtype] = np.asarray(b.score(deltas, b.encode(task.train, task.template, task.label_words)).logprobs,
                                dtype=np.float64)
    assert np.abs(got["float32"] - got["bfloat16"]).max() < 0.75
    l32, l16 = loss(got["float32"], labels), loss(got["bfloat16"], labels)
    assert np.ptp(l32) > 0.1, l32                  # the population is not a tie: the order means something
    # every pair float32 tells apart by more than bf16's rounding of a loss (~0.02 here) keeps its order
    pairs = [(i, j) for i in range(len(l32)) for j in range(len(l32)) if l32[i] + 0.02 < l32[j]]
    assert len(pairs) >= 5, l32
    assert all(l16[i] < l16[j] for i, j in pairs), (l32, l16)


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_cpu_warns_only_without_bf16_instructions(tiny_model_dir, monkeypatch, caplog, native):
    import torch

    from adapters.hf import HFBackend

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level(logging.WARNING, logger="adapters.hf"):
        b = HFBackend(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert b.model.dtype == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    if native:
        assert not warned
    else:
        assert warned and "no bfloat16 instructions" in warned[0] and "float32" in warned[0]
