"""Optimizers behind one ask/tell protocol: ``cma``, ``gn``, ``nevergrad:<Name>``, ``random``, ``backprop``."""

from __future__ import annotations

from bbpt.errors import ConfigError
from bbpt.optimizers._base import Optimizer, OptimizerSettings

__all__ = ["NAMES", "Optimizer", "OptimizerSettings", "check_available", "make_optimizer", "needs_gradient"]

NAMES = ("cma", "gn", "random", "backprop", "nevergrad:<Name>")
BUILTIN = ("cma", "gn", "random", "backprop")


def needs_gradient(spec: str) -> bool:
    return spec == "backprop"


def validate_spec(spec: str) -> None:
    if spec in BUILTIN or (spec.startswith("nevergrad:") and spec.split(":", 1)[1]):
        return
    raise ConfigError(f"unknown --optimizer {spec!r}; choose cma, gn, random, backprop or nevergrad:NAME "
                      "(e.g. nevergrad:NGOpt)")


def check_available(spec: str) -> None:
    """``validate_spec`` and what it cannot see without the library: a Nevergrad name outside its registry."""
    validate_spec(spec)
    if spec.startswith("nevergrad:"):
        from bbpt.optimizers.nevergrad_opt import check_registered

        check_registered(spec.split(":", 1)[1])


def make_optimizer(spec: str, settings: OptimizerSettings) -> Optimizer:
    validate_spec(spec)
    if spec == "cma" and settings.blocks:
        from bbpt.optimizers.layerwise import LayerwiseCMAES

        return LayerwiseCMAES(settings)
    if spec == "cma":
        from bbpt.optimizers.cma_es import CMAES

        return CMAES(settings)
    if spec == "gn":
        from bbpt.optimizers.gauss_newton import GaussNewton

        return GaussNewton(settings)
    if spec == "random":
        from bbpt.optimizers.random_search import RandomSearch

        return RandomSearch(settings)
    if spec == "backprop":
        from bbpt.optimizers.backprop import Backprop

        return Backprop(settings)
    from bbpt.optimizers.nevergrad_opt import NevergradOptimizer

    return NevergradOptimizer(spec.split(":", 1)[1], settings)
