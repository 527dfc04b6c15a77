"""The settings of one study, as a typed dataclass validated once and stored as versioned JSON."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from bbpt.errors import ConfigError

CONFIG_VERSION = 6
# What a key added since version 1 meant before it existed: a stored version-1 config resumes and re-runs
# exactly as it was run (its studies had no calibration).
V1_MEANING = {"calibration": "none"}
# Before version 3 a soft prompt led the input unless the template placed it: a stored config without the key
# (or with None, its old default) keeps that placement. Version 3's default puts it after the input (``auto``).
V2_MEANING = {"prompt_position": None}
# ``demos = "auto"`` chose on P0's training loss alone until version 4, and reads training and dev losses
# together since: a stored version-3 "auto" is that rule, spelled "auto:train" now.
V3_MEANING = {"auto": "auto:train"}
# Until version 4 a study without the flags searched with CMA-ES and no demonstrations; version 5's defaults are
# bbpt's black-box recipe, resolved per task (:meth:`StudyConfig.resolved`). A stored config names both, resolved.
V4_MEANING = {"optimizer": "cma", "demos": 0}
# Until version 6 ``prompt_position = "auto"`` put a soft prompt searched without gradients after the input on
# every task; since, it leads short inputs (bbpt/tasks/placement.py). Stored configs hold the resolved position
# ("infix") up to version 5 and "auto" from 6, so nothing stored needs a new meaning.
# The values of ``demos`` that choose between no demonstrations and one per class before the search, and the
# splits each reads P0's loss on (bbpt/demos_choice.py).
AUTO_DEMOS = {"auto": ("train", "dev"), "auto:train": ("train",)}

# Keys that may change between a run and its resume without changing which trials it produces.
RESUME_SAFE = frozenset({"budget", "device", "endpoint", "eval_every", "price_per_1k", "max_tokens_total",
                         "max_seconds", "test_curve"})
SPACES = ("projected", "full", "discrete", "vocab")
DEV_TIES = ("earliest", "loss")
CALIBRATIONS = ("none", "bias")
DEPTHS = ("input", "deep", "prefix")
SCHEDULES = ("joint", "layerwise")


@dataclass
class StudyConfig:
    # what to learn
    task: str | None = "sst2"
    data: str | None = None
    test_data: str | None = None
    template: str | None = None
    labels: list[str] | None = None
    label_names: list[str] | None = None
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    shots: int = 16
    dev_shots: int | None = None        # None: as many as shots (BBT's protocol)
    max_test: int | None = None
    seed: int = 0
    # which model, reached how
    model: str = "smollm2-135m"
    backend: str = "local"
    endpoint: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    # text-only APIs (--backend openai)
    chat: bool = False                  # /v1/chat/completions instead of /v1/completions
    logprobs: bool = True               # False: fitness is the accuracy of the generated answers
    top_logprobs: int | None = None     # None: the largest the server accepts (probed)
    price_per_1k: float | None = None   # money per 1,000 tokens, for the cost estimate
    max_tokens_total: int | None = None # stop before a generation would spend more tokens than this
    # the prompt and its search space
    prompt_tokens: int = 10
    # prefix, infix, or auto: where the template's {prompt} is when it has one; else, for a soft prompt searched
    # derivative-free, "auto" stays in the config and the task's inputs decide when it is loaded: infix (its calls
    # reuse each input's keys/values, encoded once per study, so a call is ~3x cheaper on long inputs; on AG News,
    # seed 0, CMA-ES at 120 calls went from 56.0 to 70.0 % test), or prefix where leading costs little more
    # (short inputs: bbpt/tasks/placement.py); prefix for backprop (no reuse, PEFT's placement so its prompts
    # export to PEFT; infix helped it on AG News, 74.2 -> 81.2 %, and hurt it on SST-2, 75.4 %) and for text
    # prompts. Stored resolved, except the soft black-box "auto".
    prompt_position: str | None = "auto"
    init: str = "task"
    # solved train examples per class written before every input (the icl arm's template), so the search starts
    # from in-context learning; 0: none (and what a stored config without the key meant); "auto": one per class
    # if they lower the starting prompt's loss on the training examples not shown and on dev, scored both ways
    # before the search; "auto:train": the same on the training examples alone (bbpt/demos_choice.py).
    # None: 0, or auto where the recipe (no --optimizer) applies (:meth:`resolved`)
    demos: int | str | None = None
    # where the prompt enters: input embeddings (prompt tuning), deep (an offset on the hidden states at the
    # prompt's positions before each of --layers, as BBTv2) or prefix (keys/values per layer, as PEFT's prefix
    # tuning); a deep or prefix prompt searched derivative-free gets one projection per layer
    depth: str = "input"
    layers: str = "all"                 # which layers a deep or prefix prompt reaches: all, every:K, first:N, last:N
    # deep/prefix, projected: one search over all layers' blocks (d split over them), or BBTv2's layer-wise
    # schedule (one CMA-ES per layer, d each, one generation per layer in turn)
    schedule: str = "joint"
    space: str | None = None            # None: full for backprop, projected otherwise
    intrinsic_dim: int = 500
    alpha: float = 0.5     # BBT uses 1.0; 0.5 (smaller steps) did better on SST-2 at 300 calls (README)
    space_model: str | None = None      # discrete: whose tokenizer/embeddings (None: --model if local, else default)
    vocab: str | None = None            # vocab: a file of candidate words (None: ranked from the training texts)
    vocab_size: int = 50                # vocab: K candidates per position
    # the optimizer; "auto": bbpt's black-box recipe (:meth:`resolved`): gn with --demos auto for a soft prompt on a
    # classification task, cma otherwise
    optimizer: str = "auto"
    budget: int = 300
    # a time budget beside --budget's calls: stop before a generation would take the study's seconds (its model
    # time on the training set, what the summary and reports count) past this. None: calls alone decide.
    max_seconds: float | None = None
    popsize: int = 20
    sigma0: float = 1.0
    lr: float | None = None             # None: 0.01 on P (full), 0.1 on z (projected)
    diagonal: bool = False
    bound: float = 0.0
    loss: str = "ce"
    # "bias": each prompt carries C per-class biases fitted on the training scores (free: no model calls)
    calibration: str = "bias"
    eval_every: int | None = None       # in calls; None: a tenth of the budget
    # > 1: the training set is cut into this many stratified mini-batches; generation g's candidates are scored
    # on mini-batch g mod k (calls 1/k as long), and the generation's best is re-scored on the whole set as one
    # more call, the loss the study records as its best (so best losses stay comparable across settings)
    train_batches: int = 1
    # P0 competes on dev: its dev score (with its own train-fitted bias) is the first kept one, so a search that
    # finds nothing better on dev returns the starting prompt rather than a worse one (off: bbpt <= 0.2's rule).
    keep_start: bool = False
    dev_ties: str = "earliest"          # several prompts at the best dev score: keep the earliest, or lowest dev loss
    test_curve: bool = False            # also score test for every prompt dev selected on the way (reports only)
    max_new_tokens: int = 80            # generation: the longest answer generated for BLEU/ROUGE (E2E's ≈ 30)
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        from bbpt.objective import LOSSES
        from bbpt.optimizers import validate_spec

        if self.optimizer != "auto":
            validate_spec(self.optimizer)
        if self.space is None:
            self.space = "full" if self.optimizer == "backprop" else "projected"
        self.prompt_position = self._placement()
        if self.lr is None:
            self.lr = 0.01 if self.space == "full" else 0.1
        if self.eval_every is None:
            self.eval_every = max(1, self.budget // 10)
        checks = [
            (self.prompt_tokens >= 1, "prompt_tokens", "at least 1 virtual token"),
            (self.budget >= 1, "budget", "at least 1 call"),
            (self.popsize >= 2 or self.optimizer == "backprop", "popsize", "at least 2"),
            (self.shots >= 1, "shots", "at least 1 example per class"),
            (self.dev_shots is None or self.dev_shots >= 1, "dev_shots", "at least 1 example per class"),
            (self.intrinsic_dim >= 1, "intrinsic_dim", "at least 1"),
            (math.isfinite(self.sigma0) and self.sigma0 > 0, "sigma0", "a positive number"),
            (math.isfinite(self.lr) and self.lr > 0, "lr", "a positive number"),
            (self.eval_every >= 1, "eval_every", "at least 1 call"),
            (self.space in SPACES, "space", " or ".join(SPACES)),
            (self.prompt_position in ("prefix", "infix", "suffix", "auto", None), "prompt_position",
             "prefix, infix, suffix or auto"),
            (self.loss in LOSSES, "loss", f"one of {LOSSES}"),
            (self.dev_ties in DEV_TIES, "dev_ties", " or ".join(DEV_TIES)),
            (self.calibration in CALIBRATIONS, "calibration", " or ".join(CALIBRATIONS)),
            (self.space != "full" or self.optimizer == "backprop", "space",
             "projected, discrete or vocab for derivative-free optimizers (full space has m×D dimensions)"),
            (self.space in ("full", "projected") or self.optimizer != "backprop", "space",
             "full or projected for backprop (a discrete prompt has no gradient)"),
            (self.vocab_size >= 2, "vocab_size", "at least 2 candidate words"),
            (1 <= self.train_batches <= self.shots, "train_batches",
             f"between 1 and --shots ({self.shots}), so every mini-batch holds every class"),
            (self.train_batches == 1 or self.optimizer != "backprop", "train_batches",
             "1 for backprop (its steps use the whole training set)"),
            (self.train_batches == 1 or self.optimizer != "gn", "train_batches",
             "1 for --optimizer gn (it models every training example's label scores, and a mini-batch call "
             "returns some of them); use cma or nevergrad:NAME for mini-batches"),
            (self.depth in DEPTHS, "depth", " or ".join(DEPTHS)),
            (self.schedule in SCHEDULES, "schedule", " or ".join(SCHEDULES)),
            (self.depth == "input" or self.space in ("projected", "full"), "depth",
             "input for --space discrete or vocab (a text prompt enters as tokens)"),
            (self.depth != "prefix" or self.prompt_position not in ("infix", "suffix"), "prompt_position",
             "prefix (or auto) for --depth prefix: its keys and values come before every token, as PEFT's do"),
            (self.schedule == "joint" or (self.optimizer in ("cma", "auto") and self.depth != "input"
                                          and self.space == "projected"), "schedule",
             "joint unless --optimizer cma searches a deep or prefix prompt (--depth deep|prefix, projected)"),
            (self.max_new_tokens >= 1, "max_new_tokens", "at least 1 token"),
            (self.demos is None or self.demos_auto or (type(self.demos) is int and 0 <= self.demos <= self.shots),
             "demos",
             f"auto, auto:train, or a whole number between 0 and --shots ({self.shots}): demonstrations come "
             "from the train split"),
            (not self.demos_auto or self.shots >= 2, "demos",
             "a number with --shots 1: auto compares losses on the training examples that are not shown as "
             "demonstrations, and at one shot per class none is left"),
            (self.top_logprobs is None or self.top_logprobs >= 1, "top_logprobs", "at least 1"),
            (self.price_per_1k is None or (math.isfinite(self.price_per_1k) and self.price_per_1k >= 0),
             "price_per_1k", "a non-negative number"),
            (self.max_tokens_total is None or self.max_tokens_total >= 1, "max_tokens_total", "at least 1"),
            (self.max_seconds is None or (math.isfinite(self.max_seconds) and self.max_seconds > 0), "max_seconds",
             "a positive number of seconds"),
        ]
        for ok, key, need in checks:
            if not ok:
                raise ConfigError(f"--{key.replace('_', '-')} {getattr(self, key)!r} is invalid: it must be {need}")

    @property
    def is_resolved(self) -> bool:
        """Whether the recipe's per-task choices (optimizer "auto", demos None) are made."""
        return self.optimizer != "auto" and self.demos is not None

    def resolved(self, kind: str) -> "StudyConfig":
        """This config with the recipe's choices made for a task of ``kind`` ("classification" or "generation").
        No --optimizer: bbpt's black-box recipe, gn (which reads every example's label scores) with --demos auto
        for a soft prompt (``projected``) on classification, where studies/bbt_suite_v2.toml measured it (arm
        gn_auto_dev) nearer backprop than cma; cma otherwise (a text prompt's scores do not move smoothly with z,
        a generation task has no label scores, BBTv2's layer-wise schedule is one CMA-ES per layer, gn's model
        needs every example's scores each call, not a mini-batch's). A named
        optimizer runs as named, with no demonstrations unless --demos asks."""
        if self.is_resolved:
            return self
        optimizer, demos = self.optimizer, self.demos
        if optimizer == "auto":
            recipe = (kind == "classification" and self.space == "projected" and self.schedule == "joint"
                      and self.train_batches == 1)
            optimizer = "gn" if recipe else "cma"
            if demos is None:
                demos = "auto" if recipe and self.shots >= 2 else 0
        return dataclasses.replace(self, optimizer=optimizer, demos=0 if demos is None else demos)

    @property
    def demos_auto(self) -> bool:
        """Whether the study chooses its demonstrations before the search (``auto`` or ``auto:train``)."""
        return isinstance(self.demos, str) and self.demos in AUTO_DEMOS

    def _placement(self) -> str | None:
        """The prompt's position, resolved as far as the settings alone can: None only where the template places
        ``{prompt}`` itself (it wins), and a prompt the template does not place leads (prefix), except that
        ``auto`` for a soft prompt searched derivative-free stays ``auto``: the task's inputs choose between
        leading and following them when it is loaded (:func:`bbpt.tasks.placement.auto_position`). Old configs'
        None (as written, else prefix) reads as prefix."""
        pos, placed = self.prompt_position, "{prompt}" in (self.template or "")
        if pos == "auto" and self.depth == "prefix":
            return None if placed else "prefix"
        if pos == "auto":
            soft_black_box = self.space == "projected" and self.optimizer != "backprop"
            return None if placed else ("auto" if soft_black_box else "prefix")
        if pos is None and not placed:
            return "prefix"
        return pos

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudyConfig":
        if d.get("version", CONFIG_VERSION) > CONFIG_VERSION:
            raise ConfigError(f"config version {d['version']} is newer than this bbpt understands "
                              f"({CONFIG_VERSION}); upgrade bbpt")
        if d.get("version", CONFIG_VERSION) < 2:
            d = {**V1_MEANING, **d}
        if d.get("version", CONFIG_VERSION) < 3:
            d = {**V2_MEANING, **d}
        if d.get("version", CONFIG_VERSION) < 4 and isinstance(d.get("demos"), str):
            d = {**d, "demos": V3_MEANING.get(d["demos"], d["demos"])}
        if d.get("version", CONFIG_VERSION) < 5:
            d = {**V4_MEANING, **d}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**d)

    def differences(self, other: "StudyConfig") -> list[str]:
        """Keys whose values differ in a way that changes results (what blocks a resume)."""
        a, b = self.to_dict(), other.to_dict()
        # "version" is not compared: from_dict already gave an older config its meaning in this version.
        return sorted(k for k in a if k not in RESUME_SAFE and k != "version" and a[k] != b.get(k))


def resolve_recipe(cfg: StudyConfig) -> StudyConfig:
    """``cfg`` with bbpt's per-task defaults chosen (:meth:`StudyConfig.resolved`: the optimizer and the
    demonstrations a study gets when it names neither), for its task's kind (read without loading the task)."""
    if cfg.is_resolved:
        return cfg
    from bbpt.tasks import task_kind

    return cfg.resolved(task_kind(task=None if cfg.data else cfg.task, data=cfg.data, labels=cfg.labels))
