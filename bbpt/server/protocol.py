"""Request and response models of ``bbpt serve`` (pydantic, server side only), and the server's limits.

Schemas catch wrong types and shapes of JSON; numeric limits that depend on the server's settings are checked
in the routes against :class:`Limits`, so every refusal names the limit and the value that broke it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bbpt.prompt import DEPTHS, INIT_KINDS


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Defaults fit a 2-core CPU box and a 40-step BBT population."""

    max_body_bytes: int = 32 * 2**20
    max_candidates: int = 64          # prompts per /v1/score request
    max_examples: int = 256           # examples per /v1/score or /v1/classify request
    max_prompt_tokens: int = 512      # m, rows of one soft prompt
    max_text_chars: int = 20_000      # per example text, template, init text
    max_seq_tokens: int = 4096        # tokens of one scored or completed sequence
    max_prompts: int = 256            # prompts per /v1/completions request
    max_new_tokens: int = 256
    max_logprobs: int = 20            # vLLM's --max-logprobs default
    max_labels: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")   # a misspelt field is an error, not a silent default


class ArrayIn(_Strict):
    data: str
    shape: list[int]
    dtype: str = "float32"


class InitIn(_Strict):
    kind: Literal[INIT_KINDS]
    tokens: int = Field(ge=1)
    seed: int = 0
    text: str = ""
    depth: Literal[DEPTHS] = "input"    # where the prompt enters; the server builds the layer prompts
    layers: str = Field(default="all", max_length=1000)


class SiteRequest(_Strict):
    """``POST /v1/site``: where a prompt built by ``init`` enters, its offsets' shape and per-block scales."""

    model: str | None = None
    init: InitIn


class ExampleIn(_Strict):
    text: str
    text_pair: str | None = None
    target: str | None = None           # generation: the reference answer whose log-likelihood is scored


class ScoreRequest(_Strict):
    model: str | None = None
    init: InitIn | None = None          # how the server builds P0; needed whenever deltas are sent
    deltas: ArrayIn | None = None       # [pop, m, D] offsets added to P0; absent: score without a prompt
    examples: list[ExampleIn] = Field(min_length=1)
    template: str
    label_words: list[str] = Field(default_factory=list)    # classification; generation examples have targets


class ClassifyRequest(_Strict):
    prompt: str
    texts: list[str] = Field(min_length=1)
    text_pairs: list[str] | None = None


class CompletionRequest(BaseModel):
    """The fields of OpenAI's (and vLLM's) completions request that this server honours; others are ignored,
    as vLLM ignores them, so stock OpenAI clients work."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | list[str] | None = None
    prompt_embeds: str | list[str] | None = None
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0)
    logprob_token_ids: list[int] | None = Field(default=None, min_length=1)
    return_tokens_as_token_ids: bool | None = None
    temperature: float | None = Field(default=None, ge=0)
    seed: int | None = None
    n: int = 1
    echo: bool | None = False
    stream: bool | None = False
    prompt_logprobs: int | None = None
    stop: str | list[str] | None = None     # honoured for tuned generation prompts (the bank)
