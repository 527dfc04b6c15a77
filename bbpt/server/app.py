"""The FastAPI application behind ``bbpt serve``.

Security posture: loopback by default; a bearer key when one is set (compared in constant time); a body-size
limit enforced before any parsing; every input validated with a 4xx that names the problem, so bad input is
never a 500 and never stops the server; client bytes are never unpickled (raw arrays are decoded with numpy,
``prompt_embeds`` with ``torch.load(weights_only=True)`` after size and archive checks). The model is used from
one thread only (:class:`bbpt.server.worker.ModelWorker`).
"""

from __future__ import annotations

import hmac
import logging

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import bbpt
from bbpt.errors import BbptError
from bbpt.prompt import PromptInit
from bbpt.server import completions
from bbpt.server.prompts import load_bank
from bbpt.server.protocol import ClassifyRequest, CompletionRequest, Limits, ScoreRequest, SiteRequest
from bbpt.wire import RequestError, decode_array, score_response
from bbpt.server.worker import ModelWorker
from bbpt.tasks import Example, Template

log = logging.getLogger(__name__)


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
    # OpenAI's error shape, so OpenAI and vLLM clients show the message.
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


class Gate:
    """Pure ASGI middleware in front of every route: the API key, then the body-size limit.

    Both are checked before FastAPI reads or parses anything, so a client without the key cannot make the
    server buffer a body, and an oversized body is refused (413) without being held. A declared
    Content-Length is checked up front; a body without one (chunked) is counted as it arrives.
    """

    OPEN = frozenset({"/health"})

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in self.OPEN:
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.key.encode()):
                return await _error(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                                    headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        try:
            if int(headers.get(b"content-length", 0)) > self.max_bytes:
                return await self._refuse(scope, receive, send)
        except ValueError:
            return await _error(400, "Content-Length is not a number")(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        await _error(413, f"request body is larger than this server's limit of {self.max_bytes:,} bytes; "
                          "send fewer candidates or examples per request", headers={"Connection": "close"})(
            scope, receive, send)


def create_app(backend, api_key: str | None = None, prompts_dir=None, limits: Limits = Limits(),
               name: str | None = None) -> FastAPI:
    """Serve ``backend`` (a local :class:`adapters.hf.HFBackend`); ``name`` is the model id clients see."""
    info = backend.info()
    model_name = name or info.name
    max_len = getattr(getattr(backend.model, "config", None), "max_position_embeddings", None)
    limits = Limits(**{**limits.to_dict(), "max_seq_tokens": min(limits.max_seq_tokens, max_len or 10**9)})
    worker = ModelWorker(backend, max_merge=limits.max_candidates, max_seq_tokens=limits.max_seq_tokens)
    bank = load_bank(prompts_dir, info.hidden_size)
    app = FastAPI(title="bbpt serve", version=bbpt.__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.limits, app.state.bank = worker, limits, bank
    app.add_middleware(Gate, api_key=api_key, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        # Name the fields and what is wrong with them, never echo the (possibly huge) input back.
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        return _error(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(BbptError)
    async def _bad_value(request, exc: BbptError):
        if isinstance(exc, ValueError):          # RequestError, ConfigError, DataError: the request's fault
            return _error(400, str(exc))
        log.exception("model error")
        return _error(500, f"the model failed: {exc}", kind="server_error")

    @app.exception_handler(StarletteHTTPException)      # FastAPI's and routing's own (404, 405)
    async def _http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unexpected error")
        return _error(500, "internal server error; see the server log", kind="server_error")

    generators = {n: e for n, e in bank.items() if e.kind == "generation"}

    def check_model(requested: str | None) -> None:
        if requested and requested != model_name:
            also = f" and the tuned prompts {sorted(generators)}" if generators else ""
            raise HTTPException(404, f"model {requested!r} is not served here; this server serves "
                                     f"{model_name!r}{also}")

    @app.get("/health")
    async def health():
        # The counters let a load test (benchmarks/serve_load.py) say how many requests shared a forward.
        return {"status": "ok", "model": model_name, "score_requests": worker.requests, "forwards": worker.forwards}

    @app.get("/v1/models")
    async def models():
        card = dict(id=model_name, object="model", owned_by="bbpt", hidden_size=info.hidden_size, depths=info.depths,
                    embed_std=info.embed_std, vocab_size=info.vocab_size, max_model_len=limits.max_seq_tokens,
                    limits=limits.to_dict(), prompts=sorted(bank))
        # Tuned generation prompts are models of their own, on the served one (vLLM lists LoRA adapters so).
        tuned = [dict(id=n, object="model", owned_by="bbpt", parent=model_name, root=model_name, task=e.task,
                      tokens=int(e.delta.shape[1])) for n, e in sorted(generators.items())]
        return {"object": "list", "data": [card, *tuned]}

    @app.post("/v1/score")
    async def score(req: ScoreRequest):
        check_model(req.model)
        examples, template = _inputs(req.examples, req.template, req.label_words, limits)
        init, deltas = None, None
        if req.deltas is not None:
            if req.init is None:
                raise RequestError("deltas were sent without init; say how P0 is built, e.g. "
                                   '{"kind": "text", "tokens": 10, "text": "Classify the review."}')
            init = _init(req.init, limits)
            shape = (await worker.site(init)).shape
            deltas = decode_array(req.deltas.model_dump(), field="deltas",
                                  max_elements=limits.max_candidates * int(np.prod(shape)))
            if deltas.shape[1:] != shape or not 1 <= len(deltas) <= limits.max_candidates:
                raise RequestError(f"deltas have shape {list(deltas.shape)}; expected [pop, "
                                   f"{', '.join(map(str, shape))}] with 1 <= pop <= {limits.max_candidates} for a "
                                   f"{init.depth} prompt")
        lp, tokens, target_tokens = await worker.score(init, deltas, examples, template, req.label_words)
        return score_response(model_name, lp, tokens, target_tokens)

    @app.post("/v1/site")
    async def site(req: SiteRequest):
        check_model(req.model)
        return (await worker.site(_init(req.init, limits))).describe()

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        entry = bank.get(req.prompt)
        if entry is None:
            raise HTTPException(404, f"no tuned prompt named {req.prompt!r}; available: {sorted(bank)}")
        if req.text_pairs is not None and len(req.text_pairs) != len(req.texts):
            raise RequestError("text_pairs must have one entry per text")
        pairs = req.text_pairs or [None] * len(req.texts)
        examples, _ = _inputs([Example(t, 0, p) for t, p in zip(req.texts, pairs)], entry.template.source,
                              list(entry.label_words), limits)
        lp, *_ = await worker.score(entry.init, entry.delta, examples, entry.template, list(entry.label_words))
        scores = lp[0] + (0.0 if entry.bias is None else np.asarray(entry.bias))   # as eval and predict do
        probs = np.exp(scores - np.logaddexp.reduce(scores, axis=-1, keepdims=True))
        return {"prompt": entry.name, "predictions": [
            {"label": entry.label_names[int(p.argmax())], "probs": dict(zip(entry.label_names, p.tolist()))}
            for p in probs]}

    @app.get("/v1/prompts")
    async def prompts():
        return {"prompts": [e.describe() for e in bank.values()]}

    @app.post("/v1/completions")
    async def complete(req: CompletionRequest):
        if req.model in generators:
            entry = generators[req.model]
            texts = completions.bank_texts(req, limits)
            rows = await worker.run(completions.generate_with_prompt, backend, entry, texts, req, worker)
            return completions.bank_response(rows, req)
        check_model(req.model)
        completions.check_request(req, limits, info.vocab_size)
        embeds, texts = completions.load_prompts(req, limits, info.hidden_size)
        rows = await worker.run(completions.generate, backend, embeds, texts, req, limits)
        return completions.response(rows, req, model_name, backend.tokenizer)

    return app


def _inputs(examples, template: str, label_words: list[str], limits: Limits) -> tuple[list[Example], Template]:
    """Examples and template from a request, within the server's limits."""
    if len(examples) > limits.max_examples:
        raise RequestError(f"{len(examples)} examples in one request; this server takes at most "
                           f"{limits.max_examples} (split them across requests)")
    targets = [getattr(e, "target", None) for e in examples]
    if any(t is not None for t in targets):
        # Generation: each example's reference answer is scored; there are no label words.
        if label_words or not all(t and t.strip() for t in targets):
            raise RequestError("a generation request gives every example a non-empty target and no label_words")
    elif not 1 <= len(label_words) <= limits.max_labels or not all(w for w in label_words):
        raise RequestError(f"label_words must be 1..{limits.max_labels} non-empty words")
    texts = [template, *label_words, *(e.text for e in examples), *(e.text_pair or "" for e in examples),
             *(t or "" for t in targets)]
    if any(len(t) > limits.max_text_chars for t in texts):
        raise RequestError(f"a text, template or label word is longer than {limits.max_text_chars} characters")
    tpl = Template(template)
    out = [Example(e.text, 0, e.text_pair, targets=(t,) if t is not None else ()) for e, t in zip(examples, targets)]
    for ex in out:
        tpl.render(ex)         # a missing text_pair is the request's fault: find it here, not on the model thread
    return out, tpl


def _init(spec, limits: Limits) -> PromptInit:
    if spec.tokens > limits.max_prompt_tokens:
        raise RequestError(f"init.tokens={spec.tokens} is above this server's limit of {limits.max_prompt_tokens}")
    if len(spec.text) > limits.max_text_chars:
        raise RequestError(f"init.text is longer than {limits.max_text_chars} characters")
    if spec.kind in ("text", "labels") and not spec.text.strip():
        raise RequestError(f"init kind {spec.kind!r} needs words in init.text")
    return PromptInit(spec.kind, spec.tokens, spec.seed, spec.text, spec.depth, spec.layers)
