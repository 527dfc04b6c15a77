"""How a model is reached. One module per kind of backend; all speak the :class:`Backend` protocol."""

from __future__ import annotations

from adapters._base import Backend, CachingBackend, GradientBackend, ModelInfo, ScoreResult

__all__ = ["BACKENDS", "Backend", "CachingBackend", "GradientBackend", "ModelInfo", "ScoreResult", "make_backend"]

BACKENDS = ("local", "api", "vllm", "openai")


def make_backend(kind: str, **kwargs) -> Backend:
    """Build a backend by kind; imports are lazy so unused backends cost nothing."""
    from bbpt.errors import ConfigError

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
    raise ConfigError(f"unknown --backend {kind!r}; available: {', '.join(BACKENDS)}")
