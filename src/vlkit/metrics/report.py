"""Small reporting helpers for metric results: aligned terminal tables and atomic JSON files."""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_table", "write_json"]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if _is_number(value):  # floats, numpy floats
        value = float(value)
        return str(value) if math.isnan(value) or math.isinf(value) else format(value, floatfmt)
    return str(value)


def format_table(
    rows: Sequence[Sequence[Any] | Mapping[str, Any]],
    headers: Sequence[str] | None = None,
    floatfmt: str = ".2f",
) -> str:
    """Render rows as an aligned plain-text table.

    Args:
        rows: sequences of cells, or mappings (then ``headers`` picks and orders the keys; by default the
            keys of the first row). ``None`` shows as ``n/a``; floats use ``floatfmt``.
        headers: column titles; optional for sequence rows.
        floatfmt: ``format`` spec for floats.

    Returns:
        The table, lines joined by ``\\n`` (no trailing newline). Columns holding only numbers (and
        ``None``) are right-aligned, others left-aligned.
    """
    if rows and isinstance(rows[0], Mapping):
        keys = list(headers) if headers is not None else list(rows[0])
        values = [[row.get(k) for k in keys] for row in rows]  # type: ignore[union-attr]
        headers = keys
    else:
        values = [list(row) for row in rows]  # type: ignore[arg-type]
    n_cols = max([len(r) for r in values] + [len(headers) if headers is not None else 0])
    values = [r + [""] * (n_cols - len(r)) for r in values]
    cells = [[_cell(v, floatfmt) for v in r] for r in values]
    numeric = [
        any(_is_number(r[c]) for r in values) and all(_is_number(r[c]) or r[c] is None for r in values)
        for c in range(n_cols)
    ]
    head = [str(h) for h in headers] + [""] * (n_cols - len(headers)) if headers is not None else None
    widths = [max([len(r[c]) for r in cells] + [len(head[c]) if head else 0]) for c in range(n_cols)]

    def line(texts: list[str]) -> str:
        return "  ".join(t.rjust(w) if num else t.ljust(w) for t, w, num in zip(texts, widths, numeric)).rstrip()

    out = []
    if head is not None:
        out.append(line(head))
        out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _jsonable(obj: Any) -> Any:
    """``json.dump`` fallback for numpy scalars/arrays, tensors (via ``tolist``) and paths."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as UTF-8 JSON, atomically: a temporary file in the same folder renamed into place.

    Numpy/torch numbers and arrays are converted with ``tolist``. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False, default=_jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
