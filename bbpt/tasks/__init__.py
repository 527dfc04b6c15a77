"""Tasks: built-in BBT datasets, the E2E generation task, and user data files, split few-shot."""

from __future__ import annotations

from pathlib import Path

from bbpt.errors import ConfigError
from bbpt.tasks._base import Example, Task, Template
from bbpt.tasks.builtin import CLASSIFICATION, load_builtin
from bbpt.tasks.generation import is_generation_file, load_e2e, load_generation_file
from bbpt.tasks.loaders import few_shot_split, read_examples

# Every built-in task by name: the seven BBT classification tasks and the generation task e2e.
BUILTIN = (*CLASSIFICATION, "e2e")

__all__ = ["BUILTIN", "Example", "Task", "Template", "load_task", "task_kind"]


def task_kind(*, task: str | None = None, data: str | None = None, labels=None) -> str:
    """"classification" or "generation", without loading the task: a built-in one's by name, a data file's from
    its first row (rows with ``completion`` or ``messages`` and no --labels are answers to generate)."""
    if data is not None:
        return "generation" if not labels and is_generation_file(data) else "classification"
    return "generation" if task == "e2e" else "classification"


def load_task(*, task: str | None = None, data: str | None = None, test_data: str | None = None,
              template: str | None = None, labels: list[str] | None = None,
              label_names: list[str] | None = None, text_field: str = "text", text_pair_field: str | None = None,
              label_field: str = "label", shots: int = 16, seed: int = 0, max_test: int | None = None,
              prompt_position: str | None = None, dev_shots: int | None = None) -> Task:
    """Load a built-in task by name, or a user's JSONL/CSV file with its template and label words.

    ``prompt_position`` moves the prompt (see :meth:`Template.at`); None keeps the template as written."""
    task = _load_task(task=task, data=data, test_data=test_data, template=template, labels=labels,
                      label_names=label_names, text_field=text_field, text_pair_field=text_pair_field,
                      label_field=label_field, shots=shots, seed=seed, max_test=max_test, dev_shots=dev_shots)
    task.template = task.template.at(prompt_position)
    return task


def _load_task(*, task, data, test_data, template, labels, label_names, text_field, text_pair_field, label_field,
               shots, seed, max_test, dev_shots) -> Task:
    if shots < 1:
        raise ConfigError(f"--shots must be at least 1, got {shots}")
    if dev_shots is not None and dev_shots < 1:
        raise ConfigError(f"--dev-shots must be at least 1, got {dev_shots}")
    if (task is None) == (data is None):
        raise ConfigError("give exactly one of --task NAME or --data FILE")
    if task is not None:
        if task not in BUILTIN:
            raise ConfigError(f"unknown task {task!r}; built-in tasks are {sorted(BUILTIN)}, "
                              "or pass --data FILE with --template and --labels")
        if task == "e2e":
            if labels:
                raise ConfigError("--labels is for classification; e2e is a generation task (no labels)")
            return load_e2e(shots=shots, seed=seed, template=template, max_test=max_test, dev_shots=dev_shots)
        return load_builtin(task, shots=shots, seed=seed, template=template, label_words=labels,
                            max_test=max_test, dev_shots=dev_shots)
    if not labels and is_generation_file(data):
        return load_generation_file(data, test_data, template, shots, seed, max_test, dev_shots)
    if not template or not labels:
        raise ConfigError("--data needs --template (with {text}) and --labels (one word per class, "
                          'e.g. --labels " negative" " positive")')
    tmpl = Template(template)
    names = label_names or [w.strip() for w in labels]
    if len(names) != len(labels):
        raise ConfigError(f"--label-names has {len(names)} names but --labels has {len(labels)} words; "
                          "give one name per label word")
    kw = dict(label_names=names, text_field=text_field, text_pair_field=text_pair_field, label_field=label_field)
    pool = read_examples(data, **kw)
    train, dev, rest = few_shot_split(pool, shots, seed, len(labels), dev_shots)
    test = read_examples(test_data, **kw) if test_data else rest
    if not test:
        raise ConfigError(f"{data} has no examples left for a test split after --shots {shots}; "
                          "pass --test-data FILE")
    return Task(name=Path(data).stem, label_names=names, label_words=list(labels), template=tmpl,
                train=train, dev=dev, test=test[:max_test] if max_test else test)
