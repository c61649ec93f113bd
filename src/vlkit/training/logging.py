"""Run logs: JSONL metrics, a text log and the progress bar, all written by rank 0 only.

``RUN/metrics.jsonl`` has one JSON object per logged training step::

    {"step": 12, "epoch": 0, "loss": 2.31, "loss_itc": 1.2, ..., "lr": 1e-4, "grad_norm": 3.1,
     "samples_per_s": 812.5, "step_time": 0.039, "time": 1732450000.1}

``RUN/eval.jsonl`` has one object per evaluation (``{"step": ..., "epoch": ..., <metric>: value}``).
``RUN/train.log`` repeats the messages printed on the console.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TEXT_LOG = "train.log"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a truncated last line (a killed writer) is ignored."""
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def truncate_after(path: Path, step: int) -> None:
    """Keep only rows with ``step <= step`` (used when resuming, so no step is logged twice)."""
    if not Path(path).is_file():
        return
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf
    return value


class RunLog:
    """Rank-0 writer of metrics, evaluation rows, messages and the progress bar.

    On other ranks every method is a no-op, so callers need no ``if rank == 0``.

    Args:
        run_dir: the run directory.
        enabled: True on rank 0.
        total_steps: length of the progress bar.
        start_step: steps already done (resume).
        progress: show the progress bar.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int, progress: bool) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._metrics = self._eval = self._text = None
        self.bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        truncate_after(self.run_dir / METRICS_FILE, start_step)
        truncate_after(self.run_dir / EVAL_FILE, start_step)
        self._metrics = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._eval = open(self.run_dir / EVAL_FILE, "a", encoding="utf-8")
        self._text = open(self.run_dir / TEXT_LOG, "a", encoding="utf-8")
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def info(self, message: str) -> None:
        """Print a message (above the progress bar) and append it to ``train.log``."""
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)
        assert self._text is not None
        self._text.write(f"{stamp} {message}\n")
        self._text.flush()

    def step(self, row: dict[str, Any]) -> None:
        """Write one metrics row and refresh the progress bar's postfix."""
        if not self.enabled:
            return
        assert self._metrics is not None
        self._metrics.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._metrics.flush()
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.3g}", sps=f"{row['samples_per_s']:.1f}", refresh=False
            )

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def evaluation(self, row: dict[str, Any]) -> None:
        """Write one evaluation row and print it."""
        if not self.enabled:
            return
        assert self._eval is not None
        self._eval.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._eval.flush()
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        self.info(f"eval: {shown}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for f in (self._metrics, self._eval, self._text):
            if f is not None:
                f.close()
        self._metrics = self._eval = self._text = None
