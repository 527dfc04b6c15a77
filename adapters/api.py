"""``--backend api``: a model behind ``bbpt serve``, reached over its ``/v1/score`` protocol.

The client never holds weights. It sends how P0 is built (the init spec), the prompt offsets ΔP of a
population, and the texts with their template and label words; the server resolves P0 from the spec, adds the
offsets and returns label log-probs ``[pop, n, C]``. Width and embedding std (for scaling the projection) come
from ``/v1/models``. A population or a split larger than the server's limits is cut into several requests,
sent concurrently and put back together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from adapters._base import ModelInfo, PromptSite, ScoreResult
from adapters.http_client import served_model
from adapters.http_pool import EndpointPool, endpoint_urls
from bbpt.errors import BackendError, ConfigError
from bbpt.prompt import PromptInit
from bbpt.wire import WIRE_DTYPES, init_spec, read_score_response, score_request
from bbpt.tasks import Example, Template


@dataclass
class ApiBatch:
    """What ``encode`` keeps client-side: the examples as the wire carries them, the template, the labels."""

    examples: list[dict]
    template: str
    label_words: list[str]
    target_tokens: np.ndarray | None = None      # generation: learnt from the server's first answer

    @property
    def generation(self) -> bool:
        return "target" in self.examples[0]

    @property
    def n(self) -> int:
        return len(self.examples)


class ApiBackend:
    def __init__(self, endpoint: str | None, *, model: str | None = None, api_key: str | None = None,
                 dtype: str = "float32", max_concurrency: int = 4):
        if dtype not in WIRE_DTYPES:
            raise ConfigError(f"--dtype {dtype!r} cannot travel to bbpt serve; use one of {sorted(WIRE_DTYPES)}")
        self.wire_dtype = dtype
        self.http = EndpointPool(endpoint_urls(endpoint), api_key=api_key, max_concurrency=max_concurrency)
        card = served_model(self.http, [model] if model else [], allow_single=not model)
        self._check_same_model(card)
        self.limits = card.get("limits") or {}
        self._info = ModelInfo(name=card["id"], hidden_size=int(card["hidden_size"]), embed_std=float(card["embed_std"]),
                               vocab_size=int(card["vocab_size"]), gradients=False,
                               max_batch=int(self.limits.get("max_candidates", 64)),
                               extra={"endpoint": self.http.base_url, "endpoints": self.http.urls,
                                      "limits": self.limits},
                               depths=tuple(card.get("depths") or ("input",)))   # a server before deep prompts: input
        self.init: PromptInit | None = None
        self._site: PromptSite | None = None

    def _check_same_model(self, card: dict) -> None:
        """Several endpoints must serve one model with one set of limits, or their scores would not mix."""
        if len(self.http.urls) == 1:
            return
        for reply in self.http.each("/v1/models"):
            other = next((c for c in reply.body.get("data") or [] if c.get("id") == card["id"]), None)
            if other is None:
                raise ConfigError(f"{reply.endpoint} does not serve {card['id']!r} as {self.http.urls[0]} does; "
                                  "every --endpoint must serve the same model")
            for key in ("hidden_size", "vocab_size", "embed_std", "limits"):
                if other.get(key) != card.get(key):
                    raise ConfigError(f"{reply.endpoint} serves {card['id']!r} with {key} {other.get(key)!r}, "
                                      f"{self.http.urls[0]} with {card.get(key)!r}; start every server with the "
                                      "same model and limits")

    def info(self) -> ModelInfo:
        return self._info

    def set_init(self, init: PromptInit | None) -> None:
        most = self.limits.get("max_prompt_tokens")
        if init is not None and most is not None and init.tokens > most:
            raise ConfigError(f"--prompt-tokens {init.tokens} is above the server's limit of {most}")
        self.init, self._site = init, None

    def prompt_site(self) -> PromptSite:
        """Where the prompt enters, as the server resolved it (shapes and the statistics its projection is
        scaled by: the client never sees the hidden states or keys/values themselves)."""
        if self.init is None:
            raise ConfigError("no initial prompt set; call set_init first")
        if self._site is None:
            body = self.http.post_many("/v1/site", [dict(model=self._info.name, init=init_spec(self.init))])[0].body
            self._site = PromptSite(body["depth"], tuple(body["layers"]), tuple(body["shape"]),
                                    tuple(body["scales"]), int(body.get("kv_heads", 0)))
        return self._site

    def encode(self, examples: list[Example], template: Template, label_words: list[str]) -> ApiBatch:
        if not examples:
            raise ConfigError("cannot score an empty list of examples")
        for ex in examples:      # template errors surface here, before any request is sent
            template.render(ex)
        generation = any(e.targets for e in examples)
        if generation and not all(e.targets for e in examples):
            raise ConfigError("some examples have reference answers and some do not; a batch is either "
                              "classification or generation")
        rows = [{"text": e.text, "text_pair": e.text_pair, **({"target": e.targets[0]} if generation else {})}
                for e in examples]
        return ApiBatch(rows, template.source, [] if generation else list(label_words))

    def score(self, deltas: np.ndarray | None, batch: ApiBatch) -> ScoreResult:
        if deltas is not None and self.init is None:
            raise ConfigError("no initial prompt set; call set_init first")
        pop = 1 if deltas is None else len(deltas)
        cand_step, ex_step = self._steps(deltas, batch)
        slots, payloads = [], []
        for c0 in range(0, pop, cand_step):
            for e0 in range(0, batch.n, ex_step):
                slots.append((c0, e0))
                payloads.append(score_request(
                    self._info.name, batch.examples[e0:e0 + ex_step], batch.template, batch.label_words,
                    init=self.init, deltas=None if deltas is None else deltas[c0:c0 + cand_step],
                    dtype=self.wire_dtype))
        replies = self.http.post_many("/v1/score", payloads)
        shape = (pop, batch.n) if batch.generation else (pop, batch.n, len(batch.label_words))
        out = np.empty(shape, np.float32)
        tokens, target_tokens = 0, np.zeros(batch.n, np.int64)
        for (c0, e0), r in zip(slots, replies):
            block = out[c0:c0 + cand_step, e0:e0 + ex_step]
            if batch.generation:
                target_tokens[e0:e0 + ex_step] = r.body.get("target_tokens") or 0
            lp, used = read_score_response(r.body)
            if lp.shape != block.shape:
                raise BackendError(f"{self.http.base_url}/v1/score returned log-probs of shape {lp.shape}, "
                                   f"expected {block.shape}; is it a bbpt serve of the same version?")
            block[...] = lp
            tokens += used
        if batch.generation:
            if not target_tokens.all():
                raise BackendError(f"{self.http.base_url}/v1/score did not say how long the targets are "
                                   "(target_tokens); is it a bbpt serve of this version?")
            batch.target_tokens = target_tokens
        return ScoreResult(logprobs=out, tokens=tokens,
                           bytes_sent=sum(r.bytes_sent for r in replies),
                           bytes_received=sum(r.bytes_received for r in replies),
                           target_tokens=target_tokens if batch.generation else None,
                           per_prompt=self._served_by(slots, replies, cand_step, pop)
                           if len(self.http.urls) > 1 else None)

    @staticmethod
    def _served_by(slots, replies, cand_step: int, pop: int) -> list[dict]:
        """Several endpoints: which of them scored each prompt (a trial's metrics keep it)."""
        by: list[set[str]] = [set() for _ in range(pop)]
        for (c0, _), r in zip(slots, replies):
            for c in range(c0, min(c0 + cand_step, pop)):
                by[c].add(r.endpoint)
        return [{"endpoint": ",".join(sorted(e))} for e in by]

    def _steps(self, deltas, batch: ApiBatch) -> tuple[int, int]:
        """Candidates and examples per request, within the server's count and body-size limits."""
        ex_step = int(self.limits.get("max_examples", batch.n)) or batch.n
        cand_step = int(self.limits.get("max_candidates", 64))
        servers = len(self.http.alive)     # at least one request per live server, so they all work
        if deltas is None or len(deltas) == 1:
            ex_step = min(ex_step, -(-batch.n // servers))
        else:
            cand_step = min(cand_step, -(-len(deltas) // servers))
        if deltas is not None:
            text_bytes = len(json.dumps(batch.examples[:ex_step]))
            per_cand = deltas[0].size * np.dtype(WIRE_DTYPES[self.wire_dtype]).itemsize * 4 // 3 + 4
            room = int(self.limits.get("max_body_bytes", 32 * 2**20)) * 0.9 - text_bytes
            cand_step = max(1, min(cand_step, int(room // per_cand)))
        return cand_step, ex_step

    def close(self) -> None:
        self.http.close()
