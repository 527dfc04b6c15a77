"""Prompts below the input layer, through the model's own parts: forward pre-hooks and the cache argument.

- **deep** (BBTv2): an offset added to the hidden states at the prompt's positions just before chosen decoder
  layers. A pre-hook on each chosen layer adds it (out of place, so gradients reach it); the rest of the
  model runs unchanged, so a zero offset gives the input prompt's scores exactly.
- **prefix** (PEFT's prefix tuning): keys and values for m virtual tokens at every layer, handed to the
  model as a cache (:class:`adapters._kv.KV`), with the real tokens at positions m, m+1, ... as PEFT has them.
  Its shapes (layers, key/value heads, head size) are read off one real forward's cache, so grouped-query
  models work and nothing is looked up by model name.

Which layers a prompt reaches is a small spec (:func:`pick_layers`); the decoder layers themselves are the
model's one ``ModuleList`` of ``num_hidden_layers`` modules (:func:`decoder_layers`).
"""

from __future__ import annotations

import contextlib

from bbpt.errors import BackendError, ConfigError

LAYER_SPECS = "all, every:K, first:N, last:N, or a list such as 4,8,12"


def pick_layers(spec: str, n_layers: int, depth: str) -> tuple[int, ...]:
    """The decoder layers ``spec`` names. A deep prompt's layer 0 is its input-layer part (always tuned), so
    its spec picks among layers 1 .. L-1; a prefix's among 0 .. L-1."""
    first = 1 if depth == "deep" else 0
    pool = list(range(first, n_layers))
    kind, _, arg = spec.partition(":")
    try:
        if spec == "all":
            picked = pool
        elif kind == "every":
            picked = pool[::int(arg)] if int(arg) >= 1 else []
        elif kind == "first":
            picked = pool[:int(arg)]
        elif kind == "last":
            picked = pool[len(pool) - int(arg):] if int(arg) >= 1 else []
        else:
            picked = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        raise ConfigError(f"--layers {spec!r} is not a layer spec; use {LAYER_SPECS}") from None
    if not picked or any(i not in pool for i in picked):
        raise ConfigError(f"--layers {spec!r} picks {picked or 'no layers'}, but a {depth} prompt on this "
                          f"{n_layers}-layer model can reach layers {first}..{n_layers - 1}; use {LAYER_SPECS}")
    return tuple(picked)


def decoder_layers(model):
    """The model's decoder layers: its one ``ModuleList`` as long as ``config.num_hidden_layers``."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = int(config.num_hidden_layers)
    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise BackendError(f"cannot tell this model's {n} decoder layers apart ({len(found)} module lists of "
                           "that length); deep prompts need one list of decoder layers")
    return found[0]


@contextlib.contextmanager
def hidden_offsets(layers, offsets, cols, rows=None):
    """While open, ``offsets`` ``[S, len(layers), m, D]`` are added to the hidden states entering each of the
    decoder-layer modules ``layers`` at columns ``cols[s] .. cols[s] + m`` of the forward's new tokens, in row
    ``rows[s]`` (row s when ``rows`` is None: one prompt per row; packed segments put several in a row)."""
    import torch

    if offsets is None:
        yield
        return
    b, _, m, width = offsets.shape
    which = torch.arange(b) if rows is None else torch.as_tensor(rows)
    rows = which.to(offsets.device).repeat_interleave(m)
    at = (torch.as_tensor(cols, device=offsets.device)[:, None] + torch.arange(m, device=offsets.device)).reshape(-1)
    handles = []

    def hook_for(slot: int):
        def pre(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            h = h.index_put((rows, at), offsets[:, slot].reshape(-1, width).to(h.dtype), accumulate=True)
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}
        return pre

    try:
        for slot, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(hook_for(slot), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def offsets_for(hidden, begins, rows=None):
    """:func:`hidden_offsets` for a forward's ``hidden`` argument (decoder-layer modules, offsets, and where
    each prompt starts within its sequence), with sequence s beginning at column ``begins[s]`` of the forward's
    new tokens (padding moves it); a no-op context when ``hidden`` is None."""
    if hidden is None:
        return contextlib.nullcontext()
    layers, offsets, starts = hidden
    return hidden_offsets(layers, offsets, [b + st for b, st in zip(begins, starts)], rows)


def robust_std(x) -> float:
    """The spread of ``x`` as 1.4826 × its median absolute deviation: a standard deviation that the few huge
    activations of some hidden dimensions (LLMs' "massive activations") do not inflate."""
    x = x.detach().float().reshape(-1)
    return float(1.4826 * (x - x.median()).abs().median())

