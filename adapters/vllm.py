"""``--backend vllm``: an OpenAI-compatible completions server that accepts ``prompt_embeds`` (vLLM started with
``--enable-prompt-embeds``, or ``bbpt serve``).

Such a server takes embeddings, not ids, so the client builds every sequence itself: the templated text's
embeddings around P0 + ΔP. That needs the tokenizer and the input-embedding table only, never the transformer:
the table is read alone from the model's safetensors, and :class:`adapters.hf.HFBackend` runs over it (an
embedding-only stand-in for the model), so tokenizing, P0 and label ids are computed exactly as locally.
vLLM adds no BOS or chat template to ``prompt_embeds``; the client's embeddings already carry what the local
backend would add.

Each (candidate, example) sequence is one prompt asking for one token. Label log-probs come from:

- ``logprob_token_ids`` (recent vLLM, and bbpt serve), which returns the asked ids' log-probs exactly. Found
  on the first call by a probe; servers that ignore or refuse the field fall back to
- top-k ``logprobs`` (vLLM's ``--max-logprobs`` defaults to 20). A label outside the top-k gets a **floor**:
  the largest log-prob it could have given what came back, ``min(lowest top-k log-prob, log(1 − top-k
  mass))`` (:mod:`adapters.topk`). It ranks below every returned token, as the true value does, but can
  overstate it. Such labels are counted (``missing_labels``, ``last_missing``) and each call that needed a
  floor logs a warning.
"""

from __future__ import annotations

import logging

import numpy as np

from adapters._base import ModelInfo, ScoreResult
from adapters.default_model import resolve_model
from adapters.embedding_table import load_input_embeddings
from adapters.http_client import HttpClient, HttpStatusError, root_url, served_model
from adapters.topk import NO_MASS, label_floor, warn_missing
from bbpt.errors import BackendError, ConfigError
from bbpt.prompt import PromptInit
from bbpt.wire import encode_embeds
from bbpt.tasks import Example, Template

log = logging.getLogger(__name__)

LABEL_MODES = ("auto", "token_ids", "topk")
__all__ = ["LABEL_MODES", "VLLMBackend", "label_floor", "load_input_embeddings"]   # the last two moved; kept here


def _embedding_only(weight, config):
    import torch

    class EmbeddingOnly(torch.nn.Module):
        """Stands in for the model on the client: the embedding table and nothing to run."""

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding.from_pretrained(weight, freeze=True)
            self.config = config

        def get_input_embeddings(self):
            return self.embed

        def forward(self, *args, **kwargs):
            raise BackendError("the vllm client holds only the embedding table; the model runs on the server")

    return EmbeddingOnly()


class VLLMBackend:
    def __init__(self, endpoint: str | None, *, model: str, api_key: str | None = None, dtype: str = "float32",
                 top_logprobs: int = 20, label_logprobs: str = "auto", prompts_per_request: int = 64,
                 max_concurrency: int = 4):
        import torch
        from transformers import AutoTokenizer

        from adapters.hf import HFBackend

        if label_logprobs not in LABEL_MODES:
            raise ConfigError(f"label_logprobs {label_logprobs!r} is not one of {LABEL_MODES}")
        self.torch = torch
        try:
            self.wire_dtype = getattr(torch, dtype)
        except AttributeError:
            raise ConfigError(f"unknown --dtype {dtype!r}; use float32, bfloat16 or float16") from None
        base_url = root_url(endpoint)       # a malformed --endpoint is refused before the embeddings are read
        path = resolve_model(model)
        weight, config = load_input_embeddings(path)
        self.local = HFBackend(model, device="cpu", model_obj=_embedding_only(weight, config),
                               tokenizer=AutoTokenizer.from_pretrained(path))
        self.http = HttpClient(base_url, api_key=api_key, max_concurrency=max_concurrency)
        card = served_model(self.http, [model, path], allow_single=True)
        width = self.local.info().hidden_size
        if card.get("hidden_size") not in (None, width):
            raise ConfigError(f"the server's model {card['id']!r} has width {card['hidden_size']}, but the local "
                              f"embeddings of {model!r} have {width}; point --model at the served model's files")
        self.served = card["id"]
        self._info = ModelInfo(name=self.served, hidden_size=width, embed_std=self.local.info().embed_std,
                               vocab_size=self.local.info().vocab_size, gradients=False,
                               extra={"endpoint": self.http.base_url, "top_logprobs": top_logprobs})
        self.mode = label_logprobs
        self.top_logprobs = top_logprobs
        self.prompts_per_request = prompts_per_request
        self.missing_labels = 0          # label log-probs set to the floor, over the backend's life
        self.label_logprobs = 0
        self.last_missing = None         # [pop, n, C] mask of the last call

    def info(self) -> ModelInfo:
        return self._info

    def set_init(self, init: PromptInit | None) -> None:
        self.local.set_init(init)

    def encode(self, examples: list[Example], template: Template, label_words: list[str]):
        return self.local.encode(examples, template, label_words)

    def prompt_matrix(self, delta: np.ndarray) -> np.ndarray:
        return self.local.prompt_matrix(delta)

    def score(self, deltas: np.ndarray | None, batch) -> ScoreResult:
        seqs = self._sequences(deltas, batch)
        mode = self._label_mode(seqs[0], batch.label_ids)
        payloads = []
        for i in range(0, len(seqs), self.prompts_per_request):
            p = dict(model=self.served, prompt_embeds=[encode_embeds(s) for s in seqs[i:i + self.prompts_per_request]],
                     max_tokens=1, temperature=0, return_tokens_as_token_ids=True)
            if mode == "token_ids":
                p.update(logprobs=1, logprob_token_ids=list(batch.label_ids))
            else:
                p.update(logprobs=self.top_logprobs)
            payloads.append(p)
        replies = self.http.post_many("/v1/completions", payloads)
        tops = [self._first_top(c) for r in replies
                for c in sorted(r.body.get("choices") or [], key=lambda c: c.get("index", 0))]
        if len(tops) != len(seqs):
            raise BackendError(f"{self.http.base_url}/v1/completions answered {len(tops)} choices for "
                               f"{len(seqs)} prompts")
        lp, missing = self._label_logprobs(tops, batch.label_ids)
        pop = 1 if deltas is None else len(deltas)
        shape = (pop, batch.n, len(batch.label_ids))
        self.last_missing = missing.reshape(shape)
        self.missing_labels += int(missing.sum())
        self.label_logprobs += missing.size
        warn_missing(missing, self.top_logprobs, "adapters/vllm.py")
        tokens = sum(int((r.body.get("usage") or {}).get("prompt_tokens", 0)) for r in replies)
        return ScoreResult(logprobs=lp.reshape(shape), tokens=tokens or sum(len(s) for s in seqs),
                           bytes_sent=sum(r.bytes_sent for r in replies),
                           bytes_received=sum(r.bytes_received for r in replies))

    def _sequences(self, deltas, batch) -> list:
        """Candidate-major (candidate 0's n examples, then candidate 1's, ...): before · P0 + ΔP · after."""
        torch = self.torch
        emb = self.local.embedding
        prompts = [None] if deltas is None else [torch.from_numpy(self.local.prompt_matrix(d)) for d in deltas]
        with torch.no_grad():
            pieces = [(emb(torch.tensor(b, dtype=torch.long)), emb(torch.tensor(a, dtype=torch.long)))
                      for b, a in zip(batch.before, batch.after)]
            return [torch.cat([b, *([p] if p is not None else []), a]).to(self.wire_dtype)
                    for p in prompts for b, a in pieces]

    def _label_mode(self, probe, label_ids: list[int]) -> str:
        """``token_ids`` if the server returns asked ids' log-probs, else ``topk``; probed once."""
        if self.mode != "auto":
            return self.mode
        payload = dict(model=self.served, prompt_embeds=[encode_embeds(probe)], max_tokens=1, temperature=0,
                       logprobs=1, logprob_token_ids=list(label_ids), return_tokens_as_token_ids=True)
        try:
            top = self._first_top(self.http.post_many("/v1/completions", [payload])[0].body["choices"][0])
            ok = all(f"token_id:{t}" in top for t in label_ids)
        except HttpStatusError as e:          # a server that refuses the field; outages still raise
            log.info("server refused logprob_token_ids (%s)", e)
            ok = False
        self.mode = "token_ids" if ok else "topk"
        log.info("vllm backend: label log-probs from %s", "logprob_token_ids (exact)" if ok else
                 f"the top-{self.top_logprobs} log-probs (labels outside get a floor)")
        return self.mode

    def _first_top(self, choice: dict) -> dict:
        try:
            top = choice["logprobs"]["top_logprobs"][0]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"{self.http.base_url}/v1/completions returned no top_logprobs; is it an "
                               "OpenAI-compatible server started with --enable-prompt-embeds?") from None
        return top or {}

    def _label_logprobs(self, tops: list[dict], label_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        # Keys are token_id:N when the server honours return_tokens_as_token_ids, else decoded pieces.
        pieces = {self.local.tokenizer.decode([t]): t for t in label_ids}
        out = np.empty((len(tops), len(label_ids)), np.float32)
        missing = np.zeros(out.shape, bool)
        for i, top in enumerate(tops):
            by_id = {(int(k[9:]) if k.startswith("token_id:") else pieces.get(k)): v for k, v in top.items()}
            floor = label_floor(top.values()) if top else NO_MASS
            for c, t in enumerate(label_ids):
                missing[i, c] = t not in by_id
                out[i, c] = by_id.get(t, floor)
        return out, missing

    def close(self) -> None:
        self.http.close()
