"""What every benchmark script prints: the machine it ran on, then its rows as JSON or as a table."""

from __future__ import annotations

import json
import platform


def machine() -> str:
    import torch

    return (f"{platform.platform()}; {platform.processor() or platform.machine()}; "
            f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)")


def emit(out: dict, as_json: bool, columns: list[tuple[str, str, str]]) -> None:
    """``out`` (with ``machine`` and ``rows``) as indented JSON, or as a table of ``columns``: (key, heading,
    format spec), e.g. ``("seconds_per_call", "s/call", ">7.3f")``."""
    if as_json:
        print(json.dumps(out, indent=1))
        return
    print(out["machine"])
    widths = [len(format(out["rows"][0][k], f)) if out["rows"] else len(h) for k, h, f in columns]
    print(" ".join(f"{h:{'<' if f[0] == '<' else '>'}{max(w, len(h))}}" for (_, h, f), w in zip(columns, widths)))
    for r in out["rows"]:
        print(" ".join(f"{format(r[k], f):>{max(w, len(h))}}" for (k, h, f), w in zip(columns, widths)))
