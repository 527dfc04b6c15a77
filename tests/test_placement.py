"""``--prompt-position auto`` for a soft prompt searched without gradients (config version 6): the prompt leads
short inputs and follows long ones, decided from the training inputs alone (bbpt/tasks/placement.py), the same
way every time a study is opened; studies stored before version 6 keep the placement they ran."""

from __future__ import annotations

import json

import pytest

from bbpt.cli import main
from bbpt.config import StudyConfig
from bbpt.session import load_task_for
from bbpt.tasks import Template, load_task
from bbpt.tasks.placement import LEAD_COST_MAX, auto_position, lead_cost

SHOTS = {"dbpedia": 4}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("task, placement", [("sst2", "prefix"), ("yelp", "infix"), ("agnews", "infix"),
                                             ("dbpedia", "infix"), ("mrpc", "infix"), ("snli", "infix"),
                                             ("rte", "infix")])
def test_the_bbt_suite_leads_only_sst2s_short_inputs(task, placement, seed):
    # The built-in data and the suite's 10 prompt tokens: what bbt_suite_v2's recipe_v6_2x arm runs.
    cfg = StudyConfig(task=task, shots=SHOTS.get(task, 16), seed=seed)
    assert cfg.prompt_position == "auto"
    assert load_task_for(cfg).template.placement == placement


def test_lead_cost_counts_what_a_call_recomputes():
    t = load_task(task="sst2", shots=4, seed=0)
    short, long_ = t.train[:4], [type(ex)(ex.text * 20, ex.label) for ex in t.train[:4]]
    assert 1 < lead_cost(t.template, short, 10) <= LEAD_COST_MAX < lead_cost(t.template, long_, 10)
    # More virtual tokens make the input a smaller share of a call: leading gets relatively cheaper.
    assert lead_cost(t.template, long_, 100) < lead_cost(t.template, long_, 10)
    assert auto_position(t.template, short, 10) == "prefix" and auto_position(t.template, long_, 10) == "infix"


@pytest.mark.parametrize("settings, position", [
    (dict(), "auto"),                                              # the recipe: the inputs decide
    (dict(optimizer="cma"), "auto"),                               # any soft prompt searched without gradients
    (dict(optimizer="backprop"), "prefix"),                        # PEFT's placement, exports to PEFT
    (dict(space="discrete"), "prefix"),                            # a text prompt
    (dict(depth="prefix"), "prefix"),                              # keys/values come before every token
    (dict(prompt_position="infix"), "infix"),                      # named: as named
    (dict(template="Review: {text}\n{prompt}Sentiment:"), None),   # the template places it
])
def test_auto_stays_auto_only_where_the_inputs_decide(settings, position):
    assert StudyConfig(task="sst2", **settings).prompt_position == position


def test_configs_stored_before_version_6_keep_their_placement():
    old = StudyConfig(task="sst2", optimizer="cma").to_dict()
    old.update(prompt_position="infix", version=5)       # what version 5 stored for auto
    cfg = StudyConfig.from_dict(old)
    assert cfg.prompt_position == "infix" and load_task_for(cfg).template.placement == "infix"


def test_a_study_records_where_the_prompt_went_and_eval_scores_it_there(tiny_model_dir, storage_url, tmp_path,
                                                                       capsys):
    # 10 prompt tokens lead SST-2's short inputs; an input 20 times longer is followed.
    args = ["-q", "optimize", "--model", tiny_model_dir, "--optimizer", "cma", "--shots", "4", "--max-test", "8",
            "--popsize", "4", "--budget", "8", "--intrinsic-dim", "8", "--storage", storage_url,
            "--runs-dir", str(tmp_path / "runs"), "--json", "--no-progress"]
    assert main([*args, "--task", "sst2", "--study", "short"]) == 0
    short = json.loads(capsys.readouterr().out)
    assert short["placement"] == "prefix"
    meta = json.loads((tmp_path / "runs" / "short" / "prompt.json").read_text())
    assert Template(meta["template"]).placement == "prefix" and meta["config"]["prompt_position"] == "auto"
    assert main(["-q", "eval", "--prompt", short["prompt_path"], "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(short["test"])
    # Scored on another task's inputs, the prompt stays where it was tuned (it leads), whatever auto would pick.
    assert main(["-q", "eval", "--prompt", short["prompt_path"], "--task", "yelp", "--shots", "4", "--max-test", "4",
                 "--split", "test", "--json"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)

    longer = tmp_path / "long.jsonl"
    longer.write_text("\n".join(json.dumps({"text": " ".join(["the film was long and slow"] * 30), "label": i % 2})
                                for i in range(24)))
    assert main([*args, "--data", str(longer), "--template", "Review: {text}\nSentiment:",
                 "--labels", " negative", " positive", "--study", "long"]) == 0
    assert json.loads(capsys.readouterr().out)["placement"] == "infix"
