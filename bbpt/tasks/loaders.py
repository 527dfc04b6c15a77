"""Read examples from JSONL/CSV files and draw the few-shot train/dev split of Black-Box Tuning."""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import random
from collections import defaultdict
from pathlib import Path

from bbpt.errors import DataError
from bbpt.tasks._base import Example


# Longest first: UTF-32's little-endian mark begins with UTF-16's.
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _open(path: Path):
    # utf-8-sig: a spreadsheet's "CSV UTF-8" export starts with a byte-order mark, which is not part of the header
    return gzip.open(path, "rt", encoding="utf-8-sig") if path.suffix == ".gz" else open(path, encoding="utf-8-sig")


def not_utf8(path: str | Path) -> str:
    """Why a file that failed to decode is not UTF-8: the line and the bytes where it stops being UTF-8, or the
    byte-order mark that names its encoding (a spreadsheet's UTF-16 export starts with one), and the fix."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    mark, encoding = next(((m, name) for m, name in BYTE_ORDER_MARKS if raw.startswith(m)), (b"", None))
    try:
        raw.decode("utf-8")
        start, end = 0, 1
    except UnicodeDecodeError as e:
        start, end = e.start, e.end
    if encoding:
        found = f"it starts with {mark!r}, the byte-order mark of {encoding}, as spreadsheets export text"
    else:
        found = f"byte {raw[start:end]!r} at offset {start} is not UTF-8"
    line = raw.count(b"\n", 0, start) + 1
    convert = f"iconv -f {encoding or 'ENCODING'} -t UTF-8 {path.name} > utf8-{path.name}"
    return f"{path}:{line} is not UTF-8 text: {found}; save it as UTF-8 (a spreadsheet's \"CSV UTF-8\", or `{convert}`)"


def _rows(path: Path):
    """Yield (line number, dict) from a .jsonl(.gz) or .csv(.gz) file."""
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist; check the path")
    try:
        yield from _parse(path)
    except UnicodeDecodeError:
        raise DataError(not_utf8(path)) from None


def _parse(path: Path):
    kind = path.name.removesuffix(".gz").rsplit(".", 1)[-1]
    with _open(path) as f:
        if kind == "csv":
            for i, row in enumerate(csv.DictReader(f), start=2):
                yield i, row
        elif kind in ("jsonl", "json"):
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i} is not valid JSON ({e.msg}); each line must be one JSON object") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{i} is {type(row).__name__}, not a JSON object")
                yield i, row
        else:
            raise DataError(f"data file {str(path)!r} has unknown type {kind!r}; use .jsonl or .csv (optionally .gz)")


def read_examples(path: str | Path, *, label_names: list[str], text_field: str = "text",
                  text_pair_field: str | None = None, label_field: str = "label") -> list[Example]:
    """Read labelled examples. A label may be an index into ``label_names`` or one of the names itself."""
    path = Path(path)
    index = {name: i for i, name in enumerate(label_names)}
    out = []
    for line, row in _rows(path):
        for fld in (text_field, label_field) + ((text_pair_field,) if text_pair_field else ()):
            if fld not in row:
                raise DataError(f"{path}:{line} has no field {fld!r} (fields: {sorted(row)}); "
                                f"pass the right name with --text-field/--text-pair-field/--label-field")
        raw = row[label_field]
        label = _label_index(raw, index, len(label_names))
        if label is None:
            raise DataError(f"{path}:{line} has label {raw!r}, which is not in the label set {label_names} "
                            f"(or an index 0..{len(label_names) - 1}); fix the data or the --labels/--label-names")
        out.append(Example(text=str(row[text_field]), label=label,
                           text_pair=str(row[text_pair_field]) if text_pair_field else None))
    if not out:
        raise DataError(f"data file {str(path)!r} has no examples; it needs one labelled example per line")
    return out


def _label_index(raw, index: dict[str, int], n: int) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw if 0 <= raw < n else None
    s = str(raw).strip()
    if s in index:
        return index[s]
    if s.lstrip("-").isdigit() and 0 <= int(s) < n:
        return int(s)
    return None


def few_shot_split(pool: list[Example], shots: int, seed: int, num_classes: int,
                   dev_shots: int | None = None) -> tuple[list[Example], list[Example], list[Example]]:
    """Draw ``shots`` examples per class for train and another ``dev_shots`` (default ``shots``, as BBT does)
    for dev.

    Returns (train, dev, rest of the pool). Sampling depends only on (pool order, shots, dev_shots, seed), and
    train does not depend on ``dev_shots``: a larger dev set leaves the training examples as they were.
    """
    dev_shots = shots if dev_shots is None else dev_shots
    by_class: dict[int, list[Example]] = defaultdict(list)
    for ex in pool:
        by_class[ex.label].append(ex)
    rng = random.Random(seed)
    train, dev, rest = [], [], []
    for c in range(num_classes):
        items = list(by_class.get(c, []))
        if len(items) < shots + dev_shots:
            raise DataError(f"class {c} has {len(items)} examples in the training pool but --shots {shots} and "
                            f"--dev-shots {dev_shots} need {shots + dev_shots} (train + dev); lower them or add data")
        rng.shuffle(items)
        train += items[:shots]
        dev += items[shots:shots + dev_shots]
        rest += items[shots + dev_shots:]
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev, rest
