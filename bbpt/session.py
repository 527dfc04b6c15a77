"""Everything a study run needs, opened once: config, storage row, backend, task and encoded splits.

Opening validates all inputs before anything is written, so a bad flag, file or resume leaves the database
untouched. ``finish`` does the honest ending: baseline (the same template without a prompt), the prompt
selected on dev, test scored once, the prompt saved.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import uuid
from pathlib import Path

import numpy as np

import bbpt
from bbpt.config import StudyConfig, resolve_recipe
from bbpt.errors import ConfigError, StudyError
from bbpt.optimizers import OptimizerSettings, check_available, make_optimizer
from bbpt.prompt import PromptInit, SavedPrompt, TextPrompts, make_space
from bbpt.objective import bias_list
from bbpt.scoring import answer_metrics, evaluate, evaluate_many, train_bias
from bbpt.storage import Storage
from bbpt.tasks import Task, load_task

log = logging.getLogger(__name__)

# Per-trial accounting keys a backend may report; the study's summary adds them up.
# Generation: the scores of a prompt's greedy answers that a summary shows beside its likelihood.
TEXT_SCORES = ("bleu", "rouge_l", "slot_coverage")
START = -1      # the trial number of the starting prompt P0 in evaluations (it is no trial of the search)
SUMMED = ("requests", "cached", "prompt_tokens", "completion_tokens", "missing_labels", "unparsed")


def resolve_init(cfg: StudyConfig, task: Task) -> PromptInit:
    """``task`` starts from the task's instruction text (an informed start beats a random one);
    ``labels`` from the label words; ``vocab`` from random frequent tokens; ``text:...`` from your words."""
    spec = cfg.init
    if spec == "task":
        spec = f"text:{task.init_text}" if task.init_text else "labels"
    if spec == "labels":
        init = PromptInit("labels", cfg.prompt_tokens, cfg.seed, " ".join(w.strip() for w in task.label_words))
    else:
        init = PromptInit.parse(spec, cfg.prompt_tokens, cfg.seed)
    return dataclasses.replace(init, depth=cfg.depth, layers=cfg.layers)


def check_schedule(cfg: StudyConfig, site) -> None:
    """BBTv2's layer-wise schedule gives every layer's CMA-ES one generation in turn: a budget below one sweep
    would leave layers untouched, so it is refused with the number that one sweep takes."""
    if cfg.schedule != "layerwise":
        return
    sweep = cfg.popsize * site.shape[0]
    if cfg.budget < sweep:
        raise ConfigError(f"--schedule layerwise searches {site.shape[0]} blocks one generation of {cfg.popsize} "
                          f"at a time, so one sweep takes {sweep} calls and --budget {cfg.budget} is below it; "
                          f"raise --budget to {sweep} or more, pick fewer --layers, or use --schedule joint")


def load_task_for(cfg: StudyConfig) -> Task:
    from bbpt.tasks.demos import with_demos
    from bbpt.tasks.placement import auto_position

    cfg = resolve_recipe(cfg)
    auto = cfg.prompt_position == "auto"
    task = load_task(task=cfg.task if not cfg.data else None, data=cfg.data, test_data=cfg.test_data,
                     template=cfg.template, labels=cfg.labels, label_names=cfg.label_names,
                     text_field=cfg.text_field, text_pair_field=cfg.text_pair_field, label_field=cfg.label_field,
                     shots=cfg.shots, seed=cfg.seed, max_test=cfg.max_test,
                     prompt_position=None if auto else cfg.prompt_position, dev_shots=cfg.dev_shots)
    if auto:        # the training inputs decide (the same ones every time the study is opened)
        task.template = task.template.at(auto_position(task.template, task.train, cfg.prompt_tokens))
    return with_demos(task, 0 if cfg.demos_auto else cfg.demos, cfg.seed)    # auto: the Session chooses


def open_backend(cfg: StudyConfig, api_key: str | None = None):
    from adapters import make_backend

    return make_backend(cfg.backend, model=cfg.model, device=cfg.device, dtype=cfg.dtype,
                        endpoint=cfg.endpoint, api_key=api_key, chat=cfg.chat, logprobs=cfg.logprobs,
                        top_logprobs=cfg.top_logprobs)


def check_capabilities(cfg: StudyConfig, gradients: bool, prompt_kinds: tuple[str, ...], backend: str,
                       depths: tuple[str, ...] = ("input",)) -> None:
    """The settings against what a backend can do: backprop needs gradients, a space needs the kind of prompt it
    makes. Checked on ``--backend`` alone before a backend is opened (no model loaded, no server asked), and
    again on what the opened backend reports."""
    from bbpt.discrete import TEXT_SPACES

    if cfg.depth not in depths:
        raise ConfigError(f"{backend} places soft prompts at the {' and '.join(depths)} layer only, and --depth "
                          f"{cfg.depth} needs its hidden states or keys/values; use --backend local or api (a "
                          "bbpt serve, which builds the layer prompts) for a deep or prefix prompt, or --depth input")
    if cfg.optimizer == "backprop" and not gradients:
        raise ConfigError(f"--optimizer backprop needs local weights, but {backend} only returns scores; use a "
                          "derivative-free optimizer (cma, nevergrad:NGOpt) or --backend local")
    kind = "text" if cfg.space in TEXT_SPACES else "soft"
    if kind not in prompt_kinds:
        fix = ("--space discrete (tokens near P0 + A z) or --space vocab (a word per position)" if kind == "soft"
               else "--space projected")
        raise ConfigError(f"{backend} scores {' and '.join(prompt_kinds)} prompts only, and --space {cfg.space} "
                          f"makes {kind} prompts; use {fix}")


def check_flags(cfg: StudyConfig) -> None:
    """What the settings alone decide, before any model or server is touched (with no --optimizer and a --data
    file, the file's first row says its kind, which picks the recipe's optimizer)."""
    from adapters import backend_kind

    cfg = resolve_recipe(cfg)
    kind = backend_kind(cfg.backend)
    check_capabilities(cfg, kind.gradients, kind.prompt_kinds, f"--backend {cfg.backend}", kind.depths)
    check_available(cfg.optimizer)


def check_task(cfg: StudyConfig, task: Task) -> None:
    """What a generation task cannot do: its score is each answer's likelihood, not label scores."""
    if task.kind != "generation":
        return
    from adapters import backend_kind

    if "generation" not in backend_kind(cfg.backend).task_kinds:
        raise ConfigError(f"--backend {cfg.backend} cannot score a generation task: it returns no log-likelihood "
                          "of a given answer (vLLM gives no prompt log-probs for prompt embeddings; a text API only "
                          "top-k log-probs); use --backend local, or api (a bbpt serve)")
    if cfg.demos_auto:
        raise ConfigError(f"--demos {cfg.demos} compares label losses, and {task.name!r} is a generation task; pick a "
                          "number (--demos K writes K solved examples before every input)")
    if cfg.optimizer == "gn":
        raise ConfigError(f"--optimizer gn models label scores, and {task.name!r} is a generation task (it scores "
                          "answers' likelihoods); use cma, backprop or nevergrad:NAME")
    if cfg.space not in ("projected", "full"):
        raise ConfigError(f"--space {cfg.space} is for classification; a generation prompt is soft: use "
                          "--space projected (derivative-free) or full (backprop)")


def make_prompt_space(cfg: StudyConfig, task: Task, init: PromptInit, info, site=None):
    """The search space: soft (offsets ΔP for the backend's P0, in the shape of the prompt's ``site`` when it
    enters below the input layer) or discrete (text); the backend's kinds are checked first
    (:func:`check_capabilities`)."""
    from bbpt.discrete import TEXT_SPACES, make_text_space

    if cfg.space in TEXT_SPACES:
        return make_text_space(cfg, task, init)
    return make_space(cfg.space, tokens=cfg.prompt_tokens, width=info.hidden_size, intrinsic_dim=cfg.intrinsic_dim,
                      seed=cfg.seed, embed_std=info.embed_std, sigma0=cfg.sigma0, alpha=cfg.alpha, site=site,
                      per_block_dim=cfg.schedule == "layerwise")


def stratified_batches(labels, k: int) -> list[np.ndarray]:
    """The training set's indices cut into k mini-batches, each class dealt round-robin in its training order
    (which the task's seed already shuffled), so every batch holds every class (k ≤ shots)."""
    labels = np.asarray(labels)
    out: list[list[int]] = [[] for _ in range(k)]
    for c in np.unique(labels):
        for j, i in enumerate(np.flatnonzero(labels == c)):
            out[j % k].append(int(i))
    return [np.array(sorted(b)) for b in out]


def calibration_meta(bias) -> dict | None:
    """What a saved prompt records of its calibration: the label bias added to its scores before the argmax."""
    if bias is None:
        return None
    return {"kind": "bias", "bias": [float(v) for v in bias], "fitted_on": "train",
            "applies": "added to the label words' log-probs before the softmax and argmax"}


def _with_bias(m: dict, bias) -> dict:
    return m if bias is None else {**m, "bias": bias_list(bias)}


def z_from_bytes(blob: bytes) -> np.ndarray:
    """A trial's stored parameter vector (float32 on disk) as the float64 the spaces decode."""
    return np.frombuffer(blob, dtype="<f4").astype(np.float64)


class Session:
    """Opened in order of cost: the settings alone, then the data, the backend, the prompt space and the optimizer;
    the study row is written last, so whatever fails on the way leaves the database as it was."""

    def __init__(self, cfg: StudyConfig, storage: Storage, name: str | None = None, backend=None,
                 runs_dir: str | Path = "runs", api_key: str | None = None):
        self.storage = storage
        cfg = resolve_recipe(cfg)
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
        check_flags(cfg)
        if cfg.optimizer != "backprop" and cfg.budget % cfg.popsize:
            # Population optimizers tell whole generations; a partial one would be scored and then thrown away.
            log.warning("--budget %d is not a multiple of --popsize %d: the study stops after %d calls",
                        cfg.budget, cfg.popsize, cfg.budget - cfg.budget % cfg.popsize)
        self.task = load_task_for(cfg)
        if cfg.prompt_position == "auto":
            log.info("--prompt-position auto: the prompt %s the input (bbpt/tasks/placement.py)",
                     "leads" if self.task.template.placement == "prefix" else "follows")
        check_task(cfg, self.task)
        self.backend = backend if backend is not None else open_backend(cfg, api_key)
        self.info = self.backend.info()
        check_capabilities(cfg, self.info.gradients, self.info.prompt_kinds,
                           f"backend {cfg.backend!r} ({self.info.name})", self.info.depths)
        self.init = resolve_init(cfg, self.task)
        self.backend.set_init(self.init)
        self.site = self.backend.prompt_site() if cfg.depth != "input" else None
        check_schedule(cfg, self.site)
        self.space = make_prompt_space(cfg, self.task, self.init, self.info, self.site)
        self.start_evals, self.start_seconds = [], 0.0     # stored with the first generation
        if cfg.demos_auto:
            self.task, self.train, self.dev = self._choose_demos(existing)
        else:
            self.train, self.dev = self._encode(self.task, "train"), self._encode(self.task, "dev")
        self.y_train = np.array([e.label for e in self.task.train])
        self.train_batches = [
            (self.backend.encode([self.task.train[i] for i in idx], self.task.template, self.task.label_words),
             self.y_train[idx]) for idx in stratified_batches(self.y_train, cfg.train_batches)
        ] if cfg.train_batches > 1 else []
        self.y_dev = np.array([e.label for e in self.task.dev])
        self.metric = self.task.score_name
        self.runs_dir = Path(runs_dir)
        self.optimizer = make_optimizer(cfg.optimizer, OptimizerSettings(
            dim=self.space.dim, x0=self.space.initial(), seed=cfg.seed, budget=cfg.budget, popsize=cfg.popsize,
            sigma0=cfg.sigma0, lr=cfg.lr, diagonal=cfg.diagonal, bound=cfg.bound, labels=self.y_train,
            calibration=cfg.calibration, blocks=getattr(self.space, "blocks", None) if cfg.schedule == "layerwise"
            else None))
        if existing is None:
            existing = storage.create_study(self.name, cfg.to_dict(), bbpt_version=bbpt.__version__, model=cfg.model)
        else:   # a resume may change what does not affect results (a larger budget): store what now applies
            self._check_resumable(storage.last_checkpoint(existing.id))
            storage.update_study(self.name, state="running", config=cfg.to_dict())
        self.study_id = existing.id
        if hasattr(self.backend, "use_cache"):      # paid requests: never send the same one twice in a study
            self.backend.use_cache(storage.request_cache(self.study_id))

    def _choose_demos(self, existing):
        """``--demos auto``: the template (with or without demonstrations) under which P0's loss is lower, and
        its training and dev sets encoded under it. A resumed study reads the choice it stored; a new one scores
        both (a call per template and split, kept for the first generation to store: seconds and tokens count
        as the study's, not against --budget)."""
        from bbpt import demos_choice

        cfg = self.config
        stored = demos_choice.stored_choice(self.storage.evaluations(existing.id)) if existing else None
        if stored is not None:
            task = demos_choice.candidates(self.task, cfg.seed)[(0, demos_choice.AUTO_DEMOS).index(stored)]
            return task, self._encode(task, "train"), self._encode(task, "dev")
        cands = demos_choice.score_candidates(self.backend, self.space, self.task, cfg.seed, cfg.loss,
                                              cfg.calibration, cfg.demos)
        chosen = demos_choice.pick(cands)
        self.start_evals = [dict(trial_number=START, split=demos_choice.SPLIT, metrics=c.metrics, tokens=c.tokens,
                                 note=f"P0 with {c.demos} demonstration(s) per class, on the examples not shown as "
                                      f"one (--demos {cfg.demos}: {'chosen' if c is chosen else 'not chosen'})")
                            for c in cands]
        self.start_seconds = sum(c.seconds for c in cands)
        log.info("--demos %s: P0's loss on %s %s; starting from %d demonstration(s) per class", cfg.demos,
                 " and ".join(demos_choice.RULES[cfg.demos]),
                 ", ".join(f"{c.metrics['loss']:.4f} with {c.demos}" for c in cands), chosen.demos)
        dev = chosen.dev if chosen.dev is not None else self._encode(chosen.task, "dev")     # auto:train scores no dev
        return chosen.task, chosen.train, dev

    def _encode(self, task, split: str):
        """A split of ``task`` encoded under its own template (with or without demonstrations)."""
        return self.backend.encode(task.split(split), task.template, task.label_words)

    def _check_resumable(self, ck) -> None:
        """Compaction drops a complete study's optimizer state; its limits can then no longer grow."""
        from bbpt.study import LoopState, limit_reached     # the loop's module imports this one

        cfg = self.config
        if ck and not ck.optimizer_state and not limit_reached(cfg, LoopState(**ck.loop_state),
                                                               self.calls_per_generation):
            raise StudyError(f"study {self.name!r} was compacted (`bbpt studies compact`) after it completed, so its "
                             f"optimizer state is gone and its budget cannot be raised from {ck.loop_state['calls']} "
                             f"to {cfg.budget} calls (nor --max-seconds past its {ck.loop_state['seconds']:.0f} s); "
                             "run it under a new name, or delete it and run it again")

    @property
    def calls_per_generation(self) -> int:
        """Backprop: one step; a population: its candidates, plus the re-score of its best on the whole
        training set when candidates are scored on mini-batches."""
        if self.optimizer.needs_gradient:
            return 1
        return self.config.popsize + (1 if self.train_batches else 0)

    def train_part(self, generation: int):
        """What generation ``generation`` scores its candidates on: (mini-batch number or None, batch, labels)."""
        if not self.train_batches:
            return None, self.train, self.y_train
        k = generation % len(self.train_batches)
        return (k, *self.train_batches[k])

    def trial_z(self, number: int) -> np.ndarray:
        row = self.storage.trial(self.study_id, number)
        if not row.z:
            raise StudyError(f"trial {number} of study {self.name!r} was compacted (`bbpt studies compact`): its "
                             "parameters are gone; run the study under a new name to search again")
        return z_from_bytes(row.z)

    def progress_bar(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, disable=not enabled, unit="call", desc=self.name,
                    file=sys.stderr, dynamic_ncols=True)

    def finish(self, space, loop) -> dict:
        cfg, store, sid = self.config, self.storage, self.study_id
        done = {(e.trial_number, e.split) for e in store.evaluations(sid)}
        y_test = np.array([e.label for e in self.task.test])
        evals = []
        if {(None, "dev"), (None, "test")} - done:
            # The manual prompt gets the same calibration as every tuned prompt: a bias fitted on train.
            bias, fit_tokens = train_bias(self.backend, None, self.train, self.y_train, cfg.calibration)
            for split, batch, y in (("dev", self.dev, self.y_dev), ("test", None, y_test)):
                if (None, split) not in done:
                    batch = batch or self._encode_test()
                    m, tokens, secs = evaluate(self.backend, None, batch, y, self.task.num_classes, bias)
                    m.update(self._answers(None, split))
                    evals.append(dict(trial_number=None, split=split, metrics=_with_bias(m, bias),
                                      tokens=tokens + fit_tokens, note="manual prompt"))
                    fit_tokens = 0
        if (START, "train") not in done:   # the untuned starting prompt P0, so users see what tuning bought
            m, tokens, _, bias = evaluate(self.backend, space.decode(space.initial()[None]), self.train,
                                          self.y_train, self.task.num_classes, fit=cfg.calibration, with_bias=True)
            evals.append(dict(trial_number=START, split="train", metrics=_with_bias(m, bias), tokens=tokens,
                              note="initial prompt P0"))
        sel = loop.dev_best_trial
        z = space.initial() if sel == START else self.trial_z(sel)
        delta = space.decode(z[None])      # ΔP, or the prompt's text
        if self.task.kind == "generation" and (sel, "dev") in done and "bleu" not in self._dev_metrics(sel):
            # The answers of the selected prompt only: generating for every dev check would cost more than
            # the check (selection reads the dev NLL).
            self.storage.update_evaluation(sid, sel, "dev", self._answers(delta, "dev"))
        # Test, once: the selected prompt, and with test_curve every prompt dev selected on the way, in one call
        # (a local backend then encodes each test input once for all of them).
        pending = [] if (sel, "test") in done else [
            (sel, z, loop.dev_best_bias, dict(calls_at=loop.calls, seconds_at=loop.seconds,
                                              note="selected on dev; scored once"))]
        if cfg.test_curve:
            pending += [p for p in self._curve_prompts(space, done) if p[0] != sel]
        if pending:
            scored, tokens = evaluate_many(self.backend, space.decode(np.stack([p[1] for p in pending])),
                                           self._encode_test(), y_test, self.task.num_classes,
                                           [p[2] for p in pending])
            for (trial, _, _, fields), m in zip(pending, scored):
                if trial == sel:
                    m.update(self._answers(delta, "test"))
                evals.append(dict(trial_number=trial, split="test", metrics=m, tokens=tokens, **fields))
        store.add_evaluations(sid, evals)
        by = {(e.trial_number, e.split): e.metrics for e in store.evaluations(sid)}
        summary = dict(
            study=self.name, task=self.task.name, model=cfg.model, backend=cfg.backend, optimizer=cfg.optimizer,
            seed=cfg.seed, budget=cfg.budget, calls=loop.calls, tokens=loop.tokens, seconds=round(loop.seconds, 2),
            metric=self.metric, start_train_loss=by[(START, "train")]["loss"], best_train_loss=loop.best_loss,
            selected_trial=sel,
            baseline_dev=by[(None, "dev")][self.metric], baseline_test=by[(None, "test")][self.metric],
            dev=by[(sel, "dev")][self.metric], test=by[(sel, "test")][self.metric],
            prompt_path=str(self._save_prompt(space, z, delta, by[(sel, "dev")], by[(sel, "test")],
                                              loop.dev_best_bias)),
            storage=store.url)
        if isinstance(delta, TextPrompts):
            summary["prompt_text"] = delta.texts[0]
        for key in TEXT_SCORES:         # generation: the answers' scores beside the likelihood
            if key in by[(sel, "test")]:
                summary[f"baseline_test_{key}"] = by[(None, "test")].get(key)
                summary[f"test_{key}"] = by[(sel, "test")][key]
                summary[f"dev_{key}"] = by[(sel, "dev")].get(key)
        if cfg.prompt_position == "auto":       # where the inputs put the prompt (bbpt/tasks/placement.py)
            summary["placement"] = self.task.template.placement
        if cfg.demos_auto:         # what auto chose, and the calls that chose it
            from bbpt.demos_choice import choice_calls, stored_choice

            evals = store.evaluations(sid)
            summary.update(demos=stored_choice(evals), demos_choice_calls=choice_calls(evals))
        summary.update(self._spending(loop))
        if len(self.info.extra.get("endpoints") or ()) > 1:     # a population spread over several servers
            from collections import Counter

            served = Counter(t.metrics.get("endpoint", "") for t in store.trials(sid, with_z=False))
            summary["calls_by_endpoint"] = dict(sorted(served.items()))
        store.update_study(self.name, state="complete", summary=summary)
        return summary

    def _curve_prompts(self, space, done: set) -> list[tuple]:
        """Every prompt that dev had selected at some point of the search and test has not scored, as (trial, z,
        bias, where on the curve), so a report can say what stopping earlier would have given. Scored after the
        search, never read by it or by selection."""
        from bbpt.selection import history

        sid = self.study_id
        # P0's own dev score (keep_start) is on the curve: until a trial beats it, it is the study's choice.
        dev = sorted((e for e in self.storage.evaluations(sid) if e.split == "dev" and e.trial_number is not None),
                     key=lambda e: (e.calls_at, e.id))
        out = []
        for e in history(dev, self.metric, self.config.dev_ties):
            if (e.trial_number, "test") in done:
                continue
            if e.trial_number == START:
                z, bias = space.initial(), e.metrics.get("bias")
            else:
                z, bias = self.trial_z(e.trial_number), self.storage.trial(sid, e.trial_number).metrics.get("bias")
            out.append((e.trial_number, z, bias, dict(
                calls_at=e.calls_at, seconds_at=e.seconds_at,
                note="test curve: the prompt dev had selected by then; reporting only")))
        return out

    def _answers(self, delta, split: str) -> dict:
        """Generation only: BLEU, ROUGE-L (and slot coverage) of the greedy answers of P0 + ``delta`` (None:
        the manual template alone) on a split; {} for classification, or a backend that cannot generate."""
        return answer_metrics(self.backend, delta, self.task, split, self.config.max_new_tokens)

    def _dev_metrics(self, trial: int) -> dict:
        return next(e.metrics for e in self.storage.evaluations(self.study_id)
                    if e.trial_number == trial and e.split == "dev")

    def _encode_test(self):
        if not hasattr(self, "_test"):
            self._test = self._encode(self.task, "test")
        return self._test

    def _spending(self, loop) -> dict:
        """What the whole study cost: every token counted (search, dev checks, final evaluations), the money
        estimate, why it stopped, and the sums of the backend's per-trial accounting (requests, cache hits,
        labels outside the top-k)."""
        cfg, store, sid = self.config, self.storage, self.study_id
        total = loop.tokens + sum(e.tokens for e in store.evaluations(sid))
        out: dict = dict(tokens_total=total, stopped=loop.stopped or "budget")
        if cfg.price_per_1k is not None:
            out["cost"] = round(total / 1000 * cfg.price_per_1k, 6)
        sums: dict[str, float] = {}
        for t in store.trials(sid):
            for k in SUMMED:
                if k in t.metrics:
                    sums[k] = sums.get(k, 0) + t.metrics[k]
        if sums:
            out["search"] = sums
        return out

    def _save_prompt(self, space, z, delta, dev, test, bias) -> Path:
        cfg = self.config
        if isinstance(delta, TextPrompts):
            return self._save_text_prompt(space, z, delta, dev, test, bias)
        delta = delta[0]
        matrix, layers = self._prompt_tensors(delta)
        meta = dict(
            bbpt_version=bbpt.__version__, study=self.name, model=cfg.model, task=self.task.name,
            template=self.task.template.source, label_words=self.task.label_words,
            label_names=self.task.label_names, tokens=cfg.prompt_tokens, width=self.info.hidden_size,
            init=self.init.spec(), prompt_is="P0 + delta" if matrix is not delta else "delta (P0 at the backend)",
            space=cfg.space, projection_seed=cfg.seed, intrinsic_dim=cfg.intrinsic_dim, sigma0=cfg.sigma0,
            alpha=cfg.alpha, embedding="input embeddings, joined where the template's {prompt} is (prefix if absent)",
            z=z.tolist() if cfg.space == "projected" else None, dev=dev, test=test, config=cfg.to_dict(),
            calibration=calibration_meta(bias), kind=self.task.kind, stop=self.task.meta.get("stop"))
        if self.site is not None:       # deep or prefix: what enters below the input layer, and where
            meta.update(self.site.describe())
        return SavedPrompt(np.asarray(matrix, np.float32), meta, layers=layers).save(self.runs_dir / self.name)

    def _prompt_tensors(self, delta):
        """The input-layer matrix to save and, for a deep or prefix prompt, its tensors below the input layer. A
        local backend gives the whole prompt; a remote one's client holds only offsets from the server's P0
        (``prompt_is`` says which), saved as they are: deep offsets, or a prefix's ``prefix_offsets``."""
        if hasattr(self.backend, "prompt_matrix"):
            return (self.backend.prompt_matrix(delta),
                    self.backend.prompt_layers(delta) if self.site is not None else None)
        if self.site is None:
            return delta, None
        if self.site.depth == "deep":
            return delta[0], {"deep": delta[1:]}
        return np.zeros((self.config.prompt_tokens, self.info.hidden_size), np.float32), {"prefix_offsets": delta}

    def _save_text_prompt(self, space, z, prompt: TextPrompts, dev, test, bias) -> Path:
        cfg = self.config
        meta = dict(
            bbpt_version=bbpt.__version__, study=self.name, model=cfg.model, backend=cfg.backend, task=self.task.name,
            template=self.task.template.source, label_words=self.task.label_words,
            label_names=self.task.label_names, prompt_text=prompt.texts[0],
            token_ids=list(prompt.ids[0]) if prompt.ids else None, tokens=cfg.prompt_tokens,
            placement="where the template's {prompt} is, else first on a line of its own (chat: the system message)",
            init=self.init.spec(), space=cfg.space, projection_seed=cfg.seed, intrinsic_dim=cfg.intrinsic_dim,
            sigma0=cfg.sigma0, alpha=cfg.alpha, z=z.tolist(), **space.describe(), dev=dev, test=test,
            config=cfg.to_dict(), calibration=calibration_meta(bias))
        return SavedPrompt(None, meta, text=prompt.texts[0]).save(self.runs_dir / self.name)
