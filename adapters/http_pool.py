"""Several servers of one model behind one client: ``--endpoint http://gpu1:8000,http://gpu2:8000``.

Scale-out belongs to the serving engine (several ``bbpt serve`` processes, or vLLM's data parallelism); the
client's part is to spread each call's requests over them and to survive one going away. Every endpoint keeps
its own :class:`~adapters.http_client.HttpClient` (its own connections, concurrency limit and retries). A
call's requests are dealt out round-robin, and a server that empties its share takes from the others', so a
faster server simply takes more of them. When an endpoint's retries are spent (it died, or the network to it
did), the others take its request and the endpoint is dropped for the rest of the run, with a warning; the
call fails only when no endpoint is left. A refusal (4xx) is the request's fault, not the server's, and fails the
call at once, as with one endpoint.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque

from adapters.http_client import HttpClient, HttpStatusError, Reply, root_url
from bbpt.errors import BackendError, ConfigError

log = logging.getLogger(__name__)


def endpoint_urls(endpoint: str | None, flag: str = "--endpoint") -> list[str]:
    """The root URLs of a comma-separated ``--endpoint`` (one or more; repeats refused)."""
    urls = [root_url(part.strip(), flag) for part in (endpoint or "").split(",") if part.strip()] or \
        [root_url(endpoint, flag)]
    repeated = [u for u, n in Counter(urls).items() if n > 1]
    if repeated:
        raise ConfigError(f"{flag} names {repeated[0]} more than once; list each server once")
    return urls


class EndpointPool:
    """The part of :class:`HttpClient` a backend uses (``get``, ``post_many``, ``close``), over several servers.
    Each :class:`Reply` it returns says which endpoint answered (``reply.endpoint``)."""

    def __init__(self, urls: list[str], **client_args):
        if not urls:
            raise ConfigError("no endpoint given; pass --endpoint http://host:8000[,http://host2:8000]")
        self.clients = [HttpClient(u, **client_args) for u in urls]
        self.alive = list(self.clients)
        self._senders = client_args.get("max_concurrency", 4)
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """How messages name the pool: its endpoints, comma-separated (one URL for one server)."""
        return ",".join(c.base_url for c in self.clients)

    @property
    def urls(self) -> list[str]:
        return [c.base_url for c in self.clients]

    def each(self, path: str) -> list[Reply]:
        """GET ``path`` from every endpoint (to check they all serve the same model)."""
        return [self._tag(c.get(path), c) for c in self.clients]

    def get(self, path: str) -> Reply:
        return self.post_or_get("GET", path, [None])[0]

    def post_many(self, path: str, payloads: list[dict]) -> list[Reply]:
        return self.post_or_get("POST", path, payloads)

    def post_or_get(self, method: str, path: str, payloads: list) -> list[Reply]:
        if len(self.alive) == 1 and len(self.clients) == 1:     # one server: no threads, no queue
            c = self.clients[0]
            replies = c.post_many(path, payloads) if method == "POST" else [c.get(path)]
            return [self._tag(r, c) for r in replies]
        # Requests are dealt round-robin, one queue per endpoint, so every server gets its share even when
        # there are fewer requests than senders; a sender whose queue is empty takes from the longest other
        # queue (a fast server helps a slow one), and a dead server's queue is taken over the same way.
        queues = {c: deque() for c in self.alive}
        for i in range(len(payloads)):
            queues[self.alive[i % len(self.alive)]].append(i)
        out: list[Reply | None] = [None] * len(payloads)
        failures: dict[str, BaseException] = {}
        refused: list[BaseException] = []

        def take(client: HttpClient) -> int | None:
            with self._lock:
                if queues.get(client):
                    return queues[client].popleft()
                longest = max(queues.values(), key=len, default=None)
                return longest.pop() if longest else None

        def sender(client: HttpClient) -> None:
            while not refused and client in self.alive:
                i = take(client)
                if i is None:
                    return
                try:
                    r = (client.post_many(path, [payloads[i]])[0] if method == "POST" else client.get(path))
                except HttpStatusError as e:        # the request's fault: every server would refuse it
                    refused.append(e)
                    return
                except BackendError as e:           # this server is gone: the others take its work
                    with self._lock:
                        queues[client].append(i)
                        if client in self.alive:
                            self.alive.remove(client)
                            failures[client.base_url] = e
                            log.warning("endpoint %s dropped (%s); %d endpoint(s) left", client.base_url, e,
                                        len(self.alive))
                    return
                out[i] = self._tag(r, client)

        while True:
            if not self.alive:
                detail = "; ".join(f"{u}: {e}" for u, e in failures.items())
                raise BackendError(f"every endpoint of {self.base_url} failed ({detail or 'dropped earlier'}); "
                                   "start the servers again (the study resumes from its last generation)")
            senders = min(self._senders, -(-len(payloads) // len(self.alive)))
            threads = [threading.Thread(target=sender, args=(c,), daemon=True)
                       for c in list(self.alive) for _ in range(senders)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if refused:
                raise refused[0]
            if not any(queues.values()):
                return out      # type: ignore[return-value]

    @staticmethod
    def _tag(reply: Reply, client: HttpClient) -> Reply:
        reply.endpoint = client.base_url
        return reply

    def close(self) -> None:
        for c in self.clients:
            c.close()
