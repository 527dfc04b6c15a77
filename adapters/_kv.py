"""Keys and values kept between forwards, so the local backend does not recompute what has not changed.

Everything goes through transformers' own cache argument (a :class:`~transformers.DynamicCache` built from
stored tensors; :func:`cache_arg` names it as the installed transformers does) and ``inputs_embeds``: no
model code is forked. Sequences are left-padded, with explicit position ids and an attention mask over past +
new tokens, so a row's scores equal those of the same tokens run alone and unpadded. Whether a model's cache
can be reused this way is checked once per backend (:func:`reuse_works`) rather than assumed from its name; a
model that fails the check is scored the plain way.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

from bbpt.errors import BackendError


@dataclass
class KV:
    """Keys/values of ``rows`` left-padded sequences: per layer ``[rows, kv_heads, width, head_dim]``.

    ``mask`` ``[rows, width]`` is 1 on real tokens; ``lengths`` ``[rows]`` counts them, which is also the
    position id of the token that comes next.
    """

    keys: list
    values: list
    mask: object
    lengths: object

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def take(self, idx) -> "KV":
        """Rows ``idx``, without the leading columns that are padding in all of them (a gather, so a copy)."""
        lengths = self.lengths[idx]
        cols = slice(self.mask.shape[1] - int(lengths.max()), None)
        return KV([k[idx, :, cols] for k in self.keys], [v[idx, :, cols] for v in self.values],
                  self.mask[idx, cols], lengths)

    def expand(self, rows: int) -> "KV":
        """A one-row KV seen as ``rows`` rows (views; the forward's cache concatenation makes the copy)."""
        return KV([k.expand(rows, -1, -1, -1) for k in self.keys], [v.expand(rows, -1, -1, -1) for v in self.values],
                  self.mask.expand(rows, -1), self.lengths.expand(rows))


@dataclass
class SharedKV:
    """Keys/values of rows that all begin with the same tokens (demonstrations before every input: ``--demos``):
    the shared ``head`` once, as one row, and each row's own tokens after it in ``tail``, so memory and the
    one-off encoding grow with the rows' own lengths, not with the demonstrations' length times the rows.

    ``tail`` is None when only the head fits the cache budget (a test set of hundreds of long inputs): each
    row's own tokens then run with every call, after the kept head, which still spares recomputing the head.
    """

    head: KV
    tail: KV | None

    @property
    def nbytes(self) -> int:
        return self.head.nbytes + (0 if self.tail is None else self.tail.nbytes)

    @property
    def head_len(self) -> int:
        return int(self.head.lengths[0])

    def take(self, idx) -> KV:
        """Rows ``idx`` as one KV: the head, then (if kept) each row's own tokens, left-padded among themselves.
        The padding sits between the head and a row's tokens; the mask hides it and positions count only
        real tokens, so the scores are those of the row run unpadded."""
        import torch

        head = self.head.expand(len(idx))
        if self.tail is None:
            return head
        tail = self.tail.take(idx)
        return KV([torch.cat(p, dim=2) for p in zip(head.keys, tail.keys)],
                  [torch.cat(p, dim=2) for p in zip(head.values, tail.values)],
                  torch.cat([head.mask, tail.mask], dim=1), head.lengths + tail.lengths)


def common_head(seqs: list[list[int]]) -> int:
    """How many leading token ids all of ``seqs`` share, leaving each at least one token of its own."""
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
        if n == 0:
            break
    return max(n, 0)


def cache_arg(model) -> str:
    """The keyword ``model(...)`` takes its cache by: transformers 5.24 renamed ``past_key_values`` to ``cache``
    (the old name warns, and goes in 5.40), and bbpt supports both sides of the rename."""
    return _cache_arg(type(model))


@functools.lru_cache(maxsize=None)      # one signature lookup per model class, not per forward
def _cache_arg(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def returned_cache(out):
    """The cache a forward returned, under either name (see :func:`cache_arg`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def forward_last(model, seqs: list, past: KV | None = None, keep: bool = False, targets: list | None = None,
                 hidden=None):
    """Run ``seqs`` (each ``[len, D]`` embeddings) after ``past`` (one past row per sequence, or none).

    Returns the full-vocabulary log-probs at each sequence's last token, ``[B, V]`` float32 (only that
    position reaches the LM head: ``logits_to_keep=1``; the vocabulary stays whole because a log-prob needs the
    softmax's normaliser), and with ``keep`` the keys/values of past + ``seqs``.

    With ``targets`` (per sequence, the token ids its last ``len(t)`` tokens are), it returns instead each
    sequence's total target log-prob, ``[B, 1]``: teacher-forced, read at the positions that predict the
    target tokens, and only those positions (the last ``max len(t) + 1``) reach the LM head.

    ``hidden`` (a deep prompt: decoder-layer modules, offsets ``[B, layers, m, D]``, and where in each sequence
    its prompt starts) adds the offsets to the hidden states at those positions before each of those layers.
    """
    import torch
    from transformers import DynamicCache

    from adapters._deep import offsets_for

    longest = max(s.shape[0] for s in seqs)
    x = seqs[0].new_zeros(len(seqs), longest, seqs[0].shape[1])
    new_mask = torch.zeros(len(seqs), longest, dtype=torch.long, device=x.device)
    for i, s in enumerate(seqs):
        x[i, longest - s.shape[0]:] = s
        new_mask[i, longest - s.shape[0]:] = 1
    positions = (new_mask.cumsum(-1) - 1).clamp(min=0)
    cache, mask = None, new_mask
    if past is not None:
        mask = torch.cat([past.mask, new_mask], dim=1)
        positions = positions + past.lengths[:, None]
        cache = DynamicCache(ddp_cache_data=list(zip(past.keys, past.values)), config=model.config)
    tail = 1 if targets is None else max(len(t) for t in targets) + 1
    with offsets_for(hidden, [longest - s.shape[0] for s in seqs]):          # left padding moves each row
        out = model(inputs_embeds=x, attention_mask=mask, position_ids=positions, **{cache_arg(model): cache},
                    use_cache=keep or cache is not None, logits_to_keep=tail)
    if targets is None:
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    else:
        logprobs = target_logprobs(out.logits, targets)
    if not keep:
        return logprobs, None
    keys, values = [], []
    for layer in returned_cache(out).layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(k, torch.Tensor) and k.dim() == 4 and k.shape[2] == mask.shape[1]):
            raise BackendError("this model's cache does not hold one key/value per token; it cannot be reused")
        keys.append(k)
        values.append(v)
    # Padded slots are masked out, but a masked value still enters the weighted sum with weight 0, and
    # 0 × NaN is NaN: zero them so nothing computed for a padding row can leak into a later forward.
    pad = (mask == 0)[:, None, :, None]
    for t in (*keys, *values):
        t.masked_fill_(pad, 0)
    return logprobs, KV(keys, values, mask, mask.sum(-1))


def forward_slots(model, rows: list[list], past: KV, hidden=None) -> "torch.Tensor":
    """Log-probs ``[B, K, V]`` at the last token of each segment, where row b of the batch holds up to K segments
    (each ``[len, D]`` embeddings) that all continue row b of ``past``, each as if it ran alone after it.

    The segments of a row share one copy of its past: a batch of one row per segment copies the past once per
    segment when the cache joins it to the new keys, and grouped-query attention repeats it per query head
    (with 20 candidates after one example's text, or many examples after shared demonstrations, those copies
    cost more than the new tokens). Each segment sits left-padded in its own slot of the row (slots as wide as
    the longest segment, so every row's segment ends share positions and one ``logits_to_keep`` reads them);
    a 4D mask lets a segment see its row's past and itself, causally, and nothing of the other segments; its
    position ids continue from the past's length. Padding sees only itself, so no softmax row is empty.

    ``hidden`` (a deep prompt: decoder-layer modules, offsets ``[S, layers, m, D]`` for the S segments in row
    order, and where each segment's prompt starts within it) adds each segment's offsets at its prompt's
    columns before each of those layers, as :func:`forward_last` does for a row of its own.
    """
    import torch
    from transformers import DynamicCache

    from adapters._deep import offsets_for

    first = next(s for r in rows for s in r)
    dev, dtype = first.device, first.dtype
    b, k = len(rows), max(len(r) for r in rows)
    width = max(int(s.shape[0]) for r in rows for s in r)
    n = k * width
    x = first.new_zeros(b, n, first.shape[1])
    real = torch.zeros(b, n, dtype=torch.bool, device=dev)
    positions = torch.zeros(b, n, dtype=torch.long, device=dev)
    seg_rows, seg_cols = [], []         # where each segment begins in the packed batch
    for i, row in enumerate(rows):
        for j, seg in enumerate(row):
            lo, hi = j * width + width - int(seg.shape[0]), (j + 1) * width
            x[i, lo:hi] = seg
            real[i, lo:hi] = True
            positions[i, lo:hi] = past.lengths[i] + torch.arange(hi - lo, device=dev)
            seg_rows.append(i)
            seg_cols.append(lo)
    col = torch.arange(n, device=dev)
    slot = col // width
    own = (slot[:, None] == slot[None, :]) & (col[None, :] <= col[:, None])         # [n, n], causal in a slot
    sees_new = (own[None] & real[:, None, :]) | torch.eye(n, dtype=torch.bool, device=dev)[None]
    sees_past = past.mask.bool()[:, None, :] & real[:, :, None]                      # [b, n, P]
    allowed = torch.cat([sees_past, sees_new], dim=-1)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, torch.finfo(dtype).min)
    cache = DynamicCache(ddp_cache_data=list(zip(past.keys, past.values)), config=model.config)
    ends = torch.arange(k, device=dev) * width + width - 1
    with offsets_for(hidden, seg_cols, rows=seg_rows):
        out = model(inputs_embeds=x, attention_mask=mask, position_ids=positions, **{cache_arg(model): cache},
                    use_cache=True, logits_to_keep=ends)
    return torch.log_softmax(out.logits.float(), dim=-1)


def slots_work(model, width: int, dtype, device) -> str:
    """Does :func:`forward_slots` give the scores of each segment run alone after its past? Empty when it does,
    else why not (a model whose forward ignores a custom 4D mask or a tensor ``logits_to_keep``): checked once per
    backend on random embeddings, like :func:`reuse_works`; a model that fails it is scored a row per segment."""
    import torch

    try:
        g = torch.Generator(device="cpu").manual_seed(1)
        x = (torch.randn(9, width, generator=g) * 0.02).to(device=device, dtype=dtype)
        _, kv = forward_last(model, [x[:3]], keep=True)
        got = forward_slots(model, [[x[3:5], x[5:9]]], kv)[0]
        ref = torch.cat([forward_last(model, [s], past=kv)[0] for s in (x[3:5], x[5:9])])
        return _differ(got, ref, dtype, "packed and separate")
    except Exception as e:      # noqa: BLE001 - any failure means the plain path
        return f"{type(e).__name__}: {e}"


def _differ(got, ref, dtype, what: str) -> str:
    """Why two scorings of the same sequences disagree beyond the rounding of the model's ``dtype`` ("" when
    they agree; the log-probs themselves are always float32)."""
    import torch

    tol = 1e-3 if dtype == torch.float32 else 5e-2
    diff = float((got - ref).abs().max())
    return "" if diff <= tol else f"{what} scores differ by {diff:.2e}"


def target_logprobs(logits, targets: list):
    """Each row's summed log-prob of its target ``[B, 1]``, from the logits of its last ``max len + 1``
    positions ``[B, K, V]`` (row i's target is its last ``len(targets[i])`` tokens, so the positions before
    them predict them). The softmax's normaliser is a logsumexp: no ``[B, K, V]`` log-prob tensor is made."""
    import torch

    b, k, _ = logits.shape
    lens = torch.tensor([len(t) for t in targets], device=logits.device)
    longest = int(lens.max())
    j = torch.arange(longest, device=logits.device)
    real = j[None, :] < lens[:, None]                                       # [B, T]
    pos = torch.where(real, (k - 1 - lens)[:, None] + j[None, :], torch.zeros_like(real, dtype=torch.long))
    ids = torch.zeros(b, longest, dtype=torch.long, device=logits.device)
    for i, t in enumerate(targets):
        ids[i, :len(t)] = torch.as_tensor(t, device=logits.device)
    picked = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).float()     # [B, T, V]
    gold = picked.gather(-1, ids[..., None])[..., 0] - torch.logsumexp(picked, dim=-1)
    return (gold * real).sum(-1, keepdim=True)


def reuse_works(model, width: int, dtype, device) -> tuple[str, int]:
    """Does a forward continued from stored keys/values give the scores of one uncached forward?

    Returns why not (empty when it does) and the bytes one token's keys/values take (for cache budgets).
    Runs three tiny forwards on random embeddings; any failure means "no", and the caller scores uncached.
    """
    import torch

    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = (torch.randn(6, width, generator=g) * 0.02).to(device=device, dtype=dtype)
        whole, _ = forward_last(model, [x])
        _, kv = forward_last(model, [x[:4]], keep=True)
        parts, _ = forward_last(model, [x[4:]], past=kv)
        return _differ(whole, parts, dtype, "cached and uncached"), kv.nbytes // 4
    except Exception as e:      # e.g. an architecture whose cache cannot be rebuilt from tensors
        return f"{type(e).__name__}: {e}", 0
