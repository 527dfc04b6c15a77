"""Conformance: every optimizer lowers a simple loss through ask/tell, and resumes exactly from state()."""

import numpy as np
import pytest

from bbpt.errors import ConfigError, OptimizerError
from bbpt.optimizers import OptimizerSettings, make_optimizer

SPECS = ["cma", "random", "nevergrad:NGOpt", "nevergrad:TwoPointsDE", "backprop"]
TARGET = np.linspace(-1, 1, 6)


def quadratic(zs):
    zs = np.atleast_2d(zs)
    return ((zs - TARGET) ** 2).sum(1), 2 * (zs - TARGET)


def settings(**kw):
    base = dict(dim=6, x0=np.zeros(6), seed=3, budget=400, popsize=8, sigma0=0.5, lr=0.1)
    return OptimizerSettings(**{**base, **kw})


def drive(opt, steps):
    best = np.inf
    for _ in range(steps):
        zs = opt.ask()
        losses, grads = quadratic(zs)
        opt.tell(zs, losses, grads)
        best = min(best, losses.min())
    return best


@pytest.mark.parametrize("spec", SPECS)
def test_optimizer_lowers_a_quadratic(spec):
    start = quadratic(np.zeros(6))[0][0]
    best = drive(make_optimizer(spec, settings()), 40)
    assert best < 0.5 * start


@pytest.mark.parametrize("spec", SPECS)
def test_state_round_trip_continues_the_same_search(spec):
    a = make_optimizer(spec, settings())
    drive(a, 3)
    blob = a.state()
    b = make_optimizer(spec, settings())
    b.load_state(blob)
    np.random.seed(123)   # global numpy state must not leak into the search
    za, zb = a.ask(), b.ask()
    np.testing.assert_array_equal(za, zb)


def test_unknown_optimizer_names():
    with pytest.raises(ConfigError, match="unknown --optimizer 'adam'"):
        make_optimizer("adam", settings())
    with pytest.raises(ConfigError, match="did you mean 'NGOpt'"):
        make_optimizer("nevergrad:ngopt", settings())


def drive_wide(opt, generations, dim=500):
    """A few generations on a 500-d quadratic, the size of bbpt's projected space."""
    target = np.random.default_rng(0).normal(size=dim) * 0.3
    for _ in range(generations):
        zs = opt.ask()
        opt.tell(zs, ((zs - target) ** 2).sum(1))


def test_ngopt_with_a_popsize_its_cma_es_does_not_use_fails_with_the_fix_named():
    # At d = 500 NGOpt runs CMA-ES with a population of 4 + 3 ln 500 = 22; batches of 20 straddle its
    # generations and pycma raises from deep inside (the SST-2 study's ngopt arm died this way).
    opt = make_optimizer("nevergrad:NGOpt", settings(dim=500, x0=np.zeros(500), budget=300, popsize=20, sigma0=1.0))
    try:
        drive_wide(opt, 15)
    except OptimizerError as e:
        assert "nevergrad:NGOpt failed to ask for 20 candidates (Mean shift" in str(e)
        assert "use --popsize 22 with a budget that is a multiple of 22" in str(e)
    else:   # nevergrad and cma are not pinned: say so if a newer release stops failing here
        pytest.skip("this nevergrad/pycma no longer fails with batches of 20 at d = 500 (fixed upstream?)")


def test_ngopt_with_its_own_population_runs_clean():
    import warnings

    opt = make_optimizer("nevergrad:NGOpt", settings(dim=500, x0=np.zeros(500), budget=308, popsize=22, sigma0=1.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drive_wide(opt, 14)
    assert not [w for w in caught if "TPA" in str(w.message)]     # pycma's step-size adaptation saw whole generations


def softmax_problem(dim=6, n=40, c=3, seed=0):
    """Label scores linear in z, as a soft prompt's are for small steps: a loss whose scores ``gn`` can read."""
    rng = np.random.default_rng(seed)
    w, s0 = rng.normal(size=(n, c, dim)), rng.normal(size=(n, c))
    y = (s0 + w @ np.linspace(-1, 1, dim)).argmax(-1)      # a prompt away from the start answers all of them
    s0[:, 0] += 2.0                                         # while the start prefers one label

    def scores(zs):
        return s0 + np.einsum("ncd,pd->pnc", w, np.atleast_2d(zs))

    return scores, y


def drive_scores(opt, scores, y, generations):
    from bbpt.objective import loss

    best = np.inf
    for _ in range(generations):
        zs = opt.ask()
        s = scores(zs)
        opt.tell(zs, loss(s, y), None, s)
        best = min(best, loss(s, y).min())
    return best


@pytest.mark.parametrize("calibration", ["none", "bias"])
def test_gauss_newton_reads_the_scores_and_beats_cma_es_at_the_same_calls(calibration):
    from bbpt.objective import loss

    scores, y = softmax_problem()
    kw = dict(labels=y, calibration=calibration, popsize=4, sigma0=0.3)
    start = loss(scores(np.zeros(6)), y)[0]
    # Scores exactly linear in z: the model is exact, so 5 generations (20 calls) reach the optimum (0.620 on
    # this problem without calibration, checked with 100 generations), where CMA-ES is still at 0.88.
    gn = drive_scores(make_optimizer("gn", settings(**kw)), scores, y, 5)
    cma = drive_scores(make_optimizer("cma", settings(**kw)), scores, y, 5)
    assert gn < cma - 0.1 and cma < start
    assert gn < 0.5 * start     # (the loss here is uncalibrated; with calibration gn minimises the calibrated one)


def test_gauss_newton_state_round_trip_and_needs_labels():
    scores, y = softmax_problem()
    a = make_optimizer("gn", settings(labels=y, popsize=4))
    drive_scores(a, scores, y, 3)
    b = make_optimizer("gn", settings(labels=y, popsize=4))
    b.load_state(a.state())
    np.testing.assert_array_equal(a.ask(), b.ask())
    with pytest.raises(ValueError, match="needs the training labels"):
        make_optimizer("gn", settings())
