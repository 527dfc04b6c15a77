"""Soft prompts: how P0 is initialised, how z maps to P (the prompt spaces), and the saved artifact.

A *prompt space* turns an optimizer's vector z into an offset ΔP (m × D) added to the initial prompt P0:

- ``FullSpace``: z is ΔP itself, flattened (what PEFT trains; only sensible with gradients);
- ``ProjectedSpace``: ΔP = reshape(A z), A a fixed random [m·D, d] matrix drawn from a seed as Black-Box
  Tuning does (normal, std = α·std(E) / (√d·σ0)), regenerated from its seed and never stored.

P0 itself lives with the backend (the weights may be remote), so soft spaces only ever produce offsets.
Discrete spaces (:mod:`bbpt.discrete`) decode z to :class:`TextPrompts` instead: text any API accepts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from bbpt.errors import ConfigError

INIT_KINDS = ("vocab", "text", "labels", "zeros")


@dataclass(frozen=True)
class PromptInit:
    """How P0 is built: ``kind`` in vocab|text|labels|zeros, m rows, a seed for vocab sampling."""

    kind: str
    tokens: int
    seed: int = 0
    text: str = ""

    @classmethod
    def parse(cls, spec: str, tokens: int, seed: int = 0) -> "PromptInit":
        kind, _, text = spec.partition(":")
        if kind not in INIT_KINDS:
            raise ConfigError(f"unknown --init {spec!r}; use vocab, labels, zeros or text:\"some words\"")
        if kind == "text" and not text.strip():
            raise ConfigError('--init text: needs words after the colon, e.g. --init "text:Classify the review."')
        if tokens < 1:
            raise ConfigError(f"--prompt-tokens must be at least 1, got {tokens}")
        return cls(kind=kind, tokens=tokens, seed=seed, text=text)

    def spec(self) -> str:
        return f"text:{self.text}" if self.kind == "text" else self.kind


@dataclass(frozen=True)
class TextPrompts:
    """A population of discrete prompts, as text: what discrete spaces decode to and text backends score.

    ``ids`` are the token ids in the space's own tokenizer where it has one (``--space discrete``), kept for
    the saved artifact; the backend only ever reads the text.
    """

    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def unique(self) -> tuple["TextPrompts", np.ndarray]:
        """The distinct prompts in first-seen order, and for each prompt the index of its distinct one."""
        first: dict[str, int] = {}
        idx: list[int] = []
        for i, t in enumerate(self.texts):
            if t not in first:
                first[t] = len(idx)
                idx.append(i)
        ids = tuple(self.ids[i] for i in idx) if self.ids is not None else None
        return TextPrompts(tuple(self.texts[i] for i in idx), ids), np.array([first[t] for t in self.texts])


class PromptSpace(Protocol):
    """Maps the optimizer's z (``dim`` numbers) to prompt offsets ΔP of shape (tokens, width), or (discrete
    spaces) to :class:`TextPrompts`."""

    dim: int
    shape: tuple[int, int]

    def initial(self) -> np.ndarray: ...

    def decode(self, zs: np.ndarray) -> np.ndarray: ...

    def decode_torch(self, z): ...


@dataclass
class FullSpace:
    tokens: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.tokens, self.width)

    @property
    def dim(self) -> int:
        return self.tokens * self.width

    def initial(self) -> np.ndarray:
        return np.zeros(self.dim)

    def decode(self, zs: np.ndarray) -> np.ndarray:
        return np.asarray(zs, dtype=np.float32).reshape(-1, *self.shape)

    def decode_torch(self, z):
        return z.reshape(-1, *self.shape)


class ProjectedSpace:
    """ΔP = reshape(A z) with A ~ N(0, std²), std = α·embed_std/(√d·σ0): a σ0-sized step in z moves P by
    about α embedding standard deviations, whatever d is."""

    def __init__(self, tokens: int, width: int, dim: int, *, seed: int, embed_std: float, sigma0: float = 1.0,
                 alpha: float = 1.0):
        if dim < 1:
            raise ConfigError(f"--intrinsic-dim must be at least 1, got {dim}")
        self.tokens, self.width, self.dim = tokens, width, dim
        self.shape = (tokens, width)
        self.std = alpha * embed_std / (math.sqrt(dim) * sigma0)
        rng = np.random.default_rng(seed)
        self.A = (rng.standard_normal((tokens * width, dim), dtype=np.float32) * self.std).astype(np.float32)
        self._A_torch = None

    def initial(self) -> np.ndarray:
        return np.zeros(self.dim)

    def decode(self, zs: np.ndarray) -> np.ndarray:
        zs = np.atleast_2d(np.asarray(zs, dtype=np.float32))
        return (zs @ self.A.T).reshape(-1, *self.shape)

    def decode_torch(self, z):
        import torch

        if self._A_torch is None or self._A_torch.device != z.device:
            self._A_torch = torch.from_numpy(self.A).to(z.device)
        return (z.reshape(-1, self.dim).to(self._A_torch.dtype) @ self._A_torch.T).reshape(-1, *self.shape)


def make_space(kind: str, *, tokens: int, width: int, intrinsic_dim: int, seed: int, embed_std: float,
               sigma0: float, alpha: float = 1.0) -> PromptSpace:
    if kind == "full":
        return FullSpace(tokens, width)
    if kind == "projected":
        return ProjectedSpace(tokens, width, intrinsic_dim, seed=seed, embed_std=embed_std, sigma0=sigma0,
                              alpha=alpha)
    raise ConfigError(f"unknown --space {kind!r}; choose projected (z through a random projection), full (P), "
                      "discrete (z snapped to tokens) or vocab (a word per position)")


@dataclass
class SavedPrompt:
    """A tuned prompt on disk: ``prompt.json`` with either ``prompt.safetensors`` (key ``prompt``: P, m × D; a
    soft prompt) or ``prompt.txt`` (a discrete prompt, plain text to paste into any API)."""

    prompt: np.ndarray | None
    meta: dict
    text: str | None = None

    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.prompt is not None:
            save_file({"prompt": np.ascontiguousarray(self.prompt, dtype=np.float32)}, str(d / "prompt.safetensors"))
        if self.text is not None:
            (d / "prompt.txt").write_text(self.text + "\n")
        (d / "prompt.json").write_text(json.dumps(self.meta, indent=2, default=_jsonable) + "\n")
        return d

    @property
    def bias(self) -> np.ndarray | None:
        """The label bias ``[C]`` to add to this prompt's label log-probs (its calibration), or None. Every
        consumer of a saved prompt (eval, predict, the server's bank) applies it the same way."""
        cal = self.meta.get("calibration")
        if not cal:
            return None
        if cal.get("kind") != "bias" or len(cal.get("bias", ())) != len(self.meta.get("label_words", ())):
            raise ConfigError(f"prompt {self.meta.get('study')!r} has a calibration this bbpt cannot apply "
                              f"({cal!r}); expected kind 'bias' with one number per label word")
        return np.asarray(cal["bias"], dtype=np.float64)

    @classmethod
    def load(cls, directory: str | Path) -> "SavedPrompt":
        from safetensors.numpy import load_file

        d = Path(directory)
        soft, text = d / "prompt.safetensors", d / "prompt.txt"
        if not (soft.exists() or text.exists()) or not (d / "prompt.json").exists():
            raise ConfigError(f"{str(d)!r} is not a saved prompt (needs prompt.json and prompt.safetensors or "
                              "prompt.txt); pass the directory that `bbpt optimize` printed")
        return cls(prompt=load_file(str(soft))["prompt"] if soft.exists() else None,
                   meta=json.loads((d / "prompt.json").read_text()),
                   text=text.read_text().removesuffix("\n") if text.exists() and not soft.exists() else None)


def _jsonable(o):
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")
