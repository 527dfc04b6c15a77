"""The HTTP side of every remote backend: one pooled async httpx client, a concurrency limit, timeouts, and
retries with exponential backoff and jitter (tenacity) on what is worth retrying.

Backends are called synchronously by the study loop, so the async client lives on a private event-loop thread
and sync callers hand it coroutines; one loop and one connection pool serve all of a backend's requests, and a
call that fans out into many requests (chunks of a population) sends them concurrently, up to the limit.

Retried: connection errors, timeouts, resets (any ``httpx.TransportError``), 408, 429 and 5xx. A
``Retry-After`` header is honoured (capped at the longest backoff, so a server cannot stall a study forever).
Anything else (401, 400, 404, 413) is the request's fault and fails at once. When the retries are spent the
call raises :class:`bbpt.errors.BackendError`, so a failed call never becomes a trial. A connection that
cannot be made to a server that has never answered this client (refused, no such host, connect timeout) is
not retried either: that is a wrong ``--endpoint`` or a server not started, which a minute of backoff cannot
mend. Once the server has answered, the same failure is a restart or a network blip, and is retried.

Environment: ``BBPT_HTTP_TIMEOUT`` (seconds to wait for a response, default 600: a CPU server scoring a full
population takes minutes), ``BBPT_HTTP_RETRIES`` (attempts per request, default 8, about a minute of backoff).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import threading
import time
from dataclasses import dataclass

import httpx
import tenacity

from bbpt.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
CONNECT_FAILURES = (httpx.ConnectError, httpx.ConnectTimeout)     # retried only once the server has answered


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    initial: float = 0.5          # first backoff, seconds; doubles each time
    max_wait: float = 30.0        # longest single wait, Retry-After included
    jitter: float = 0.5           # up to this many seconds added at random, so clients do not retry in step

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        return cls(attempts=max(1, int(os.environ.get("BBPT_HTTP_RETRIES", cls.attempts))))


@dataclass
class Reply:
    body: dict
    bytes_sent: int               # every attempt's request body: what this call cost on the wire
    bytes_received: int
    attempts: int
    seconds: float = 0.0          # from the first attempt to the answer, backoff included
    endpoint: str = ""            # which server answered (set by an EndpointPool)


class HttpStatusError(BackendError):
    """The server refused the request (a 4xx other than 408/429): retrying would get the same answer."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class RetryableStatus(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.retry_after = status, retry_after


@dataclass
class _Traffic:
    """Bytes counted across the attempts of one request (the attempts themselves raise or return)."""

    sent: int = 0
    received: int = 0
    attempts: int = 0


class _BackoffOrRetryAfter(tenacity.wait.wait_base):
    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self.backoff = (tenacity.wait_exponential(multiplier=policy.initial, max=policy.max_wait)
                        + tenacity.wait_random(0, policy.jitter))

    def __call__(self, state: tenacity.RetryCallState) -> float:
        after = getattr(state.outcome.exception(), "retry_after", None)
        return min(after, self.policy.max_wait) if after is not None else self.backoff(state)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _message(r: httpx.Response) -> str:
    try:
        err = r.json().get("error", {})
        return err.get("message", "") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        return r.text[:300]


class HttpClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float | None = None,
                 connect_timeout: float = 10.0, max_concurrency: int = 4, retry: RetryPolicy | None = None):
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy.from_env()
        self.answered = False         # has the server ever sent a response (any status) to this client?
        timeout = timeout if timeout is not None else float(os.environ.get("BBPT_HTTP_TIMEOUT", 600))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bbpt-http", daemon=True)
        self._thread.start()

        async def make():
            return (httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                      timeout=httpx.Timeout(timeout, connect=connect_timeout),
                                      limits=httpx.Limits(max_connections=max_concurrency,
                                                          max_keepalive_connections=max_concurrency)),
                    asyncio.Semaphore(max_concurrency))

        self._client, self._slots = self._submit(make())

    def _submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def get(self, path: str) -> Reply:
        return self._submit(self._request("GET", path, None))

    def post_many(self, path: str, payloads: list[dict], return_exceptions: bool = False) -> list:
        """POST each payload (concurrently, up to the limit); all succeed or the call raises BackendError.
        With ``return_exceptions`` every request runs to its end and a failed one's place holds its error, so
        a caller can keep (and cache) the answers that did come back."""
        async def all_of():
            return await asyncio.gather(*(self._request("POST", path, p) for p in payloads),
                                        return_exceptions=return_exceptions)

        return self._submit(all_of())

    def _retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, CONNECT_FAILURES) and not self.answered:
            return False
        return isinstance(exc, (httpx.TransportError, RetryableStatus))

    async def _request(self, method: str, path: str, payload: dict | None) -> Reply:
        body = None if payload is None else json.dumps(payload).encode()
        traffic = _Traffic()
        start = time.perf_counter()
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.retry.attempts), wait=_BackoffOrRetryAfter(self.retry),
            retry=tenacity.retry_if_exception(self._retryable), reraise=True,
            before_sleep=lambda s: log.warning("%s %s failed (%s); retry %d of %d", method, path,
                                               s.outcome.exception(), s.attempt_number, self.retry.attempts - 1))
        try:
            async for attempt in retrying:
                with attempt:
                    reply = await self._attempt(method, path, body, traffic)
                    reply.seconds = time.perf_counter() - start
                    return reply
        except (httpx.TransportError, RetryableStatus) as e:
            if isinstance(e, CONNECT_FAILURES) and not self.answered:
                raise BackendError(f"cannot connect to {self.base_url} ({type(e).__name__}: {e}), and no server has "
                                   "answered there yet; start it (e.g. `bbpt serve`) or fix --endpoint") from None
            raise BackendError(f"{method} {self.base_url}{path} failed after {traffic.attempts} attempt(s): "
                               f"{type(e).__name__}: {e}; is the server running and reachable? "
                               "(BBPT_HTTP_RETRIES sets the attempts)") from None

    async def _attempt(self, method: str, path: str, body: bytes | None, traffic: _Traffic) -> Reply:
        async with self._slots:
            traffic.attempts += 1
            traffic.sent += len(body or b"")
            r = await self._client.request(method, path, content=body,
                                           headers={"Content-Type": "application/json"} if body else None)
            self.answered = True
            traffic.received += r.num_bytes_downloaded
        if r.status_code in RETRY_STATUSES:
            raise RetryableStatus(r.status_code, _message(r), _retry_after(r.headers.get("retry-after")))
        if r.status_code >= 400:
            hint = " (check --api-key or BBPT_API_KEY)" if r.status_code == 401 else ""
            raise HttpStatusError(f"{method} {self.base_url}{path} was refused with HTTP {r.status_code}: "
                                  f"{_message(r)}{hint}", r.status_code)
        try:
            data = r.json()
        except ValueError:
            raise BackendError(f"{method} {self.base_url}{path} answered HTTP {r.status_code} with a body that is "
                               f"not JSON: {r.text[:200]!r}") from None
        return Reply(data, traffic.sent, traffic.received, traffic.attempts)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._submit(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


def root_url(endpoint: str | None, flag: str = "--endpoint") -> str:
    """The server's root URL; ``http://host:8000`` and ``http://host:8000/v1`` both name it."""
    if endpoint and "," in endpoint:
        raise ConfigError(f"{flag} {endpoint!r} names several servers; only --backend api spreads a study over "
                          "several endpoints, this backend takes one URL")
    if not endpoint or not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"{flag} {endpoint!r} is not an http(s) URL; pass e.g. {flag} http://127.0.0.1:8000")
    url = endpoint.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def served_model(http: HttpClient, wanted: list[str], allow_single: bool) -> dict:
    """The ``/v1/models`` entry to use: one whose id is in ``wanted``, or (``allow_single``) the only one."""
    cards = http.get("/v1/models").body.get("data") or []
    for card in cards:
        if card.get("id") in wanted:
            return card
    if allow_single and len(cards) == 1:
        return cards[0]
    ids = [c.get("id") for c in cards]
    raise ConfigError(f"{http.base_url} serves {ids}, not {wanted[0]!r}; pass --model with one of those")
