"""Everything a study run needs, opened once: config, storage row, backend, task and encoded splits.

Opening validates all inputs before anything is written, so a bad flag, file or resume leaves the database
untouched. ``finish`` does the honest ending: baseline (the same template without a prompt), the prompt
selected on dev, test scored once, the prompt saved.
"""

from __future__ import annotations

import logging
import sys
import uuid
from pathlib import Path

import numpy as np

import bbpt
from bbpt.config import StudyConfig
from bbpt.errors import ConfigError, StudyError
from bbpt.prompt import PromptInit, SavedPrompt
from bbpt.scoring import evaluate
from bbpt.storage import Storage
from bbpt.tasks import Task, load_task

log = logging.getLogger(__name__)


def resolve_init(cfg: StudyConfig, task: Task) -> PromptInit:
    """``task`` starts from the task's instruction text (an informed start beats a random one);
    ``labels`` from the label words; ``vocab`` from random frequent tokens; ``text:...`` from your words."""
    spec = cfg.init
    if spec == "task":
        spec = f"text:{task.init_text}" if task.init_text else "labels"
    if spec == "labels":
        return PromptInit("labels", cfg.prompt_tokens, cfg.seed, " ".join(w.strip() for w in task.label_words))
    return PromptInit.parse(spec, cfg.prompt_tokens, cfg.seed)


def load_task_for(cfg: StudyConfig) -> Task:
    return load_task(task=cfg.task if not cfg.data else None, data=cfg.data, test_data=cfg.test_data,
                     template=cfg.template, labels=cfg.labels, label_names=cfg.label_names,
                     text_field=cfg.text_field, text_pair_field=cfg.text_pair_field, label_field=cfg.label_field,
                     shots=cfg.shots, seed=cfg.seed, max_test=cfg.max_test)


def open_backend(cfg: StudyConfig, api_key: str | None = None):
    from adapters import make_backend

    return make_backend(cfg.backend, model=cfg.model, device=cfg.device, dtype=cfg.dtype,
                        endpoint=cfg.endpoint, api_key=api_key)


class Session:
    def __init__(self, cfg: StudyConfig, storage: Storage, name: str | None = None, backend=None,
                 runs_dir: str | Path = "runs", api_key: str | None = None):
        self.storage = storage
        self.name = name or f"{cfg.task or Path(cfg.data).stem}-{cfg.optimizer.replace(':', '-')}-{uuid.uuid4().hex[:6]}"
        existing = storage.get_study(self.name)
        if existing is not None:
            stored = StudyConfig.from_dict(existing.config)
            diffs = cfg.differences(stored)
            if diffs:
                detail = ", ".join(f"{k}: stored {getattr(stored, k)!r} vs now {getattr(cfg, k)!r}" for k in diffs)
                raise StudyError(f"study {self.name!r} exists with a different config ({detail}); resume it with "
                                 "the same settings, or pick a new --study name")
        self.config = cfg
        if cfg.optimizer != "backprop" and cfg.budget % cfg.popsize:
            # Population optimizers tell whole generations; a partial one would be scored and then thrown away.
            log.warning("--budget %d is not a multiple of --popsize %d: the study stops after %d calls",
                        cfg.budget, cfg.popsize, cfg.budget - cfg.budget % cfg.popsize)
        self.task = load_task_for(cfg)
        self.backend = backend if backend is not None else open_backend(cfg, api_key)
        self.info = self.backend.info()
        if cfg.optimizer == "backprop" and not self.info.gradients:
            raise ConfigError(f"--optimizer backprop needs local weights, but backend {cfg.backend!r} only returns "
                              "scores; use a derivative-free optimizer (cma, nevergrad:NGOpt) or --backend local")
        self.init = resolve_init(cfg, self.task)
        self.backend.set_init(self.init)
        encode = lambda split: self.backend.encode(self.task.split(split), self.task.template, self.task.label_words)
        self.train, self.dev = encode("train"), encode("dev")
        self.y_train = np.array([e.label for e in self.task.train])
        self.y_dev = np.array([e.label for e in self.task.dev])
        self.metric = "f1" if self.task.metric == "f1" else "accuracy"
        self.runs_dir = Path(runs_dir)
        if existing is None:
            existing = storage.create_study(self.name, cfg.to_dict(), bbpt_version=bbpt.__version__, model=cfg.model)
        else:   # a resume may change what does not affect results (a larger budget): store what now applies
            storage.update_study(self.name, state="running", config=cfg.to_dict())
        self.study_id = existing.id

    def trial_z(self, number: int) -> np.ndarray:
        row = self.storage.trial(self.study_id, number)
        return np.frombuffer(row.z, dtype="<f4").astype(np.float64)

    def progress_bar(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, disable=not enabled, unit="call", desc=self.name,
                    file=sys.stderr, dynamic_ncols=True)

    def finish(self, space, loop) -> dict:
        cfg, store, sid = self.config, self.storage, self.study_id
        done = {(e.trial_number, e.split) for e in store.evaluations(sid)}
        y_test = np.array([e.label for e in self.task.test])
        test = None
        evals = []
        for split, batch, y in (("dev", self.dev, self.y_dev), ("test", None, y_test)):
            if (None, split) not in done:
                batch = batch or self._encode_test()
                m, tokens, secs = evaluate(self.backend, None, batch, y, self.task.num_classes)
                evals.append(dict(trial_number=None, split=split, metrics=m, tokens=tokens, note="manual prompt"))
        if (-1, "train") not in done:   # the untuned starting prompt P0, so users see what tuning bought
            m, tokens, _ = evaluate(self.backend, space.decode(space.initial()[None]), self.train, self.y_train,
                                    self.task.num_classes)
            evals.append(dict(trial_number=-1, split="train", metrics=m, tokens=tokens, note="initial prompt P0"))
        sel = loop.dev_best_trial
        z = self.trial_z(sel)
        delta = space.decode(z[None])
        if (sel, "test") not in done:
            m, tokens, secs = evaluate(self.backend, delta, self._encode_test(), y_test, self.task.num_classes)
            evals.append(dict(trial_number=sel, split="test", metrics=m, tokens=tokens, calls_at=loop.calls,
                              seconds_at=loop.seconds, note="selected on dev; scored once"))
        store.add_evaluations(sid, evals)
        by = {(e.trial_number, e.split): e.metrics for e in store.evaluations(sid)}
        summary = dict(
            study=self.name, task=self.task.name, model=cfg.model, backend=cfg.backend, optimizer=cfg.optimizer,
            seed=cfg.seed, budget=cfg.budget, calls=loop.calls, tokens=loop.tokens, seconds=round(loop.seconds, 2),
            metric=self.metric, start_train_loss=by[(-1, "train")]["loss"], best_train_loss=loop.best_loss,
            selected_trial=sel,
            baseline_dev=by[(None, "dev")][self.metric], baseline_test=by[(None, "test")][self.metric],
            dev=by[(sel, "dev")][self.metric], test=by[(sel, "test")][self.metric],
            prompt_path=str(self._save_prompt(space, z, delta[0], by[(sel, "dev")], by[(sel, "test")])),
            storage=store.url)
        store.update_study(self.name, state="complete", summary=summary)
        return summary

    def _encode_test(self):
        if not hasattr(self, "_test"):
            self._test = self.backend.encode(self.task.test, self.task.template, self.task.label_words)
        return self._test

    def _save_prompt(self, space, z, delta, dev, test) -> Path:
        cfg = self.config
        matrix = self.backend.prompt_matrix(delta) if hasattr(self.backend, "prompt_matrix") else delta
        meta = dict(
            bbpt_version=bbpt.__version__, study=self.name, model=cfg.model, task=self.task.name,
            template=self.task.template.source, label_words=self.task.label_words,
            label_names=self.task.label_names, tokens=cfg.prompt_tokens, width=self.info.hidden_size,
            init=self.init.spec(), prompt_is="P0 + delta" if matrix is not delta else "delta (P0 at the backend)",
            space=cfg.space, projection_seed=cfg.seed, intrinsic_dim=cfg.intrinsic_dim, sigma0=cfg.sigma0,
            alpha=cfg.alpha, embedding="input embeddings, joined where the template's {prompt} is (prefix if absent)",
            z=z.tolist() if cfg.space == "projected" else None, dev=dev, test=test, config=cfg.to_dict())
        return SavedPrompt(np.asarray(matrix, np.float32), meta).save(self.runs_dir / self.name)
