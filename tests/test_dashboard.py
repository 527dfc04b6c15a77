"""The dashboard's data and the prompt card, without a browser (tests/test_dashboard_browser.py drives the pages)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bbpt.cli import main as cli_main
from bbpt.dashboard import data
from bbpt.dashboard.app import create_app
from bbpt.errors import StorageError
from bbpt.prompt import SavedPrompt
from bbpt.report import gather, table_rows
from bbpt.storage import Storage
from dashboard_helpers import fake_study

ROOT = Path(__file__).resolve().parent.parent
SUITE_DB = ROOT / "studies" / "results" / "bbt_suite.db"


def test_a_read_only_storage_refuses_writes_and_leaves_the_file_as_it_was(tmp_path):
    db = tmp_path / "suite.db"
    shutil.copy(SUITE_DB, db)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    s = Storage(f"sqlite:///{db}", read_only=True)
    rows = data.studies(s)
    assert len(rows) == 63
    data.study(s, rows[0]["name"])
    with pytest.raises(StorageError, match="read-only|readonly"):
        s.update_study(rows[0]["name"], state="failed")
    s.engine.dispose()
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_a_viewer_of_a_missing_database_creates_nothing(tmp_path):
    with pytest.raises(StorageError, match="no database"):
        Storage(f"sqlite:///{tmp_path / 'nope.db'}", read_only=True)
    assert not (tmp_path / "nope.db").exists()


def test_a_ten_thousand_trial_study_page_is_small_and_exact(storage_url):
    s = Storage(storage_url)
    fake_study(s, "long", 10_000)
    page = data.study(s, "long")
    size = len(json.dumps(page))
    assert size <= 500_000, size
    rep = gather(s, "long")
    assert page["raw"]["of"] == 10_000 and page["raw"]["shown"] <= data.MAX_POINTS
    # the best-so-far curve is sent through its change points only, and read back as a step it is the same
    xs, ys = np.array(page["best_loss"]["calls"]), np.array(page["best_loss"]["y"])
    idx = np.searchsorted(xs, rep.calls, side="right") - 1
    np.testing.assert_allclose(ys[idx], rep.best_loss)
    assert xs[-1] == rep.calls[-1] == 10_000
    paged = data.trials_page(s, "long", offset=9_990, limit=50)
    assert paged["total"] == 10_000 and [r["number"] for r in paged["rows"]] == list(range(9_990, 10_000))


def test_compare_shows_bbpt_compares_table(storage_url):
    s = Storage(storage_url)
    fake_study(s, "a", 400, seed=1)
    fake_study(s, "b", 300, seed=2)
    got = data.compare_studies(s, ["a", "b"])
    assert (got["head"], got["rows"]) == tuple(map(list, table_rows([gather(s, "a"), gather(s, "b")])))
    assert [line["name"] for line in got["lines"]] == ["a", "b"]


def test_the_spec_compare_page_has_the_committed_reports_numbers():
    from bbpt.studyspec.spec import load_spec

    spec = load_spec(ROOT / "studies" / "bbt_suite.toml")
    s = Storage(spec.storage_url(None), read_only=True)
    got = data.compare_spec(s, spec, "sst2")
    report = (ROOT / "studies" / "results" / "bbt_suite.md").read_text()
    for row in got["rows"]:
        assert "| " + " | ".join(row) + " |" in report
    searching = [a for a in got["panels"][0]["arms"] if "calls" in a]
    assert len(searching) == sum(1 for a in spec.arms if a.tuned)
    assert all(a["seeds"] == 3 for a in searching)


def test_the_app_answers_every_page_and_refuses_unknown_studies(storage_url):
    s = Storage(storage_url)
    fake_study(s, "suite/sst2/cma/seed0", 60)
    c = TestClient(create_app(storage_url))
    for path in ("/", "/study/suite/sst2/cma/seed0", "/compare?study=suite/sst2/cma/seed0", "/static/bbpt.js",
                 "/static/bbpt.css", "/static/plotly.min.js", "/api/studies", "/api/version",
                 "/api/study/suite/sst2/cma/seed0", "/api/study/suite/sst2/cma/seed0/trials",
                 "/api/study/suite/sst2/cma/seed0/card", "/api/compare?study=suite/sst2/cma/seed0"):
        r = c.get(path)
        assert r.status_code == 200, (path, r.text[:200])
    r = c.get("/api/study/nope")
    assert r.status_code == 404 and "no study named 'nope'" in r.json()["error"]
    assert c.get("/static/../../pyproject.toml").status_code == 404
    assert c.get("/api/compare").status_code == 400          # no studies named and no spec
    assert not c.get("/api/study/suite/sst2/cma/seed0/card").json()["available"]


# -- the prompt card ---------------------------------------------------------------------------------------
def _saved(prompt: np.ndarray, tmp_path: Path, model: str, init: str = "zeros") -> Path:
    meta = dict(study="s", model=model, task="sst2", template="{text}", label_words=[" negative", " positive"],
                tokens=len(prompt), init=init, prompt_is="P0 + delta", dev={"accuracy": 0.75}, test={"accuracy": 0.7},
                config={"seed": 0})
    return SavedPrompt(prompt.astype(np.float32), meta).save(tmp_path / "prompt")


def test_a_prompt_made_of_real_tokens_reads_back_as_them(tmp_path, tiny_model_dir):
    from bbpt.promptcard import Vocabulary, card

    vocab = Vocabulary.load(tiny_model_dir)
    ids = [300, 301, 4242]
    c = card(SavedPrompt.load(_saved(vocab.embeddings[ids], tmp_path, tiny_model_dir)), vocab)
    assert c["hard_prompt_ids"] == ids
    assert [t["nearest"][0]["cosine"] for t in c["tokens"]] == pytest.approx([1.0] * 3, abs=1e-5)
    assert "drift" not in c["tokens"][0]          # zeros init: nothing to drift from
    assert c["scores"]["test_note"].startswith("not used for selection")


@pytest.mark.slow
def test_inspect_on_the_default_model_reports_drift_from_its_init_text(tmp_path, default_model_dir, capsys):
    from bbpt.promptcard import Vocabulary, initial_prompt

    vocab = Vocabulary.load("smollm2-135m")
    probe = SavedPrompt(np.zeros((4, 576), np.float32), dict(init="text:great movie", tokens=4, config={"seed": 0}))
    p0 = initial_prompt(probe, vocab)
    moved = p0.copy()
    moved[1] += 0.2 * np.linalg.norm(p0[1]) / np.sqrt(576)       # one row moved, by a fifth of its norm
    d = _saved(moved, tmp_path, "smollm2-135m", init="text:great movie")
    assert cli_main(["inspect", str(d), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    drifts = [t["drift"] for t in c["tokens"]]
    assert drifts[0] == 0 and drifts[2] == 0 and drifts[1] == pytest.approx(0.2, abs=0.01)
    words = vocab.tokenizer.decode(vocab.tokenizer("great movie", add_special_tokens=False)["input_ids"] * 2)
    assert c["hard_prompt"] == words          # rows 0, 2, 3 are the init's own tokens; row 1 still nearest to its
    assert cli_main(["inspect", str(d)]) == 0
    text = capsys.readouterr().out
    assert "nearest-token hard prompt" in text and "not used for selection" in text


# -- the queue: specs POSTed with the key, for `bbpt worker`s -------------------------------------------------

QUEUED_SPEC = """
name = "web"
tasks = ["sst2", "rte"]
seeds = [0, 1]
budget = 20

[[arms]]
name = "cma"
optimizer = "cma"
"""


def test_the_dashboard_queues_a_spec_only_with_its_key(storage_url):
    Storage(storage_url)                                    # an empty database, at this bbpt's schema
    read_only = TestClient(create_app(storage_url))
    assert read_only.get("/api/queue").json() == {"rows": [], "accepts": False}
    refused = read_only.post("/api/queue", content=QUEUED_SPEC)
    assert refused.status_code == 403 and "--api-key" in refused.json()["error"]

    client = TestClient(create_app(storage_url, api_key="s3cret", max_spec_bytes=1024))
    key = {"Authorization": "Bearer s3cret"}
    assert client.post("/api/queue", content=QUEUED_SPEC).status_code == 401
    assert client.post("/api/queue", content=QUEUED_SPEC, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/api/queue", content="#" * 2000, headers=key).status_code == 413
    bad = client.post("/api/queue", content=QUEUED_SPEC.replace("budget", "budgte"), headers=key)
    assert bad.status_code == 400 and "budgte" in bad.json()["error"]
    assert client.get("/api/queue").json()["rows"] == []   # a refused spec queues nothing

    ok = client.post("/api/queue", params={"path": "web.toml"}, content=QUEUED_SPEC, headers=key)
    assert ok.status_code == 200 and ok.json() == dict(spec="web", queued=4, complete=0, studies=4)
    rows = client.get("/api/queue").json()["rows"]
    assert [(r["name"], r["state"], r["worker"]) for r in rows] == [
        (f"web/{t}/cma/seed{s}", "pending", None) for s in (0, 1) for t in ("sst2", "rte")]
    again = client.post("/api/queue", content=QUEUED_SPEC, headers=key)
    assert again.json()["queued"] == 0                     # already queued: nothing twice


def test_a_database_from_before_the_work_table_shows_no_queue(tmp_path):
    db = tmp_path / "suite.db"
    shutil.copy(SUITE_DB, db)
    url = f"sqlite:///{db}"
    from test_workers import as_written_before_migrations

    as_written_before_migrations(url)
    client = TestClient(create_app(url))
    assert client.get("/api/queue").json()["rows"] == [] and client.get("/api/version").status_code == 200
    assert len(client.get("/api/studies").json()) == 63
