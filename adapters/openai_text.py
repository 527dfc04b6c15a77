"""``--backend openai``: a text-only OpenAI-compatible API (OpenAI, llama.cpp's server, Ollama, vLLM without
embeddings). It takes text and at best returns the top-k log-probs of the next token, so it scores discrete
prompts (:class:`bbpt.prompt.TextPrompts`, from ``--space discrete|vocab``), never soft ones.

**Requests.** One per (prompt, example), on ``/v1/completions`` (the prompt where the template says, else
leading on its own line) or, with ``chat``, ``/v1/chat/completions`` (the prompt as the system message, or
where the template's ``{prompt}`` puts it in the user message). ``max_tokens=1``, ``temperature=0`` and
``logprobs`` with the largest top-k the server accepts: unless ``top_logprobs`` is given, the first request
tries 20, 10, 5 and 1 (OpenAI allows 20 on chat and 5 on legacy completions) and keeps the first accepted.

**Label log-probs.** The server's tokenizer is unknown, so labels are matched as text: a returned token counts
for a label when, stripped and case-folded, it is a non-empty beginning of that label word and of no other
(" positive", "Positive" and " pos" all count for " positive"); a label's log-prob is the log-sum-exp of its
tokens. A label with no token in the top-k gets the **floor** ``min(k-th log-prob, log(1 − top-k mass)) −
FLOOR_MARGIN``: the most it could have, lowered by a margin because a token outside the top-k usually sits well
below the k-th. Floors are counted per trial (``missing_labels``) and over the backend's life.

**No log-probs** (``logprobs=False``): the model answers in up to ``ANSWER_TOKENS`` tokens and the answer is
parsed strictly: its words must begin with exactly one label word, whole, or it counts as wrong (-1 in
``ScoreResult.predicted``, ``unparsed`` per trial). Fitness is then the error rate.

**Cost.** Every answer keeps its ``usage`` (prompt and completion tokens) and latency; the tokens of requests
actually sent are what a call costs. Answers are kept by a hash of the request, in memory and, when the study
hands one over (``use_cache``), in its storage, so the same request is never sent twice in a study, across
resumes included. Identical requests within one call are sent once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass

import numpy as np

from adapters._base import ModelInfo, ScoreResult
from adapters.http_client import HttpClient, HttpStatusError, root_url, served_model
from adapters.topk import label_floor, merge_duplicates, warn_missing
from bbpt.errors import BackendError, BbptError, ConfigError
from bbpt.prompt import PromptInit, TextPrompts
from bbpt.tasks import Example, Template

log = logging.getLogger(__name__)

TOPK_TRIES = (20, 10, 5, 1)
FLOOR_MARGIN = 1.0          # nats below the most a label outside the top-k could have
ANSWER_TOKENS = 4           # --no-logprobs: long enough for a label word and the start of what follows it
NO_SCORE = -30.0            # --no-logprobs: the "log-prob" of every class an answer did not name
REQUESTS_PER_ROUND = 64     # sent together; answers are stored after each round, so a crash loses at most one


@dataclass
class TextBatch:
    examples: list[Example]
    template: Template
    label_words: list[str]
    labels: list[str]                 # the label words normalized for matching: stripped, case-folded

    @property
    def n(self) -> int:
        return len(self.examples)


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[^\W_]+", text.casefold()))


def label_logprobs(top: dict[str, float], labels: list[str], margin: float = FLOOR_MARGIN):
    """Each label's log-prob from a top-k ``{token: log-prob}``, and which labels got the floor instead."""
    groups: list[list[float]] = [[] for _ in labels]
    for tok, lp in top.items():
        t = tok.strip().casefold()
        hits = [c for c, w in enumerate(labels) if t and w.startswith(t)]
        if len(hits) == 1:           # a piece that begins two labels says nothing about either
            groups[hits[0]].append(lp)
    floor = label_floor(top.values(), margin)
    missing = np.array([not g for g in groups])
    return np.array([np.logaddexp.reduce(g) if g else floor for g in groups], np.float32), missing


def parse_answer(text: str, labels: list[str]) -> int:
    """The class whose label word the answer begins with, whole; -1 if none, or more than one, fits."""
    words = _norm(text)
    hits = [c for c, w in enumerate(labels) if words == _norm(w) or words.startswith(_norm(w) + " ")]
    return hits[0] if len(hits) == 1 else -1


class OpenAITextBackend:
    def __init__(self, endpoint: str | None, *, model: str | None = None, api_key: str | None = None,
                 chat: bool = False, logprobs: bool = True, top_logprobs: int | None = None,
                 floor_margin: float = FLOOR_MARGIN, max_concurrency: int = 4, timeout: float | None = None):
        if top_logprobs is not None and top_logprobs < 1:
            raise ConfigError(f"--top-logprobs {top_logprobs} is invalid; give at least 1, or leave it out to use "
                              "the largest the server accepts")
        self.http = HttpClient(root_url(endpoint), api_key=api_key, max_concurrency=max_concurrency, timeout=timeout)
        self.served = self._served_id(model)
        self.chat, self.use_logprobs, self.top_k = chat, logprobs, top_logprobs
        self.path = "/v1/chat/completions" if chat else "/v1/completions"
        self.floor_margin = floor_margin
        self.cache = None                    # the study's stored answers (see use_cache)
        self.memo: dict[str, dict] = {}      # answers seen by this process
        self.missing_labels = 0              # label log-probs set to the floor, over the backend's life
        self.label_scores = 0
        self.requests_sent = 0
        self._info = ModelInfo(name=self.served, hidden_size=0, embed_std=0.0, vocab_size=0, gradients=False,
                               prompt_kinds=("text",),
                               extra={"endpoint": self.http.base_url, "route": self.path, "logprobs": logprobs})

    def _served_id(self, model: str | None) -> str:
        try:
            return served_model(self.http, [model] if model else [], allow_single=True)["id"]
        except HttpStatusError as e:
            if e.status != 404 or not model:
                raise
            return model            # an API without /v1/models: take --model as the id

    # -- protocol -------------------------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        return self._info

    def set_init(self, init: PromptInit | None) -> None:
        """Nothing to resolve: a discrete prompt's start is text, built by its space."""

    def use_cache(self, cache) -> None:
        self.cache = cache

    def encode(self, examples: list[Example], template: Template, label_words: list[str]) -> TextBatch:
        if not examples:
            raise ConfigError("cannot score an empty list of examples")
        labels = [w.strip().casefold() for w in label_words]
        if any(not w for w in labels) or len(set(labels)) < len(labels):
            raise ConfigError(f"label words {label_words} must be non-empty and differ after stripping spaces and "
                              "case: a text API's answer is matched to them as text")
        for ex in examples:          # template errors surface here, before any request is sent
            template.render(ex)
        return TextBatch(list(examples), template, list(label_words), labels)

    def score(self, prompts: TextPrompts | None, batch: TextBatch) -> ScoreResult:
        if prompts is not None and not isinstance(prompts, TextPrompts):
            raise ConfigError("backend openai scores text prompts only (a text API takes no embeddings); use "
                              "--space discrete or --space vocab")
        texts = [None] if prompts is None else list(prompts.texts)
        payloads = [self._payload(t, ex, batch.template) for t in texts for ex in batch.examples]
        keys = [self._key(p) for p in payloads]
        fresh = self._fetch(keys, payloads)
        pop, n, classes = len(texts), batch.n, len(batch.labels)
        lp = np.full((pop * n, classes), NO_SCORE, np.float32)
        missing = np.zeros(lp.shape, bool)
        predicted = np.full(pop * n, -1)
        counted: set[str] = set()
        per_prompt = [dict(requests=0, cached=0, prompt_tokens=0, completion_tokens=0, tokens=0, request_seconds=0.0)
                      for _ in texts]
        for row, key in enumerate(keys):
            answer, acct = self.memo[key], per_prompt[row // n]
            if key in fresh and key not in counted:      # sent now, and charged to its first prompt only
                counted.add(key)
                usage = answer.get("usage") or {}
                acct["requests"] += 1
                acct["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
                acct["completion_tokens"] += int(usage.get("completion_tokens") or 0)
                acct["request_seconds"] += float(answer.get("seconds") or 0.0)
            else:
                acct["cached"] += 1
            if self.use_logprobs:
                lp[row], missing[row] = label_logprobs(answer["top"], batch.labels, self.floor_margin)
                if answer.get("k"):          # the top-k its answers came with (cached ones keep theirs)
                    acct["top_logprobs"] = min(acct.get("top_logprobs", answer["k"]), answer["k"])
            else:
                predicted[row] = parse_answer(answer.get("text") or "", batch.label_words)
                if predicted[row] >= 0:
                    lp[row, predicted[row]] = 0.0
        for c, acct in enumerate(per_prompt):
            acct["tokens"] = acct["prompt_tokens"] + acct["completion_tokens"]
            rows = slice(c * n, (c + 1) * n)
            if self.use_logprobs:
                acct["missing_labels"] = int(missing[rows].sum())
            else:
                acct["unparsed"] = int((predicted[rows] < 0).sum())
        self._note_missing(missing)
        return ScoreResult(logprobs=lp.reshape(pop, n, classes), tokens=sum(a["tokens"] for a in per_prompt),
                           predicted=None if self.use_logprobs else predicted.reshape(pop, n),
                           per_prompt=per_prompt)

    def close(self) -> None:
        self.http.close()

    # -- requests -------------------------------------------------------------------------------------------
    def _payload(self, prompt_text: str | None, ex: Example, template: Template) -> dict:
        p: dict = dict(model=self.served, max_tokens=1 if self.use_logprobs else ANSWER_TOKENS, temperature=0)
        if self.chat:
            system, user = template.chat_parts(ex, prompt_text)
            p["messages"] = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": user}]
        else:
            p["prompt"] = template.render_text_prompt(ex, prompt_text)
        return p

    def _key(self, payload: dict) -> str:
        # The top-k is left out: it is probed once and belongs to the server, not to the request.
        material = json.dumps(dict(route=self.path, logprobs=self.use_logprobs, **payload), sort_keys=True,
                              ensure_ascii=False)
        return hashlib.sha256(material.encode()).hexdigest()

    def _with_k(self, payload: dict, k: int) -> dict:
        if not self.use_logprobs:
            return payload
        return {**payload, "logprobs": True, "top_logprobs": k} if self.chat else {**payload, "logprobs": k}

    def _fetch(self, keys: list[str], payloads: list[dict]) -> set[str]:
        """Make sure every key has an answer in ``memo``; return the keys that had to be sent now."""
        todo = {k: p for k, p in zip(keys, payloads) if k not in self.memo}
        if todo and self.cache is not None:
            self.memo.update(self.cache.get_many(list(todo)))
            todo = {k: p for k, p in todo.items() if k not in self.memo}
        items = list(todo.items())
        if items and self.use_logprobs and self.top_k is None:
            self._store({items[0][0]: self._probe(items[0][1])})
            items = items[1:]
        for i in range(0, len(items), REQUESTS_PER_ROUND):
            part = items[i:i + REQUESTS_PER_ROUND]
            replies = self.http.post_many(self.path, [self._with_k(p, self.top_k) for _, p in part],
                                          return_exceptions=True)
            self._store({k: self._answer(r) for (k, _), r in zip(part, replies) if not isinstance(r, BaseException)})
            errors = [r for r in replies if isinstance(r, BaseException)]
            if errors:
                err = errors[0]
                if isinstance(err, BbptError):
                    raise err
                raise BackendError(f"{self.http.base_url}{self.path} failed: {type(err).__name__}: {err}") from err
        return set(todo)

    def _probe(self, payload: dict) -> dict:
        """Send one real request with the largest top-k the server accepts; remember that k."""
        for k in TOPK_TRIES:
            try:
                reply = self.http.post_many(self.path, [self._with_k(payload, k)])[0]
            except HttpStatusError as e:
                if e.status not in (400, 422):
                    raise
                log.info("%s refused top-%d log-probs (%s); trying fewer", self.http.base_url, k, e)
                continue
            self.top_k = k
            self._info.extra["top_logprobs"] = k
            log.info("openai backend: label log-probs from the top-%d of %s%s", k, self.http.base_url, self.path)
            return self._answer(reply)
        raise BackendError(f"{self.http.base_url}{self.path} refused log-probs for every top-k in {TOPK_TRIES}; "
                           "if the API returns none, run with --no-logprobs (fitness = accuracy of the answers)")

    def _answer(self, reply) -> dict:
        """What is kept of a response: the first token's top-k, the text, usage and latency."""
        body = reply.body
        self.requests_sent += 1
        try:
            choice = body["choices"][0]
            if self.chat:
                text = (choice.get("message") or {}).get("content") or ""
                content = (choice.get("logprobs") or {}).get("content") or []
                top = merge_duplicates((t["token"], t["logprob"]) for t in (content[0].get("top_logprobs") or [])) \
                    if content else {}
            else:
                text = choice.get("text") or ""
                tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
                top = {str(t): float(v) for t, v in (tops[0] or {}).items()} if tops else {}
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise BackendError(f"{self.http.base_url}{self.path} answered in an unexpected shape: "
                               f"{json.dumps(body)[:300]}; is it an OpenAI-compatible API?") from None
        if self.use_logprobs and not top:
            raise BackendError(f"{self.http.base_url}{self.path} returned no top log-probs; if the API cannot, "
                               "run with --no-logprobs (fitness = accuracy of the generated answers)")
        usage = body.get("usage") or {}
        return dict(top=top, text=text, k=self.top_k, seconds=round(reply.seconds, 4),
                    usage=dict(prompt_tokens=usage.get("prompt_tokens"),
                               completion_tokens=usage.get("completion_tokens")))

    def _store(self, answers: dict[str, dict]) -> None:
        self.memo.update(answers)
        if self.cache is not None:
            self.cache.put_many(answers)

    def _note_missing(self, missing: np.ndarray) -> None:
        if not self.use_logprobs:
            return
        self.missing_labels += int(missing.sum())
        self.label_scores += missing.size
        warn_missing(missing, self.top_k, "adapters/openai_text.py")
