"""Conformance: every optimizer lowers a simple loss through ask/tell, and resumes exactly from state()."""

import numpy as np
import pytest

from bbpt.errors import ConfigError
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
