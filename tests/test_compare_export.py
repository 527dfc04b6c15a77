"""`bbpt compare` puts gradient and black-box studies on the same axes; `bbpt export` writes prompts that
PEFT loads and that predict what bbpt predicts; `bbpt import-peft` brings adapters back."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bbpt.cli import main
from bbpt.prompt import SavedPrompt
from bbpt.report import StudyReport, band_figure, figure, gather
from bbpt.storage import Storage
from study_helpers import copy_db, finished_db  # noqa: F401


def test_compare_curves_come_from_the_trials(finished_db):
    storage = Storage(finished_db.url)
    for name, budget in (("cma", 24), ("bp", 8)):
        r = gather(storage, name)
        trials = storage.trials(storage.require_study(name).id)
        assert list(r.calls) == list(range(1, budget + 1))          # a backprop step is one call too
        assert r.seconds[-1] == pytest.approx(sum(t.seconds for t in trials))
        assert list(r.best_loss) == list(np.minimum.accumulate([t.loss for t in trials]))
        assert len(r.dev_calls) >= 2 and list(r.dev_calls) == sorted(r.dev_calls)
        summary = storage.require_study(name).summary
        assert (r.dev, r.test) == (summary["dev"], summary["test"])
    bp = storage.trials(storage.require_study("bp").id)
    # The backward pass is inside each trial's seconds, so the seconds axis charges backprop for it.
    assert all(0 < t.backward_seconds < t.seconds for t in bp)


def test_reach_is_the_first_dev_evaluation_at_the_target(finished_db):
    r = gather(Storage(finished_db.url), "cma")
    first = r.best_dev[0]
    assert r.reach(first) == (r.dev_calls[0], r.dev_seconds[0])
    assert r.reach(r.best_dev[-1] + 1e-9) is None


def test_band_mean_starts_where_every_seed_has_a_dev_score():
    def seed(dev_seconds, best_dev):
        e = np.array([])
        return StudyReport("s", "cma", "complete", e, e, e, 0, np.array([10.0, 20.0]), np.asarray(dev_seconds, float),
                           np.asarray(best_dev, float), None, None)

    # The slow seed's first score (0.70 at 50 s) is below the fast seed's (0.90 at 5 s): a mean over whichever
    # seeds have a score would fall from 0.90 to 0.80 at 50 s.
    fig = band_figure([("cma", [seed([5, 60], [0.9, 0.9]), seed([50, 100], [0.7, 0.8])])])
    x, y = fig.axes[1].lines[0].get_data()
    assert x[0] == 50 and np.all(np.diff(y) >= 0)
    np.testing.assert_allclose(y, [0.8, 0.8, 0.85])


def test_a_tie_is_two_dev_evaluations_at_the_best_score():
    def rep(scores):
        e = np.array([])
        return StudyReport("s", "cma", "complete", e, e, e, 0, e, e, e, None, None, dev_scores=np.array(scores))

    assert rep([0.5, 0.75, 0.75]).dev_tied and rep([0.75, 0.5, 0.75]).dev_tied
    assert not rep([0.5, 0.75, 0.5]).dev_tied and not rep([0.75]).dev_tied and not rep([]).dev_tied


def test_dev_curves_run_to_the_end_of_the_search():
    # Dev is scored only when the best train candidate changes: a search whose last new best came at call 30
    # of 100 still searched to call 100 with that dev score, and its curve must say so, in both figures.
    r = StudyReport("s", "nevergrad:TwoPointsDE", "complete", np.arange(1.0, 101), np.arange(1.0, 101) * 2,
                    np.zeros(100), 0, np.array([10.0, 30.0]), np.array([20.0, 60.0]), np.array([0.5, 0.6]), 0.6, 0.55)
    band = band_figure([("de", [r])])
    compare = figure([r])
    for ax, end in ((band.axes[0], 100), (band.axes[1], 200), (compare.axes[2], 100), (compare.axes[3], 200)):
        x, y = ax.lines[0].get_data()
        assert x[-1] == end and y[-1] == 0.6


def test_compare_prints_a_table_and_plots_four_panels(finished_db, tmp_path, capsys):
    png = tmp_path / "compare.png"
    assert main(["compare", "cma", "bp", "--target", "0.5", "--plot", str(png), "--storage", finished_db.url]) == 0
    rows = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines()[1:]}
    storage = Storage(finished_db.url)
    for name, optimizer, calls in (("cma", "cma", "24"), ("bp", "backprop", "8")):
        s = storage.require_study(name).summary
        reached = gather(storage, name).reach(0.5)
        assert rows[name][1:4] == [optimizer, "complete", calls]
        assert rows[name][6:9] == [f"{s['best_train_loss']:.4f}", f"{s['dev']:.4f}", f"{s['test']:.4f}"]
        assert rows[name][9] == (str(reached[0]) if reached else "never")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fig = figure([gather(storage, "cma"), gather(storage, "bp")], target=0.5)
    axes = fig.get_axes()
    assert len(axes) == 4
    for ax in axes:
        labels = [ln.get_label() for ln in ax.get_lines()]
        assert labels[:2] == ["cma (cma)", "bp (backprop)"]
    seconds_panel = axes[1].get_lines()[1]
    np.testing.assert_allclose(seconds_panel.get_xdata(), gather(storage, "bp").seconds)


def test_export_finds_the_saved_prompt_and_checks_it_belongs(finished_db, tmp_path, capsys):
    url = copy_db(finished_db.url, tmp_path / "copy.db")
    storage = Storage(url)
    summary = storage.require_study("cma").summary
    storage.update_study("cma", summary={**summary, "prompt_path": str(tmp_path / "moved")})
    assert main(["export", "cma", "--format", "bbpt", "--out", str(tmp_path / "out"), "--storage", url,
                 "--runs-dir", str(tmp_path / "nowhere")]) == 2
    assert "no saved prompt of study 'cma'" in capsys.readouterr().err

    # Another database's study of the same name saved here too: same name, different config.
    impostor = tmp_path / "other" / "cma"
    shutil.copytree(finished_db.runs / "cma", impostor)
    meta = json.loads((impostor / "prompt.json").read_text())
    meta["config"]["seed"] = 7
    (impostor / "prompt.json").write_text(json.dumps(meta))
    args = ["export", "cma", "--format", "bbpt", "--out", str(tmp_path / "out"), "--storage", url]
    assert main([*args, "--runs-dir", str(tmp_path / "other")]) == 2
    assert not (tmp_path / "out").exists()

    assert main([*args, "--runs-dir", str(finished_db.runs)]) == 0
    out, original = SavedPrompt.load(tmp_path / "out"), SavedPrompt.load(finished_db.runs / "cma")
    np.testing.assert_array_equal(out.prompt, original.prompt)
    assert out.meta == original.meta


def test_an_unfinished_study_cannot_be_exported(finished_db, tmp_path, capsys):
    url = copy_db(finished_db.url, tmp_path / "copy.db")
    Storage(url).update_study("bp", state="running")
    assert main(["export", "bp", "--out", str(tmp_path / "out"), "--storage", url]) == 2
    assert "study 'bp' is running" in capsys.readouterr().err


def _peft_and_bbpt_logprobs(peft_dir, prompt_dir):
    """Label log-probs [n, C] of the saved prompt's test examples, by PEFT (its own loading, its own prefix)
    and by bbpt (what `bbpt eval` does)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.hf import HFBackend
    from bbpt.config import StudyConfig
    from bbpt.prompt import PromptInit
    from bbpt.session import load_task_for

    saved = SavedPrompt.load(prompt_dir)
    task = load_task_for(StudyConfig.from_dict(saved.meta["config"]))
    backend = HFBackend(saved.meta["model"], device="cpu")
    backend.set_init(PromptInit("zeros", saved.prompt.shape[0]))
    ours = backend.score(saved.prompt[None], backend.encode(task.test, task.template, task.label_words)).logprobs[0]

    base_dir = json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(peft_dir)).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    label_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in task.label_words]
    theirs = []
    with torch.no_grad():
        for ex in task.test:
            before, after = task.template.render(ex)
            assert before == ""                      # prefix placement: PEFT prepends the prompt to everything
            logits = model(**tok(after, return_tensors="pt")).logits[0, -1]
            theirs.append(torch.log_softmax(logits.float(), -1)[label_ids].numpy())
    return np.array(theirs), ours


def _check_peft_round_trip(prompt_dir, peft_dir, url, study, tmp_path):
    assert main(["export", study, "--format", "peft", "--out", str(peft_dir), "--storage", url,
                 "--runs-dir", str(prompt_dir.parent)]) == 0
    theirs, ours = _peft_and_bbpt_logprobs(peft_dir, prompt_dir)
    assert len(ours) >= 8
    np.testing.assert_array_equal(theirs.argmax(-1), ours.argmax(-1))
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    # ... and back: importing the adapter gives the same prompt and metadata.
    assert main(["import-peft", str(peft_dir), "--out", str(tmp_path / "back")]) == 0
    back, saved = SavedPrompt.load(tmp_path / "back"), SavedPrompt.load(prompt_dir)
    np.testing.assert_array_equal(back.prompt, saved.prompt)
    assert back.meta["imported_from"] == str(peft_dir)
    assert {k: v for k, v in back.meta.items() if k != "imported_from"} == saved.meta


def test_peft_round_trip_on_the_tiny_model(finished_db, tmp_path):
    _check_peft_round_trip(finished_db.runs / "bp", tmp_path / "peft", finished_db.url, "bp", tmp_path)


@pytest.mark.slow
def test_peft_round_trip_on_the_default_model(tmp_path):
    """The real model, the default task and prefix placement: PEFT predicts what bbpt predicts."""
    url = f"sqlite:///{tmp_path / 'bbpt.db'}"
    assert main(["optimize", "--optimizer", "backprop", "--budget", "2", "--shots", "4", "--max-test", "16",
                 "--prompt-tokens", "4", "--device", "cpu", "--study", "real", "--storage", url,
                 "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    _check_peft_round_trip(tmp_path / "runs" / "real", tmp_path / "peft", url, "real", tmp_path)


def test_import_a_foreign_peft_adapter(finished_db, tmp_path, capsys):
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(finished_db.model)
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                             base_model_name_or_path=finished_db.model)
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    weights = peft_model.prompt_encoder["default"].embedding.weight.detach().numpy()

    assert main(["import-peft", str(tmp_path / "adapter"), "--out", str(tmp_path / "p")]) == 2
    assert "was not exported by bbpt" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert main(["import-peft", str(tmp_path / "adapter"), "--out", str(tmp_path / "p"), "--task", "sst2",
                 "--shots", "4", "--max-test", "8"]) == 0
    saved = SavedPrompt.load(tmp_path / "p")
    np.testing.assert_array_equal(saved.prompt, weights)
    assert saved.meta["model"] == finished_db.model and saved.meta["label_words"] == [" negative", " positive"]
    capsys.readouterr()
    assert main(["eval", "--prompt", str(tmp_path / "p"), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 8
