"""How a model is reached. One module per kind of backend; all speak the :class:`Backend` protocol."""

from __future__ import annotations

from dataclasses import dataclass

from adapters._base import Backend, CachingBackend, GradientBackend, ModelInfo, PromptSite, ScoreResult

__all__ = ["BACKENDS", "Backend", "BackendKind", "CachingBackend", "GradientBackend", "ModelInfo", "PromptSite", "ScoreResult",
           "backend_kind", "make_backend"]


@dataclass(frozen=True)
class BackendKind:
    """What a kind of backend can do, known from ``--backend`` alone, so settings it cannot serve are refused
    before a model is loaded or a server asked; an open backend's ``info()`` reports the same."""

    gradients: bool
    prompt_kinds: tuple[str, ...]
    # What it can score: label log-probs (classification) and/or a target's log-likelihood (generation).
    # vLLM returns no prompt log-probs for prompt embeddings, and a text API's top-k log-probs cannot score a
    # given answer token by token, so both score classification only.
    task_kinds: tuple[str, ...] = ("classification", "generation")
    # Where a soft prompt may enter. A local model (and `bbpt serve`, which runs one and builds the layer
    # prompts itself) runs below its input layer; vLLM takes prompt embeddings, which reach the input layer alone.
    depths: tuple[str, ...] = ("input",)


BACKENDS = {"local": BackendKind(True, ("soft", "text"), depths=("input", "deep", "prefix")),
            "api": BackendKind(False, ("soft",), depths=("input", "deep", "prefix")),   # the server says which
            "vllm": BackendKind(False, ("soft",), ("classification",)),
            "openai": BackendKind(False, ("text",), ("classification",))}


def backend_kind(kind: str) -> BackendKind:
    from bbpt.errors import ConfigError

    if kind not in BACKENDS:
        raise ConfigError(f"unknown --backend {kind!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[kind]


def make_backend(kind: str, **kwargs) -> Backend:
    """Build a backend by kind; imports are lazy so unused backends cost nothing."""
    backend_kind(kind)
    if kind == "local":
        from adapters.hf import HFBackend

        return HFBackend(kwargs["model"], device=kwargs.get("device", "auto"), dtype=kwargs.get("dtype", "float32"))
    if kind == "api":       # bbpt serve's /v1/score: the client never holds the weights
        from adapters.api import ApiBackend

        return ApiBackend(kwargs.get("endpoint"), model=kwargs.get("model"), api_key=kwargs.get("api_key"),
                          dtype=kwargs.get("dtype", "float32"))
    if kind == "vllm":      # OpenAI completions with prompt_embeds; needs the embedding table locally
        from adapters.vllm import VLLMBackend

        return VLLMBackend(kwargs.get("endpoint"), model=kwargs["model"], api_key=kwargs.get("api_key"),
                           dtype=kwargs.get("dtype", "float32"))
    if kind == "openai":    # a text-only API (completions or chat with top-k log-probs): discrete prompts
        from adapters.openai_text import OpenAITextBackend

        return OpenAITextBackend(kwargs.get("endpoint"), model=kwargs.get("model"), api_key=kwargs.get("api_key"),
                                 chat=kwargs.get("chat", False), logprobs=kwargs.get("logprobs", True),
                                 top_logprobs=kwargs.get("top_logprobs"))
