"""Generation tasks: inputs with reference answers, from the built-in E2E data or a user's JSONL file.

Two file formats, the ones users already have for fine-tuning:

- ``{"prompt": "...", "completion": "..."}`` per line (the input goes through ``--template``, ``{text}`` by
  default; the completion is the target);
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line (OpenAI's chat format): the last turn must be
  the assistant's and is the target; the turns before it are the input, rendered with the model's chat template
  where it has one.

The few-shot knob is the number of training examples (``shots``); dev is drawn apart, the same size unless
``dev_shots`` says otherwise, and test is what is left (or ``test_data``).
"""

from __future__ import annotations

import csv
import gzip
import io
import random
from collections import OrderedDict
from importlib import resources
from pathlib import Path

from bbpt.errors import ConfigError, DataError
from bbpt.tasks._base import Example, Task, Template
from bbpt.tasks.loaders import _rows

ROLES = ("system", "user", "assistant", "tool", "developer")

E2E_TEMPLATE = "Restaurant data: {text}\nDescription:"
E2E_INIT = "Describe the restaurant in one fluent sentence that mentions every item of its data."
# A target follows the answer cue's colon, so it starts with a space (as label words do).
TARGET_LEAD = " "


def is_generation_file(path: str | Path) -> bool:
    """Whether a data file holds generation rows (``completion`` or ``messages``) rather than labelled ones."""
    for _, row in _rows(Path(path)):
        return "messages" in row or "completion" in row
    return False


def read_generation(path: str | Path) -> list[Example]:
    """Read ``{"prompt", "completion"}`` or ``{"messages": [...]}`` rows; every fault names its line and fix."""
    path = Path(path)
    out = []
    for line, row in _rows(path):
        where = f"{path}:{line}"
        if "messages" in row:
            out.append(_chat_example(row["messages"], where))
        elif "completion" in row:
            if "prompt" not in row:
                raise DataError(f"{where} has a completion but no \"prompt\" field; give each row "
                                '{"prompt": "...", "completion": "..."}')
            target = row["completion"]
            if not isinstance(target, str) or not target.strip():
                raise DataError(f"{where} has an empty completion ({target!r}); every row needs the answer the "
                                "prompt should teach, or drop the row")
            out.append(Example(text=str(row["prompt"]), targets=(target,)))
        else:
            raise DataError(f"{where} has neither \"completion\" nor \"messages\" (fields: {sorted(row)}); a "
                            'generation row is {"prompt": "...", "completion": "..."} or {"messages": [...]} '
                            "ending with the assistant's answer")
    if not out:
        raise DataError(f"data file {str(path)!r} has no examples; it needs one example per line")
    return out


def _chat_example(messages, where: str) -> Example:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} is {m!r}; each message needs \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i}'s content is {type(m['content']).__name__}; bbpt reads text "
                            "content only (a string)")
        turns.append((m["role"], m["content"]))
    if not any(r == "assistant" for r, _ in turns):
        raise DataError(f"{where} has no assistant turn (roles: {[r for r, _ in turns]}); the last message must "
                        "be the assistant's answer the prompt should teach")
    if turns[-1][0] != "assistant":
        raise DataError(f"{where} ends with a {turns[-1][0]!r} turn; the last message must be the assistant's "
                        "answer (the target), so drop what follows it")
    if not turns[-1][1].strip():
        raise DataError(f"{where}: the last assistant message is empty; give the answer, or drop the row")
    if len(turns) == 1:
        raise DataError(f"{where} has only the assistant's answer; add the user turn it answers")
    context = tuple(turns[:-1])
    plain = "\n".join(f"{r}: {c}" for r, c in context) + "\nassistant:"
    return Example(text=plain, targets=(turns[-1][1],), chat=context)


def split_examples(pool: list[Example], shots: int, seed: int, dev_shots: int | None):
    """``shots`` training and ``dev_shots`` (default ``shots``) dev examples drawn at random, and the rest."""
    dev_shots = shots if dev_shots is None else dev_shots
    if len(pool) < shots + dev_shots:
        raise ConfigError(f"only {len(pool)} examples, fewer than --shots {shots} + dev {dev_shots}; lower --shots "
                          "or add examples")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    # train first, so a larger dev set leaves the training examples as they were
    train = [pool[i] for i in order[:shots]]
    dev = [pool[i] for i in order[shots:shots + dev_shots]]
    rest = [pool[i] for i in sorted(order[shots + dev_shots:])]
    return train, dev, rest


def load_generation_file(data, test_data, template, shots, seed, max_test, dev_shots) -> Task:
    pool = read_generation(data)
    train, dev, rest = split_examples(pool, shots, seed, dev_shots)
    test = read_generation(test_data) if test_data else rest
    if not test:
        raise ConfigError(f"{data} has no examples left for a test split after --shots {shots}; "
                          "pass --test-data FILE")
    return Task(name=Path(data).stem, label_names=[], label_words=[], template=Template(template or "{text}"),
                train=train, dev=dev, test=test[:max_test] if max_test else test, metric="logprob",
                kind="generation")


def _e2e_rows(name: str):
    """(MR, [references]) in file order, grouped by MR (all references of one MR are consecutive)."""
    raw = (resources.files("bbpt.tasks") / "data" / "e2e" / name).read_bytes()
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for row in csv.DictReader(io.StringIO(gzip.decompress(raw).decode("utf-8"))):
        groups.setdefault(row["mr"], []).append(row["ref"])
    return list(groups.items())


def load_e2e(*, shots: int, seed: int, template: str | None, max_test: int | None, dev_shots: int | None) -> Task:
    """E2E without its train split: training and dev MRs drawn (by MR, never by row) from the official dev set;
    test is the official test set, whose values the dev set never shows, so a prompt must teach the format.

    A training example is one MR with one of its references, drawn by the seed; dev and test keep every
    reference (BLEU is multi-reference) and score NLL on the first.
    """
    rng = random.Random(seed)
    pool = [Example(text=mr, targets=tuple(TARGET_LEAD + r for r in refs)) for mr, refs in _e2e_rows("dev.csv.gz")]
    train, dev, _ = split_examples(pool, shots, seed, dev_shots)
    train = [Example(text=e.text, targets=(rng.choice(e.targets),)) for e in train]
    test = [Example(text=mr, targets=tuple(TARGET_LEAD + r for r in refs)) for mr, refs in _e2e_rows("test.csv.gz")]
    return Task(name="e2e", label_names=[], label_words=[], template=Template(template or E2E_TEMPLATE),
                train=train, dev=dev, test=test[:max_test] if max_test else test, metric="logprob",
                init_text=E2E_INIT, kind="generation", meta={"slots": "e2e", "stop": ["\n"]})
