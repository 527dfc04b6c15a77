"""The command line on the tiny model: end to end, --json, errors with exit code 2, instant --help."""

import json
import subprocess
import sys

import pytest

from bbpt.cli import main

KEYS = {"task", "model", "optimizer", "seed", "budget", "calls", "tokens", "seconds", "baseline_dev",
        "baseline_test", "dev", "test", "prompt_path"}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bbpt.cli", *args], capture_output=True, text=True)


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from bbpt.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'cma', 'nevergrad', 'sqlalchemy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    helptext = run_cli("optimize", "--help").stdout
    for flag in ("--optimizer", "--budget", "--init", "--intrinsic-dim", "--storage", "--json"):
        assert flag in helptext


def test_output_piped_into_a_reader_that_left_ends_quietly():
    # `bbpt optimizers | head -1`: the reader is gone before the listing (more than stdout's buffer) is out.
    import os

    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "bbpt.cli", "optimizers"], stdout=w, stderr=subprocess.PIPE,
                           text=True)
    finally:
        os.close(w)
    assert p.returncode == 141, p.stderr
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


@pytest.mark.parametrize("optimizer,extra", [("cma", ["--popsize", "4", "--budget", "8"]),
                                             ("backprop", ["--budget", "3"]),
                                             ("nevergrad:NGOpt", ["--popsize", "4", "--budget", "8"]),
                                             ("random", ["--popsize", "4", "--budget", "8"])])
def test_optimize_json_then_eval_and_predict(tiny_model_dir, storage_url, tmp_path, capsys, optimizer, extra):
    rc = main(["-q", "optimize", "--model", tiny_model_dir, "--task", "sst2", "--shots", "4", "--max-test", "16",
               "--optimizer", optimizer, *extra, "--prompt-tokens", "3", "--intrinsic-dim", "8",
               "--storage", storage_url, "--runs-dir", str(tmp_path / "runs"), "--study", "s", "--json",
               "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert KEYS <= set(summary) and summary["calls"] == summary["budget"]
    rc = main(["-q", "eval", "--prompt", summary["prompt_path"], "--split", "test", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["test"])
    assert main(["-q", "predict", "--prompt", summary["prompt_path"], "great film", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["label"] in ("negative", "positive") and sum(pred["probs"].values()) == pytest.approx(1, abs=1e-4)


def test_custom_data_file(tiny_model_dir, storage_url, tmp_path, sst2_jsonl, capsys):
    rc = main(["-q", "optimize", "--model", tiny_model_dir, "--data", str(sst2_jsonl), "--template",
               "Review: {text}\nSentiment:", "--labels", " negative", " positive", "--shots", "4",
               "--optimizer", "cma", "--popsize", "4", "--budget", "4", "--intrinsic-dim", "4",
               "--storage", storage_url, "--runs-dir", str(tmp_path), "--json", "--no-progress"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["task"] == "my"


def test_dev_shots_sets_the_dev_set_selection_and_eval_use(tiny_model_dir, storage_url, tmp_path, capsys):
    rc = main(["-q", "optimize", "--model", tiny_model_dir, "--task", "sst2", "--shots", "2", "--dev-shots", "6",
               "--max-test", "8", "--optimizer", "random", "--popsize", "2", "--budget", "4", "--prompt-tokens", "2",
               "--intrinsic-dim", "4", "--storage", storage_url, "--runs-dir", str(tmp_path), "--json",
               "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert main(["-q", "eval", "--prompt", summary["prompt_path"], "--split", "dev", "--json"]) == 0
    dev = json.loads(capsys.readouterr().out)
    assert dev["examples"] == 2 * 6 and dev["accuracy"] == pytest.approx(summary["dev"])
    assert main(["-q", "eval", "--prompt", summary["prompt_path"], "--split", "train", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 2 * 2


DEAD = "http://127.0.0.1:9"      # the discard port: nothing listens, the connection is refused at once
DATA = ["--template", "{text}", "--labels", " negative", " positive", "--data"]


@pytest.mark.parametrize("args,message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--prompt-tokens", "0"], "--prompt-tokens 0 is invalid"),
    (["--template", "Sentiment:"], r"has no {text} field"),
    (["--optimizer", "adam"], "unknown --optimizer 'adam'"),
    (["--optimizer", "nevergrad:NoSuchOptimizer"], "unknown Nevergrad optimizer 'NoSuchOptimizer'"),
    (["--labels", " good", " goodish"], "start with the same token"),
    (["--sigma0", "nan"], "--sigma0 nan is invalid"),
    (["--dev-shots", "0"], "--dev-shots 0 is invalid"),
    ([*DATA, "{tmp}/utf16.csv"], "utf16.csv:1 is not UTF-8 text"),
    (["--backend", "nope"], "unknown --backend 'nope'"),
    (["--backend", "api", "--endpoint", DEAD], f"cannot connect to {DEAD}"),
    (["--backend", "api", "--endpoint", DEAD, "--optimizer", "backprop"], "backprop needs local weights"),
    (["--backend", "openai", "--endpoint", DEAD], "--backend openai scores text prompts only"),
])
def test_bad_input_exits_2_with_a_clear_message(tiny_model_dir, storage_url, tmp_path, args, message):
    (tmp_path / "utf16.csv").write_bytes("text,label\ngreat,1\n".encode("utf-16"))   # a spreadsheet's export
    r = run_cli("optimize", "--model", tiny_model_dir, "--storage", storage_url, "--budget", "4",
                "--popsize", "2", "--no-progress", *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    # Bad input writes nothing: no study, not even the empty database file the storage URL names.
    assert not (tmp_path / "bbpt.db").exists()


def test_a_mistyped_number_prints_the_error_and_where_to_look_not_the_usage():
    r = run_cli("optimize", "--budget", "abc")
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["bbpt optimize: error: argument --budget: invalid int value: 'abc'",
                                     "For more information, try 'bbpt optimize --help'."]
