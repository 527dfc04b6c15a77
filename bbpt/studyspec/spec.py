"""Study specs: a TOML file that declares a comparison (tasks × seeds × arms), parsed and validated once.

Top-level keys are the spec's own (name, tasks, seeds, storage, runs_dir, reference, arms, task_settings) plus
any :class:`~bbpt.config.StudyConfig` setting, which becomes the default of every arm; an ``[[arms]]`` table
names an optimizer and overrides any of those settings; a ``[task_settings.<task>]`` table overrides them for
one task's studies (e.g. fewer shots where a task has many classes). A key set both by an arm and by a task is
an error: which of the two should win is a question only the spec's author can answer. An arm's own
``[arms.task_settings.<task>]`` table overrides its settings for one task (e.g. a black-box budget sized to each
task's cost); being the most specific, it wins over everything else. An arm (or its per-task table) may give
``max_seconds`` relative to another arm's time on the machine that runs it, ``max_seconds = "2x backprop"``
(see :mod:`bbpt.studyspec.timing`), so "twice backprop's time" holds on whichever host a study lands. Two arms tune
nothing: ``manual`` scores the task's manual prompt, ``icl`` the same prompt after in-context demonstrations
drawn from the train split.

Every (task, seed, arm) becomes one bbpt study named ``<spec>/<task>/<arm>/seed<k>`` whose StudyConfig is
built here, so a typo or an invalid value fails before anything runs or is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from bbpt.config import StudyConfig, resolve_recipe
from bbpt.errors import ConfigError

if typing.TYPE_CHECKING:
    from bbpt.studyspec.timing import RelativeSeconds

BASELINES = ("manual", "icl")
# StudyConfig fields a spec does not set: task and seed come from `tasks` and `seeds`, each arm names its own
# optimizer, and the data-file fields describe user files (specs run built-in tasks, whose templates are fixed).
NOT_IN_SPEC = frozenset({"task", "seed", "version", "optimizer", "data", "test_data", "template", "labels",
                         "label_names", "text_field", "text_pair_field", "label_field"})
SETTINGS = tuple(f.name for f in dataclasses.fields(StudyConfig) if f.name not in NOT_IN_SPEC)
SPEC_KEYS = frozenset({"name", "tasks", "seeds", "storage", "runs_dir", "reference", "arms", "task_settings"})
# Arms that tune nothing only need what decides the examples and how the model is reached.
BASELINE_SETTINGS = frozenset({"shots", "dev_shots", "max_test", "model", "backend", "endpoint", "device", "dtype",
                               "max_new_tokens",
                               "calibration"})
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")   # one path segment: names end up in folders


@dataclass(frozen=True)
class Arm:
    name: str
    optimizer: str                       # an optimizer spec, or "manual" / "icl"
    settings: dict                       # StudyConfig overrides of this arm (as written)
    demos_per_class: int = 1             # icl only
    task_settings: dict = field(default_factory=dict)   # task -> this arm's overrides for that task only
    # max_seconds given as "<factor>x <arm>": the arm's own (key None) and per task; resolved when a study runs
    relative_seconds: dict = field(default_factory=dict)

    def settings_for(self, task: str) -> dict:
        return {**self.settings, **self.task_settings.get(task, {})}

    def relative_seconds_for(self, task: str) -> "RelativeSeconds | None":
        if "max_seconds" in self.task_settings.get(task, {}):     # a number for this task wins over the arm's rule
            return None
        return self.relative_seconds.get(task, self.relative_seconds.get(None))

    @property
    def tuned(self) -> bool:
        return self.optimizer not in BASELINES


@dataclass(frozen=True)
class Planned:
    """One study of the spec. For tuned arms ``config`` is what the study loop runs; for manual/icl it only
    carries the task, split and model settings (its optimizer field is a placeholder, never run)."""

    name: str
    task: str
    arm: Arm
    seed: int
    config: StudyConfig
    relative_seconds: "RelativeSeconds | None" = None   # config.max_seconds is set from it when the study runs


@dataclass
class StudySpec:
    path: Path
    name: str
    tasks: list[str]
    seeds: list[int]
    arms: list[Arm]
    defaults: dict                       # top-level StudyConfig settings, as written
    task_settings: dict = field(default_factory=dict)   # task -> the settings of its [task_settings.<task>]
    storage: str | None = None           # as written; None: results/<name>.db next to the spec
    runs_dir: str = "runs"
    reference: str | None = None         # the arm whose mean dev score the others race to
    sha256: str = ""
    source: str = ""                     # the TOML text: queued work carries it, so any worker can rebuild the plan
    plan: list[Planned] = field(default_factory=list)

    @property
    def results_dir(self) -> Path:
        return self.path.parent / "results"

    def storage_url(self, override: str | None = None) -> str:
        if override:
            return override
        return self.storage or f"sqlite:///{self.results_dir / (self.name + '.db')}"

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def only(self, arms: list[str] | None = None, seeds: list[int] | None = None,
             tasks: list[str] | None = None) -> "StudySpec":
        """The same spec with its plan cut to some arms, seeds and tasks (``bbpt study run --arms/--seeds/--tasks``),
        e.g. to run the arms a question needs first; the rest stays runnable later into the same storage."""
        for a in arms or []:
            if not any(x.name == a for x in self.arms):
                raise ConfigError(f"{self.path}: --arms names {a!r}, which is not an arm of this spec; its arms are "
                                  f"{', '.join(x.name for x in self.arms)}")
        for s in seeds or []:
            if s not in self.seeds:
                raise ConfigError(f"{self.path}: --seeds names {s}, which is not among the spec's seeds "
                                  f"{self.seeds}; add it to seeds = [...] in the spec to run it")
        for t in tasks or []:
            if t not in self.tasks:
                raise ConfigError(f"{self.path}: --tasks names {t!r}, which is not a task of this spec; its tasks are "
                                  f"{', '.join(self.tasks)}")
        plan = [p for p in self.plan if (not arms or p.arm.name in arms) and (not seeds or p.seed in seeds)
                and (not tasks or p.task in tasks)]
        return dataclasses.replace(self, plan=plan)

    @property
    def full_plan(self) -> list[Planned]:
        """Every study of the spec, whatever ``only`` cut (rebuilt on each call: read it once); a relative time
        limit reads the other arms' studies from it."""
        return _plan(self)


def study_name(spec: str, task: str, arm: str, seed: int) -> str:
    return f"{spec}/{task}/{arm}/seed{seed}"


def load_spec(path: str | Path) -> StudySpec:
    """Read, type-check and validate a spec; raises ConfigError naming the file, the key and the fix."""
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read study spec {str(path)!r} ({e.strerror}); pass the path of a .toml spec, "
                          "e.g. studies/sst2_gradient_vs_dfo.toml") from None
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"study spec {str(path)!r} is not UTF-8 text: {e}") from None
    return spec_from_text(text, path)


def spec_from_text(text: str, path: str | Path) -> StudySpec:
    """A spec from its TOML text; ``path`` names it in messages and places its results folder (a worker
    rebuilds a queued spec from the text stored with the work, wherever the file is)."""
    path = Path(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"study spec {str(path)!r} is not valid TOML: {e}") from None
    where = f"{path} (top level)"
    _check_keys(raw, SPEC_KEYS | set(SETTINGS), where)
    name = raw.get("name", path.stem)
    _check_name(name, "name", where)
    tasks = _str_list(raw, "tasks", where)
    from bbpt.tasks import BUILTIN    # the task list is small; load it only once a spec is read

    for t in tasks:
        if t not in BUILTIN:
            raise ConfigError(f"{where}: unknown task {t!r} in tasks; built-in tasks are {sorted(BUILTIN)}")
    seeds = raw.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"{where}: seeds = {seeds!r} should be a list of distinct integers, e.g. seeds = [0, 1, 2]")
    defaults = {k: _typed(k, v, where) for k, v in raw.items() if k in SETTINGS}
    arms = _arms(raw.get("arms"), path, tasks)
    task_settings = _task_settings(raw.get("task_settings", {}), tasks, arms, path)
    spec = StudySpec(path=path, name=name, tasks=tasks, seeds=seeds, arms=arms, defaults=defaults,
                     task_settings=task_settings,
                     storage=_opt_str(raw, "storage", where), runs_dir=_opt_str(raw, "runs_dir", where) or "runs",
                     reference=_reference(raw, arms, where), sha256=hashlib.sha256(text.encode()).hexdigest(),
                     source=text)
    spec.plan = _plan(spec)
    return spec


def _arms(raw_arms, path: Path, tasks: list[str]) -> list[Arm]:
    if not isinstance(raw_arms, list) or not raw_arms or not all(isinstance(a, dict) for a in raw_arms):
        raise ConfigError(f"{path}: no arms; add one [[arms]] table per arm, each with name and optimizer, e.g.\n"
                          '[[arms]]\nname = "cma"\noptimizer = "cma"')
    arms: list[Arm] = []
    for i, a in enumerate(raw_arms):
        where = f"{path} [[arms]] #{i + 1}" + (f" {a['name']!r}" if isinstance(a.get("name"), str) else "")
        for key in ("name", "optimizer"):
            if not isinstance(a.get(key), str):
                raise ConfigError(f"{where}: {key} is missing or not a string; every arm needs "
                                  'name = "..." and optimizer = "auto" (the default recipe) | "cma" | "gn" | "backprop" '
                                  '| "nevergrad:NAME" | "random" | "manual" | "icl"')
        _check_name(a["name"], "name", where)
        if any(b.name == a["name"] for b in arms):
            raise ConfigError(f"{where}: arm name {a['name']!r} is used twice; arm names must be unique")
        opt = a["optimizer"]
        if opt in BASELINES:
            allowed = {"name", "optimizer"} | BASELINE_SETTINGS | ({"demos_per_class"} if opt == "icl" else set())
        else:
            allowed = {"name", "optimizer"} | set(SETTINGS)
        _check_keys(a, allowed | {"task_settings"}, where, note=f" for an arm with optimizer {opt!r}")
        demos = a.get("demos_per_class", 1)
        if isinstance(demos, bool) or not isinstance(demos, int) or demos < 1:
            raise ConfigError(f"{where}: demos_per_class = {demos!r} should be an integer of at least 1")
        relative = {}
        a = _take_relative_seconds(a, None, relative, where)
        raw_tasks = a.get("task_settings", {})
        if isinstance(raw_tasks, dict):
            raw_tasks = {t: _take_relative_seconds(v, t, relative, f"{where} [arms.task_settings.{t}]")
                         for t, v in raw_tasks.items()}
        settings = {k: _typed(k, v, where) for k, v in a.items() if k in SETTINGS}
        per_task = _arm_task_settings(raw_tasks, tasks, allowed - {"name", "optimizer", "demos_per_class"}, where)
        arms.append(Arm(name=a["name"], optimizer=opt, settings=settings, demos_per_class=demos,
                        task_settings=per_task, relative_seconds=relative))
    _check_relative_seconds(arms, path)
    return arms


def _take_relative_seconds(table, task: str | None, into: dict, where: str):
    """``table`` without a relative ``max_seconds`` ("2x backprop"), which goes into ``into[task]``."""
    if not isinstance(table, dict) or not isinstance(table.get("max_seconds"), str):
        return table
    from bbpt.studyspec.timing import parse_relative

    into[task] = parse_relative(table["max_seconds"], where)
    return {k: v for k, v in table.items() if k != "max_seconds"}


def _check_relative_seconds(arms: list[Arm], path: Path) -> None:
    by_name = {a.name: a for a in arms}
    for arm in arms:
        for rule in arm.relative_seconds.values():
            ref = by_name.get(rule.arm)
            where = f"{path} [[arms]] {arm.name!r}: max_seconds = {str(rule)!r}"
            if ref is None or not ref.tuned:
                raise ConfigError(f"{where} names {rule.arm!r}, which is not a tuned arm of this spec; name one of "
                                  f"{[a.name for a in arms if a.tuned]}")
            if ref.relative_seconds or ref is arm:
                raise ConfigError(f"{where}: arm {rule.arm!r} is itself timed relative to an arm; name an arm whose "
                                  "studies run to their budget, such as a backprop arm")


def _per_task(raw, tasks: list[str], allowed: set, where: str, table: str, example: str) -> dict[str, dict]:
    """Read ``[<table>.<task>]`` tables (the spec's or an arm's): known tasks, known keys, typed values."""
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(f"{where}: {table} should be one table per task, e.g.\n[{table}.{example}]")
    out = {}
    for task, values in raw.items():
        here = f"{where} [{table}.{task}]"
        if task not in tasks:
            raise ConfigError(f"{here}: {task!r} is not in this spec's tasks {tasks}; add it there or remove the table")
        _check_keys(values, allowed, here)
        out[task] = {k: _typed(k, v, here) for k, v in values.items()}
    return out


def _arm_task_settings(raw, tasks: list[str], allowed: set, where: str) -> dict[str, dict]:
    return _per_task(raw, tasks, allowed, where, "arms.task_settings", "yelp]\nbudget = 400")


def _task_settings(raw, tasks: list[str], arms: list[Arm], path: Path) -> dict[str, dict]:
    out = _per_task(raw, tasks, set(SETTINGS), str(path), "task_settings", "dbpedia]\nshots = 4")
    for task, values in out.items():
        for arm in arms:
            both = sorted(set(values) & set(arm.settings))
            if both:
                raise ConfigError(f"{path} [task_settings.{task}]: {both[0]} is also set by arm {arm.name!r}; set "
                                  "it in one place (or give the task its own arm)")
    return out


def _reference(raw: dict, arms: list[Arm], where: str) -> str | None:
    """Default: the first backprop arm, so "calls to reach" reads as "calls to match gradient descent"."""
    ref = raw.get("reference")
    if ref is None:
        return next((a.name for a in arms if a.optimizer == "backprop"), None)
    tuned = [a.name for a in arms if a.tuned]
    if ref not in tuned:
        raise ConfigError(f"{where}: reference = {ref!r} is not a tuned arm of this spec; choose one of {tuned}")
    return ref


def _plan(spec: StudySpec) -> list[Planned]:
    """Seed-major order: every arm of every task gets its first seed before any gets a second, so an
    interrupted run already answers the whole question, with fewer seeds."""
    plan = []
    for seed in spec.seeds:
        for task in spec.tasks:
            for arm in spec.arms:
                values = {**spec.defaults, **spec.task_settings.get(task, {}), **arm.settings_for(task)}
                if arm.tuned:
                    values["optimizer"] = arm.optimizer
                else:
                    values = {k: v for k, v in values.items() if k in BASELINE_SETTINGS}
                    values["optimizer"] = "random"     # placeholder: StudyConfig needs one; never run
                where = f"{spec.path} [[arms]] {arm.name!r}" + (
                    f" [arms.task_settings.{task}]" if task in arm.task_settings else "")
                try:
                    cfg = resolve_recipe(StudyConfig(task=task, seed=seed, **values))
                except ConfigError as e:
                    raise ConfigError(f"{where}: {_as_keys(e)}") from None
                if arm.optimizer == "icl" and arm.demos_per_class > cfg.shots:
                    raise ConfigError(f"{where}: demos_per_class = {arm.demos_per_class} but the train split has "
                                      f"only shots = {cfg.shots} examples per class; lower demos_per_class")
                plan.append(Planned(study_name(spec.name, task, arm.name, seed), task, arm, seed, cfg,
                                    arm.relative_seconds_for(task) if arm.tuned else None))
    return plan


def _as_keys(e: ConfigError) -> str:
    """StudyConfig speaks in command-line flags (--sigma0); a spec spells them as keys (sigma0)."""
    msg = re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), str(e))
    if msg.startswith("unknown optimizer"):
        msg += '; or "manual" / "icl" for an arm that tunes nothing'
    return msg


# -- small checks --------------------------------------------------------------------------------------------
def _check_keys(table: dict, allowed: set | frozenset, where: str, note: str = "") -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}{note}; allowed keys: {', '.join(sorted(allowed))}")


def _check_name(value, key: str, where: str) -> None:
    if not isinstance(value, str) or not SAFE_NAME.match(value):
        raise ConfigError(f"{where}: {key} = {value!r} must be letters, digits, '_', '-' or '.', starting with a "
                          "letter or digit (it becomes part of study names and folders)")


def _str_list(raw: dict, key: str, where: str) -> list[str]:
    v = raw.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v) or len(set(v)) != len(v):
        raise ConfigError(f'{where}: {key} = {v!r} should be a non-empty list of distinct names, e.g. {key} = ["sst2"]')
    return v


def _opt_str(raw: dict, key: str, where: str) -> str | None:
    v = raw.get(key)
    if v is not None and not isinstance(v, str):
        raise ConfigError(f"{where}: {key} = {v!r} should be a string")
    return v


_HINTS = typing.get_type_hints(StudyConfig)


def _typed(key: str, value, where: str):
    """Check a TOML value against the StudyConfig field's type (StudyConfig itself does not check types);
    integers are accepted where a float is expected."""
    hint = _HINTS[key]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in options:
        if t is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue
        if t is int and isinstance(value, int):
            return value
        if t is float and isinstance(value, (int, float)):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    want = " or ".join(t.__name__ for t in options if t is not type(None))
    raise ConfigError(f"{where}: {key} = {value!r} should be {want}")
