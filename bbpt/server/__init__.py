"""``bbpt serve``: a model as a service, for tuning prompts on a model the client cannot open.

Routes (see :mod:`bbpt.server.app`): ``/health``, ``/v1/models``, ``/v1/score`` (bbpt's own protocol: the
client sends prompt offsets and texts, the server resolves P0 and returns label log-probs),
``/v1/completions`` (OpenAI-compatible, with vLLM's ``prompt_embeds``) and ``/v1/classify`` (tuned prompts
served by name). What clients share with it (array encoding, request and response shapes) is :mod:`bbpt.wire`.
"""
