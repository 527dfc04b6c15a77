import numpy as np
import pytest
import torch

from bbpt.errors import ConfigError
from bbpt.prompt import FullSpace, ProjectedSpace, PromptInit, SavedPrompt, make_space


def test_projection_is_deterministic_by_seed():
    a, b, c = (ProjectedSpace(3, 8, 5, seed=s, embed_std=0.1) for s in (7, 7, 8))
    assert np.array_equal(a.A, b.A) and not np.array_equal(a.A, c.A)


def test_projection_scale_follows_bbt():
    s = ProjectedSpace(10, 64, 100, seed=0, embed_std=0.2, sigma0=0.5, alpha=1.0)
    assert s.A.std() == pytest.approx(0.2 / (10 * 0.5), rel=0.02)


def test_decode_numpy_and_torch_agree():
    s = ProjectedSpace(2, 4, 3, seed=0, embed_std=1.0)
    z = np.random.default_rng(0).standard_normal((5, 3))
    np.testing.assert_allclose(s.decode(z), s.decode_torch(torch.tensor(z, dtype=torch.float32)).numpy(), atol=1e-6)
    assert s.decode(z).shape == (5, 2, 4)
    assert FullSpace(2, 4).decode(np.zeros((1, 8))).shape == (1, 2, 4)


def test_bad_space_and_init():
    with pytest.raises(ConfigError, match="unknown --space"):
        make_space("tiny", tokens=1, width=2, intrinsic_dim=2, seed=0, embed_std=1, sigma0=1)
    with pytest.raises(ConfigError, match="unknown --init 'random'"):
        PromptInit.parse("random", 5)
    with pytest.raises(ConfigError, match="--prompt-tokens must be at least 1, got 0"):
        PromptInit.parse("vocab", 0)


def test_saved_prompt_round_trip(tmp_path):
    p = SavedPrompt(np.arange(6, dtype=np.float32).reshape(2, 3), {"model": "m", "tokens": 2})
    p.save(tmp_path / "x")
    q = SavedPrompt.load(tmp_path / "x")
    assert np.array_equal(p.prompt, q.prompt) and q.meta == p.meta
    with pytest.raises(ConfigError, match="not a saved prompt"):
        SavedPrompt.load(tmp_path)
