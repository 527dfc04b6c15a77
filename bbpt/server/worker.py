"""The one place the server touches the model.

Torch modules are not safe to call from several threads, so every piece of model work (tokenizing, resolving
P0, forwards) runs on one dedicated thread, and the event loop stays free to accept and validate requests.
Concurrent ``/v1/score`` requests that share their inputs (the same examples, template, label words and
initial prompt: many clients tuning the same task, or one client's parallel chunks) are merged into one
population, because the local backend batches (candidate, example) pairs and a bigger population fills its
forward passes better.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from bbpt.prompt import PromptInit
from bbpt.wire import RequestError
from bbpt.tasks import Example, Template

log = logging.getLogger(__name__)

ENCODED_CACHE = 32      # distinct (examples, template, labels) sets kept tokenized: a few studies' splits


@dataclass
class _Job:
    key: tuple                       # jobs with equal keys may share one forward
    init: PromptInit | None
    deltas: np.ndarray | None
    examples: tuple
    template: Template
    label_words: tuple
    future: asyncio.Future = field(repr=False, default=None)

    @property
    def pop(self) -> int:
        return 1 if self.deltas is None else len(self.deltas)


class ModelWorker:
    def __init__(self, backend, *, max_merge: int, max_seq_tokens: int):
        self.backend = backend
        self.max_merge = max_merge
        self.max_seq_tokens = max_seq_tokens
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bbpt-model")
        self._queue: list[_Job] = []
        self._draining = False
        self._init: PromptInit | None = None
        self._encoded: OrderedDict = OrderedDict()
        self.forwards = 0            # backend.score calls, for tests and logs: merged requests share one
        self.requests = 0            # score requests taken; requests / forwards is how much merging happened

    async def run(self, fn, *args):
        """Run ``fn(*args)`` on the model thread (for completions and other one-off model work)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def score(self, init: PromptInit | None, deltas: np.ndarray | None, examples: list[Example],
                    template: Template, label_words: list[str]) -> tuple[np.ndarray, int, np.ndarray | None]:
        """Label log-probs ``[pop, n, C]`` (generation: target log-probs ``[pop, n]``), the tokens processed and,
        for generation, each target's length in tokens; possibly computed with other requests."""
        ex, labels = tuple(examples), tuple(label_words)
        job = _Job(key=(init, deltas is None, ex, template, labels), init=init, deltas=deltas, examples=ex,
                   template=template, label_words=labels, future=asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self.requests += 1
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await job.future

    async def _drain(self) -> None:
        try:
            while self._queue:
                group = self._take_group()
                try:
                    results = await self.run(self._score_group, group)
                except Exception as e:   # every job of the group asked the same thing, so all share the error
                    for j in group:
                        if not j.future.done():
                            j.future.set_exception(e)
                    continue
                for j, r in zip(group, results):
                    if not j.future.done():      # the client may have gone away; its result is dropped
                        j.future.set_result(r)
        finally:
            self._draining = False

    def _take_group(self) -> list[_Job]:
        head = self._queue[0]
        group, total = [head], head.pop
        if head.deltas is not None:
            for j in self._queue[1:]:
                if j.key == head.key and total + j.pop <= self.max_merge:
                    group.append(j)
                    total += j.pop
        for j in group:
            self._queue.remove(j)
        return group

    # -- on the model thread --------------------------------------------------------------------------------
    def _score_group(self, group: list[_Job]) -> list[tuple[np.ndarray, int]]:
        head = group[0]
        batch = self._encode(head.examples, head.template, head.label_words)
        m = 0 if head.init is None or head.deltas is None else head.init.tokens
        longest = max(len(b) + m + len(a) for b, a in zip(batch.before, batch.after))
        if longest > self.max_seq_tokens:
            raise RequestError(f"an example is {longest} tokens long with the prompt, more than this server's "
                               f"limit of {self.max_seq_tokens}; shorten the texts")
        if head.deltas is None:
            res = self.backend.score(None, batch)
            self.forwards += 1
            return [(res.logprobs, res.tokens, res.target_tokens)]
        self.use_init(head.init)
        res = self.backend.score(np.concatenate([j.deltas for j in group]), batch)
        self.forwards += 1
        out, start = [], 0
        for j in group:     # every candidate processes the same tokens, so usage splits by population share
            out.append((res.logprobs[start:start + j.pop], res.tokens * j.pop // len(res.logprobs),
                        res.target_tokens))
            start += j.pop
        return out

    def _encode(self, examples: tuple, template: Template, label_words: tuple):
        key = (examples, template, label_words)
        if key in self._encoded:
            self._encoded.move_to_end(key)
        else:
            # The backend also caches the examples' embeddings on the batch, so repeated calls skip that too.
            self._encoded[key] = self.backend.encode(list(examples), template, list(label_words))
            if len(self._encoded) > ENCODED_CACHE:
                self._encoded.popitem(last=False)
        return self._encoded[key]

    async def site(self, init: PromptInit):
        """Where prompts built by ``init`` enter (a :class:`adapters.PromptSite`), resolved on the model thread."""
        def resolve():
            self.use_init(init)
            return self.backend.prompt_site()
        return await self.run(resolve)

    def use_init(self, init: PromptInit) -> None:
        # P0 is resolved once per spec and kept while requests keep naming it (one study at a time is the
        # common case); switching specs costs one embedding lookup, so no larger cache is worth keeping.
        if init != self._init:
            self._init = None
            self.backend.set_init(init)
            self._init = init

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
