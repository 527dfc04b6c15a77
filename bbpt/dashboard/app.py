"""``bbpt dashboard``: a small web view of the studies in one storage, live while they run.

Read-only by construction: storage is opened with ``read_only=True`` (SQLite refuses writes on the view's
connections; PostgreSQL sessions are read-only), every request is one short transaction, so a running study
is never blocked or locked by the view. Pages are one HTML shell and a small script of bbpt's own; plots are
plotly.js served from the installed plotly wheel (SVG traces, no WebGL, no CDN), so the view works offline
and renders headless. A page polls ``/api/version`` every ~1.5 s and refetches its data when what is stored
has changed.

Started with ``--api-key``, and only then, it also takes specs to queue (``POST /api/queue``, validated as
``bbpt study queue`` validates them) for ``bbpt worker``s to run: the one write it makes, through a writable
storage opened for that request alone. The queue itself is shown either way.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import threading
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

import bbpt
from bbpt.dashboard import data
from bbpt.errors import BbptError, StudyError
from bbpt.storage import Storage

log = logging.getLogger(__name__)

STATIC = resources.files("bbpt.dashboard") / "static"
POLL_MS = 1500


def plotly_js() -> Path:
    """plotly.js as the plotly wheel ships it (the dashboard's one third-party asset)."""
    try:
        import plotly
    except ImportError:
        raise BbptError("bbpt dashboard draws with plotly, which is not installed; pip install -e \".[ui]\"") from None
    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise BbptError(f"the installed plotly has no {path}; reinstall it (pip install --force-reinstall plotly)")
    return path


MAX_SPEC_BYTES = 256 * 1024


def create_app(storage_url: str, *, spec=None, runs_dir: str | None = None, device: str = "cpu",
               api_key: str | None = None, max_spec_bytes: int = MAX_SPEC_BYTES) -> FastAPI:
    storage = Storage(storage_url, read_only=True)
    js = plotly_js()
    app = FastAPI(title="bbpt dashboard", version=bbpt.__version__, docs_url=None, redoc_url=None)
    cards: dict[str, dict] = {}
    vocab_lock = threading.Lock()
    vocab: dict[str, object] = {}

    shell = (STATIC / "page.html").read_text()          # read once: every page is this shell

    def page(kind: str, title: str, **params) -> HTMLResponse:
        attrs = json.dumps(dict(page=kind, poll=POLL_MS, spec=spec.name if spec else None,
                                tasks=spec.tasks if spec else [], **params))
        # plotly.js is 4.8 MB to parse: only the pages that draw load it, deferred, so that bbpt.js (loaded
        # first, in <head>) has the page's data on its way while the browser parses it
        plots = '<script src="/static/plotly.min.js" defer></script>\n' if kind != "studies" else ""
        return HTMLResponse(shell.replace("{{title}}", html.escape(title)).replace("{{plotly}}", plots)
                            .replace("{{params}}", html.escape(attrs, quote=True)))

    @app.exception_handler(BbptError)
    async def _bbpt_error(_request, exc: BbptError):
        return JSONResponse({"error": str(exc)}, status_code=404 if isinstance(exc, StudyError) else 400)

    # -- pages ----------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def index():
        return page("studies", "bbpt: studies")

    @app.get("/study/{name:path}", response_class=HTMLResponse)
    def study_page(name: str):
        return page("study", f"bbpt: {name}", study=name)

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(study: list[str] = Query(default=[]), task: str | None = None):
        if not study and spec is not None and task is None:
            task = spec.tasks[0]
        return page("compare", "bbpt: compare", studies=study, task=task)

    # -- data -----------------------------------------------------------------------------------------------
    @app.get("/api/version")
    def api_version(study: str | None = None):
        return data.version(storage, study)

    @app.get("/api/studies")
    def api_studies():
        return data.studies(storage)

    @app.get("/api/study/{name:path}/trials")
    def api_trials(name: str, offset: int = 0, limit: int = 50):
        return data.trials_page(storage, name, offset, limit)

    @app.get("/api/study/{name:path}/card")
    def api_card(name: str):
        row = storage.require_study(name)
        where = data.prompt_dir(row, runs_dir or (spec.runs_dir if spec else None))
        if where is None:
            return dict(available=False, reason="no saved prompt for this study: it is still running, or its "
                        "runs folder is not here (start the dashboard with --runs DIR)")
        if name not in cards:
            from bbpt.prompt import SavedPrompt
            from bbpt.promptcard import Vocabulary, card

            saved = SavedPrompt.load(where)
            voc = None
            if saved.text is None:
                with vocab_lock:        # one embedding table per model, read once
                    model = saved.meta["model"]
                    if model not in vocab:
                        vocab[model] = Vocabulary.load(model)
                    voc = vocab[model]
            cards[name] = dict(card(saved, voc), available=True, path=str(where))
        return cards[name]

    @app.get("/api/study/{name:path}")
    def api_study(name: str, max_points: int = data.MAX_POINTS):
        return data.study(storage, name, max(10, min(max_points, 20000)))

    @app.get("/api/compare")
    def api_compare(study: list[str] = Query(default=[]), task: str | None = None):
        if study:
            return data.compare_studies(storage, study)
        if spec is None:
            return JSONResponse({"error": "name studies to compare (?study=A&study=B), or start the dashboard "
                                          "with --spec to compare a spec's arms"}, status_code=400)
        return data.compare_spec(storage, spec, task or spec.tasks[0])

    # -- the queue ------------------------------------------------------------------------------------------
    @app.get("/api/queue")
    def api_queue():
        return dict(rows=data.queue(storage), accepts=api_key is not None)

    @app.post("/api/queue")
    async def api_queue_spec(request: Request, path: str = "posted.toml"):
        """The body is a spec's TOML text; ``path`` names it (in messages, and its runs folder's home)."""
        if api_key is None:
            return JSONResponse({"error": "this dashboard is read-only; start it with --api-key KEY to accept "
                                          "specs to queue"}, status_code=403)
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return JSONResponse({"error": "queueing needs the header 'Authorization: Bearer KEY' with the "
                                          "dashboard's --api-key"}, status_code=401)
        if int(request.headers.get("content-length") or 0) > max_spec_bytes:
            return JSONResponse({"error": f"a spec is at most {max_spec_bytes} bytes"}, status_code=413)
        body = await request.body()
        if len(body) > max_spec_bytes:
            return JSONResponse({"error": f"a spec is at most {max_spec_bytes} bytes"}, status_code=413)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return JSONResponse({"error": "the spec should be UTF-8 TOML text"}, status_code=400)
        from bbpt.studyspec.runner import queue_spec
        from bbpt.studyspec.spec import spec_from_text

        posted = spec_from_text(text, path)       # ConfigError -> 400 with the message `study queue` gives
        added, done = queue_spec(posted, storage_url)
        return dict(spec=posted.name, queued=added, complete=done, studies=len(posted.plan))

    # -- assets ---------------------------------------------------------------------------------------------
    @app.get("/static/plotly.min.js")
    def static_plotly():
        return FileResponse(js, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    @app.get("/static/{name}")
    def static_file(name: str):
        kinds = {"bbpt.js": "text/javascript", "bbpt.css": "text/css"}
        if name not in kinds:
            return Response(status_code=404)
        return Response((STATIC / name).read_text(), media_type=kinds[name])

    @app.get("/favicon.ico")
    def favicon():
        return Response(status_code=204)

    return app
