"""What ``bbpt serve`` and its clients share: the bytes of arrays on the wire and the shape of ``/v1/score``
requests and responses (numpy and base64 only: clients need no server dependencies). Both sides import it
downward, the server from :mod:`bbpt.server`, the clients from :mod:`adapters`.

Arrays travel as ``{"data": base64 of raw little-endian bytes, "shape": [...], "dtype": "float32"|"float16"}``.
Raw bytes, not pickle or ``.npy``: decoding runs no code the client chose, and the byte count is checked
against the declared shape before anything is allocated. Prompt embeddings for the OpenAI route use vLLM's
format instead (base64 of ``torch.save`` of a 2-D tensor), loaded with every guard vLLM has and a few more.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import zipfile

import numpy as np

from bbpt.errors import BbptError

WIRE_DTYPES = {"float32": "<f4", "float16": "<f2"}


class RequestError(BbptError, ValueError):
    """A request to ``bbpt serve`` is malformed; the server answers 400 with this message."""


def encode_array(a: np.ndarray, dtype: str = "float32") -> dict:
    if dtype not in WIRE_DTYPES:
        raise RequestError(f"wire dtype {dtype!r} is not supported; use one of {sorted(WIRE_DTYPES)}")
    raw = np.ascontiguousarray(a, dtype=WIRE_DTYPES[dtype]).tobytes()
    return {"data": base64.b64encode(raw).decode("ascii"), "shape": list(np.shape(a)), "dtype": dtype}


def decode_array(obj: dict, *, field: str, max_elements: int) -> np.ndarray:
    """A float32 array from its wire form; every way it can be wrong is a :class:`RequestError`."""
    dtype, shape = obj.get("dtype"), obj.get("shape")
    if dtype not in WIRE_DTYPES:
        raise RequestError(f"{field}.dtype is {dtype!r}; send one of {sorted(WIRE_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise RequestError(f"{field}.shape must be a list of non-negative integers, got {shape!r}")
    count = math.prod(shape)
    if count > max_elements:
        raise RequestError(f"{field} has {count:,} numbers, more than this server accepts ({max_elements:,})")
    try:
        raw = base64.b64decode(obj.get("data", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise RequestError(f"{field}.data is not valid base64") from None
    itemsize = np.dtype(WIRE_DTYPES[dtype]).itemsize
    if len(raw) != count * itemsize:
        raise RequestError(f"{field}.data holds {len(raw)} bytes but shape {shape} of {dtype} needs "
                           f"{count * itemsize}; send raw little-endian bytes, row-major")
    a = np.frombuffer(raw, dtype=WIRE_DTYPES[dtype]).reshape(shape).astype(np.float32)
    if not np.isfinite(a).all():
        raise RequestError(f"{field} contains NaN or inf; send finite numbers")
    return a


def encode_embeds(t) -> str:
    """vLLM's ``prompt_embeds`` format: base64 of ``torch.save`` of a (tokens, width) tensor."""
    import torch

    buf = io.BytesIO()
    torch.save(t.detach().cpu().contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_embeds(data: str, *, width: int, max_bytes: int, max_tokens: int, field: str = "prompt_embeds"):
    """Load a client's ``torch.save`` bytes without ever unpickling arbitrary objects.

    Checks, in order: base64, size, a zip archive whose members are stored uncompressed (so the size we
    checked is the size torch reads: no zip bombs), ``torch.load(weights_only=True)`` under sparse-tensor
    invariant checks, then a dense floating 2-D tensor of the model's width, finite, not too long.
    """
    import torch

    if not isinstance(data, str) or len(data) > (max_bytes * 4) // 3 + 4:
        raise RequestError(f"{field} must be a base64 string of at most {max_bytes:,} bytes once decoded")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field} is not valid base64") from None
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise RequestError(f"{field} is not a torch.save archive; send base64 of torch.save(tensor)") from None
    if any(m.compress_type != zipfile.ZIP_STORED for m in members) or sum(m.file_size for m in members) > max_bytes:
        raise RequestError(f"{field} archive is compressed or larger than {max_bytes:,} bytes")
    try:
        with torch.sparse.check_sparse_tensor_invariants():
            t = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refusals, truncated archives: all the client's bytes
        raise RequestError(f"{field} could not be loaded as a tensor ({str(e)[:200]})") from None
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise RequestError(f"{field} must hold one dense torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3 and t.shape[0] == 1:     # vLLM accepts a leading batch axis of 1 too
        t = t[0]
    if t.dim() != 2 or t.shape[1] != width or not 0 < t.shape[0] <= max_tokens:
        raise RequestError(f"{field} must have shape (tokens, {width}) with 1..{max_tokens} tokens, "
                           f"got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise RequestError(f"{field} must be floating point, got {t.dtype}")
    if not torch.isfinite(t).all():
        raise RequestError(f"{field} contains NaN or inf")
    return t.float()


def init_spec(init) -> dict:
    """How P0 is built, as the wire carries it; a deep or prefix prompt also says where it enters (left out at
    the input layer, so requests stay what servers before deep prompts accept)."""
    spec = dict(kind=init.kind, tokens=init.tokens, seed=init.seed, text=init.text)
    if init.depth != "input":
        spec.update(depth=init.depth, layers=init.layers)
    return spec


def score_request(model: str | None, examples: list[dict], template: str, label_words: list[str], *, init=None,
                  deltas: np.ndarray | None = None, dtype: str = "float32") -> dict:
    """The body of ``POST /v1/score`` (the server validates it as :class:`bbpt.server.protocol.ScoreRequest`).

    ``examples`` are ``{"text", "text_pair"}`` dicts (generation: with ``"target"``, and no label words); ``init`` (a :class:`bbpt.prompt.PromptInit`) says how the
    server builds P0 and must come with ``deltas``, the population's offsets ``[pop, m, D]``. Without deltas
    the examples are scored with no prompt (the manual template's baseline).
    """
    body = dict(model=model, examples=examples, template=template, label_words=list(label_words))
    if deltas is not None:
        body["init"] = init_spec(init)
        body["deltas"] = encode_array(deltas, dtype)
    return body


def score_response(model: str, logprobs: np.ndarray, tokens: int, target_tokens=None) -> dict:
    """The body ``/v1/score`` answers with: label log-probs ``[pop, n, C]`` and the tokens the model read; for
    examples sent with targets (generation), each target's summed log-prob ``[pop, n]`` and its length in
    tokens (``target_tokens``, ``[n]``, the end-of-sequence token included)."""
    body = {"model": model, "logprobs": logprobs.tolist(),
            "usage": {"prompt_tokens": tokens, "candidates": len(logprobs), "examples": logprobs.shape[1]}}
    if target_tokens is not None:
        body["target_tokens"] = [int(t) for t in target_tokens]
    return body


def read_score_response(body: dict) -> tuple[np.ndarray, int]:
    """Log-probs (float32) and prompt tokens from a ``/v1/score`` answer; the caller checks the shape."""
    return np.asarray(body.get("logprobs"), dtype=np.float32), int(body["usage"]["prompt_tokens"])
