"""The dashboard in a real browser: Debian's Chromium, driven by Playwright through its executable path (no
browser download), against ``bbpt dashboard`` serving on loopback.

Each page must load with no console error and no request to a host other than loopback; the committed
seven-task suite must show its 63 studies and, on its compare page, one band per searching arm with the
committed report's numbers; a trial written by another process must appear within 3 s without a reload, and
that writer must never meet "database is locked". Screenshots of the three pages go to ``test-artifacts/``
(git-ignored), for a person to look at.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from bbpt.storage import Storage
from dashboard_helpers import DashboardProcess, fake_study, start_writer

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"
# What the machine's probe found a closed-network Chromium needs: no background connections, no sandbox as root.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's "
                                                           "package: apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


class Watched:
    """A page that records console errors, page errors and every request's host."""

    def __init__(self, browser):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors, self.hosts = [], set()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.hosts.add(urlparse(r.url).hostname))

    def check(self):
        assert self.errors == []
        assert self.hosts <= {"127.0.0.1"}, self.hosts

    def shot(self, name: str):
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def suite_dashboard(tmp_path_factory):
    d = tmp_path_factory.mktemp("suite")
    db = d / "bbt_suite.db"
    shutil.copy(ROOT / "studies" / "results" / "bbt_suite.db", db)
    dash = DashboardProcess("--spec", str(ROOT / "studies" / "bbt_suite.toml"), "--storage", f"sqlite:///{db}",
                            log_dir=d).start()
    yield dash
    dash.stop()


def test_the_committed_suite_lists_its_63_studies(browser, suite_dashboard):
    w = Watched(browser)
    w.page.goto(suite_dashboard.url + "/")
    w.page.wait_for_selector("#list table")
    assert w.page.text_content("#count") == "63 studies"
    assert w.page.locator("#list tbody tr").count() == 63
    w.shot("studies")
    w.check()


def test_a_study_page_draws_its_curves_and_pages_its_trials(browser, suite_dashboard):
    w = Watched(browser)
    name = "bbt_suite/sst2/twopointsde/seed0"
    w.page.goto(suite_dashboard.url + "/study/" + name)
    w.page.wait_for_function("document.getElementById('plot-dev') && document.getElementById('plot-dev').data")
    w.page.wait_for_selector("#trials table")
    assert re.fullmatch(r"1–50 of \d+", w.page.text_content("#range"))
    w.page.click("#next")
    w.page.wait_for_function("document.getElementById('range').textContent.startsWith('51–')")
    w.page.check("input[value=seconds]")
    assert "svg" in w.page.inner_html("#plot-loss")           # SVG traces, not WebGL
    w.shot("study")
    w.check()


def test_the_compare_page_has_one_band_per_searching_arm_and_the_reports_numbers(browser, suite_dashboard):
    from bbpt.studyspec.spec import load_spec

    spec = load_spec(ROOT / "studies" / "bbt_suite.toml")
    w = Watched(browser)
    w.page.goto(suite_dashboard.url + "/compare?task=sst2")
    w.page.wait_for_function("document.getElementById('plot-dev-calls') && document.getElementById('plot-dev-calls').data")
    bands = w.page.evaluate("document.getElementById('plot-dev-calls').data.filter(t => t.meta === 'band').length")
    assert bands == sum(1 for a in spec.arms if a.tuned)
    report = (ROOT / "studies" / "results" / "bbt_suite.md").read_text()
    rows = w.page.evaluate("[...document.querySelectorAll('#table tbody tr')].map(tr => "
                           "[...tr.children].map(td => td.textContent))")
    assert len(rows) == len(spec.arms)
    for row in rows:
        assert "| " + " | ".join(row) + " |" in report
    w.shot("compare")
    w.check()


def test_a_trial_written_by_another_process_appears_without_a_reload(browser, tmp_path):
    url = f"sqlite:///{tmp_path / 'live.db'}"
    fake_study(Storage(url), "live", 40)
    dash = DashboardProcess("--storage", url, log_dir=tmp_path).start()
    writer = None
    try:
        w = Watched(browser)
        w.page.goto(dash.url + "/study/live")
        w.page.wait_for_function("document.getElementById('range').textContent.endsWith('of 40')")
        # The page polls while the writer commits a generation every 0.3 s for ~6 s, then one more after.
        writer = start_writer(url, "live", generations=20, pause=0.3)
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err            # e.g. sqlite3.OperationalError: database is locked
        total = 40 + 5 * 20
        written_at = float(out.split()[-1])
        w.page.wait_for_function(f"document.getElementById('range').textContent.endsWith('of {total}')",
                                 timeout=3000)
        assert time.time() - written_at < 3.0 + 0.5   # the last write, seen within the poll interval and fetch
        w.check()
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        dash.stop()
