"""Selection on dev when several prompts tie at the best dev score: `--dev-ties earliest` (the default, and the
rule of the committed studies) keeps the first, `--dev-ties loss` the one with the lowest dev loss."""

from __future__ import annotations

import numpy as np
import pytest

from bbpt.config import StudyConfig
from bbpt.errors import ConfigError
from bbpt.storage import Storage
from study_helpers import cli, optimize_args


def test_dev_ties_keep_the_earliest_or_the_lowest_dev_loss(tmp_path, tiny_model_dir):
    url = f"sqlite:///{tmp_path / 'ties.db'}"
    for rule in ("earliest", "loss"):
        args = optimize_args(tiny_model_dir, url, rule, budget=40, runs_dir=tmp_path / "runs",
                             extra=("--eval-every", "4", "--dev-ties", rule))
        done = cli(args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    storage = Storage(url)

    def searched(name):
        sid = storage.require_study(name).id
        return [e for e in storage.evaluations(sid) if e.split == "dev" and e.trial_number not in (None, -1)]

    evals = searched("earliest")
    # The rule only chooses among the prompts scored; the search and its dev scores are the same under both.
    assert [(e.trial_number, e.metrics) for e in evals] == [(e.trial_number, e.metrics) for e in searched("loss")]
    best = max(e.metrics["accuracy"] for e in evals)
    tied = [e for e in evals if e.metrics["accuracy"] == best]
    lowest = min(tied, key=lambda e: e.metrics["loss"])
    assert len(tied) > 1 and lowest is not tied[0], "this seed no longer gives a tie the dev loss breaks differently"
    assert storage.require_study("earliest").summary["selected_trial"] == tied[0].trial_number
    assert storage.require_study("loss").summary["selected_trial"] == lowest.trial_number


def test_an_unknown_tie_rule_is_named():
    with pytest.raises(ConfigError, match="--dev-ties 'first' is invalid: it must be earliest or loss"):
        StudyConfig(dev_ties="first")


def test_a_test_curve_scores_each_prompt_dev_kept_and_changes_nothing_else(tmp_path, tiny_model_dir):
    from bbpt.report import gather, test_curve
    from study_helpers import trial_rows

    url = f"sqlite:///{tmp_path / 'curve.db'}"
    for name, extra in (("plain", ()), ("curve", ("--test-curve",))):
        args = optimize_args(tiny_model_dir, url, name, budget=40, runs_dir=tmp_path / "runs",
                             extra=("--eval-every", "4", "--dev-ties", "loss", *extra))
        done = cli(args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    storage = Storage(url)
    assert [r[1:] for r in trial_rows(url, "plain")] == [r[1:] for r in trial_rows(url, "curve")]

    def tests(name):
        return [e for e in storage.evaluations(storage.require_study(name).id)
                if e.split == "test" and e.trial_number is not None]

    assert len(tests("plain")) == 1 and not len(gather(storage, "plain").test_scores)
    # The curve's prompts are scored on test in one call with the selected one, which scores as it does alone.
    plain, both = (storage.require_study(n).summary for n in ("plain", "curve"))
    assert (plain["selected_trial"], plain["test"]) == (both["selected_trial"], both["test"])
    curve = gather(storage, "curve")
    assert len(tests("curve")) == len(curve.test_scores) > 1, "this seed no longer changes the kept prompt twice"
    # The curve ends at the selected prompt's test score, the one the summary reports.
    assert curve.test_scores[-1] == storage.require_study("curve").summary["test"] == curve.test
    x, y = test_curve(curve, "calls")
    assert x[-1] == curve.calls[-1] and list(x[:-1]) == sorted(x[:-1])


def test_keep_start_lets_p0_compete_on_dev_and_changes_no_trial(tmp_path, tiny_model_dir):
    from bbpt.report import gather
    from study_helpers import trial_rows

    url = f"sqlite:///{tmp_path / 'start.db'}"
    for name, extra in (("plain", ()), ("start", ("--keep-start", "--test-curve"))):
        args = optimize_args(tiny_model_dir, url, name, budget=24, runs_dir=tmp_path / "runs",
                             extra=("--eval-every", "4", *extra))
        done = cli(args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    storage = Storage(url)
    assert [r[1:] for r in trial_rows(url, "plain")] == [r[1:] for r in trial_rows(url, "start")]
    sid = storage.require_study("start").id
    dev = {e.trial_number: e for e in storage.evaluations(sid) if e.split == "dev"}
    p0 = dev.pop(-1)
    assert p0.calls_at == 0 and "bias" in p0.metrics
    assert not any(e.trial_number == -1 and e.split == "dev"
                   for e in storage.evaluations(storage.require_study("plain").id))
    summary = storage.require_study("start").summary
    searched = max(e.metrics["accuracy"] for e in dev.values() if e.trial_number is not None)
    # The rule: P0 is kept unless a trial scores strictly higher on dev (earliest wins ties).
    sel = summary["selected_trial"]
    if searched <= p0.metrics["accuracy"]:
        assert sel == -1
    else:
        assert sel != -1 and dev[sel].metrics["accuracy"] == searched
    assert summary["dev"] == max(searched, p0.metrics["accuracy"]) >= p0.metrics["accuracy"]
    curve = gather(storage, "start")
    assert curve.dev_calls[0] == 0 and curve.best_dev[0] == p0.metrics["accuracy"]
    assert curve.test_scores[-1] == summary["test"]


def test_keep_start_returns_p0_when_no_trial_beats_it(tmp_path, tiny_model_dir):
    # A budget of less than one generation scores no trial: P0 is the only candidate, and what is saved.
    from bbpt.prompt import SavedPrompt

    url = f"sqlite:///{tmp_path / 'p0.db'}"
    args = optimize_args(tiny_model_dir, url, "p0", budget=3, runs_dir=tmp_path / "runs", extra=("--keep-start",))
    done = cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = Storage(url).require_study("p0").summary
    assert summary["selected_trial"] == -1 and summary["calls"] == 0
    saved = SavedPrompt.load(tmp_path / "runs" / "p0")
    assert saved.meta["calibration"] is not None and abs(saved.prompt).sum() > 0


def test_mini_batches_score_a_generation_on_part_of_train_and_its_best_on_all(tiny_model_dir, tmp_path):
    """--train-batches 2: candidates alternate between two stratified halves of train (each with every class);
    each generation's best is re-scored on the whole set as one more call, and only those losses are the
    study's best."""
    from adapters.hf import HFBackend
    from bbpt.config import StudyConfig
    from bbpt.session import Session, stratified_batches
    from bbpt.storage import Storage
    from bbpt.study import run

    batches = stratified_batches(np.array([0, 1, 0, 1, 0, 1, 1, 0]), 2)
    assert [sorted(np.array([0, 1, 0, 1, 0, 1, 1, 0])[b]) for b in batches] == [[0, 0, 1, 1]] * 2
    cfg = StudyConfig(task="sst2", model=tiny_model_dir, device="cpu", shots=4, max_test=8, prompt_tokens=4,
                      intrinsic_dim=10, popsize=4, budget=15, train_batches=2, optimizer="cma")
    store = Storage(f"sqlite:///{tmp_path / 's.db'}")
    sess = Session(cfg, store, name="mb", backend=HFBackend(tiny_model_dir, device="cpu"),
                   runs_dir=tmp_path / "runs")
    assert sess.calls_per_generation == 5
    summary = run(sess, progress=False)
    trials = store.trials(sess.study_id)
    assert summary["calls"] == 15 and len(trials) == 15          # 3 generations of 4 candidates + 1 re-score
    for g in range(3):
        gen = [t for t in trials if t.generation == g]
        part, rescore = gen[:4], gen[4]
        assert {t.metrics["batch"] for t in part} == {g % 2} and all(t.metrics["examples"] == 4 for t in part)
        best = min(part, key=lambda t: t.loss)
        assert rescore.metrics["rescore_of"] == best.number and rescore.z == best.z
        assert rescore.metrics["examples"] == 8 and rescore.tokens > best.tokens
    whole = [t for t in trials if "rescore_of" in t.metrics]
    assert summary["best_train_loss"] == pytest.approx(min(t.loss for t in whole))
    # the re-score's loss is the whole training set's: scoring that prompt again gives it
    z = np.frombuffer(whole[0].z, dtype="<f4")[None]
    again = sess.backend.score(sess.space.decode(z), sess.train)
    from bbpt.scoring import fitness_at, fitted_bias
    loss, _ = fitness_at(again, sess.y_train, "ce", fitted_bias(again, sess.y_train, "bias"))
    assert loss[0] == pytest.approx(whole[0].loss, abs=1e-5)


def test_mini_batches_are_refused_where_they_cannot_work():
    from bbpt.config import StudyConfig
    from bbpt.errors import ConfigError

    with pytest.raises(ConfigError, match="--train-batches 5 .*--shots \\(4\\)"):
        StudyConfig(shots=4, train_batches=5)
    with pytest.raises(ConfigError, match="--train-batches 2 .*backprop"):
        StudyConfig(optimizer="backprop", train_batches=2)


def test_order_check_counts_which_dev_signal_orders_test_right():
    from bbpt.selection import order_check

    # One study's prompts as (dev score, dev loss, test). Pairs: (a, b): score and loss both say b, test says b;
    # (a, c): score says c, loss says a, test says a (loss right where they disagree); (b, c): score says c,
    # loss says b, test says b (loss right again). A study tied on dev score everywhere adds no pair.
    a, b, c = (0.5, 0.70, 0.60), (0.6, 0.60, 0.70), (0.7, 0.75, 0.55)
    tied = [(0.5, 0.6, 0.5), (0.5, 0.5, 0.6)]
    got = order_check([[a, b, c], tied, [a]])
    assert (got.pairs, got.score_right, got.loss_right, got.disagree, got.loss_right_when_disagree) == (3, 1, 3, 2, 2)
    assert order_check([]).pairs == 0


def test_reselect_replays_selection_on_a_larger_dev_set_and_writes_nothing(tmp_path, tiny_model_dir):
    from bbpt.cli import main
    from bbpt.errors import StudyError
    from bbpt.replay import replay_dev_shots
    from study_helpers import dump

    url = f"sqlite:///{tmp_path / 'replay.db'}"
    args = optimize_args(tiny_model_dir, url, "s", budget=40, runs_dir=tmp_path / "runs",
                         extra=("--eval-every", "8", "--demos", "auto"))
    done = cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    storage = Storage(url)
    row = storage.require_study("s")
    dev = {e.trial_number: e.metrics for e in storage.evaluations(row.id)
           if e.split == "dev" and e.trial_number is not None}
    before = dump(url)

    # At the study's own dev size the replay rescores the same prompts on the same examples: same scores, same pick.
    same = replay_dev_shots(storage, "s", 4)
    assert same["stored"]["trial"] == same["replayed"]["trial"] == row.summary["selected_trial"]
    assert same["replayed"]["dev"] == pytest.approx(dev[same["replayed"]["trial"]]["accuracy"])
    assert same["stored"]["test"] == pytest.approx(row.summary["test"])

    bigger = replay_dev_shots(storage, "s", 12)
    assert bigger["dev_examples"] == 12 * 2 and bigger["prompts"] == len(dev)
    assert bigger["replayed"]["trial"] in dev and 0 <= bigger["replayed"]["test"] <= 1
    assert main(["studies", "reselect", "s", "--dev-shots", "12", "--storage", url]) == 0
    assert dump(url) == before          # a replay writes nothing

    with pytest.raises(StudyError, match="--dev-shots 2 is fewer than the study's 4"):
        replay_dev_shots(storage, "s", 2)
    storage.compact(keep_dev_z_bytes=0)     # as compacted before bbpt kept the prompts scored on dev
    with pytest.raises(StudyError, match="was compacted before bbpt kept the z of prompts scored on dev"):
        replay_dev_shots(storage, "s", 12)
