"""The study loop: ask, score, tell, persist — one generation at a time, resumable from storage.

Each generation's trials, any dev evaluations and the optimizer checkpoint taken after ``tell`` are written
in one transaction, so killing the process at any instant loses no completed trial and a resumed study asks
exactly what an uninterrupted one would. Selection is on dev only; test is scored once, at the end.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from bbpt.scoring import evaluate, score_population, train_bias
from bbpt.selection import improves
from bbpt.session import START, Session, _with_bias

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Everything besides the optimizer that a resumed loop needs; stored as JSON in each checkpoint."""

    generation: int = 0
    trials: int = 0
    calls: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best_trial: int | None = None
    best_loss: float = float("inf")
    best_bias: list[float] | None = None   # the best trial's label bias, fitted on train (calibration "bias")
    evaluated: list[int] = field(default_factory=list)     # trial numbers already scored on dev
    dev_best_trial: int | None = None
    dev_best: float | None = None        # None until the first dev check (older studies stored -1.0)
    dev_best_loss: float = float("inf")  # the selected prompt's dev loss (the tie-break of --dev-ties loss)
    dev_best_bias: list[float] | None = None
    dev_last: float | None = None
    eval_tokens: int = 0                 # spent on dev checks during the search
    gen_tokens_max: int = 0              # the costliest generation so far: the estimate for the next one
    gen_seconds_max: float = 0.0         # the slowest generation so far: the estimate for the next one
    stopped: str = ""                    # why the search ended: budget, max_tokens_total, max_seconds, optimizer: ...


def run(sess: Session, progress: bool = True) -> dict:
    """Run (or resume) the study until its budget is spent, then select on dev and score test once."""
    cfg, store, sid = sess.config, sess.storage, sess.study_id
    space = sess.space
    opt = sess.optimizer        # built by the session, before its study row was written
    ck = store.last_checkpoint(sid)
    loop = LoopState(**ck.loop_state) if ck else LoopState()
    per_gen = sess.calls_per_generation
    if ck and ck.optimizer_state:
        opt.load_state(ck.optimizer_state)
        log.info("resuming study %s at call %d/%d", sess.name, loop.calls, cfg.budget)
    best_z = sess.trial_z(loop.best_trial) if loop.best_trial is not None else None
    bar = sess.progress_bar(total=cfg.budget, initial=loop.calls, enabled=progress)
    # Stored with the first generation, so a kill before it leaves nothing half-written. What the session scored
    # before the search (--demos auto's two calls) is the study's time and tokens, not its budget's calls.
    start_evals = []
    if ck is None:
        start_evals = list(sess.start_evals) + ([_start_eval(sess, space, loop)] if cfg.keep_start else [])
        loop.seconds += sess.start_seconds
        loop.eval_tokens += sum(e["tokens"] for e in sess.start_evals)
    # Why this run ends, asked afresh each run: a resume with a larger limit goes on where the last one stopped.
    while not opt.stop() and not _stop(cfg, loop, per_gen):
        seconds_before = loop.seconds
        zs = opt.ask()
        part, train, y_train = sess.train_part(loop.generation)
        got = score_population(sess.backend, space, zs, train, y_train, cfg.loss, opt.needs_gradient,
                               cfg.calibration)
        opt.tell(zs, got.losses, got.grads, got.logprobs)
        gen_tokens = got.tokens
        if part is None:
            trials, best_z = _record(loop, cfg, zs, got, best_z)
        else:
            # Mini-batch losses steer the search; the study's best is the generation's best re-scored on the
            # whole training set (one more call), so it compares with whole-set studies.
            trials, _ = _record(loop, cfg, zs, got, best_z, {"batch": part, "examples": train.n}, tracks_best=False)
            i = int(np.argmin(got.losses))
            full = score_population(sess.backend, space, zs[i:i + 1], sess.train, sess.y_train, cfg.loss, False,
                                    cfg.calibration)
            more, best_z = _record(loop, cfg, zs[i:i + 1], full, best_z,
                                   {"rescore_of": trials[i]["number"], "examples": sess.train.n})
            trials += more
            gen_tokens += full.tokens
        loop.calls += len(trials)
        loop.gen_tokens_max = max(loop.gen_tokens_max, gen_tokens)
        loop.gen_seconds_max = max(loop.gen_seconds_max, loop.seconds - seconds_before)
        evals, start_evals = start_evals, []
        due = loop.calls // cfg.eval_every > (loop.calls - len(trials)) // cfg.eval_every
        if cfg.max_seconds:     # also at every tenth of the time budget: the calls it buys are not known ahead
            tenth = cfg.max_seconds / 10
            due = due or loop.seconds // tenth > seconds_before // tenth
        last = bool(limit_reached(cfg, loop, per_gen))
        if (due or last) and loop.best_trial not in loop.evaluated:
            evals.append(_dev_eval(sess, space, loop, best_z))
        loop.generation += 1
        store.commit_generation(sid, trials, dict(generation=loop.generation, optimizer_state=opt.state(),
                                                  loop_state=asdict(loop), best_trial=loop.best_trial), evals)
        bar.update(len(trials))
        # Under --max-seconds the bar's ETA (from --budget's calls) is not when the search ends: show the clock.
        clock = dict(seconds=f"{loop.seconds:.1f}/{cfg.max_seconds:g}") if cfg.max_seconds else {}
        bar.set_postfix(best_loss=f"{loop.best_loss:.4f}",
                        dev=f"{loop.dev_last:.3f}" if loop.dev_last is not None else "-", **clock)
    bar.close()
    loop.stopped = limit_reached(cfg, loop, per_gen)
    if opt.stop() and not loop.stopped:
        loop.stopped = "optimizer: " + ", ".join(sorted(opt.stop()))
    if start_evals:             # no generation ran (a budget under one): P0 is then the only candidate
        store.add_evaluations(sid, start_evals)
    if loop.best_trial is not None and loop.best_trial not in loop.evaluated:  # budget smaller than one step
        store.add_evaluations(sid, [_dev_eval(sess, space, loop, best_z)])
    return sess.finish(space, loop)


def limit_reached(cfg, loop: LoopState, per_gen: int) -> str:
    """Which limit another generation of ``per_gen`` calls would pass ("" if none): --budget's calls, or the
    tokens or seconds it would take, estimated from the costliest and the slowest generation so far."""
    if loop.calls + per_gen > cfg.budget:
        return "budget"
    if cfg.max_tokens_total and loop.tokens + loop.eval_tokens + loop.gen_tokens_max > cfg.max_tokens_total:
        return "max_tokens_total"
    if cfg.max_seconds and loop.seconds + loop.gen_seconds_max > cfg.max_seconds:
        return "max_seconds"
    return ""


def _stop(cfg, loop: LoopState, per_gen: int) -> bool:
    """Whether the search ends before another generation; an early end (not --budget's) is logged."""
    why = limit_reached(cfg, loop, per_gen)
    if why == "max_tokens_total":
        log.warning("stopping at call %d: another generation (up to %d tokens) would take the %d tokens spent "
                    "past --max-tokens-total %d", loop.calls, loop.gen_tokens_max,
                    loop.tokens + loop.eval_tokens, cfg.max_tokens_total)
    elif why == "max_seconds":
        log.info("stopping at call %d: another generation (up to %.1f s) would take the study's %.1f s past "
                 "--max-seconds %g", loop.calls, loop.gen_seconds_max, loop.seconds, cfg.max_seconds)
    return bool(why)


def _record(loop: LoopState, cfg, zs, got, best_z, extra: dict | None = None, tracks_best: bool = True):
    """The trial rows of one scored population (each candidate one call), with the loop's counters and, when
    these losses are on the whole training set (``tracks_best``), its best trial updated. Returns the rows and
    the best z so far."""
    trials = []
    for i, (z, lo) in enumerate(zip(zs, got.losses)):
        metrics = dict(got.metrics[i])
        if got.bytes_sent or got.bytes_received:     # remote backends: each candidate's share of the traffic
            metrics.update(bytes_sent=got.bytes_sent // len(zs), bytes_received=got.bytes_received // len(zs))
        if got.texts is not None:
            metrics["prompt"] = got.texts[i]
        metrics.update(got.per_prompt[i] if got.per_prompt else {})
        metrics.update(extra or {})
        tokens = metrics.pop("tokens", got.tokens // len(zs))
        if cfg.price_per_1k is not None:
            metrics["cost"] = tokens / 1000 * cfg.price_per_1k
        trials.append(dict(number=loop.trials, generation=loop.generation, z=np.asarray(z, "<f4").tobytes(),
                           loss=float(lo), metrics=metrics, calls=1, tokens=tokens,
                           seconds=got.seconds / len(zs), backward_seconds=got.backward_seconds / len(zs),
                           state="complete"))
        if tracks_best and lo < loop.best_loss:
            loop.best_loss, loop.best_trial, loop.best_bias = float(lo), loop.trials, metrics.get("bias")
            best_z = np.asarray(z)
        loop.trials += 1
    loop.tokens += got.tokens
    loop.seconds += got.seconds
    return trials, best_z


def _dev_eval(sess: Session, space, loop: LoopState, z: np.ndarray) -> dict:
    m, tokens, secs = evaluate(sess.backend, space.decode(z[None]), sess.dev, sess.y_dev, sess.task.num_classes,
                               loop.best_bias)
    score = m[sess.metric]
    loop.eval_tokens += tokens
    loop.evaluated.append(loop.best_trial)
    loop.dev_last = score
    if improves(score, m["loss"], loop.dev_best, loop.dev_best_loss, sess.config.dev_ties):
        loop.dev_best, loop.dev_best_loss, loop.dev_best_trial = score, m["loss"], loop.best_trial
        loop.dev_best_bias = loop.best_bias
    return dict(trial_number=loop.best_trial, split="dev", metrics=m, calls_at=loop.calls,
                seconds_at=loop.seconds, tokens=tokens)


def _start_eval(sess: Session, space, loop: LoopState) -> dict:
    """``keep_start``: score P0 on dev, with the bias it fits on train, as the first kept prompt."""
    cfg = sess.config
    p0 = space.decode(space.initial()[None])
    bias, fit_tokens = train_bias(sess.backend, p0, sess.train, sess.y_train, cfg.calibration)
    m, tokens, _ = evaluate(sess.backend, p0, sess.dev, sess.y_dev, sess.task.num_classes, bias)
    loop.eval_tokens += tokens + fit_tokens
    loop.dev_best, loop.dev_best_loss, loop.dev_best_trial = m[sess.metric], m["loss"], START
    loop.dev_last = m[sess.metric]
    m = _with_bias(m, bias)
    loop.dev_best_bias = m.get("bias")
    return dict(trial_number=START, split="dev", metrics=m, calls_at=0, seconds_at=0.0,
                tokens=tokens + fit_tokens, note="starting prompt P0, a candidate of selection (keep_start)")
