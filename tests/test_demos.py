"""--demos K: solved train examples before every input, and a prompt tuned from there."""

from __future__ import annotations

import json

import pytest

from bbpt.cli import main
from bbpt.config import StudyConfig
from bbpt.errors import ConfigError
from bbpt.prompt import SavedPrompt
from bbpt.session import load_task_for


def test_demos_are_train_examples_written_before_the_query_with_the_prompt_in_its_place():
    cfg = StudyConfig(task="sst2", shots=4, seed=3, demos=1, optimizer="cma", prompt_position="infix")
    task, plain = load_task_for(cfg), load_task_for(StudyConfig(task="sst2", shots=4, seed=3, optimizer="cma",
                                                                prompt_position="infix"))
    src = task.template.source
    # one demonstration per class, each a train text followed by its label word, then the query's template
    assert src.endswith(plain.template.source) and src.count("{prompt}") == 1
    demos = src[: -len(plain.template.source)]
    shown = [ex for ex in task.train if ex.text in demos]
    assert sorted(ex.label for ex in shown) == [0, 1]
    assert all(plain.template.render_plain(ex) + task.label_words[ex.label] in demos for ex in shown)
    # the splits are the same: demonstrations change the text, not which examples are scored
    assert [e.text for e in task.test] == [e.text for e in plain.test]


def test_a_prompt_tuned_with_demos_saves_them_and_scores_the_same_in_eval(tiny_model_dir, storage_url, tmp_path,
                                                                          capsys):
    rc = main(["-q", "optimize", "--model", tiny_model_dir, "--task", "sst2", "--shots", "4", "--max-test", "16",
               "--optimizer", "cma", "--popsize", "4", "--budget", "8", "--prompt-tokens", "3", "--intrinsic-dim",
               "8", "--demos", "1", "--storage", storage_url, "--runs-dir", str(tmp_path / "runs"), "--study", "s",
               "--json", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    saved = SavedPrompt.load(summary["prompt_path"])
    # the run's settings, --prompt-tokens included: with --prompt-position auto they decide where the prompt goes
    task = load_task_for(StudyConfig(task="sst2", shots=4, seed=0, demos=1, optimizer="cma", max_test=16,
                                     prompt_tokens=3))
    assert saved.meta["template"] == task.template.source
    assert main(["-q", "eval", "--prompt", summary["prompt_path"], "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["test"])


def test_a_stored_config_without_demos_means_none_and_too_many_are_refused():
    old = StudyConfig(task="sst2", optimizer="cma", demos=0).to_dict()
    del old["demos"]
    old["version"] = 4          # written before version 5 (every version-5 config is stored resolved)
    assert StudyConfig.from_dict(old).demos == 0
    with pytest.raises(ConfigError, match="--demos 17 is invalid.*between 0 and --shots"):
        StudyConfig(task="sst2", shots=16, demos=17)


def _optimize(tiny_model_dir, storage_url, tmp_path, *extra):
    return main(["-q", "optimize", "--model", tiny_model_dir, "--task", "sst2", "--shots", "4", "--max-test", "8",
                 "--optimizer", "cma", "--popsize", "4", "--prompt-tokens", "3", "--intrinsic-dim", "8",
                 "--storage", storage_url, "--runs-dir", str(tmp_path / "runs"), "--study", "s", "--json",
                 "--no-progress", *extra])


@pytest.mark.parametrize("rule", ["auto", "auto:train"])
def test_demos_auto_starts_from_the_template_with_the_lower_p0_loss_on_the_examples_not_shown(
        rule, tiny_model_dir, tiny_backend, storage_url, tmp_path, capsys):
    import numpy as np

    from bbpt.demos_choice import SPLIT
    from bbpt.objective import calibrated, fit_bias, loss
    from bbpt.storage import Storage
    from bbpt.tasks.demos import pick_demos, with_demos

    assert _optimize(tiny_model_dir, storage_url, tmp_path, "--budget", "8", "--demos", rule) == 0
    summary = json.loads(capsys.readouterr().out)
    storage = Storage(storage_url)
    rows = {e.metrics["demos"]: e for e in storage.evaluations(storage.require_study("s").id) if e.split == SPLIT}
    with_dev = rule == "auto"
    assert sorted(rows) == [0, 1] and summary["demos_choice_calls"] == (4 if with_dev else 2)
    # Each loss is P0's (no offset: the tiny backend holds the same P0), calibrated as the study would (a bias
    # fitted on the 6 training examples that neither template shows as a demonstration), over those 6 and, for
    # auto, the 8 dev examples too, each example weighing the same.
    plain = load_task_for(StudyConfig(task="sst2", shots=4, seed=0, optimizer="cma", max_test=8, prompt_tokens=3))
    shown = {id(ex) for ex in pick_demos(plain, 1, 0)}
    held = [i for i, ex in enumerate(plain.train) if id(ex) not in shown]
    y = np.array([ex.label for ex in plain.train])[held]
    y_dev = np.array([ex.label for ex in plain.dev])
    from bbpt.session import resolve_init

    tiny_backend.set_init(resolve_init(StudyConfig(task="sst2", shots=4, prompt_tokens=3), plain))
    p0 = np.zeros((1, 3, tiny_backend.info().hidden_size))
    for k, task in ((0, plain), (1, with_demos(plain, 1, 0))):
        lp = tiny_backend.score(p0, tiny_backend.encode(task.train, task.template, task.label_words)).logprobs[:, held]
        bias = fit_bias(lp, y)
        train_loss = loss(calibrated(lp, bias), y)[0]
        m = rows[k].metrics
        assert m["examples"] == 6
        if with_dev:
            lp_dev = tiny_backend.score(p0, tiny_backend.encode(task.dev, task.template, task.label_words)).logprobs
            dev_loss = loss(calibrated(lp_dev, bias), y_dev)[0]
            assert m["dev_examples"] == len(y_dev) == 8
            assert m["train_loss"] == pytest.approx(train_loss, abs=1e-5)
            assert m["dev_loss"] == pytest.approx(dev_loss, abs=1e-5)
            assert m["loss"] == pytest.approx((6 * train_loss + 8 * dev_loss) / 14, abs=1e-5)
        else:
            assert "dev_loss" not in m and m["loss"] == pytest.approx(train_loss, abs=1e-5)
    chosen = min(rows, key=lambda k: (rows[k].metrics["loss"], k))
    assert summary["demos"] == chosen
    template = (with_demos(plain, 1, 0) if chosen else plain).template.source
    assert SavedPrompt.load(summary["prompt_path"]).meta["template"] == template


def test_a_version_3_demos_auto_keeps_its_training_loss_rule():
    """Config version 4 gave ``auto`` the training and dev losses; a study stored with version 3's ``auto``
    resumes and re-runs with the rule it ran with, now spelled ``auto:train``."""
    from bbpt.config import CONFIG_VERSION

    old = {**StudyConfig(task="sst2", optimizer="gn").to_dict(), "version": 3, "demos": "auto"}
    assert CONFIG_VERSION >= 4 and StudyConfig.from_dict(old).demos == "auto:train"
    assert StudyConfig.from_dict({**old, "version": 4}).demos == "auto"
    assert StudyConfig.from_dict({**old, "demos": 1}).demos == 1
    # read back and stored again (a resume stores the config), it keeps that meaning
    again = StudyConfig.from_dict(StudyConfig.from_dict(old).to_dict())
    assert again.demos == "auto:train" and not again.differences(StudyConfig.from_dict(old))


def test_demos_auto_resumes_from_its_stored_choice_without_scoring_again(tiny_model_dir, storage_url, tmp_path,
                                                                         capsys, monkeypatch):
    from bbpt import demos_choice
    from bbpt.storage import Storage

    assert _optimize(tiny_model_dir, storage_url, tmp_path, "--budget", "8", "--demos", "auto") == 0
    first = json.loads(capsys.readouterr().out)

    def not_again(*a, **k):
        raise AssertionError("a resumed study scored the demonstrations' choice again")

    monkeypatch.setattr(demos_choice, "score_candidates", not_again)
    assert _optimize(tiny_model_dir, storage_url, tmp_path, "--budget", "12", "--demos", "auto") == 0
    again = json.loads(capsys.readouterr().out)
    assert again["calls"] == 12 and again["demos"] == first["demos"] and again["demos_choice_calls"] == 4
    storage = Storage(storage_url)
    assert sum(e.split == demos_choice.SPLIT for e in storage.evaluations(storage.require_study("s").id)) == 2


def test_demos_auto_is_refused_where_it_cannot_compare_and_nothing_is_written(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--demos 'auto' is invalid.*at one shot per class none is left"):
        StudyConfig(task="sst2", shots=1, demos="auto")
    with pytest.raises(ConfigError, match="--demos 'often' is invalid.*auto, auto:train, or a whole number"):
        StudyConfig(task="sst2", demos="often")
    url = f"sqlite:///{tmp_path / 'refused.db'}"
    assert main(["-q", "optimize", "--model", tiny_model_dir, "--task", "e2e", "--shots", "2", "--demos", "auto",
                 "--storage", url, "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 2
    assert "generation task; pick a number" in capsys.readouterr().err
    assert not (tmp_path / "refused.db").exists() and not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit) as e:
        main(["optimize", "--demos", "often"])
    assert e.value.code == 2 and "'often' should be a whole number of demonstrations per class, auto or auto:train" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_on_the_default_model_demonstrations_are_kept_once_and_score_as_uncached(real_backend):
    """SST-2 with --demos 1 on SmolLM2: the shared demonstrations' keys/values give the uncached scores; and
    AG News' training set with demonstrations, whose keys/values per example went over the CPU's 1 GB cache
    (scored uncached, every call), fits with the demonstrations kept once."""
    import numpy as np

    from adapters.hf import HFBackend
    from bbpt.prompt import PromptInit

    be = real_backend
    task = load_task_for(StudyConfig(task="sst2", shots=16, seed=0, demos=1, optimizer="cma",
                                      prompt_position="infix"))
    be.set_init(PromptInit("text", 10, text=task.init_text))
    batch = be.encode(task.train[:6], task.template, task.label_words)
    d = np.random.default_rng(0).normal(scale=0.01, size=(2, 10, 576)).astype(np.float32)
    token_bytes = 30 * 2 * 3 * 64 * 4          # SmolLM2-135M: 30 layers, keys and values, 3 heads of 64, fp32
    heads, h, width = HFBackend.kv_plan(batch)
    be.kv_cache_bytes = len(heads) * (h + width) * token_bytes - 1      # whole rows do not fit; the head does
    try:
        got = be.score(d, batch).logprobs
    finally:
        be.kv_cache_bytes = 2**30
    kv = batch.kv
    assert kv.head.mask.shape[1] > 40 and kv.tail is not None
    be.reuse_kv = False
    try:
        np.testing.assert_allclose(got, be.score(d, batch).logprobs, atol=2e-3)
    finally:
        be.reuse_kv = True
    ag = load_task_for(StudyConfig(task="agnews", shots=16, seed=0, demos=1, optimizer="cma",
                                    prompt_position="infix"))
    heads, h, width = HFBackend.kv_plan(be.encode(ag.train, ag.template, ag.label_words))
    per_example = len(heads) * (h + width) * token_bytes
    kept_once = (h + len(heads) * width) * token_bytes
    assert per_example > 2**30 > kept_once


@pytest.mark.slow
def test_on_the_default_model_demos_auto_chooses_on_train_and_the_study_uses_its_choice(storage_url, tmp_path,
                                                                                       capsys):
    """`bbpt optimize --demos auto` on SmolLM2 (SST-2, a few calls): both starting templates scored on the 30
    training examples not shown, the lower loss chosen, and the saved prompt carries the chosen template."""
    from bbpt.demos_choice import SPLIT
    from bbpt.storage import Storage

    rc = main(["-q", "optimize", "--task", "sst2", "--optimizer", "gn", "--popsize", "4", "--budget", "4",
               "--max-test", "8", "--demos", "auto", "--storage", storage_url, "--runs-dir", str(tmp_path / "runs"),
               "--study", "auto", "--json", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    storage = Storage(storage_url)
    rows = [e.metrics for e in storage.evaluations(storage.require_study("auto").id) if e.split == SPLIT]
    assert sorted(m["demos"] for m in rows) == [0, 1] and all(m["examples"] == 30 for m in rows)
    assert all(m["dev_examples"] == 32 and m["calls"] == 2 for m in rows)     # auto reads dev too
    assert rows[0]["loss"] != rows[1]["loss"]
    assert summary["demos"] == min(rows, key=lambda m: m["loss"])["demos"]
    template = SavedPrompt.load(summary["prompt_path"]).meta["template"]
    assert (template.count("\n\n") == 2) == (summary["demos"] == 1)     # two demonstrations, then the query
