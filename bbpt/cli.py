"""The ``bbpt`` command line. Only argparse and the standard library load at start, so ``--help`` is instant;
each subcommand imports what it needs."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from bbpt.config import CALIBRATIONS, DEV_TIES, SPACES   # light: dataclasses only, no torch
from bbpt.errors import BbptError

log = logging.getLogger("bbpt")

EPILOG = """examples:
  bbpt optimize --task agnews --budget 300           # black-box, the default: gn, demonstrations if they help
  bbpt optimize --task agnews --max-seconds 600 --budget 2000   # ten minutes of search, whatever calls they buy
  bbpt optimize --task sst2 --optimizer cma --budget 300 --seed 0
  bbpt optimize --task sst2 --optimizer backprop --budget 40
  bbpt optimize --data my.jsonl --template "Review: {text}\\nSentiment:" --labels " negative" " positive"
  bbpt eval --prompt runs/<study> --split test
  bbpt predict --prompt runs/<study> "a gorgeous, witty, seductive movie."
  bbpt optimize --task e2e --optimizer backprop --budget 100
  bbpt generate --prompt runs/<study> "name[The Eagle], eatType[pub], area[riverside]"
  bbpt studies list
  bbpt compare sst2-cma sst2-backprop --target 0.8 --plot compare.png
  bbpt export sst2-cma --format peft --out peft_prompt/
  bbpt study run studies/sst2_gradient_vs_dfo.toml && bbpt study report studies/sst2_gradient_vs_dfo.toml
  bbpt dashboard --spec studies/bbt_suite.toml          # http://127.0.0.1:8080
  bbpt inspect runs/<study>
  bbpt serve --model smollm2-135m --port 8000 --api-key KEY
  bbpt optimize --backend api --endpoint http://127.0.0.1:8000 --api-key KEY --task sst2
  bbpt optimize --backend api --endpoint http://gpu1:8000,http://gpu2:8000 --task sst2   # one population, 2 servers
  bbpt optimize --backend openai --endpoint http://127.0.0.1:8080/v1 --task sst2 --space discrete --budget 200
  bbpt eval --prompt runs/<study> --backend openai --endpoint http://127.0.0.1:8080/v1 --split test
"""


class _Parser(argparse.ArgumentParser):
    """A usage error is the one line that matters and where to read more, as git and cargo print it, not the
    whole usage above it. Subcommand parsers are made of the same class, so each names its own --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\nFor more information, try '{self.prog} --help'.\n")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one worth reading (not None/False) and the help text does not
    already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or "default" in text:
            return text
        return super()._get_help_string(action)


def _add_task_args(p: argparse.ArgumentParser, default_task: str | None = "sst2") -> None:
    g = p.add_argument_group("task (built-in, or your own file)")
    g.add_argument("--task", default=None, help=f"built-in task: sst2, yelp, agnews, dbpedia, mrpc, rte, snli "
                                                f"(classification), e2e (generation: data-to-text) "
                                                f"(default {default_task} unless --data is given)")
    g.add_argument("--data", help="your examples as .jsonl or .csv: labelled rows (with --template and --labels), "
                                  'or generation rows {"prompt", "completion"} or {"messages": [...]}')
    g.add_argument("--test-data", help="a separate test file for --data (default: what few-shot sampling leaves)")
    g.add_argument("--template", help='format string with {text} (and {text_pair}, {prompt}); '
                                      '{prompt} marks where the prompt goes, else it is a prefix')
    g.add_argument("--labels", nargs="+", help='label words, one per class in label-index order, with their '
                                               'leading space: --labels " negative" " positive"')
    g.add_argument("--label-names", nargs="+", help="names used for the labels in --data (default: the words)")
    g.add_argument("--text-field", default="text", help="field holding the input text (default: text)")
    g.add_argument("--text-pair-field", help="field holding the second text of a pair task")
    g.add_argument("--label-field", default="label", help="field holding the label (index or name)")
    g.add_argument("--shots", type=int, default=16, help="examples per class for train, and again for dev "
                                                         "(default 16, BBT's protocol); generation: training "
                                                         "examples, and again for dev")
    g.add_argument("--dev-shots", type=int, help="examples per class for dev, if not --shots: more makes the "
                                                 "choice of prompt less noisy (32 dev examples put 3 points on "
                                                 "each one) for more dev scoring time; train stays the same")
    g.add_argument("--max-test", type=int, help="score only the first N test examples (quick looks)")
    g.add_argument("--seed", type=int, default=0, help="seeds the few-shot split, projection and optimizer")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default, from PyPI, no hub needed), a local directory, or a hub id")
    g.add_argument("--backend", default="local", help="how the model is reached: local (default), api (a bbpt "
                   "serve), vllm (an OpenAI-compatible server taking prompt_embeds; needs --model's files locally), "
                   "openai (any OpenAI-compatible text API with log-probs; tunes discrete prompts: --space discrete "
                   "or vocab)")
    g.add_argument("--endpoint", help="server URL for remote backends, e.g. http://127.0.0.1:8000; for --backend "
                   "api, several comma-separated servers of one model share each population "
                   "(http://gpu1:8000,http://gpu2:8000)")
    g.add_argument("--api-key", default=os.environ.get("BBPT_API_KEY"), help="bearer key for remote backends "
                                                                             "(or BBPT_API_KEY); never stored")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--dtype", default="float32",
                   help="float32 (default), bfloat16 or float16. bfloat16 makes a black-box call 1.4-2.3x cheaper on "
                        "CPUs with bf16 instructions (AVX512-BF16, AMX; bbpt warns where they are "
                        "missing), with label log-probs within ~0.6 of float32's (benchmarks/dtype.py)")
    _add_text_api_args(p)


def _add_text_api_args(p: argparse.ArgumentParser, costs: bool = True) -> None:
    """``costs=False`` (eval): flags not given are None, so a saved prompt's own settings apply."""
    g = p.add_argument_group("text-only APIs (--backend openai)")
    g.add_argument("--chat", action="store_const", const=True, default=False if costs else None,
                   help="use /v1/chat/completions (the prompt becomes the system message unless the template "
                        "places it with {prompt}); default /v1/completions")
    g.add_argument("--no-logprobs", dest="logprobs", action="store_const", const=False,
                   default=True if costs else None,
                   help="for APIs without log-probs: fitness is the accuracy of the generated answers, parsed "
                        "strictly (an answer must begin with a label word)")
    g.add_argument("--top-logprobs", type=int, help="top-k log-probs to ask for (default: the largest the server "
                   "accepts, tried from 20 down); labels outside the top-k get a floor, counted per trial")
    if costs:
        g.add_argument("--price-per-1k", type=float, help="money per 1,000 tokens (prompt + completion): trials "
                       "and the summary then carry a cost estimate")
        g.add_argument("--max-tokens-total", type=int, help="stop the search before a generation would take the "
                       "tokens spent past this (estimated from the costliest generation so far)")


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=None,
                   help="SQLAlchemy URL of the study database (default: $BBPT_STORAGE or sqlite:///bbpt.db)")


STUDY_DESCRIPTION = """\
Run a whole comparison declared in a TOML spec (every arm x seed x task, one bbpt study each, all in one
storage), then report it as markdown tables and plots. A spec, annotated:

  name = "sst2_demo"        # default: the file name; studies are named <name>/<task>/<arm>/seed<k>
  tasks = ["sst2"]          # built-in tasks: sst2 yelp agnews dbpedia mrpc rte snli
  seeds = [0, 1, 2]         # each seeds the few-shot split, the projection and the optimizer
  shots = 16                # any `bbpt optimize` setting, spelled as a key (intrinsic_dim, not
  prompt_tokens = 10        # --intrinsic-dim), is a default for every arm
  budget = 300              # calls
  # storage = "sqlite:///my.db"   default: results/<name>.db in the spec's folder

  # [task_settings.dbpedia] # settings for one task's studies only, e.g. fewer shots
  # shots = 4               # where 14 classes make a call cost 14 x shots examples

  [[arms]]
  name = "manual"
  optimizer = "manual"      # the task's manual prompt, no tuning: the bar to clear
  [[arms]]
  name = "icl"
  optimizer = "icl"         # solved train examples in the prompt text, no tuning
  demos_per_class = 1
  [[arms]]
  name = "backprop"
  optimizer = "backprop"
  budget = 40               # an arm overrides any setting
  [[arms]]
  name = "cma"
  optimizer = "cma"         # or random, nevergrad:NGOpt, ... (`bbpt optimizers`)

A misspelt or unknown key is an error that names it. `reference = "ARM"` picks the arm whose mean dev score
the report's "calls to reach" column measures against (default: the first backprop arm).

examples:
  bbpt study run studies/sst2_gradient_vs_dfo.toml --dry-run    # what is done, what is left
  bbpt study run studies/sst2_gradient_vs_dfo.toml              # interrupted? run it again: it resumes
  bbpt study report studies/sst2_gradient_vs_dfo.toml           # studies/results/sst2_gradient_vs_dfo.md
"""


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} should be comma-separated integers, e.g. 0,1") from None


def _demos(text: str) -> int | str:
    if text in ("auto", "auto:train"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} should be a whole number of demonstrations per class, "
                                         "auto or auto:train") from None


def _add_study_parser(sub) -> None:
    p = sub.add_parser("study", help="run a comparison declared in a TOML spec (arms x seeds x tasks), and "
                       "report it", description=STUDY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    ssub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sp = ssub.add_parser("run", help="run every study of the spec: complete ones are skipped, interrupted ones "
                         "resume", description="Run every study the spec declares, in seed-major order (every arm "
                         "of every task gets the first seed before any gets the second), into the spec's storage. Complete "
                         "studies are skipped and interrupted ones resume where their last generation was "
                         "stored, so after an interruption run the same command again. A study whose stored "
                         "settings differ from the spec's stops the run with a message saying what to do.")
    sp.add_argument("spec", metavar="SPEC.toml", help="the study spec, e.g. studies/sst2_gradient_vs_dfo.toml")
    sp.add_argument("--storage", help="SQLAlchemy URL to use instead of the spec's storage")
    sp.add_argument("--dry-run", action="store_true", help="list every study, its state (new, calls done, "
                                                           "complete) and time, with an estimate of the time left "
                                                           "from the complete ones; run nothing")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar (the per-study log lines remain)")
    sp.add_argument("--arms", type=_names, metavar="A,B", help="run only these arms (comma-separated), e.g. the "
                    "two a question needs first; the others stay for a later run into the same storage")
    sp.add_argument("--seeds", type=_ints, metavar="0,1", help="run only these of the spec's seeds")
    sp.add_argument("--tasks", type=_names, metavar="T,U", help="run only these of the spec's tasks")
    sp.add_argument("--workers", type=int, default=1, metavar="K",
                    help="run K worker processes here (each with 1/K of the CPU threads). Any number of `bbpt "
                    "study run` processes, on one host (SQLite) or many (PostgreSQL), may share one storage: each "
                    "claims one study at a time, and takes over a study whose worker died once its lease "
                    "(60 s, $BBPT_LEASE_SECONDS) lapses")
    sp = ssub.add_parser("queue", help="queue the spec's unfinished studies for `bbpt worker`s to run",
                         description="Put every unfinished study of the spec (with the spec's text) in the "
                         "storage's work table; `bbpt worker --storage URL` processes on any machine that reaches "
                         "the database take them, one at a time. The database is the queue: no broker.")
    sp.add_argument("spec", metavar="SPEC.toml", help="the study spec to queue")
    sp.add_argument("--storage", help="SQLAlchemy URL to use instead of the spec's storage (PostgreSQL for "
                                      "workers on several machines)")
    sp.add_argument("--arms", type=_names, metavar="A,B", help="queue only these arms")
    sp.add_argument("--seeds", type=_ints, metavar="0,1", help="queue only these of the spec's seeds")
    sp.add_argument("--tasks", type=_names, metavar="T,U", help="queue only these of the spec's tasks")
    sp = ssub.add_parser("report", help="write the spec's markdown report and plots from its storage",
                         description="Write <spec folder>/results/<name>.md: per task, mean ± std over seeds of "
                         "dev and test score per arm, calls, tokens, seconds and calls to reach the reference "
                         "arm's dev score; and <name>-<task>.png: best-so-far dev score against calls and "
                         "seconds, one band per arm. Only complete studies count. The report is rebuilt from "
                         "storage alone: the same storage gives the same file. A written reading of the results "
                         "goes in results/<name>.reading.md and is included.")
    sp.add_argument("spec", metavar="SPEC.toml", help="the study spec that was run")
    sp.add_argument("--storage", help="SQLAlchemy URL to read instead of the spec's storage")
    sp.add_argument("--out", metavar="FILE.md", help="where to write the markdown (plots go beside it; default: "
                                                     "results/<name>.md in the spec's folder)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bbpt", description="Tune prompts for language models: backprop into a soft prompt when the "
        "weights are local, derivative-free search (CMA-ES, Nevergrad) when only scores come back.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = _DefaultsFormatter

    p = sub.add_parser("optimize", help="tune a prompt on a task and report baseline, dev and test",
                       formatter_class=fmt, description="Tune a soft prompt. Every generation is stored as it "
                       "ends; rerun the same command with the same --study to resume.")
    _add_task_args(p)
    _add_model_args(p)
    g = p.add_argument_group("prompt")
    g.add_argument("--prompt-tokens", type=int, default=10, help="m, the number of virtual tokens")
    g.add_argument("--prompt-position", choices=("auto", "prefix", "infix", "suffix"),
                   help="infix: the prompt follows the input, before the answer cue, so each input is encoded once "
                   "per study and derivative-free calls are ~3x cheaper; suffix: the prompt follows the answer cue "
                   "too, so a call recomputes only the prompt's m tokens (cheapest where the cue is long); prefix: the prompt leads (PEFT's placement, "
                   "needed by export --format peft); auto (default): where the template's {prompt} is; else, for a soft "
                   "prompt searched derivative-free, prefix where the inputs are short enough that leading costs a "
                   "call at most 2.2x the text (SST-2) and infix otherwise; prefix for backprop and text prompts")
    g.add_argument("--depth", choices=("input", "deep", "prefix"), default="input",
                   help="where the prompt enters: input (joined to the input embeddings: prompt tuning); deep (also "
                   "an offset on the hidden states at the prompt's positions before each of --layers, as BBTv2); "
                   "prefix (keys and values of m virtual tokens at each of --layers, as PEFT's prefix tuning, "
                   "started from P0's own). Local models only")
    g.add_argument("--layers", default="all", help="which layers a deep or prefix prompt reaches: all, every:K, "
                   "first:N, last:N, or a list such as 4,8,12")
    g.add_argument("--schedule", choices=("joint", "layerwise"), default="joint",
                   help="a deep or prefix prompt searched by cma: one search over every layer (d split over "
                   "them), or BBTv2's layer-wise turns (one CMA-ES of d per layer; needs popsize x layers calls "
                   "for one sweep)")
    g.add_argument("--init", default="task", help="where P0 starts: task (the task's instruction text), "
                   'labels, vocab (random frequent tokens), zeros, or text:"your words"')
    g.add_argument("--demos", type=_demos, metavar="K|auto", help="write K solved train examples per class before "
                   "every input, as in-context demonstrations, and tune the prompt from there (the icl arm of a study "
                   "spec scores the same text with no prompt). Default: 0, or auto with the default --optimizer on a "
                   "classification task. auto: one per class if they lower the "
                   "starting prompt's loss on the training examples not shown and on dev (four calls before the "
                   "search decide; they helped SST-2, DBpedia and SNLI and hurt Yelp); auto:train: on those "
                   "training examples alone (two calls; config version 3's auto). Longer inputs make calls dearer")
    g.add_argument("--space", choices=SPACES, help="projected: P = P0 + A z "
                   "(default for derivative-free); full: train P itself (default for backprop); discrete: P0 + A z "
                   "snapped to the nearest tokens, sent as text; vocab: each of --prompt-tokens positions picks one "
                   "of --vocab-size words")
    g.add_argument("--intrinsic-dim", type=int, default=500, help="d, the size of z (BBT: 500)")
    g.add_argument("--alpha", type=float, default=0.5, help="scale of the random projection A: std = "
                   "α·std(embeddings)/(√d·σ0); BBT uses 1.0, 0.5 did better on SST-2 at 300 calls (discrete: 1 "
                                                            "replaces about a fifth of the tokens per σ0 step)")
    g.add_argument("--space-model", help="--space discrete: the model whose tokenizer and embedding table the "
                   "prompt is snapped to (default: --model if it is local, else smollm2-135m)")
    g.add_argument("--vocab", help="--space vocab: a file of candidate words, one per line (default: words of "
                   "the training texts ranked by association with the labels)")
    g.add_argument("--vocab-size", type=int, default=50, help="--space vocab: candidate words per position")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", help="gn, cma, backprop, random, or nevergrad:NAME (e.g. nevergrad:NGOpt; "
                   "`bbpt optimizers` lists names). Default: bbpt's black-box recipe, gn (Gauss-Newton on the "
                   "returned label scores) with --demos auto for a soft prompt on a classification task (nearest "
                   "backprop in the BBT suite: README), cma otherwise")
    g.add_argument("--budget", type=int, default=300, help="calls: one forward of one candidate over the "
                                                           "training batch (a backprop step is one call)")
    g.add_argument("--max-seconds", type=float, help="a time budget beside --budget: stop before a generation "
                   "would take the study's seconds (model time on the training set, as its summary counts them) "
                   "past this; dev is then also checked at every tenth of it. E.g. --max-seconds 600 --budget 2000: "
                   "ten minutes, whatever they buy. A study resumed with a larger value goes on")
    g.add_argument("--popsize", type=int, default=20, help="candidates per generation (black-box)")
    g.add_argument("--sigma0", type=float, default=1.0, help="initial step size of the search in z")
    g.add_argument("--lr", type=float, help="backprop learning rate (default 0.01 on P, 0.1 on z)")
    g.add_argument("--diagonal", action="store_true", help="CMA-ES with a diagonal covariance (large d)")
    g.add_argument("--bound", type=float, default=0.0, help="CMA-ES box bound on z (0: none)")
    g.add_argument("--loss", choices=("ce", "hinge"), default="ce", help="training loss over the label words")
    g.add_argument("--calibration", choices=CALIBRATIONS,
                   help="bias (default): each prompt carries one bias per label, fitted on the training scores at no "
                        "cost in calls, so a model that favours one label word is corrected (the manual baseline "
                        "gets the same); none: raw label-word scores (bbpt 0.1 and the committed v1 studies)")
    g.add_argument("--eval-every", type=int, help="calls between dev evaluations (default: budget/10)")
    g.add_argument("--train-batches", type=int, default=1, help="k > 1: score each generation's candidates on "
                   "one of k stratified mini-batches of the training set in turn (calls k times shorter) and its "
                   "best on the whole set (one more call, the loss recorded as the study's best); each trial "
                   "records its examples and tokens")
    g.add_argument("--dev-ties", choices=DEV_TIES,
                   help="which prompt is kept when several reach the best dev score: the earliest (default; the rule "
                        "of the committed studies) or the one with the lowest dev loss (finer than a score that moves "
                        "in steps of one dev example)")
    g.add_argument("--keep-start", action="store_true", default=None,
                   help="score the starting prompt P0 on dev too, as the first kept prompt: a search that finds "
                        "nothing better on dev then returns P0 rather than a worse prompt (costs one dev and one "
                        "train scoring)")
    g.add_argument("--test-curve", action="store_true", default=None,
                   help="after the search, also score test for each prompt that dev selected on the way, so reports "
                        "show test against calls and seconds (what stopping earlier would have given); costs one test "
                        "scoring per change of the selected prompt, and never feeds back into the search or selection")
    g.add_argument("--max-new-tokens", type=int, help="generation tasks: the longest answer generated when the "
                   "selected prompt's answers are scored (BLEU, ROUGE-L) on dev and test (default 80)")
    g = p.add_argument_group("output")
    g.add_argument("--study", help="study name; an existing name resumes it (default: generated, printed)")
    _add_storage_args(g)
    g.add_argument("--runs-dir", default="runs", help="where tuned prompts are saved, one folder per study")
    g.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    g.add_argument("--queue", action="store_true", help="do not run it here: queue it in --storage for a `bbpt "
                   "worker` to run (the settings are checked now; the data and model where the worker runs)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help="score a saved prompt on a split", formatter_class=fmt,
                       description="Score a saved prompt (from `bbpt optimize`) on train, dev or test. The task "
                       "and its few-shot split default to those the prompt was tuned on.")
    p.add_argument("--prompt", required=True, help="a saved prompt directory, e.g. runs/<study>")
    p.add_argument("--split", default="test", choices=("train", "dev", "test"))
    _add_task_args(p, default_task=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    g = p.add_argument_group("where a discrete prompt (prompt.txt) is scored (default: as it was tuned)")
    g.add_argument("--backend", help="local or openai")
    g.add_argument("--endpoint", help="the API's URL, e.g. http://127.0.0.1:8080/v1")
    g.add_argument("--api-key", default=os.environ.get("BBPT_API_KEY"), help="bearer key (or BBPT_API_KEY)")
    g.add_argument("--model", help="the model: a served model id for openai, local files for local")
    _add_text_api_args(p, costs=False)

    p = sub.add_parser("predict", help="classify texts with a saved prompt", formatter_class=fmt)
    p.add_argument("--prompt", required=True, help="a saved prompt directory, e.g. runs/<study>")
    p.add_argument("texts", nargs="+", help="texts to classify (for pair tasks: 'first ||| second')")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print predictions as JSON lines")

    p = sub.add_parser("generate", help="answer inputs with a saved generation prompt (greedy)",
                       formatter_class=fmt, description="Greedy answers from the frozen model with a prompt tuned on "
                       "a generation task, one line per input, in the template it was tuned with.")
    p.add_argument("--prompt", required=True, help="a saved prompt directory, e.g. runs/<study>")
    p.add_argument("texts", nargs="+", help='inputs, e.g. "name[The Eagle], eatType[pub], area[riverside]"')
    p.add_argument("--max-new-tokens", type=int, default=80, help="longest answer, in tokens")
    p.add_argument("--stop", nargs="*", help="stop strings (default: the task's, e.g. a newline for e2e); "
                                             "generation always stops at the end-of-sequence token")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print {input, output} JSON lines")

    p = sub.add_parser("studies", help="list, show or delete stored studies")
    ssub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, helptext in (("list", "one line per study"), ("show", "config, progress and results of one"),
                             ("delete", "remove a study and all its trials"),
                             ("compact", "shrink complete studies to what reports and exports read (drops "
                                         "optimizer state and the parameters of every trial but the selected "
                                         "one and the searched prompts scored on dev): before committing "
                                         "results"),
                             ("reselect", "replay a finished study's selection on a larger dev set "
                                          "(--dev-shots), without re-running its search: the same prompts it "
                                          "scored on dev, its own rule, the new pick scored on test once; "
                                          "prints both picks and writes nothing")):
        sp = ssub.add_parser(action, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        if action in ("show", "delete", "reselect"):
            sp.add_argument("name")
        if action == "reselect":
            sp.add_argument("--dev-shots", type=int, required=True,
                            help="dev examples per class, more than the study used (its dev set is kept and "
                                 "extended; train and test do not change)")
            sp.add_argument("--json", action="store_true", help="print the result as JSON")
        if action == "show":
            sp.add_argument("--text", action="store_true", help="print only the best discrete prompt, as plain "
                                                                "text ready to paste into any API")
        _add_storage_args(sp)

    p = sub.add_parser("trials", help="print the trials of a study")
    p.add_argument("name")
    p.add_argument("--csv", action="store_true", help="CSV on stdout (default: a table)")
    _add_storage_args(p)

    p = sub.add_parser("compare", help="compare studies on the same axes: a table and a plot",
                       description="One row per study: optimizer, calls, tokens, seconds, best train loss, dev "
                       "and test of the prompt selected on dev. A backprop step counts as one call and its "
                       "backward pass shows in seconds, so gradient and black-box runs compare honestly.")
    p.add_argument("names", nargs="+", metavar="STUDY")
    p.add_argument("--target", type=float, help="a dev accuracy: the table adds the calls and seconds each "
                                                "study took to reach it")
    p.add_argument("--plot", metavar="FILE.png", help="write best-so-far train loss and dev accuracy against "
                                                      "calls and against seconds, one line per study")
    _add_storage_args(p)

    p = sub.add_parser("export", help="write a finished study's prompt as a PEFT adapter or a bbpt prompt",
                       formatter_class=fmt)
    p.add_argument("name", metavar="STUDY")
    p.add_argument("--format", choices=("peft", "bbpt"), default="peft",
                   help="peft: adapter_config.json + adapter_model.safetensors for PeftModel.from_pretrained; "
                        "bbpt: the native prompt directory (for bbpt eval/predict)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--runs-dir", default="runs", help="where `bbpt optimize` saved the study's prompt")
    _add_storage_args(p)

    p = sub.add_parser("import-peft", help="convert a PEFT prompt-tuning adapter to a bbpt prompt directory",
                       description="An adapter exported by bbpt carries its task; for any other adapter say what "
                       "it classifies with --task, or --data with --template and --labels.")
    p.add_argument("dir", help="a directory with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--out", required=True, help="the prompt directory to write, e.g. runs/NAME")
    _add_task_args(p, default_task=None)

    sub.add_parser("optimizers", help="list optimizer names, Nevergrad's registry included")

    p = sub.add_parser("dashboard", help="a web view of the studies in a storage, live while they run",
                       formatter_class=fmt, description="Serve a read-only web view of a storage: every study "
                       "(state, calls / budget, best train loss, dev, test), one study's curves against calls, "
                       "seconds or tokens with its paged trial table and its prompt's card, and a comparison of "
                       "studies or of a spec's arms (mean and band over seeds, as `bbpt study report` draws "
                       "them). Pages update by themselves while studies run; the view never writes to or locks "
                       "the storage. Needs the ui extra: pip install -e \".[ui]\"")
    _add_storage_args(p)
    p.add_argument("--spec", metavar="SPEC.toml", help="a study spec: adds its compare pages (one per task), "
                   "and reads its storage unless --storage is given")
    p.add_argument("--runs", metavar="DIR", help="where the studies saved their prompts, for the prompt card "
                   "(default: the spec's runs folder, or the path each study recorded)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; loopback unless you mean otherwise")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument("--api-key", help="also accept specs to queue for `bbpt worker`s (POST /api/queue with "
                   "'Authorization: Bearer KEY', the spec's TOML as the body); without it the view is read-only")
    p.add_argument("--max-spec-kb", type=int, default=256, help="largest spec POST /api/queue accepts (413 above)")

    p = sub.add_parser("inspect", help="describe a saved prompt: nearest tokens, norms, drift, scores",
                       formatter_class=fmt, description="The prompt card of a saved prompt (the folder `bbpt "
                       "optimize` printed): for a soft prompt, each virtual token's nearest vocabulary tokens by "
                       "cosine, its norm against the vocabulary's embedding norms, its drift from P0 (|P - P0| / "
                       "|P0|), and the nearest-token hard prompt; for a discrete prompt, its text; with the dev "
                       "score that selected it and the test score, which selection never read.")
    p.add_argument("prompt", metavar="DIR", help="a saved prompt folder, e.g. runs/<study>")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p.add_argument("--score-hard", action="store_true", help="also score the nearest-token hard prompt on dev "
                   "(one pass over dev: loads the model)")
    p.add_argument("--device", default="auto", help="for --score-hard: cpu, cuda, cuda:N or auto")

    _add_study_parser(sub)

    p = sub.add_parser("worker", help="run studies queued in a storage (bbpt study queue), until stopped",
                       formatter_class=fmt, description="Take queued studies of any spec from the storage, one at "
                       "a time, and run them (resuming any a dead worker left), until stopped with Ctrl-C, which "
                       "hands the current study back at once. Start one per machine (or per GPU) against one "
                       "PostgreSQL database; SQLite serves workers on one host only.",
                       epilog="example:\n  bbpt study queue studies/bbt_suite.toml --storage postgresql+psycopg://u@db/bbpt\n"
                              "  bbpt worker --storage postgresql+psycopg://u@db/bbpt    # on each machine")
    _add_storage_args(p)
    p.add_argument("--until-empty", action="store_true", help="exit once no queued study is left (default: wait "
                                                              "for more)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the per-study log lines remain)")

    p = sub.add_parser("storage", help="upgrade a study database to this bbpt's schema")
    ssub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sp = ssub.add_parser("upgrade", help="migrate the database in place (Alembic); stop its workers first",
                         description="Migrate a study database written by an older bbpt to this one's schema, in "
                         "place (as `optuna storage upgrade` does). Reading an old database needs no upgrade; "
                         "writing to it does. Stop every worker on it first, and keep a copy if it matters.")
    _add_storage_args(sp)

    p = sub.add_parser("serve", help="serve a model over HTTP for --backend api|vllm clients (and tuned prompts)",
                       formatter_class=fmt, description="Serve a model so prompts can be tuned by clients that "
                       "never see its weights: /v1/score (bbpt's protocol), /v1/completions (OpenAI-compatible, "
                       "with vLLM's prompt_embeds), /v1/classify (tuned prompts from --prompts, by name).")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a local directory, or a hub id")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; loopback unless you mean otherwise")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("BBPT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (or set BBPT_API_KEY)")
    p.add_argument("--prompts", help="folder of saved prompts (e.g. runs/) served by /v1/classify by folder name")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body accepted (413 above)")
    p.add_argument("--max-candidates", type=int, default=64, help="prompts per /v1/score request")
    p.add_argument("--max-examples", type=int, default=256, help="examples per /v1/score request")
    p.add_argument("--max-logprobs", type=int, default=20, help="largest top-k for /v1/completions (vLLM's default)")
    p.add_argument("--max-connections", type=int, default=64, help="open connections before answering 503")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from bbpt import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: thousands of lines for a text-API study. Its warnings still show.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from bbpt import commands

    # SIGTERM (kill, a batch scheduler's stop) ends a run as Ctrl-C does: the current study's lease is handed
    # back at once instead of lapsing, and every finished generation is already stored.
    on_main = threading.current_thread() is threading.main_thread()   # (tests call main() from threads too)
    before = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
    try:
        return getattr(commands, "cmd_" + args.command.replace("-", "_"))(args) or 0
    except BbptError as e:
        print(f"bbpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bbpt: interrupted; every finished generation is stored; run the same command to resume",
              file=sys.stderr)
        return 130
    except BrokenPipeError:     # `bbpt trials ... | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())    # so the exit flush cannot fail again
        return 141
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    sys.exit(main())
