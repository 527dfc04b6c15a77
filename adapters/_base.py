"""The Backend protocol: how bbpt reaches a model. Nothing above ``adapters/`` knows whether it is local.

A backend is told once how to build the initial prompt P0 (``set_init``; the weights may live elsewhere, so
only the backend can resolve text or vocabulary into embedding rows), encodes a list of examples once
(``encode``), and then scores a whole population of prompt offsets ΔP in one ``score`` call, returning
log-probabilities of each class's first label token: ``[pop, n, C]``.

What ``score`` takes as prompts depends on ``ModelInfo.prompt_kinds``: ``"soft"`` backends take offsets ΔP
(``[pop, m, D]``, or None for no prompt); ``"text"`` backends take a :class:`bbpt.prompt.TextPrompts` (a
population of discrete prompts, as text) and place each where the template says. A text-only API can do only
the latter; a local model can do both. The session checks the space against the backend's kinds, so nothing
above ``adapters/`` asks which backend it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from bbpt.prompt import PromptInit, TextPrompts
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
    prompt_kinds: tuple[str, ...] = ("soft",)     # "soft" (offsets ΔP) and/or "text" (TextPrompts)
    depths: tuple[str, ...] = ("input",)          # where a soft prompt may enter (bbpt.prompt.DEPTHS)


@dataclass(frozen=True)
class PromptSite:
    """Where a soft prompt enters, as the backend resolved it after ``set_init``: what a prompt space must emit
    per candidate (``shape``) and how large each of its blocks should be (``scales``).

    - input: ``shape`` (m, D), one block, the embeddings' std;
    - deep: (1 + len(layers), m, D): block 0 joins the input embeddings, block i is added to the hidden states
      at the prompt's positions before decoder layer ``layers[i-1]``; scales are P0's hidden states' spread there;
    - prefix: (len(layers), 2, m, kv_width): keys and values of m virtual tokens at each of ``layers``;
      scales are the spread of P0's own keys and values at each layer.
    """

    depth: str
    layers: tuple[int, ...]
    shape: tuple[int, ...]
    scales: tuple[float, ...]
    kv_heads: int = 0           # prefix: key/value heads per layer (kv_width = kv_heads × head size)

    def describe(self) -> dict:
        """What a study records of its site (the statistics its projection was scaled by)."""
        out = {"depth": self.depth, "layers": list(self.layers), "shape": list(self.shape),
               "scales": [float(s) for s in self.scales]}
        if self.depth == "prefix":
            out["kv_heads"] = self.kv_heads
        return out


@dataclass
class ScoreResult:
    # classification: [pop, n, C] label log-probs; generation: [pop, n] each example's target log-prob (summed
    # over its tokens, teacher-forced), with ``target_tokens`` [n] the token count of each target
    logprobs: np.ndarray
    tokens: int                   # tokens the model processed for this call
    bytes_sent: int = 0
    bytes_received: int = 0
    # A backend that reads answers instead of scores (a text API without log-probs) sets the parsed class of
    # each answer, -1 where none could be parsed; fitness is then the error rate, not a loss on ``logprobs``.
    predicted: np.ndarray | None = None       # [pop, n] ints
    # Per-prompt accounting the study stores in each trial's metrics (requests, tokens, cache hits, ...).
    per_prompt: list[dict] | None = None
    target_tokens: np.ndarray | None = None   # generation only: [n]


@runtime_checkable
class Backend(Protocol):
    def info(self) -> ModelInfo: ...

    def set_init(self, init: PromptInit | None) -> None: ...

    def encode(self, examples: list[Example], template: Template, label_words: list[str]) -> Any: ...

    def score(self, prompts: "np.ndarray | TextPrompts | None", batch: Any) -> ScoreResult: ...

    def close(self) -> None: ...


@runtime_checkable
class CachingBackend(Backend, Protocol):
    """A backend whose requests cost money: the session hands it the study's request cache, so a resumed or
    repeated study never sends the same request twice."""

    def use_cache(self, cache) -> None: ...


@runtime_checkable
class GradientBackend(Backend, Protocol):
    """A backend whose weights are local: scores are differentiable with respect to ΔP."""

    def logprobs_torch(self, deltas, batch): ...

    def prompt_matrix(self, delta: np.ndarray) -> np.ndarray: ...
