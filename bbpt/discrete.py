"""Discrete prompt spaces: the optimizer still searches a vector z (so CMA-ES, Nevergrad and random search all
apply unchanged), but z decodes to text that any API accepts.

- ``DiscreteSpace`` (``--space discrete``): P = P0 + A z as in Black-Box Tuning, then each of the m rows is
  snapped to its nearest token embedding (Euclidean) in a *local* embedding table of the same model family,
  and the ids are detokenized. z = 0 gives the initial prompt's tokens exactly. Only whole words (with their
  leading space) and punctuation marks are candidates, so every prompt is readable text. A is rescaled so that
  a σ0-sized step replaces about a fifth of the tokens (``--alpha`` scales that).
- ``VocabSpace`` (``--space vocab``), for when nothing about the model is known: m positions, each choosing
  one of K candidate words, by argmax over its block of K numbers in z (the continuous relaxation Nevergrad's
  own choice parameters use, so its discrete optimizers, e.g. ``nevergrad:DiscreteOnePlusOne``, apply). The
  default candidates are words of the *training* texts ranked by association with the labels, as BDPL (Diao et
  al. 2022) builds its vocabulary; ``--vocab FILE`` gives your own.

Many z decode to the same text; the scoring layer scores each distinct text of a population once.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from bbpt.errors import ConfigError
from bbpt.prompt import ProjectedSpace, PromptInit, TextPrompts
from bbpt.tasks import Example
from bbpt.tasks.loaders import not_utf8

log = logging.getLogger(__name__)

TEXT_SPACES = ("discrete", "vocab")
# A candidate token is a word (with or without its leading space) or one punctuation mark: byte fragments,
# digits, code and special tokens would make prompts unreadable and may not re-tokenize to themselves.
READABLE = re.compile(r"^ [A-Za-z]+$|^[.,!?:;'\"()-]$")
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
FLIP_FRACTION = 0.2         # of the tokens, replaced by a σ0-sized step at alpha = 1


class DiscreteSpace:
    def __init__(self, tokenizer, table: np.ndarray, init_ids: list[int], dim: int, *, seed: int, sigma0: float,
                 alpha: float = 1.0):
        self.tokenizer = tokenizer
        self.tokens, width = len(init_ids), table.shape[1]
        self.dim, self.shape = dim, (self.tokens, width)
        self.p0 = table[np.asarray(init_ids)]
        special = set(tokenizer.all_special_ids)
        pieces = tokenizer.batch_decode([[i] for i in range(table.shape[0])])
        ok = {i for i, p in enumerate(pieces) if i not in special and READABLE.match(p)} | set(init_ids)
        self.allowed = np.array(sorted(ok))
        self.candidates = np.ascontiguousarray(table[self.allowed])
        self.sq_norms = (self.candidates.astype(np.float64) ** 2).sum(1).astype(np.float32)
        self.proj = ProjectedSpace(self.tokens, width, dim, seed=seed, embed_std=float(table.std()), sigma0=sigma0)
        # A soft prompt's scale (a σ0 step moves P by about one embedding std) changes no token at all: a random
        # direction in D dimensions is nearly orthogonal to every e − e0, so the row stays nearest its own token
        # until the step is several times larger, then jumps abruptly. Rescale so that at alpha = 1 a σ0-sized
        # step in z replaces about FLIP_FRACTION of the tokens.
        self.scale = alpha * self._flip_scale(np.random.default_rng(seed + 1).standard_normal((16, dim)) * sigma0)
        self.proj.A *= self.scale
        self.proj.std *= self.scale

    def _flip_scale(self, zs: np.ndarray) -> float:
        """The factor on ΔP at which FLIP_FRACTION of the rows of P0 + t·ΔP(z) change token, for these z.

        Row r with token e0 and direction δ turns into token e once ‖e − e0‖² < 2t·δ·(e − e0), so it first
        changes at t* = min over e with δ·(e − e0) > 0 of ‖e − e0‖² / (2 δ·(e − e0)): exact, one product.
        """
        deltas = self.proj.decode(zs).reshape(-1, self.shape[1])
        e0 = np.tile(self.p0, (len(zs), 1))
        gap = self.sq_norms[None, :] - 2 * e0 @ self.candidates.T + (e0 ** 2).sum(1, keepdims=True)   # ‖e − e0‖²
        push = 2 * (deltas @ self.candidates.T - (deltas * e0).sum(1, keepdims=True))               # 2δ·(e − e0)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where((push > 0) & (gap > 1e-8), gap / push, np.inf).min(1)
        finite = t[np.isfinite(t)]
        return float(np.quantile(finite, FLIP_FRACTION)) if finite.size else 1.0

    def initial(self) -> np.ndarray:
        return np.zeros(self.dim)

    def snap(self, rows: np.ndarray) -> np.ndarray:
        """Ids of the allowed tokens nearest to each row: argmin ‖e‖² − 2 e·p (‖p‖² is the same for all e)."""
        scores = self.sq_norms[None, :] - 2.0 * (rows.astype(np.float32) @ self.candidates.T)
        return self.allowed[scores.argmin(1)]

    def decode(self, zs: np.ndarray) -> TextPrompts:
        prompts = self.p0[None] + self.proj.decode(zs)
        ids = self.snap(prompts.reshape(-1, self.shape[1])).reshape(len(prompts), self.tokens)
        rows = tuple(tuple(int(i) for i in r) for r in ids)
        return TextPrompts(tuple(self.tokenizer.decode(list(r)).strip() for r in rows), rows)

    def decode_torch(self, z):
        raise ConfigError("a discrete prompt has no gradient (rows are snapped to tokens); use a derivative-free "
                          "--optimizer (cma, nevergrad:NGOpt, random) with --space discrete")

    def describe(self) -> dict:
        return dict(candidate_tokens=int(self.allowed.size), projection_std=self.proj.std, flip_scale=self.scale)


class VocabSpace:
    def __init__(self, words: list[str], tokens: int):
        if len(words) < 2:
            raise ConfigError(f"--space vocab needs at least 2 candidate words, got {len(words)}; give a longer "
                              "--vocab file or more --shots")
        self.words, self.tokens = list(words), tokens
        self.k = len(words)
        self.dim = tokens * self.k
        self.shape = (tokens, self.k)

    def initial(self) -> np.ndarray:
        """Position i starts on candidate i: the m words most associated with the labels, in rank order."""
        x0 = np.zeros(self.shape)
        x0[np.arange(self.tokens), np.arange(self.tokens) % self.k] = 1.0
        return x0.ravel()

    def decode(self, zs: np.ndarray) -> TextPrompts:
        choice = np.atleast_2d(np.asarray(zs, dtype=np.float64)).reshape(-1, *self.shape).argmax(-1)
        return TextPrompts(tuple(" ".join(self.words[i] for i in row) for row in choice))

    def decode_torch(self, z):
        raise ConfigError("--space vocab chooses words by argmax and has no gradient; use a derivative-free "
                          "--optimizer (cma, nevergrad:DiscreteOnePlusOne, random)")

    def describe(self) -> dict:
        return dict(vocabulary=self.words)


def label_vocabulary(examples: list[Example], num_classes: int, size: int, min_count: int = 2) -> list[str]:
    """Words of the examples ranked by their strongest association with one label: max over classes c of the
    smoothed PMI log p(c | w) − log p(c), counting each word once per example; ties go to the more frequent,
    then the longer.
    Words seen fewer than ``min_count`` times are left out unless too few remain."""
    df: Counter = Counter()
    by_class = [Counter() for _ in range(num_classes)]
    for ex in examples:
        words = set(WORD.findall(f"{ex.text} {ex.text_pair or ''}".lower()))
        df.update(words)
        by_class[ex.label].update(words)
    prior = Counter(ex.label for ex in examples)
    n = len(examples)

    def pmi(w: str) -> float:
        return max(math.log((by_class[c][w] + 0.5) / (df[w] + 0.5 * num_classes)) - math.log(prior[c] / n)
                   for c in range(num_classes) if prior[c])

    pool = [w for w in df if len(w) > 1 and df[w] >= min_count]
    if len(pool) < size:
        pool = [w for w in df if len(w) > 1]
    # Few-shot sets are small (SST-2 16-shot: ~220 distinct words, ~25 seen twice), so many words tie; among
    # equals, longer words (content, not function words) come first.
    return sorted(pool, key=lambda w: (-pmi(w), -df[w], -len(w), w))[:size]


def read_vocab(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--vocab {path!r} is not a file; give a text file with one candidate word per line")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"--vocab {not_utf8(p)}") from None
    words = list(dict.fromkeys(ln.strip() for ln in text.splitlines() if ln.strip()))
    if len(words) < 2:
        raise ConfigError(f"--vocab {path!r} has {len(words)} distinct word(s); give at least 2, one per line")
    return words


def space_model(cfg) -> str:
    """Whose tokenizer and embedding table ``--space discrete`` snaps to: ``--space-model``, else ``--model``
    when it names local files (a directory or a bundled model), else the default model."""
    from adapters.default_model import DEFAULT_MODEL, WHEEL_MODELS

    if cfg.space_model:
        return cfg.space_model
    return cfg.model if cfg.model in WHEEL_MODELS or Path(cfg.model).is_dir() else DEFAULT_MODEL


def make_text_space(cfg, task, init: PromptInit):
    """The discrete space a config asks for; validated here so a bad setting fails before anything is stored."""
    if cfg.space == "vocab":
        words = read_vocab(cfg.vocab) if cfg.vocab else label_vocabulary(task.train, task.num_classes,
                                                                         cfg.vocab_size)
        return VocabSpace(words, cfg.prompt_tokens)
    from transformers import AutoTokenizer

    from adapters.default_model import resolve_model
    from adapters.embedding_table import load_input_embeddings

    path = resolve_model(space_model(cfg))
    tokenizer = AutoTokenizer.from_pretrained(path)
    table = load_input_embeddings(path)[0].numpy()
    return DiscreteSpace(tokenizer, table, init_ids(tokenizer, table.shape[0], init), cfg.intrinsic_dim,
                         seed=cfg.seed, sigma0=cfg.sigma0, alpha=cfg.alpha)


def init_ids(tokenizer, vocab_size: int, init: PromptInit) -> list[int]:
    """The m token ids z = 0 decodes to, by the same rules as a soft prompt's P0 (text is repeated to fill m)."""
    if init.kind == "zeros":
        raise ConfigError("--init zeros has no tokens to start a discrete prompt from; use task, labels, vocab "
                          'or text:"your words"')
    if init.kind == "vocab":
        from adapters.hf import VOCAB_INIT_RANGE

        rng = np.random.default_rng(init.seed)
        pieces = tokenizer.batch_decode([[i] for i in range(min(VOCAB_INIT_RANGE, vocab_size))])
        pool = [i for i, p in enumerate(pieces) if READABLE.match(p) and i not in tokenizer.all_special_ids]
        return [int(i) for i in rng.choice(pool, size=init.tokens, replace=False)]
    ids = tokenizer(init.text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"--init {init.spec()!r} tokenizes to nothing; give some words")
    if len(ids) != init.tokens:
        log.info("the initial prompt %r is %d tokens; --prompt-tokens %d %s it", init.text, len(ids), init.tokens,
                 "repeats" if len(ids) < init.tokens else "cuts")
    return (ids * (init.tokens // len(ids) + 1))[: init.tokens]
