import numpy as np
import pytest

from bbpt import objective
from bbpt.errors import ObjectiveError


def test_ce_matches_manual_softmax():
    lp = np.log(np.array([[[0.2, 0.6], [0.9, 0.1]]]))   # full-vocab log-probs, restricted to the labels
    y = [1, 0]
    expect = -np.mean([np.log(0.6 / 0.8), np.log(0.9 / 1.0)])
    assert objective.loss(lp, y)[0] == pytest.approx(expect, rel=1e-6)


def test_hinge_is_zero_beyond_margin():
    lp = np.array([[[0.0, 5.0]], [[0.0, 0.5]]])
    out = objective.loss(lp, [1], "hinge")
    assert out[0] == 0.0 and out[1] == pytest.approx(0.5)


def test_nan_scores_name_the_candidate():
    lp = np.zeros((3, 2, 2))
    lp[2, 1, 0] = np.nan
    with pytest.raises(ObjectiveError, match=r"candidate\(s\) \[2\] contain nan"):
        objective.loss(lp, [0, 1])


def test_macro_f1():
    assert objective.macro_f1(np.array([0, 0, 1, 1]), [0, 1, 1, 1], 2) == pytest.approx((2 / 3 + 0.8) / 2)
