"""The Backend protocol: how bbpt reaches a model. Nothing above ``adapters/`` knows whether it is local.

A backend is told once how to build the initial prompt P0 (``set_init``; the weights may live elsewhere, so
only the backend can resolve text or vocabulary into embedding rows), encodes a list of examples once
(``encode``), and then scores a whole population of prompt offsets ΔP in one ``score`` call, returning
log-probabilities of each class's first label token: ``[pop, n, C]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from bbpt.prompt import PromptInit
from bbpt.tasks import Example, Template


@dataclass(frozen=True)
class ModelInfo:
    name: str
    hidden_size: int
    embed_std: float
    vocab_size: int
    gradients: bool
    max_batch: int = 64
    extra: dict = field(default_factory=dict)


@dataclass
class ScoreResult:
    logprobs: np.ndarray          # [pop, n, C]
    tokens: int                   # tokens the model processed for this call
    bytes_sent: int = 0
    bytes_received: int = 0


@runtime_checkable
class Backend(Protocol):
    def info(self) -> ModelInfo: ...

    def set_init(self, init: PromptInit | None) -> None: ...

    def encode(self, examples: list[Example], template: Template, label_words: list[str]) -> Any: ...

    def score(self, deltas: np.ndarray | None, batch: Any) -> ScoreResult: ...

    def close(self) -> None: ...


@runtime_checkable
class GradientBackend(Backend, Protocol):
    """A backend whose weights are local: scores are differentiable with respect to ΔP."""

    def logprobs_torch(self, deltas, batch): ...

    def prompt_matrix(self, delta: np.ndarray) -> np.ndarray: ...
