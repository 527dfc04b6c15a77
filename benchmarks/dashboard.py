"""How fast the dashboard draws a long study: a 10,000-trial study's page in headless Chromium.

A study of ``--trials`` trials (written straight into a fresh SQLite file through the loop's own write path,
20 a generation, a dev check every 200) is served by ``bbpt dashboard`` on loopback; Chromium (Debian's,
driven by Playwright through its executable path) opens its page. Reported: the JSON the page fetched (bytes),
and the seconds from navigation to the curves drawn and the first trial page shown: the first load in a fresh
browser context (cold: plotly.js fetched and parsed) and the median of ``--repeats`` later loads in the same
context (warm, as a user's later visits are), the server warm. Also the studies page and a compare page of the committed suite.

    python benchmarks/dashboard.py --json > benchmarks/results/dashboard-2cpu-DATE.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from bbpt.storage import Storage
    from dashboard_helpers import DashboardProcess, fake_study
    from test_dashboard_browser import CHROMIUM, FLAGS

    tmp = Path(tempfile.mkdtemp())
    url = f"sqlite:///{tmp / 'long.db'}"
    fake_study(Storage(url), "long", args.trials)
    shutil.copy(ROOT / "studies" / "results" / "bbt_suite.db", tmp / "suite.db")
    long_dash = DashboardProcess("--storage", url, log_dir=tmp).start()
    suite_dash = DashboardProcess("--spec", str(ROOT / "studies" / "bbt_suite.toml"), "--storage",
                                  f"sqlite:///{tmp / 'suite.db'}", log_dir=tmp).start()
    pages = [("study, %d trials" % args.trials, long_dash.url + "/study/long",
              "document.getElementById('plot-dev').data && document.querySelector('#trials table')"),
             ("studies (63)", suite_dash.url + "/", "document.querySelector('#list table')"),
             ("compare (sst2, 5 arms x 3 seeds)", suite_dash.url + "/compare?task=sst2",
              "document.getElementById('plot-dev-seconds') && document.getElementById('plot-dev-seconds').data")]
    rows = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            for label, page_url, ready in pages:
                times, size = [], 0
                # one browser context per page kind: the first load is cold (nothing cached), the others warm,
                # as a user's later visits are
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                for _ in range(args.repeats + 1):
                    page = context.new_page()
                    got = []
                    page.on("response", lambda r, got=got: got.append(r) if "/api/" in r.url else None)
                    t0 = time.perf_counter()
                    page.goto(page_url)
                    page.wait_for_function(ready, timeout=30_000)
                    times.append(time.perf_counter() - t0)
                    size = sum(len(r.body()) for r in got if r.ok)
                    page.close()
                context.close()
                rows.append(dict(page=label, cold_seconds=round(times[0], 3),
                                 warm_seconds_median=round(statistics.median(times[1:]), 3),
                                 warm_seconds_max=round(max(times[1:]), 3), api_json_bytes=size))
            browser.close()
    finally:
        long_dash.stop()
        suite_dash.stop()
    out = dict(machine=f"{platform.platform()}; {platform.processor() or platform.machine()}", trials=args.trials,
               repeats=args.repeats, rows=rows)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for r in rows:
            print(f"{r['page']:36} cold {r['cold_seconds']:6.2f} s, warm {r['warm_seconds_median']:6.2f} s  "
                  f"{r['api_json_bytes'] / 1000:8.1f} kB of JSON")


if __name__ == "__main__":
    main()
