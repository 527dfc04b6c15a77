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
# Where the prompt enters the model: the input embeddings (prompt tuning); the hidden states at the prompt's
# positions before chosen layers (BBTv2's deep prompt); or keys and values at chosen layers (prefix tuning).
DEPTHS = ("input", "deep", "prefix")


@dataclass(frozen=True)
class PromptInit:
    """How P0 is built: ``kind`` in vocab|text|labels|zeros, m rows, a seed for vocab sampling."""

    kind: str
    tokens: int
    seed: int = 0
    text: str = ""
    depth: str = "input"        # one of DEPTHS; the backend resolves ``layers`` against the model's depth
    layers: str = "all"         # which layers a deep or prefix prompt reaches (:func:`adapters._deep.pick_layers`)

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
    """z is ΔP itself, in whatever shape the prompt's site takes (``[m, D]`` at the input; per layer deeper)."""

    tokens: int
    width: int
    site_shape: tuple[int, ...] | None = None     # None: the input layer's (tokens, width)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.site_shape) if self.site_shape else (self.tokens, self.width)

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

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


class LayeredSpace:
    """A prompt in blocks, one per place it enters (a layer's hidden states, or a layer's keys and values):
    z is the blocks' own vectors one after another, and block b is ΔP_b = reshape(A_b z_b), each A_b drawn
    from the seed as :class:`ProjectedSpace` draws A, with std = α·scale_b/(√d_b·σ0). ``scale_b`` is the
    spread of what block b is added to (the backend measures it: :class:`adapters.PromptSite`), so a σ0-sized
    step moves every layer's prompt by about α of that layer's own spread, as BBTv2 scales its projections.
    ``blocks`` says which coordinates of z each block owns (a layer-wise optimizer searches one at a time).
    """

    def __init__(self, site_shape: tuple[int, ...], scales, dims: list[int], *, seed: int, sigma0: float = 1.0,
                 alpha: float = 1.0):
        if len(scales) != site_shape[0] or len(dims) != site_shape[0]:
            raise ConfigError(f"a layered prompt of {site_shape[0]} blocks needs one scale and one d per block, "
                              f"got {len(scales)} and {len(dims)}")
        if min(dims) < 1:
            raise ConfigError(f"every block needs at least 1 dimension of z, got {dims}")
        self.shape = tuple(site_shape)
        self.dims = [int(d) for d in dims]
        self.dim = sum(self.dims)
        starts = np.cumsum([0] + self.dims)
        self.blocks = [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
        size = int(np.prod(self.shape[1:]))
        rng = np.random.default_rng(seed)
        self.stds = [alpha * float(sc) / (math.sqrt(d) * sigma0) for sc, d in zip(scales, self.dims)]
        self.A = [(rng.standard_normal((size, d), dtype=np.float32) * std).astype(np.float32)
                  for d, std in zip(self.dims, self.stds)]
        self._A_torch = None

    def initial(self) -> np.ndarray:
        return np.zeros(self.dim)

    def decode(self, zs: np.ndarray) -> np.ndarray:
        zs = np.atleast_2d(np.asarray(zs, dtype=np.float32))
        parts = [zs[:, a:b] @ A.T for (a, b), A in zip(self.blocks, self.A)]
        return np.stack(parts, axis=1).reshape(-1, *self.shape)

    def decode_torch(self, z):
        import torch

        if self._A_torch is None or self._A_torch[0].device != z.device:
            self._A_torch = [torch.from_numpy(A).to(z.device) for A in self.A]
        z = z.reshape(-1, self.dim).to(self._A_torch[0].dtype)
        parts = [z[:, a:b] @ A.T for (a, b), A in zip(self.blocks, self._A_torch)]
        return torch.stack(parts, dim=1).reshape(-1, *self.shape)


def make_space(kind: str, *, tokens: int, width: int, intrinsic_dim: int, seed: int, embed_std: float,
               sigma0: float, alpha: float = 1.0, site=None, per_block_dim: bool = False) -> PromptSpace:
    """The search space for a soft prompt. ``site`` (an :class:`adapters.PromptSite`, None at the input
    layer) gives a deep or prefix prompt's shape and per-block scales; its projected space splits d over the
    blocks (``per_block_dim``: d for every block, as BBTv2's layer-by-layer search has)."""
    if kind == "full":
        return FullSpace(tokens, width, None if site is None or site.depth == "input" else site.shape)
    if kind == "projected" and site is not None and site.depth != "input":
        blocks = site.shape[0]
        if per_block_dim:
            dims = [intrinsic_dim] * blocks
        else:
            if intrinsic_dim < blocks:
                raise ConfigError(f"--intrinsic-dim {intrinsic_dim} is below the {blocks} blocks of this "
                                  f"{site.depth} prompt (one dimension of z each at least); raise it to "
                                  f"{blocks} or more, or pick fewer --layers")
            dims = [intrinsic_dim // blocks + (1 if b < intrinsic_dim % blocks else 0) for b in range(blocks)]
        return LayeredSpace(site.shape, site.scales, dims, seed=seed, sigma0=sigma0, alpha=alpha)
    if kind == "projected":
        return ProjectedSpace(tokens, width, intrinsic_dim, seed=seed, embed_std=embed_std, sigma0=sigma0,
                              alpha=alpha)
    raise ConfigError(f"unknown --space {kind!r}; choose projected (z through a random projection), full (P), "
                      "discrete (z snapped to tokens) or vocab (a word per position)")


@dataclass
class SavedPrompt:
    """A tuned prompt on disk: ``prompt.json`` with either ``prompt.safetensors`` (key ``prompt``: P, m × D; a
    soft prompt) or ``prompt.txt`` (a discrete prompt, plain text to paste into any API).

    A deep prompt adds key ``deep`` (``[layers, m, D]``, the offsets added to the hidden states at the
    prompt's positions before each of ``meta["layers"]``); a prefix adds ``prefix`` (``[L, 2, m, kv_width]``,
    every layer's keys and values; ``prompt`` is then the P0 they were started from).
    """

    prompt: np.ndarray | None
    meta: dict
    text: str | None = None
    layers: dict[str, np.ndarray] | None = None       # "deep" or "prefix" tensors, as above

    @property
    def depth(self) -> str:
        return self.meta.get("depth", "input")

    def scoring_init(self) -> tuple[PromptInit, np.ndarray]:
        """How a backend scores this prompt: the init to give ``set_init`` and the offset to send (its site's
        shape). A prompt tuned through a remote backend saved only its offset from the server's P0, so P0 is
        rebuilt from the recorded init; otherwise the saved tensors are the prompt and P0 is zeros (a deep
        prompt at the layers it was tuned at, a prefix with every layer's keys and values)."""
        meta, m = self.meta, self.prompt.shape[0]
        if meta.get("prompt_is", "").startswith("delta"):
            kind, _, text = meta["init"].partition(":")
            if kind == "labels":
                text = " ".join(w.strip() for w in meta["label_words"])
            tuned_at = ",".join(map(str, meta["layers"])) if self.depth != "input" else "all"
            seed = int(meta.get("config", {}).get("seed", 0))
            return PromptInit(kind, m, seed, text, self.depth, tuned_at), self.site_delta()
        layers = ",".join(map(str, meta["layers"])) if self.depth == "deep" else "all"
        return PromptInit("zeros", m, depth=self.depth, layers=layers), self.site_delta()

    def site_delta(self) -> np.ndarray:
        """The whole prompt as an offset from a zero P0, in its site's shape: what a backend told
        ``set_init(PromptInit("zeros", m, depth=..., layers=...))`` scores as this prompt."""
        if self.depth == "deep":
            return np.concatenate([self.prompt[None], self.layers["deep"]])
        if self.depth == "prefix":      # every layer's keys/values, or (tuned remotely) offsets from P0's
            return self.layers["prefix"] if "prefix" in self.layers else self.layers["prefix_offsets"]
        return self.prompt

    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.prompt is not None:
            tensors = {"prompt": self.prompt, **(self.layers or {})}
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                      str(d / "prompt.safetensors"))
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
        tensors = load_file(str(soft)) if soft.exists() else {}
        prompt = tensors.pop("prompt", None)
        return cls(prompt=prompt, meta=json.loads((d / "prompt.json").read_text()),
                   text=text.read_text().removesuffix("\n") if text.exists() and not soft.exists() else None,
                   layers=tensors or None)


def _jsonable(o):
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")
