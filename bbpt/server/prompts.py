"""A soft-prompt bank: one frozen model, many tuned prompts, each chosen by name: classification prompts through
``/v1/classify``, generation prompts as models of ``/v1/completions`` (the way vLLM serves LoRA adapters).

``--prompts DIR`` is scanned once at start: every folder holding a saved prompt (``prompt.safetensors`` and
``prompt.json``, as ``bbpt optimize`` writes under ``runs/``) is served under its folder name. Prompts tuned on
another model (a different width) are skipped with a warning rather than failing the whole server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bbpt.errors import BbptError
from bbpt.prompt import PromptInit, SavedPrompt
from bbpt.tasks import Template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BankEntry:
    name: str
    init: PromptInit
    delta: np.ndarray            # [1, m, D]: the offset from init's P0 that gives the tuned prompt
    template: Template
    label_words: tuple[str, ...]
    label_names: tuple[str, ...]
    task: str
    bias: tuple[float, ...] | None = None      # the prompt's calibration: added to its label log-probs
    kind: str = "classification"               # or "generation": answered by /v1/completions
    stop: tuple[str, ...] = ()                 # generation: the task's stop strings (e2e: a newline)

    def describe(self) -> dict:
        return dict(name=self.name, task=self.task, kind=self.kind, labels=list(self.label_names),
                    tokens=int(self.delta.shape[1]))


def entry_from_saved(name: str, saved: SavedPrompt) -> BankEntry:
    meta = saved.meta
    init, delta = saved.scoring_init()
    return BankEntry(name=name, init=init, delta=np.asarray(delta, np.float32)[None],
                     template=Template(meta["template"]), label_words=tuple(meta["label_words"]),
                     label_names=tuple(meta.get("label_names") or meta["label_words"]), task=str(meta.get("task")),
                     bias=None if saved.bias is None else tuple(saved.bias.tolist()),
                     kind=meta.get("kind", "classification"), stop=tuple(meta.get("stop") or ()))


def load_bank(directory: str | Path | None, width: int) -> dict[str, BankEntry]:
    if directory is None:
        return {}
    root = Path(directory)
    bank = {}
    for d in sorted(p.parent for p in root.glob("*/prompt.json")):
        try:
            entry = entry_from_saved(d.name, SavedPrompt.load(d))
        except (BbptError, KeyError, ValueError, OSError) as e:
            log.warning("skipping prompt %s: %s", d, e)
            continue
        if entry.delta.shape[2] != width:
            log.warning("skipping prompt %s: width %d, but the served model has %d", d, entry.delta.shape[2], width)
            continue
        bank[entry.name] = entry
    log.info("serving %d tuned prompt(s) from %s", len(bank), root)
    return bank
