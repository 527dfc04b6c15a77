"""What each ``bbpt`` subcommand does; the parser lives in :mod:`bbpt.cli`."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys

import numpy as np

from bbpt.config import StudyConfig, resolve_recipe
from bbpt.errors import ConfigError, StudyError

log = logging.getLogger(__name__)

CONFIG_FLAGS = [f for f in StudyConfig.__dataclass_fields__ if f != "version"]


def _config_from_args(args) -> StudyConfig:
    # A flag left at None keeps the config's default (every None-default field stays None either way).
    values = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k, None) is not None}
    if args.data:
        values["task"] = None
    elif not args.task:
        values["task"] = "sst2"
    return resolve_recipe(StudyConfig(**values))


def cmd_optimize(args) -> int:
    from bbpt.session import Session
    from bbpt.storage import Storage
    from bbpt.study import run

    cfg = _config_from_args(args)
    if args.queue:
        return _queue_optimize(cfg, args)
    storage = Storage(args.storage)
    try:
        sess = Session(cfg, storage, name=args.study, runs_dir=args.runs_dir, api_key=args.api_key)
    except BaseException:
        # A refused run leaves nothing behind: not even the empty database file its storage just created.
        if storage.new_file and not storage.list_studies():
            storage.engine.dispose()
            for suffix in ("", "-wal", "-shm", "-journal"):
                storage.file.with_name(storage.file.name + suffix).unlink(missing_ok=True)
        raise
    print(f"study {sess.name} in {storage.url}", file=sys.stderr)
    summary = run(sess, progress=not args.no_progress)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0


def _queue_optimize(cfg, args) -> int:
    """`optimize --queue`: the study's config in the work table, for a `bbpt worker` to run."""
    import uuid

    from bbpt.session import check_flags
    from bbpt.storage import Storage
    from bbpt.storage.work import SpecSource, Work

    check_flags(cfg)
    name = args.study or f"{cfg.task or 'data'}-{cfg.optimizer.replace(':', '-')}-{uuid.uuid4().hex[:6]}"
    storage = Storage(args.storage)
    row = storage.get_study(name)
    if row is not None and row.state == "complete" and row.config.get("budget") == cfg.budget:
        raise StudyError(f"study {name!r} in {storage.url} is complete; pick a new --study name, or raise --budget "
                         "to extend it")
    added = Work(storage).enqueue([name], SpecSource("optimize", "", ""),
                                  config={"study": cfg.to_dict(), "runs_dir": args.runs_dir})
    what = f"queued study {name}" if added else f"study {name} was already queued"
    print(f"{what} in {storage.url}; run it with: bbpt worker --storage {storage.url}")
    return 0


def format_summary(s: dict) -> str:
    m = s["metric"]
    lines = [
        f"study {s['study']}: {s['optimizer']} on {s['task']} with {s['model']} (seed {s['seed']})",
        f"  {'':22}{'dev ' + m:>14}{'test ' + m:>14}",
        f"  {'manual prompt':22}{s['baseline_dev']:>14.4f}{s['baseline_test']:>14.4f}",
        f"  {'tuned prompt':22}{s['dev']:>14.4f}{s['test']:>14.4f}",
        f"  calls {s['calls']}/{s['budget']}, tokens {s['tokens']:,}, {s['seconds']:.1f} s scoring "
        f"({s['seconds'] / max(s['calls'], 1):.2f} s/call)",
        f"  train loss {s['start_train_loss']:.4f} (initial prompt) -> {s['best_train_loss']:.4f} (best)",
        f"  prompt saved to {s['prompt_path']}",
    ]
    if s.get("prompt_text") is not None:
        lines.append(f"  prompt text: {s['prompt_text']!r}")
    for key, label in (("slot_coverage", "slot coverage"), ("rouge_l", "ROUGE-L"), ("bleu", "BLEU")):
        if f"test_{key}" in s:
            lines.insert(4, f"  {'answers: ' + label:22}{'':>14}{s['test_' + key]:>14.2f}"
                            f"   (manual prompt {s['baseline_test_' + key]:.2f})")
    if s.get("search"):         # a text API's bill: what was sent, what the cache saved, labels outside the top-k
        spent = ", ".join(f"{k.replace('_', ' ')} {v:,.0f}" for k, v in s["search"].items())
        lines.append(f"  search: {spent}; {s['tokens_total']:,} tokens in all"
                     + (f", cost {s['cost']:.4f}" if "cost" in s else ""))
    if s.get("stopped", "budget") != "budget":
        lines.append(f"  stopped early: {s['stopped']}")
    return "\n".join(lines)


# How a discrete prompt is scored: as it was tuned, unless these flags say otherwise.
TEXT_BACKEND_KEYS = ("backend", "endpoint", "model", "chat", "logprobs", "top_logprobs", "device")


def _saved_task_and_backend(args):
    from adapters.hf import HFBackend
    from bbpt.prompt import SavedPrompt, TextPrompts
    from bbpt.session import open_backend
    from bbpt.tasks import Template

    saved = SavedPrompt.load(args.prompt)
    meta = saved.meta
    tuned = StudyConfig.from_dict(meta["config"])
    cfg = tuned
    override = getattr(args, "task", None) or getattr(args, "data", None)
    if override:
        cfg = _config_from_args(args)
        if not cfg.template:    # the prompt sits where it was tuned (the saved template places it, or it leads)
            cfg.template, cfg.prompt_position = meta["template"], Template(meta["template"]).placement
        cfg.labels = cfg.labels or meta["label_words"]
    if saved.text is not None:      # a discrete prompt: text, scored by any backend that takes text
        for k in TEXT_BACKEND_KEYS:
            given = getattr(args, k, None)
            setattr(cfg, k, given if given is not None else getattr(tuned, k))
        return TextPrompts((saved.text,)), cfg, open_backend(cfg, api_key=getattr(args, "api_key", None))
    if getattr(args, "backend", None) not in (None, "local"):
        raise ConfigError(f"{args.prompt} holds a soft prompt (embeddings), which --backend {args.backend} cannot "
                          "take; soft prompts are scored locally (leave out --backend)")
    backend = HFBackend(meta["model"], device=args.device)
    if tuple(saved.prompt.shape) != (meta["tokens"], backend.info().hidden_size):
        raise ConfigError(f"prompt in {args.prompt} has shape {saved.prompt.shape} but model {meta['model']} "
                          f"has width {backend.info().hidden_size}; use the model it was tuned for")
    init, delta = saved.scoring_init()       # P0 rebuilt for a prompt tuned remotely, else zeros
    backend.set_init(init)
    return delta[None], cfg, backend


def cmd_eval(args) -> int:
    from bbpt.scoring import answer_metrics, evaluate
    from bbpt.session import load_task_for

    from bbpt.prompt import SavedPrompt

    prompt, cfg, backend = _saved_task_and_backend(args)
    bias = SavedPrompt.load(args.prompt).bias
    task = load_task_for(cfg)
    if bias is not None and len(bias) != task.num_classes:
        raise ConfigError(f"{args.prompt} is calibrated for {len(bias)} labels but task {task.name!r} has "
                          f"{task.num_classes}; score it on a task with the labels it was tuned for")
    examples = task.split(args.split)
    batch = backend.encode(examples, task.template, task.label_words)
    try:
        m, tokens, secs = evaluate(backend, prompt, batch, [e.label for e in examples], task.num_classes, bias)
        m.update(answer_metrics(backend, prompt, task, args.split, cfg.max_new_tokens))
    finally:
        backend.close()
    out = dict(prompt=args.prompt, task=task.name, split=args.split, examples=len(examples), **m,
               tokens=tokens, seconds=round(secs, 2), backend=cfg.backend)
    if args.json:
        print(json.dumps(out))
    elif task.kind == "generation":
        slots = f", slot coverage {m['slot_coverage']:.1f}" if "slot_coverage" in m else ""
        print(f"{task.name} {args.split} ({len(examples)} examples): BLEU {m['bleu']:.2f}, ROUGE-L "
              f"{m['rouge_l']:.2f}{slots}, NLL {m['nll']:.4f} per target token [{m['bleu_signature']}]")
    else:
        print(f"{task.name} {args.split} ({len(examples)} examples): accuracy {m['accuracy']:.4f}, "
              f"macro-F1 {m['f1']:.4f}, loss {m['loss']:.4f} [{secs:.1f} s]")
    return 0


def cmd_generate(args) -> int:
    from bbpt.prompt import SavedPrompt
    from bbpt.tasks import Example, Template

    saved = SavedPrompt.load(args.prompt)
    if saved.meta.get("kind") != "generation":
        raise ConfigError(f"{args.prompt} was tuned for classification ({saved.meta.get('task')}); use "
                          f"`bbpt predict --prompt {args.prompt} TEXT`, or tune one on a generation task "
                          "(--task e2e, or --data with prompt/completion rows)")
    prompt, cfg, backend = _saved_task_and_backend(args)
    stop = args.stop if args.stop is not None else saved.meta.get("stop")
    try:
        answers = backend.generate(prompt[0], [Example(t) for t in args.texts], Template(saved.meta["template"]),
                                   max_new_tokens=args.max_new_tokens, stop=stop)
    finally:
        backend.close()
    for text, answer in zip(args.texts, answers):
        print(json.dumps({"input": text, "output": answer.strip()}) if args.json else answer.strip())
    return 0


def cmd_predict(args) -> int:
    from bbpt.prompt import SavedPrompt
    from bbpt.tasks import Example, Template

    saved = SavedPrompt.load(args.prompt)
    if saved.meta.get("kind") == "generation":
        raise ConfigError(f"{args.prompt} was tuned for generation ({saved.meta.get('task')}); answer with "
                          f"`bbpt generate --prompt {args.prompt} TEXT`")
    prompt, cfg, backend = _saved_task_and_backend(args)
    meta, bias = saved.meta, saved.bias
    template = Template(meta["template"])
    examples = []
    for t in args.texts:
        first, sep, second = t.partition("|||")
        examples.append(Example(first.strip() if sep else t, 0, second.strip() if sep else None))
    try:
        res = backend.score(prompt, backend.encode(examples, template, meta["label_words"]))
    finally:
        backend.close()
    lp = res.logprobs[0] + (0.0 if bias is None else bias)        # the prompt's calibration, as in eval
    probs = np.exp(lp - np.logaddexp.reduce(lp, axis=-1, keepdims=True))
    answered = res.predicted[0] if res.predicted is not None else probs.argmax(-1)
    for text, p, a in zip(args.texts, probs, answered):
        label = meta["label_names"][int(a)] if a >= 0 else "(no label in the answer)"
        if args.json:
            print(json.dumps({"text": text, "label": label,
                              "probs": dict(zip(meta["label_names"], map(float, p)))}))
        else:
            print(f"{label}\t{p.max():.3f}\t{text}")
    return 0


def cmd_studies(args) -> int:
    from bbpt.storage import Storage

    storage = Storage(args.storage, create=False)
    if args.action == "list":
        rows = storage.list_studies()
        from bbpt.storage.work import Work, holder

        work = Work(storage).rows()
        print(f"{'name':32} {'task':8} {'optimizer':18} {'state':9} {'calls':>11} {'dev':>7} {'test':>7}")
        for r in rows:
            s, c = r.summary or {}, r.config
            ck = storage.last_checkpoint(r.id)
            calls = ck.loop_state["calls"] if ck else 0
            dev = f"{s['dev']:.4f}" if "dev" in s else "-"
            test = f"{s['test']:.4f}" if "test" in s else "-"
            held = holder(work.get(r.name)) if r.state != "complete" else None
            print(f"{r.name:32} {str(c.get('task') or c.get('data')):8} {c['optimizer']:18} {r.state:9} "
                  f"{calls:>5}/{c['budget']:<5} {dev:>7} {test:>7}" + (f"  held by {held}" if held else ""))
        return 0
    if args.action == "compact":
        path = storage.file
        before = path.stat().st_size if path else None
        n, k = storage.compact()
        size = f": {before / 2**20:.1f} MB -> {path.stat().st_size / 2**20:.1f} MB" if path else ""
        print(f"dropped the optimizer state of {n} complete studies and the parameters of {k} trials neither "
              f"selected nor scored on dev{size}; they can be reported, exported and evaluated, not extended")
        return 0
    if args.action == "reselect":
        from bbpt.replay import replay_dev_shots

        got = replay_dev_shots(storage, args.name, args.dev_shots)
        if args.json:
            print(json.dumps(got))
            return 0
        (small, big), m = got["dev_shots"], got["metric"]
        fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"
        print(f"{got['study']}: {got['prompts']} prompts scored on dev; {m} in %")
        print(f"  kept with {small} dev shots per class: trial {got['stored']['trial']}, dev "
              f"{fmt(got['stored']['dev'])}, test {fmt(got['stored']['test'])}")
        print(f"  kept with {big} ({got['dev_examples']} dev examples): trial {got['replayed']['trial']}, dev "
              f"{fmt(got['replayed']['dev'])} ({fmt(got['replayed']['dev_small'])} on the first {small}), test "
              f"{fmt(got['replayed']['test'])}")
        return 0
    row = storage.require_study(args.name)
    if args.action == "delete":
        storage.delete_study(args.name)
        print(f"deleted study {args.name}")
        return 0
    ck = storage.last_checkpoint(row.id)
    best = _best_prompt_text(storage, row, ck)
    if args.text:
        if best is None:
            raise ConfigError(f"study {row.name!r} tunes a soft prompt (embeddings), which has no text; export it "
                              "with `bbpt export`")
        print(best)
        return 0
    shown = dict(name=row.name, state=row.state)
    if best is not None:            # a discrete prompt, ready to paste into any API
        shown["best_prompt"] = best
    shown.update(bbpt_version=row.bbpt_version, model=row.model, created=str(row.created),
                 progress=ck.loop_state if ck else None, summary=row.summary, config=row.config)
    print(json.dumps(shown, indent=2))
    return 0


def _best_prompt_text(storage, row, ck) -> str | None:
    """A discrete study's best prompt: the one selected on dev once complete, the best on train so far before."""
    if (row.summary or {}).get("prompt_text") is not None:
        return row.summary["prompt_text"]
    best = ck.loop_state.get("best_trial") if ck else None
    trial = storage.trial(row.id, best) if best is not None else None
    return trial.metrics.get("prompt") if trial else None


def cmd_trials(args) -> int:
    from bbpt.storage import Storage

    storage = Storage(args.storage, create=False)
    row = storage.require_study(args.name)
    fields = ["number", "generation", "loss", "accuracy", "calls", "tokens", "seconds", "backward_seconds", "state"]
    trials = storage.trials(row.id)
    text = any("prompt" in t.metrics for t in trials)      # discrete studies: each trial's prompt, last
    fields += ["prompt"] if text else []
    w = csv.writer(sys.stdout) if args.csv else None
    if w:
        w.writerow(fields)
    else:
        print(" ".join(f"{f:>12}" for f in fields))
    for t in trials:
        vals = [t.number, t.generation, round(t.loss, 6), t.metrics.get("accuracy"), t.calls, t.tokens,
                round(t.seconds, 4), round(t.backward_seconds, 4), t.state]
        vals += [t.metrics.get("prompt", "")] if text else []
        if w:
            w.writerow(vals)
        else:
            print(" ".join(f"{str(v):>12}" for v in vals))
    return 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from bbpt.report import format_table, gather, plot
    from bbpt.storage import Storage

    if args.target is not None and not 0 < args.target <= 1:
        raise ConfigError(f"--target {args.target} is not an accuracy; give a number in (0, 1], e.g. 0.8")
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise ConfigError(f"--plot {args.plot!r}: folder {str(Path(args.plot).parent)!r} does not exist")
    storage = Storage(args.storage, create=False)
    reports = [gather(storage, name) for name in args.names]
    print(format_table(reports, args.target))
    if args.plot:
        print(f"plot written to {plot(reports, args.plot, args.target)}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from bbpt.export import study_prompt, to_peft
    from bbpt.storage import Storage

    saved = study_prompt(Storage(args.storage, create=False), args.name, args.runs_dir)
    out = to_peft(saved, args.out) if args.format == "peft" else saved.save(args.out)
    print(f"exported study {args.name} as {args.format} to {out}")
    return 0


def cmd_import_peft(args) -> int:
    from bbpt.export import from_peft

    out = from_peft(args.dir, args.out, _config_from_args(args) if args.task or args.data else None)
    print(f"imported {args.dir} to {out}; score it with: bbpt eval --prompt {out}")
    return 0


def cmd_study(args) -> int:
    from bbpt.studyspec import load_spec

    spec = load_spec(args.spec)         # validated before anything is opened or written
    if args.action == "report":
        from bbpt.studyspec import write_report

        out = write_report(spec, storage_url=args.storage, out=args.out, spec_arg=args.spec)
        print(f"report written to {out}")
        return 0
    url = spec.storage_url(args.storage)
    spec = spec.only(args.arms, args.seeds, args.tasks)
    if args.action == "queue":
        from bbpt.studyspec.runner import queue_spec

        added, done = queue_spec(spec, args.storage)
        print(f"queued {added} studies of {spec.name} in {url} ({done} already complete, "
              f"{len(spec.plan) - done - added} already queued); run them with: bbpt worker --storage {url}")
        return 0
    if args.dry_run:
        return _study_plan(spec, url)
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: give at least 1")
    if args.workers > 1:
        return _study_workers(args, url)
    from bbpt.studyspec import run_spec

    print(f"study spec {spec.name}: {len(spec.plan)} studies in {url}", file=sys.stderr)
    failed = run_spec(spec, storage_url=args.storage, progress=not args.no_progress)
    if failed:
        print(f"{len(failed)} studies failed: {', '.join(failed)}; the log above says why. Rerunning resumes "
              "them from their last stored generation.", file=sys.stderr)
        return 1
    print(f"all {len(spec.plan)} studies of {spec.name} are complete; next: bbpt study report {args.spec}"
          + (f" --storage {args.storage}" if args.storage else ""))
    return 0


def _study_workers(args, url: str) -> int:
    """`study run --workers K`: K `study run` processes on this host, sharing the cores; they coordinate
    through the storage exactly as processes on different machines do."""
    import signal
    import subprocess

    threads = max(1, (os.cpu_count() or 1) // args.workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    argv = [sys.executable, "-m", "bbpt.cli", "study", "run", args.spec, "--storage", url, "--no-progress"]
    for flag, values in (("--arms", args.arms), ("--seeds", args.seeds), ("--tasks", args.tasks)):
        if values:
            argv += [flag, ",".join(map(str, values))]
    print(f"{args.workers} workers on {url}, {threads} thread(s) each", file=sys.stderr)
    procs = [subprocess.Popen(argv, env=env) for _ in range(args.workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:       # hand every study back: each worker releases its lease on SIGTERM
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        raise
    return max(codes)


def cmd_worker(args) -> int:
    from bbpt.studyspec.runner import run_worker

    failed = run_worker(args.storage, progress=not args.no_progress, until_empty=args.until_empty)
    if failed:
        print(f"{len(failed)} studies failed: {', '.join(failed)}; the log above says why", file=sys.stderr)
        return 1
    return 0


def cmd_storage(args) -> int:
    from bbpt.storage import Storage

    storage = Storage(args.storage, create=False)
    before, after = storage.upgrade()
    print(f"{storage.url}: schema revision {before} -> {after}" if before != after
          else f"{storage.url}: already at revision {after}, nothing to do")
    return 0


def _study_plan(spec, url: str) -> int:
    from bbpt.errors import StorageError
    from bbpt.storage import Storage
    from bbpt.studyspec import status, time_left
    from bbpt.studyspec.runner import Status, duration

    from bbpt.storage.work import Work, holder

    try:
        storage = Storage(url, create=False)
        states, work = status(spec, storage), Work(storage).rows()
    except StorageError:     # nothing stored yet: every study is new
        states, work = [Status(p, "new", 0, []) for p in spec.plan], {}
    left = time_left(states)
    w = max(len(p.name) for p in spec.plan)
    print(f"{'study':{w}} {'state':9} {'calls':>11} {'time':>8}")
    for s, t in zip(states, left):
        p = s.study
        budget = p.config.budget if p.arm.tuned else 0
        took = duration(s.seconds) if s.seconds is not None else f"~{duration(t)}" if t else "?"
        note = f"  stored settings differ: {', '.join(s.stale)}" if s.stale and s.state != "new" else ""
        held = holder(work.get(p.name))
        note += f"  held by {held}" if held and s.state != "complete" else ""
        print(f"{p.name:{w}} {s.state:9} {s.calls:>5}/{budget:<5} {took:>8}{note}")
    done = [s.seconds for s in states if s.seconds is not None]
    todo = [t for s, t in zip(states, left) if s.state != "complete"]
    known = [t for t in todo if t is not None]
    print(f"done: {len(done)} studies, {duration(sum(done))} measured; left: {len(todo)} studies"
          + (f", about {duration(sum(known))} by the median time of complete studies of the same task and arm"
             if known else "")
          + (f" ({len(todo) - len(known)} with none complete to go by)" if len(known) < len(todo) else ""))
    return 0


def cmd_optimizers(args) -> int:
    from bbpt.optimizers import BUILTIN
    from bbpt.optimizers.nevergrad_opt import registry_names

    print("\n".join(BUILTIN))
    for n in registry_names():
        print(f"nevergrad:{n}")
    return 0


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ConfigError(f"bbpt serve needs the server extra ({e.name} is missing): pip install 'bbpt[serve]'") from None

    from adapters.hf import HFBackend
    from bbpt.server.app import create_app
    from bbpt.server.protocol import Limits

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", args.host)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_candidates=args.max_candidates,
                    max_examples=args.max_examples, max_logprobs=args.max_logprobs)
    backend = HFBackend(args.model, device=args.device, dtype=args.dtype)
    app = create_app(backend, api_key=args.api_key, prompts_dir=args.prompts, limits=limits)
    uvicorn.run(app, host=args.host, port=args.port, limit_concurrency=args.max_connections,
                log_level="warning" if args.quiet else "info")
    return 0


def cmd_dashboard(args) -> int:
    try:
        import fastapi  # noqa: F401
        import plotly  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ConfigError(f"bbpt dashboard needs the ui extra ({e.name} is missing): pip install -e \".[ui]\"") from None
    from bbpt.dashboard.app import create_app

    spec = None
    if args.spec:
        from bbpt.studyspec.spec import load_spec

        spec = load_spec(args.spec)
    url = spec.storage_url(args.storage) if spec else args.storage
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("dashboard on %s: anyone who can reach this port can read every study in the storage", args.host)
    app = create_app(url, spec=spec, runs_dir=args.runs, api_key=args.api_key, max_spec_bytes=args.max_spec_kb * 1024)
    print(f"bbpt dashboard of {url or 'the default storage'}: http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def cmd_inspect(args) -> int:
    from bbpt.prompt import SavedPrompt
    from bbpt.promptcard import Vocabulary, card, format_card, score_hard_prompt

    saved = SavedPrompt.load(args.prompt)
    c = card(saved, None if saved.text is not None else Vocabulary.load(saved.meta["model"]))
    if args.score_hard:
        if c["kind"] != "soft":
            raise ConfigError(f"{args.prompt} is a discrete prompt: it is its own hard prompt (drop --score-hard)")
        c["hard_prompt_dev"] = score_hard_prompt(args.prompt, c, device=args.device)
    print(json.dumps(c, indent=2) if args.json else format_card(c))
    return 0
