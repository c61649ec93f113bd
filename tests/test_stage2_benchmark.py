"""benchmarks/caption.py runs (tiny config) and finds vlkit's captions token-identical to transformers'."""

from __future__ import annotations

import runpy

from conftest import REPO


def test_caption_benchmark_quick(capsys):
    bench = runpy.run_path(str(REPO / "benchmarks" / "caption.py"), run_name="caption_benchmark")
    assert bench["main"](["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "fp32 outputs token-identical: yes" in out
    rows = [line for line in out.splitlines() if line.startswith(("fp32", "bf16")) and "|" in line]
    assert len(rows) == 8  # 2 dtypes x 2 batch sizes x (greedy, beam 5)
