"""What every task command shares: the ``--model/--device/--dtype/--json`` options, one-line errors,
image and text inputs, and the output (an aligned table for people, JSON with ``--json`` for programs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from vlkit.errors import DataError, VlkitError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
DTYPES = ("float32", "bfloat16", "float16")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors raised as :class:`VlkitError`, so ``vlkit`` prints them as one line and
    exits with status 2 like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise VlkitError(f"{self.prog}: {message} (see --help)")


def parser(command: str, description: str, *, default_model: str | None = None) -> ArgumentParser:
    """A parser for ``vlkit COMMAND`` with the options every task command has."""
    from vlkit.api import DEFAULT_MODEL

    p = ArgumentParser(
        prog=f"vlkit {command}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = default_model or DEFAULT_MODEL
    p.add_argument(
        "--model",
        default=model,
        help=f"bundled model name, vlkit folder, transformers folder or LAVIS .pth (default: {model}; "
        "see `vlkit models`)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA when available)")
    p.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: as stored)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    return p


def add_generation(p: argparse.ArgumentParser) -> None:
    """``--num-beams`` and ``--max-new-tokens`` (defaults: the task's reference settings)."""
    p.add_argument("--num-beams", type=int, help="beam width (default: the task's reference setting, 5)")
    p.add_argument("--max-new-tokens", type=int, help="length limit of the generated text")


def generation(args: argparse.Namespace) -> dict[str, Any]:
    out = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    return {k: v for k, v in out.items() if v is not None}


def load_pipeline(args: argparse.Namespace, task: str) -> Any:
    """Load ``--model`` and check it can do ``task``."""
    from vlkit.api import load

    pipe = load(args.model, device=args.device, dtype=args.dtype)
    pipe.require(task)
    return pipe


def image_paths(items: Sequence[str]) -> list[str]:
    """Image files named directly or found in folders (sorted, by suffix)."""
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{item}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            out += [str(p) for p in found]
        else:
            out.append(item)  # files and file:// URLs; load_image reports what is wrong with them
    if not out:
        raise DataError("no images given")
    return out


def read_lines(path: str) -> list[str]:
    """Non-empty lines of a text file (one text per line)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from err
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise DataError(f"{path}: no texts (one per line)")
    return texts


def printable(text: str) -> str:
    """``text`` with control characters escaped, so one result stays on one table row."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def emit(args: argparse.Namespace, payload: Any, rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """Print ``payload`` as JSON (``--json``) or ``rows`` as a table."""
    if args.json:
        json.dump(payload, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return
    from vlkit.metrics.report import format_table

    cells = [[printable(c) if isinstance(c, str) else c for c in row] for row in rows]
    print(format_table(cells, headers, floatfmt=".4f"))


def display(path: str) -> str:
    """A path as shown in tables: relative to the working directory when inside it."""
    try:
        return os.path.relpath(path) if not str(path).startswith("file:") and os.path.isabs(path) else str(path)
    except ValueError:
        return str(path)
