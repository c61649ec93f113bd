"""``vlkit plot RUN_DIR [--out PNG]``: loss, learning-rate and evaluation curves of a run, drawn with Pillow.

Matplotlib is not a vlkit dependency, so this module draws simple line charts itself: one panel per
quantity group (losses, learning rate, evaluation metrics), each with axes, "nice" ticks, labels and a
legend.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlkit.errors import DataError
from vlkit.training.logging import EVAL_FILE, METRICS_FILE, read_jsonl

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
NOT_PLOTTED = {"step", "epoch", "time", "lr", "samples_per_s", "step_time", "loss_scale", "grad_norm"}

Series = tuple[str, list[float], list[float]]  # (label, xs, ys)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        if value >= lo - step * 1e-9:
            ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def _decimate(xs: list[float], ys: list[float], limit: int) -> tuple[list[float], list[float]]:
    """At most about ``limit`` points: bucket means, so long noisy curves stay readable."""
    if len(xs) <= limit:
        return xs, ys
    size = -(-len(xs) // limit)
    out_x, out_y = [], []
    for i in range(0, len(xs), size):
        bucket = [(x, y) for x, y in zip(xs[i : i + size], ys[i : i + size]) if math.isfinite(y)]
        if bucket:
            out_x.append(sum(b[0] for b in bucket) / len(bucket))
            out_y.append(sum(b[1] for b in bucket) / len(bucket))
    return out_x, out_y


def draw_panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: Sequence[Series],
    *,
    log_y: bool = False,
    s: int = 1,
) -> None:
    """One chart with axes, ticks, grid, title and legend inside ``box`` = (left, top, right, bottom).

    ``s`` scales fonts, margins and line widths (the image is drawn at ``s`` x size, then downsampled).
    """
    left, top, right, bottom = box
    font, small = _font(16 * s), _font(13 * s)
    draw.text((left + 4 * s, top), title, fill="black", font=font)
    px0, py0, px1, py1 = left + 78 * s, top + 26 * s, right - 14 * s, bottom - 40 * s  # plot area
    series = [(label, *_decimate(xs, ys, (px1 - px0) // s)) for label, xs, ys in series]
    points = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not log_y)]
    if not points:
        draw.text((px0, (py0 + py1) // 2), "no data", fill="gray", font=font)
        return
    xlo, xhi = min(p[0] for p in points), max(p[0] for p in points)
    if xhi == xlo:
        xhi = xlo + 1
    tr = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    ylo, yhi = min(tr(p[1]) for p in points), max(tr(p[1]) for p in points)
    if yhi == ylo:
        ylo, yhi = ylo - 0.5, yhi + 0.5
    pad = (yhi - ylo) * 0.05
    ylo, yhi = ylo - pad, yhi + pad

    def sx(x: float) -> float:
        return px0 + (x - xlo) / (xhi - xlo) * (px1 - px0)

    def sy(y: float) -> float:
        return py1 - (tr(y) - ylo) / (yhi - ylo) * (py1 - py0)

    for t in nice_ticks(xlo, xhi, 6):
        x = sx(t)
        draw.line((x, py0, x, py1), fill="#e6e6e6", width=s)
        draw.line((x, py1, x, py1 + 5 * s), fill="black", width=s)
        label = _fmt(t)
        draw.text((x - draw.textlength(label, font=small) / 2, py1 + 7 * s), label, fill="black", font=small)
    if log_y:
        yticks = [10.0**e for e in range(math.floor(ylo), math.ceil(yhi) + 1) if ylo <= e <= yhi]
        if len(yticks) < 2:
            yticks = [10**v for v in nice_ticks(ylo, yhi, 4)]
    else:
        yticks = nice_ticks(ylo, yhi, 5)
    for t in yticks:
        y = sy(t)
        if not py0 - 1 <= y <= py1 + 1:
            continue
        draw.line((px0, y, px1, y), fill="#e6e6e6", width=s)
        draw.line((px0 - 5 * s, y, px0, y), fill="black", width=s)
        label = _fmt(t)
        draw.text((px0 - 8 * s - draw.textlength(label, font=small), y - 8 * s), label, fill="black", font=small)
    draw.rectangle((px0, py0, px1, py1), outline="black", width=s)
    draw.text(((px0 + px1) / 2 - 14 * s, py1 + 24 * s), "step", fill="black", font=small)
    for i, (label, xs, ys) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        pts = [(sx(x), sy(y)) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not log_y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2 * s, joint="curve")
        if len(pts) <= 30:  # few points (e.g. evaluations): mark them
            for x, y in pts:
                draw.ellipse((x - 3 * s, y - 3 * s, x + 3 * s, y + 3 * s), fill=colour)
        # legend, top-right inside the plot
        lx = px1 - (10 + 28) * s - max(draw.textlength(entry[0], font=small) for entry in series)
        ly = py0 + (8 + 18 * i) * s
        draw.line((lx, ly + 8 * s, lx + 20 * s, ly + 8 * s), fill=colour, width=3 * s)
        draw.text((lx + 26 * s, ly), label, fill="black", font=small)


def plot_run(run_dir: str | Path, out: str | Path | None = None, *, width: int = 1000) -> Path:
    """Draw the curves of ``run_dir`` to a PNG (default ``RUN_DIR/curves.png``); returns its path.

    Raises:
        DataError: if the run has no metrics.
    """
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / METRICS_FILE)
    if not rows:
        raise DataError(f"{run_dir}: no {METRICS_FILE} rows to plot")
    evals = read_jsonl(run_dir / EVAL_FILE)
    steps = [float(r["step"]) for r in rows]
    loss_keys = [k for k in rows[0] if k not in NOT_PLOTTED and isinstance(rows[0][k], (int, float))]
    losses = [(k, steps, [float(r.get(k, math.nan)) for r in rows]) for k in loss_keys]
    panels: list[tuple[str, list[Series], bool]] = [("training losses and metrics", losses, False)]
    panels.append(("learning rate", [("lr", steps, [float(r["lr"]) for r in rows])], False))
    if evals:
        eval_keys = [k for k in evals[0] if k not in ("step", "epoch") and isinstance(evals[0][k], (int, float))]
        ev_steps = [float(r["step"]) for r in evals]
        panels.append(
            ("evaluation", [(k, ev_steps, [float(r.get(k, math.nan)) for r in evals]) for k in eval_keys], False)
        )
    s, panel_h = 2, 330  # drawn at twice the size and downsampled: anti-aliased lines and text
    height = panel_h * len(panels) + 40
    image = Image.new("RGB", (width * s, height * s), "white")
    draw = ImageDraw.Draw(image)
    title = f"{run_dir.resolve().name}: {len(rows)} logged steps, last step {rows[-1]['step']}"
    draw.text((10 * s, 8 * s), title, fill="black", font=_font(18 * s))
    for i, (name, series, log_y) in enumerate(panels):
        top = 40 + i * panel_h
        draw_panel(draw, (10 * s, top * s, (width - 10) * s, (top + panel_h - 10) * s), name, series, log_y=log_y, s=s)
    out = Path(out) if out is not None else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    image.resize((width, height), Image.Resampling.LANCZOS).save(out)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlkit plot", description="Draw a training run's curves to a PNG.")
    parser.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    parser.add_argument("--width", type=int, default=1000, help="image width in pixels")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.out, width=args.width))
    return 0
