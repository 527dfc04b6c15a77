"""`bbpt study run|report` on a tiny spec: four arms (manual, icl, backprop, cma) × two seeds on the tiny random
model. An interrupted run resumed by rerunning the command stores exactly what an uninterrupted one does; a
third run writes nothing; the report has a mean ± std row per arm and is byte-identical when rebuilt; spec
mistakes exit 2 naming the key."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bbpt.cli import main
from bbpt.report import gather
from bbpt.storage import Storage
from bbpt.studyspec.spec import load_spec
from study_helpers import cli, dump

ARMS = {"manual": 0, "icl": 0, "bp": 3, "cma": 8}      # arm -> calls
STUDIES = [f"tiny/sst2/{arm}/seed{s}" for s in (0, 1) for arm in ARMS]   # the plan's (seed-major) order


def write_spec(folder: Path, model: str, top: str = "", arm_extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "tiny.toml"
    spec.write_text(f"""
name = "tiny"
model = {str(model)!r}
device = "cpu"
tasks = ["sst2"]
seeds = [0, 1]
shots = 4
max_test = 16
prompt_tokens = 3
intrinsic_dim = 8
popsize = 4
budget = 8
runs_dir = {str(folder / "runs")!r}
{top}
[[arms]]
name = "manual"
optimizer = "manual"

[[arms]]
name = "icl"
optimizer = "icl"

[[arms]]
name = "bp"
optimizer = "backprop"
budget = 3

[[arms]]
name = "cma"
optimizer = "cma"
{arm_extra}
""")
    return spec


def db_url(spec: Path) -> str:
    return f"sqlite:///{spec.parent / 'results' / 'tiny.db'}"


def rows(url: str, sql: str, *args) -> list[tuple]:
    con = sqlite3.connect(f"file:{url.split('///', 1)[1]}?mode=ro", uri=True)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def trials(url: str, study: str) -> list[tuple]:
    return rows(url, "SELECT t.number, t.loss FROM trials t JOIN studies s ON s.id = t.study_id WHERE s.name = ? "
                     "ORDER BY t.id", study)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """The tiny spec run once, uninterrupted."""
    spec = write_spec(tmp_path_factory.mktemp("ref"), tiny_model_dir)
    assert main(["-q", "study", "run", str(spec), "--no-progress"]) == 0
    return SimpleNamespace(spec=spec, url=db_url(spec))


def test_interrupted_run_resumes_to_what_an_uninterrupted_run_stores(tmp_path, tiny_model_dir, finished,
                                                                     monkeypatch, caplog, capsys):
    spec = write_spec(tmp_path, tiny_model_dir)
    real = Storage.commit_generation
    commits = []

    def interrupted(self, *a, **kw):    # Ctrl-C right after the second stored generation (backprop's step 2)
        real(self, *a, **kw)
        commits.append(1)
        if len(commits) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Storage, "commit_generation", interrupted)
    assert main(["-q", "study", "run", str(spec), "--no-progress"]) == 130
    url = db_url(spec)
    states = dict(rows(url, "SELECT name, state FROM studies"))
    assert states == {STUDIES[0]: "complete", STUDIES[1]: "complete", STUDIES[2]: "running"}
    assert len(trials(url, STUDIES[2])) == 2
    capsys.readouterr()
    assert main(["-q", "study", "run", str(spec), "--dry-run"]) == 0
    listing = capsys.readouterr().out     # seed 1 of manual and icl go by seed 0's time; the rest have none
    assert "done: 2 studies" in listing and "left: 6 studies, about " in listing, listing
    assert "(4 with none complete to go by)" in listing, listing

    monkeypatch.setattr(Storage, "commit_generation", real)
    caplog.set_level(logging.INFO, logger="bbpt.studyspec.runner")
    assert main(["-q", "study", "run", str(spec), "--no-progress"]) == 0
    assert f"{STUDIES[0]}: complete, skipped" in caplog.text
    assert f"{STUDIES[2]}: resuming at call 2/3" in caplog.text

    assert rows(url, "SELECT name, state FROM studies ORDER BY name") == [(n, "complete") for n in sorted(STUDIES)]
    for name in STUDIES:
        got, want = trials(url, name), trials(finished.url, name)
        assert [n for n, _ in got] == list(range(ARMS[name.split("/")[2]])), name   # none lost, none twice
        np.testing.assert_allclose([lo for _, lo in got], [lo for _, lo in want], atol=1e-6, err_msg=name)
    dupes = rows(url, "SELECT study_id, trial_number, split, COUNT(*) FROM evaluations WHERE split = 'test' "
                      "GROUP BY study_id, trial_number, split HAVING COUNT(*) > 1")
    assert dupes == []
    summary = lambda u: {n: (d, t) for n, d, t in rows(u, "SELECT name, json_extract(summary, '$.dev'), "
                                                          "json_extract(summary, '$.test') FROM studies")}
    got, want = summary(url), summary(finished.url)
    assert got.keys() == want.keys()
    for name in want:       # approx() takes no nested tuples in newer pytest: compare each (dev, test) pair
        assert got[name] == pytest.approx(want[name]), name

    before = dump(url)      # a third run finds everything complete and writes nothing
    assert main(["-q", "study", "run", str(spec), "--no-progress"]) == 0
    assert dump(url) == before


def test_report_has_a_row_per_arm_and_is_rebuilt_identically(finished, capsys):
    assert main(["-q", "study", "report", str(finished.spec)]) == 0
    md = finished.spec.parent / "results" / "tiny.md"
    text = md.read_text()
    # the task's table: its arms' rows come first (the tables against the reference arm follow)
    table = [ln for ln in text.splitlines() if ln.startswith("| ") and ln.split(" | ")[0][2:] in ARMS][:len(ARMS)]
    assert [ln.split(" | ")[0][2:] for ln in table] == list(ARMS)
    for ln in table:
        cols = ln.strip("| ").split(" | ")
        assert cols[2] == "2/2" and "±" in cols[3] and "±" in cols[4], ln
    # The manual row is the mean of its two seeds' stored test scores, in percent.
    tests = [t for (t,) in rows(finished.url, "SELECT json_extract(summary, '$.test') FROM studies "
                                              "WHERE name LIKE 'tiny/sst2/manual/%' ORDER BY name")]
    assert table[0].split(" | ")[4].startswith(f"{100 * np.mean(tests):.1f} ± ")
    assert "calls to reach dev" in text and "(bp)" in text
    # Against the reference arm seed by seed: cma's test minus bp's on each seed, and its seconds over bp's.
    sums = {n: json.loads(s) for n, s in rows(finished.url, "SELECT name, summary FROM studies")}
    pairs = [(sums[f"tiny/sst2/cma/seed{k}"], sums[f"tiny/sst2/bp/seed{k}"]) for k in (0, 1)]
    gap = 100 * np.mean([a["test"] - b["test"] for a, b in pairs])
    ratio = np.mean([a["seconds"] / b["seconds"] for a, b in pairs])
    assert f"| cma | {gap:+.1f} (2; {ratio:.2f}x) | {gap:+.1f} |" in text
    # The ties line counts the tuned studies (here cma and bp, two seeds each) by their stored dev scores.
    storage = Storage(finished.url)
    tuned = [gather(storage, n) for n in STUDIES if ARMS[n.split("/")[2]]]
    assert f"dev ties: in {sum(r.dev_tied for r in tuned)} of {len(tuned)} tuned studies" in text
    assert "the earliest was kept" in text
    assert (md.parent / "tiny-sst2.png").stat().st_size > 0 and "](tiny-sst2.png)" in text
    assert main(["-q", "study", "report", str(finished.spec)]) == 0
    assert md.read_text() == text

    capsys.readouterr()
    assert main(["-q", "study", "run", str(finished.spec), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert all(f"{name} " in listing for name in STUDIES) and listing.count("complete") == len(STUDIES)


def test_report_reads_a_committed_database_without_changing_a_byte(finished, tmp_path):
    # Older committed study files are in SQLite's rollback-journal mode; a read-write open would switch them to
    # WAL (two header bytes), so rebuilding a report would dirty the committed database.
    db = tmp_path / "committed.db"
    con = sqlite3.connect(db)
    src = sqlite3.connect(finished.url.split("///", 1)[1])
    src.backup(con)
    src.close()
    assert con.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
    con.close()
    before = db.read_bytes()
    assert main(["-q", "study", "report", str(finished.spec), "--storage", f"sqlite:///{db}",
                 "--out", str(tmp_path / "report" / "tiny.md")]) == 0
    assert "| manual |" in (tmp_path / "report" / "tiny.md").read_text()
    assert db.read_bytes() == before


def test_time_left_goes_by_complete_studies_of_the_same_task_and_arm(tmp_path, tiny_model_dir):
    from bbpt.studyspec.runner import Status, time_left

    plan = {p.name: p for p in load_spec(write_spec(tmp_path, tiny_model_dir)).plan}
    s = lambda name, *a: Status(plan[f"tiny/sst2/{name}"], *a)
    states = [s("cma/seed0", "complete", 8, [], 8, 100.0), s("cma/seed1", "running", 2, [], 8),
              s("bp/seed0", "complete", 3, [], 3, 10.0), s("bp/seed1", "complete", 3, [], 3, 500.0),
              s("icl/seed0", "new", 0, []), s("manual/seed0", "new", 0, [])]
    # cma/seed1 has spent a quarter of its budget; icl and manual have no complete study to go by.
    assert time_left(states) == [0.0, 75.0, 0.0, 0.0, None, None]


def test_a_larger_dev_set_reaches_every_arm_baselines_included(tmp_path, tiny_model_dir):
    from bbpt.studyspec.markdown import _shots

    plan = load_spec(write_spec(tmp_path, tiny_model_dir, top="dev_shots = 8")).plan
    assert {p.config.dev_shots for p in plan} == {8} and {p.config.shots for p in plan} == {4}
    assert _shots(plan[0].config) == "4 examples per class in train, 8 in dev"


def test_unknown_spec_key_exits_2_naming_it(tmp_path, tiny_model_dir):
    spec = write_spec(tmp_path, tiny_model_dir, arm_extra="sigma = 0.5")
    r = cli(["study", "run", str(spec)], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "unknown key 'sigma'" in r.stderr and "sigma0" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "results").exists()      # nothing opened or written


@pytest.mark.parametrize("top,arm_extra,message", [
    ("budgett = 8", "", "(top level): unknown key 'budgett'; allowed keys: "),
    ("", 'budget = "8"', "budget = '8' should be int"),
    ("", "sigma0 = nan", "sigma0 nan is invalid"),
    ('reference = "manual"', "", "reference = 'manual' is not a tuned arm"),
    ("", 'optimizer = "adam"', None),          # TOML itself refuses a key given twice
    ("[task_settings.yelp]\nshots = 2", "", "'yelp' is not in this spec's tasks ['sst2']"),
    ("[task_settings.sst2]\nshotz = 2", "", "[task_settings.sst2]: unknown key 'shotz'"),
    ("[task_settings.sst2]\nbudget = 4", "", "budget is also set by arm 'bp'; set it in one place"),
    ("", "[arms.task_settings.yelp]\nbudget = 12", "'yelp' is not in this spec's tasks ['sst2']"),
    ("", "[arms.task_settings.sst2]\nbudgett = 12", "[arms.task_settings.sst2]: unknown key 'budgett'"),
    ("", "[arms.task_settings.sst2]\nbudget = 0", "'cma' [arms.task_settings.sst2]: budget 0 is invalid"),
    ("", 'task_settings = "sst2"', "task_settings should be one table per task"),
])
def test_spec_mistakes_exit_2(tmp_path, tiny_model_dir, capsys, top, arm_extra, message):
    spec = write_spec(tmp_path, tiny_model_dir, top=top, arm_extra=arm_extra)
    assert main(["study", "run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert (message or "is not valid TOML") in err and str(spec) in err


def test_task_settings_apply_to_every_arm_of_that_task(tmp_path, tiny_model_dir):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, top="[task_settings.sst2]\nshots = 2\npopsize = 2"))
    assert {p.config.shots for p in spec.plan} == {2}                   # baselines draw the same examples
    assert {p.config.popsize for p in spec.plan if p.arm.tuned} == {2}
    assert spec.task_settings == {"sst2": {"shots": 2, "popsize": 2}}


def test_an_arms_task_settings_apply_to_that_arm_and_task_only(tmp_path, tiny_model_dir):
    # The most specific table wins: it overrides the arm's own value and the spec's [task_settings] alike.
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, top="[task_settings.sst2]\nshots = 2",
                                arm_extra="popsize = 4\n[arms.task_settings.sst2]\nbudget = 12\nshots = 3"))
    by_arm = {p.arm.name: p.config for p in spec.plan if p.seed == 0}
    assert by_arm["cma"].budget == 12 and by_arm["cma"].shots == 3
    assert by_arm["bp"].budget == 3 and by_arm["bp"].shots == 2 and by_arm["manual"].shots == 2
    assert spec.arm("cma").task_settings == {"sst2": {"budget": 12, "shots": 3}}


def test_baseline_arm_rejects_tuning_keys(tmp_path, tiny_model_dir, capsys):
    spec = write_spec(tmp_path, tiny_model_dir)
    spec.write_text(spec.read_text().replace('optimizer = "manual"', 'optimizer = "manual"\npopsize = 4'))
    assert main(["study", "report", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'popsize' for an arm with optimizer 'manual'" in err and "allowed keys: backend" in err


def test_arms_and_seeds_select_part_of_the_plan(tmp_path, tiny_model_dir, capsys):
    spec = write_spec(tmp_path, tiny_model_dir)
    assert main(["-q", "study", "run", str(spec), "--no-progress", "--arms", "manual,cma", "--seeds", "1"]) == 0
    url = db_url(spec)
    assert sorted(rows(url, "SELECT name, state FROM studies")) == [
        ("tiny/sst2/cma/seed1", "complete"), ("tiny/sst2/manual/seed1", "complete")]
    capsys.readouterr()
    assert main(["study", "run", str(spec), "--arms", "cma,nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope', which is not an arm of this spec" in err and "manual, icl, bp, cma" in err
    assert main(["study", "run", str(spec), "--seeds", "7"]) == 2
    assert "--seeds names 7" in capsys.readouterr().err
    assert main(["study", "run", str(spec), "--tasks", "rte"]) == 2
    assert "--tasks names 'rte', which is not a task of this spec; its tasks are sst2" in capsys.readouterr().err
    assert len(rows(url, "SELECT name FROM studies")) == 2      # the refused runs wrote nothing
    assert main(["-q", "study", "run", str(spec), "--no-progress", "--arms", "manual", "--tasks", "sst2",
                 "--seeds", "0"]) == 0
    assert len(rows(url, "SELECT name FROM studies")) == 3


def test_export_of_a_baseline_arm_says_there_is_nothing_to_export(finished, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["export", "tiny/sst2/manual/seed0", "--storage", finished.url, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "manual arm of a study spec: it tuned nothing" in err and "Traceback" not in err
    assert not out.exists()


def test_compact_keeps_the_report_and_refuses_to_extend(finished, tiny_model_dir, tmp_path, capsys):
    spec = write_spec(tmp_path, tiny_model_dir)
    url = db_url(spec)
    (tmp_path / "results").mkdir()
    src, dst = (sqlite3.connect(u.split("///", 1)[1]) for u in (finished.url, url))
    src.backup(dst)         # a consistent copy of the finished database, WAL included
    src.close(), dst.close()
    assert main(["-q", "study", "report", str(spec)]) == 0
    md = tmp_path / "results" / "tiny.md"
    before, size = md.read_text(), Path(url.split("///", 1)[1]).stat().st_size

    capsys.readouterr()
    # prompts checked on dev or test that are neither the selected one nor the checkpoint's best on train
    other = ("FROM trials t WHERE EXISTS (SELECT 1 FROM evaluations e WHERE e.study_id = t.study_id AND "
             "e.trial_number = t.number) AND t.number IS NOT (SELECT json_extract(summary, '$.selected_trial') "
             "FROM studies WHERE id = t.study_id) AND t.number NOT IN (SELECT c.best_trial FROM checkpoints c "
             "WHERE c.study_id = t.study_id AND c.best_trial IS NOT NULL)")
    others = rows(url, f"SELECT COUNT(*) {other}")[0][0]
    assert main(["studies", "compact", "--storage", url]) == 0
    assert "dropped the optimizer state of 4 complete studies" in capsys.readouterr().out   # bp and cma × 2
    assert rows(url, "SELECT COUNT(*) FROM checkpoints WHERE length(optimizer_state) > 0") == [(0,)]
    # Trials lose their parameters but keep their results and evaluations; the selected prompt keeps its z
    # (export and eval read it), every other scored prompt loses it (reports read scores only).
    assert rows(url, "SELECT COUNT(*) FROM trials WHERE length(z) = 0")[0][0] > 0
    assert rows(url, "SELECT COUNT(*) FROM trials WHERE loss IS NULL") == [(0,)]
    assert rows(url, "SELECT COUNT(*) FROM studies s JOIN trials t ON t.study_id = s.id AND t.number = "
                     "json_extract(s.summary, '$.selected_trial') WHERE length(t.z) = 0") == [(0,)]
    assert rows(url, "SELECT COUNT(*) FROM studies s JOIN trials t ON t.study_id = s.id AND t.number = "
                     "json_extract(s.summary, '$.selected_trial')")[0][0] > 0
    assert others > 0, "the finished studies should score some prompts besides the one they select"
    # ... except prompts scored on dev whose z is small (a searched z): kept, so a selection rule can be
    # replayed on a committed study. With no such allowance, every other scored prompt loses its z.
    on_dev = "AND EXISTS (SELECT 1 FROM evaluations e WHERE e.study_id = t.study_id AND e.trial_number = " \
             "t.number AND e.split = 'dev')"
    assert rows(url, f"SELECT COUNT(*) {other} {on_dev} AND length(t.z) = 0") == [(0,)]
    assert rows(url, f"SELECT COUNT(*) {other} {on_dev}")[0][0] > 0
    assert Storage(url).compact(keep_dev_z_bytes=0)[1] > 0
    assert rows(url, f"SELECT COUNT(*) {other} AND length(t.z) > 0") == [(0,)]
    assert Path(url.split("///", 1)[1]).stat().st_size <= size
    assert main(["-q", "study", "report", str(spec)]) == 0
    assert md.read_text() == before             # reports read trials, evaluations and summaries only

    spec.write_text(spec.read_text().replace("budget = 8\n", "budget = 12\n"))
    before = rows(url, "SELECT name, state, config FROM studies"), rows(url, "SELECT COUNT(*) FROM trials")
    assert main(["-q", "study", "run", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "was compacted" in err and "cannot be raised from 8 to 12 calls" in err
    # refused before anything is written: the study stays complete, with the budget it ran
    assert (rows(url, "SELECT name, state, config FROM studies"), rows(url, "SELECT COUNT(*) FROM trials")) == before


def test_a_study_whose_optimizer_breaks_is_marked_failed_and_the_others_run(tmp_path, tiny_model_dir, monkeypatch,
                                                                             capsys, caplog):
    from bbpt.errors import OptimizerError
    from bbpt.optimizers.cma_es import CMAES

    real, asks = CMAES.ask, []

    def breaks_on_second_generation(self):
        asks.append(1)
        if len(asks) == 2:
            raise OptimizerError("cma failed to ask for 4 candidates (simulated library failure)")
        return real(self)

    monkeypatch.setattr(CMAES, "ask", breaks_on_second_generation)
    spec = write_spec(tmp_path, tiny_model_dir)
    caplog.set_level(logging.INFO, logger="bbpt.studyspec.runner")
    assert main(["-q", "study", "run", str(spec), "--no-progress", "--seeds", "0"]) == 1
    assert "tiny/sst2/cma/seed0 failed: cma failed to ask" in caplog.text
    assert "1 studies failed: tiny/sst2/cma/seed0" in capsys.readouterr().err
    url = db_url(spec)
    assert dict(rows(url, "SELECT name, state FROM studies")) == {
        "tiny/sst2/manual/seed0": "complete", "tiny/sst2/icl/seed0": "complete", "tiny/sst2/bp/seed0": "complete",
        "tiny/sst2/cma/seed0": "failed"}
    assert len(trials(url, "tiny/sst2/cma/seed0")) == 4          # the generation before the failure is kept


def test_budget_table_reads_each_test_curve_at_each_budget_and_leaves_unreached_budgets_blank():
    from bbpt.report import StudyReport
    from bbpt.studyspec.markdown import _budget_table
    from bbpt.studyspec.spec import Arm

    def study(calls_end, test_calls, test_scores):
        a = np.array
        return StudyReport(name="s", optimizer="cma", state="complete", calls=a([calls_end]), seconds=a([1.0]),
                           best_loss=a([0.5]), tokens=1, dev_calls=a(test_calls), dev_seconds=a([1.0] * len(test_calls)),
                           best_dev=a(test_scores), dev=test_scores[-1], test=test_scores[-1],
                           test_calls=a(test_calls), test_seconds=a([1.0] * len(test_calls)), test_scores=a(test_scores))

    spec = SimpleNamespace(arms=[Arm("manual", "manual", {}), Arm("cma", "cma", {})])
    cells = {("sst2", "cma"): [(study(300, [20, 150], [0.6, 0.8]), {}), (study(300, [20], [0.7]), {})]}
    lines = _budget_table(spec, "sst2", cells, "accuracy")
    row = next(ln for ln in lines if ln.startswith("| cma |"))
    # at 100 calls: seeds at 0.6 and 0.7; at 200 and 300: 0.8 and 0.7; past 300 neither seed ran: blank
    assert row == "| cma | 2 | 65.0 | 75.0 | 75.0 |  |  |  |  |"
    assert not any(ln.startswith("| manual") for ln in lines)
