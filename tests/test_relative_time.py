"""``max_seconds = "2x bp"`` in a spec's arm: the time limit is read, when the study starts, from the complete
studies of the named arm's settings on the same task and on this machine's hardware (bbpt/studyspec/timing.py).
Refused, writing nothing, when no such study ran here; an arm repeating the reference's settings times a new
machine."""

from __future__ import annotations

import json
import logging
import statistics

import pytest

from bbpt.cli import main
from bbpt.storage import Storage
from bbpt.studyspec.spec import load_spec
from bbpt.studyspec.timing import RelativeSeconds, hardware
from test_study_spec import db_url, rows, write_spec

TWIN = '\n[[arms]]\nname = "bp_here"\noptimizer = "backprop"\nbudget = 3\n'


def summary(url: str, name: str) -> dict:
    return json.loads(rows(url, "SELECT summary FROM studies WHERE name = ?", name)[0][0])


def config(url: str, name: str) -> dict:
    return json.loads(rows(url, "SELECT config FROM studies WHERE name = ?", name)[0][0])


def test_the_rule_is_parsed_per_arm_and_a_number_for_one_task_wins(tmp_path, tiny_model_dir):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, arm_extra='max_seconds = "2.5x bp"'))
    cma = next(p for p in spec.plan if p.arm.name == "cma")
    assert cma.relative_seconds == RelativeSeconds(2.5, "bp") and cma.config.max_seconds is None
    assert all(p.relative_seconds is None for p in spec.plan if p.arm.name != "cma")
    spec = load_spec(write_spec(tmp_path, tiny_model_dir,
                                arm_extra='max_seconds = "2x bp"\n[arms.task_settings.sst2]\nmax_seconds = 30'))
    cma = next(p for p in spec.plan if p.arm.name == "cma")
    assert cma.relative_seconds is None and cma.config.max_seconds == 30.0


@pytest.mark.parametrize("value,message", [
    ('"2x nosuch"', "names 'nosuch', which is not a tuned arm of this spec"),
    ('"2x manual"', "names 'manual', which is not a tuned arm of this spec"),
    ('"twice bp"', "should be a number of seconds or '<factor>x <arm>'"),
    ('"0x bp"', "should be a number of seconds or '<factor>x <arm>'"),
    ('"2x cma"', "arm 'cma' is itself timed relative to an arm"),
])
def test_a_bad_rule_exits_2_naming_it(tmp_path, tiny_model_dir, capsys, value, message):
    spec = write_spec(tmp_path, tiny_model_dir, arm_extra=f"max_seconds = {value}")
    assert main(["study", "run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(spec) in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()


def test_max_seconds_is_the_factor_times_the_median_reference_seconds_on_this_machine(tmp_path, tiny_model_dir,
                                                                                        caplog):
    spec = write_spec(tmp_path, tiny_model_dir, arm_extra='max_seconds = "2x bp"')
    caplog.set_level(logging.INFO, logger="bbpt.studyspec.runner")
    url = db_url(spec)
    for seed in (0, 1):     # seed-major plan order: bp runs before cma within a seed
        assert main(["-q", "study", "run", str(spec), "--no-progress", "--arms", "bp,cma", "--seeds", str(seed)]) == 0
        reference = [summary(url, f"tiny/sst2/bp/seed{s}")["seconds"] for s in range(seed + 1)]
        cfg = config(url, f"tiny/sst2/cma/seed{seed}")
        assert cfg["max_seconds"] == pytest.approx(2 * statistics.median(reference), rel=1e-9)
        assert f"tiny/sst2/cma/seed{seed}: max_seconds = 2x bp on this machine" in caplog.text
        assert f"(the median of {seed + 1} {('study', 'studies')[seed]} with bp's settings here)" in caplog.text
    assert summary(url, "tiny/sst2/cma/seed1")["stopped"] in ("budget", "max_seconds")


def test_no_reference_on_this_machine_refuses_the_study_and_a_twin_arm_times_it(tmp_path, tiny_model_dir, caplog,
                                                                               capsys):
    spec = write_spec(tmp_path, tiny_model_dir, arm_extra='max_seconds = "2x bp"\n' + TWIN)
    url = db_url(spec)
    caplog.set_level(logging.INFO, logger="bbpt.studyspec.runner")
    assert main(["-q", "study", "run", str(spec), "--no-progress", "--arms", "bp", "--seeds", "0"]) == 0
    elsewhere = summary(url, "tiny/sst2/bp/seed0")      # as if bp had run on another host
    elsewhere.update(machine="Linux-other; Some Other CPU; 64 CPUs; device cpu; torch 2 with 64 thread(s)",
                     seconds=999.0)
    Storage(url).update_study("tiny/sst2/bp/seed0", summary=elsewhere)
    assert hardware(elsewhere["machine"]) == "Some Other CPU; 64 CPUs; device cpu; torch 2 with 64 thread(s)"

    assert main(["-q", "study", "run", str(spec), "--no-progress", "--arms", "cma", "--seeds", "0"]) == 1
    assert "tiny/sst2/cma/seed0 refused: tiny/sst2/cma/seed0: max_seconds = '2x bp' needs a complete study of " \
           "'bp''s settings on sst2 run on this machine" in caplog.text
    assert "`bbpt study run SPEC --arms bp_here --tasks sst2 --seeds 0`" in caplog.text
    assert "1 studies failed: tiny/sst2/cma/seed0" in capsys.readouterr().err
    assert rows(url, "SELECT COUNT(*) FROM studies WHERE name LIKE '%/cma/%'") == [(0,)]     # nothing written

    assert main(["-q", "study", "run", str(spec), "--no-progress", "--arms", "bp_here", "--seeds", "0"]) == 0
    assert main(["-q", "study", "run", str(spec), "--no-progress", "--arms", "cma", "--seeds", "0"]) == 0
    here = summary(url, "tiny/sst2/bp_here/seed0")["seconds"]
    assert config(url, "tiny/sst2/cma/seed0")["max_seconds"] == pytest.approx(2 * here, rel=1e-9)   # not 2 x 999


def test_the_machine_names_the_cpu_generation_where_the_model_name_does_not(tmp_path):
    # A cloud host may call its CPU just "AMD EPYC"; family and model tell two generations apart, so a time
    # limit read on one is not applied on the other.
    from bbpt.studyspec.runner import cpu_name

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                    "model name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 99\n")
    assert cpu_name(str(info)) == "AMD EPYC (family 25, model 17, stepping 1)"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n")    # no such fields (Arm)
    assert cpu_name(str(info)) and "family" not in cpu_name(str(info))
    assert cpu_name(str(tmp_path / "missing"))      # no /proc at all (macOS): the platform's name
