"""OpenAI-compatible ``/v1/completions`` with vLLM's ``prompt_embeds``: enough for bbpt's vLLM client and for
any client written against vLLM.

Generation is greedy at temperature 0 and sampled otherwise (a per-request seeded generator, never the global
one). Log-probs are the model's raw ones, before temperature, as vLLM reports them by default. Prompts of equal
length are run together: no padding, so every prompt's numbers equal those of running it alone.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict

from bbpt.server.protocol import CompletionRequest, Limits
from bbpt.wire import RequestError, decode_embeds


def check_request(req: CompletionRequest, limits: Limits, vocab_size: int) -> None:
    """Refuse what this server does not do, the way vLLM refuses it (400 with the reason)."""
    if req.stream:
        raise RequestError("stream=true is not supported by bbpt serve; send stream=false")
    if req.n != 1:
        raise RequestError(f"n={req.n} is not supported; send n=1 (one completion per prompt)")
    if req.echo or req.prompt_logprobs is not None:
        raise RequestError("echo and prompt_logprobs are not supported (vLLM rejects them with prompt_embeds too)")
    if not req.prompt and not req.prompt_embeds:
        raise RequestError("either prompt or prompt_embeds must be given and non-empty")
    if (req.max_tokens or 0) > limits.max_new_tokens:
        raise RequestError(f"max_tokens={req.max_tokens} is above this server's limit of {limits.max_new_tokens}")
    if req.logprobs is not None and req.logprobs > limits.max_logprobs:
        raise RequestError(f"logprobs={req.logprobs} is above this server's limit of {limits.max_logprobs} "
                           "(like vLLM's --max-logprobs); ask for fewer or start bbpt serve with --max-logprobs")
    if req.logprob_token_ids is not None:
        if req.logprobs is None:
            raise RequestError("when using logprob_token_ids, logprobs must be set")
        if len(req.logprob_token_ids) > limits.max_labels or not all(0 <= t < vocab_size
                                                                     for t in req.logprob_token_ids):
            raise RequestError(f"logprob_token_ids must be at most {limits.max_labels} ids in [0, {vocab_size})")


def load_prompts(req: CompletionRequest, limits: Limits, width: int) -> tuple[list, list[str]]:
    """The request's prompts: decoded embeddings first, then texts (vLLM's order when both are sent)."""
    embeds = [req.prompt_embeds] if isinstance(req.prompt_embeds, str) else list(req.prompt_embeds or [])
    # The openai client refuses prompt=None, so vLLM's documented call sends prompt="" beside the embeddings;
    # vLLM reads that as no text prompt, and so does this server.
    if embeds and req.prompt == "":
        texts = []
    else:
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt or [])
    if len(embeds) + len(texts) > limits.max_prompts:
        raise RequestError(f"{len(embeds) + len(texts)} prompts in one request; this server takes at most "
                           f"{limits.max_prompts}")
    if any(len(t) > limits.max_text_chars for t in texts):
        raise RequestError(f"a prompt is longer than {limits.max_text_chars} characters")
    tensors = [decode_embeds(e, width=width, max_bytes=limits.max_body_bytes, max_tokens=limits.max_seq_tokens,
                             field=f"prompt_embeds[{i}]") for i, e in enumerate(embeds)]
    return tensors, texts


def generate(backend, embeds: list, texts: list[str], req: CompletionRequest, limits: Limits) -> list[dict]:
    """Run on the model thread: one dict per prompt with the generated ids, their log-probs and top entries."""
    torch = backend.torch
    seqs = [e.to(device=backend.device, dtype=backend.dtype) for e in embeds]
    for t in texts:
        ids = backend.tokenizer(t, add_special_tokens=True)["input_ids"]     # vLLM adds BOS to text prompts
        if not 0 < len(ids) <= limits.max_seq_tokens:
            raise RequestError(f"a text prompt is {len(ids)} tokens; send 1..{limits.max_seq_tokens}")
        seqs.append(backend.embedding(torch.tensor(ids, device=backend.device)))
    by_len = defaultdict(list)
    for i, s in enumerate(seqs):
        by_len[s.shape[0]].append(i)
    gen = torch.Generator(device=backend.device)
    gen.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % 2**63))
    out: list[dict] = [None] * len(seqs)
    with torch.inference_mode():
        for idx in by_len.values():
            for i, r in zip(idx, _decode(backend, torch.stack([seqs[i] for i in idx]), req, gen)):
                out[i] = r
    return out


def bank_texts(req: CompletionRequest, limits: Limits) -> list[str]:
    """The inputs of a request to a tuned generation prompt: text only (the prompt's embeddings are the
    server's), greedy, as ``bbpt generate`` answers; what it cannot honour is refused, not ignored."""
    if req.stream or req.n != 1 or req.echo or req.prompt_logprobs is not None:
        raise RequestError("a tuned prompt answers with stream=false, n=1 and no echo or prompt_logprobs")
    if req.prompt_embeds:
        raise RequestError(f"model {req.model!r} is a tuned prompt: send its input as prompt (text); the soft "
                           "prompt is the server's")
    if req.logprobs is not None:
        raise RequestError("logprobs are not returned for tuned prompts; leave logprobs out")
    if req.temperature not in (None, 0):
        raise RequestError(f"temperature={req.temperature}: tuned prompts answer greedily (send 0 or leave it out)")
    texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt or [])
    if not texts or not all(t.strip() for t in texts):
        raise RequestError("prompt must be a non-empty text (or list of texts): the input the tuned prompt answers")
    if len(texts) > limits.max_prompts or any(len(t) > limits.max_text_chars for t in texts):
        raise RequestError(f"at most {limits.max_prompts} prompts of at most {limits.max_text_chars} characters")
    if (req.max_tokens or 0) > limits.max_new_tokens:
        raise RequestError(f"max_tokens={req.max_tokens} is above this server's limit of {limits.max_new_tokens}")
    return texts


def generate_with_prompt(backend, entry, texts: list[str], req: CompletionRequest, worker) -> list[dict]:
    """On the model thread: greedy answers with a bank prompt, through the template it was tuned with, exactly
    what ``bbpt generate --prompt`` gives for the same inputs."""
    from bbpt.tasks import Example

    worker.use_init(entry.init)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop if req.stop is not None else entry.stop)
    return backend.generate_rows(entry.delta[0], [Example(t) for t in texts], entry.template,
                                 max_new_tokens=req.max_tokens if req.max_tokens is not None else 16, stop=stop)


def bank_response(rows: list[dict], req: CompletionRequest) -> dict:
    choices = [dict(index=i, text=r["text"], logprobs=None, finish_reason=r["finish"], stop_reason=None)
               for i, r in enumerate(rows)]
    prompt_tokens = sum(r["prompt_tokens"] for r in rows)
    completion_tokens = sum(len(r["ids"]) for r in rows)
    return dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()), model=req.model,
                choices=choices, usage=dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                            total_tokens=prompt_tokens + completion_tokens))


def _decode(backend, x, req: CompletionRequest, gen) -> list[dict]:
    """Token-by-token decoding with a KV cache for one batch of equal-length prompts."""
    from adapters._kv import cache_arg, returned_cache

    torch = backend.torch
    n, max_new = x.shape[0], req.max_tokens if req.max_tokens is not None else 16
    stop = _stop_ids(backend)
    rows = [dict(ids=[], logprobs=[], top=[], finish="length", prompt_tokens=int(x.shape[1])) for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool, device=backend.device)
    mask = torch.ones(n, x.shape[1], dtype=torch.long, device=backend.device)
    past, cur, past_arg = None, x, cache_arg(backend.model)
    for _ in range(max_new):
        o = backend.model(inputs_embeds=cur, attention_mask=mask, **{past_arg: past}, use_cache=True, logits_to_keep=1)
        lp = torch.log_softmax(o.logits[:, -1].float(), dim=-1)
        if req.temperature == 0:
            nxt = lp.argmax(-1)
        else:
            probs = torch.softmax(lp / (req.temperature or 1.0), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        for r in range(n):
            if done[r]:
                continue
            tok = int(nxt[r])
            # A stop token is reported with its log-probs (as vLLM does) but left out of the text.
            rows[r]["ids"].append(tok)
            rows[r]["logprobs"].append(float(lp[r, tok]))
            rows[r]["top"].append(_top(lp[r], tok, req))
            if tok in stop:
                rows[r]["finish"] = "stop"
                done[r] = True
        if done.all():
            break
        past, cur = returned_cache(o), backend.embedding(nxt).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
    return rows


def _top(lp, sampled: int, req: CompletionRequest) -> dict[int, float] | None:
    """The sampled token plus either the asked ids (``logprob_token_ids``) or the natural top-k."""
    if req.logprobs is None:
        return None
    if req.logprob_token_ids:
        ids = [sampled, *req.logprob_token_ids]
    else:
        ids = [sampled, *(lp.topk(req.logprobs).indices.tolist() if req.logprobs else [])]
    return dict(zip(ids, lp[ids].tolist()))


def _stop_ids(backend) -> set[int]:
    eos = getattr(getattr(backend.model, "generation_config", None), "eos_token_id", None)
    eos = backend.tokenizer.eos_token_id if eos is None else eos
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())


def response(rows: list[dict], req: CompletionRequest, model: str, tokenizer) -> dict:
    """The OpenAI completions response body."""
    def name(t: int) -> str:
        return f"token_id:{t}" if req.return_tokens_as_token_ids else tokenizer.decode([t])

    choices = []
    for i, r in enumerate(rows):
        logprobs = None
        if req.logprobs is not None:
            offsets, pos = [], 0
            for t in r["ids"]:                # offsets into the text, whatever the tokens are named
                offsets.append(pos)
                pos += len(tokenizer.decode([t], skip_special_tokens=True))
            logprobs = dict(tokens=[name(t) for t in r["ids"]], token_logprobs=r["logprobs"], text_offset=offsets,
                            top_logprobs=[{name(t): v for t, v in top.items()} for top in r["top"]])
        choices.append(dict(index=i, text=tokenizer.decode(r["ids"], skip_special_tokens=True), logprobs=logprobs,
                            finish_reason=r["finish"], stop_reason=None))
    prompt_tokens = sum(r["prompt_tokens"] for r in rows)
    completion_tokens = sum(len(r["ids"]) for r in rows)
    return dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()), model=model,
                choices=choices, usage=dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                            total_tokens=prompt_tokens + completion_tokens))
