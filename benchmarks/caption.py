"""Captioning speed: vlkit vs transformers' Blip2ForConditionalGeneration on identical weights.

A medium BLIP-2 (ViT-B/16-sized vision at 224 px, a 12-layer Q-Former, an OPT-125m-sized LLM) is built
with random weights in transformers, saved, and loaded into vlkit through the converter, so both run the
same numbers. Each row times one call that encodes a batch of images and generates a fixed number of new
tokens (``min_new_tokens = max_new_tokens``, so both do the same work), greedy or beam 5, with fp32 or
bf16 weights. Reported: images/s from wall time and from process CPU time (the machine may be shared; CPU
time is less sensitive to other load), and the ratio vlkit / transformers (> 1: vlkit faster). The
"same" column says whether the generated tokens were identical.

    python benchmarks/caption.py            # the medium config (a few minutes on 2 CPU threads)
    python benchmarks/caption.py --quick    # a tiny config, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(SRC))

from vlkit.checkpoints.folder import load_model  # noqa: E402
from vlkit.generation import GenerationConfig  # noqa: E402


@dataclass
class Shapes:
    vision: dict
    qformer: dict
    text: dict
    queries: int


MEDIUM = Shapes(
    vision=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
    ),
    qformer=dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        cross_attention_frequency=2,
    ),
    text=dict(
        model_type="opt",
        hidden_size=768,
        word_embed_proj_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        ffn_dim=3072,
        vocab_size=50272,
        max_position_embeddings=2048,
    ),
    queries=32,
)
TINY = Shapes(
    vision=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    ),
    qformer=dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, cross_attention_frequency=2
    ),
    text=dict(
        model_type="opt",
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=64,
        vocab_size=128,
        max_position_embeddings=128,
    ),
    queries=4,
)


def build_pair(shapes: Shapes, folder: Path):
    """(transformers model, vlkit model) with the same random weights, both in eval mode."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    text = dict(shapes.text, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    config = Blip2Config(
        vision_config=shapes.vision,
        qformer_config=shapes.qformer,
        text_config=text,
        num_query_tokens=shapes.queries,
        image_token_index=text["vocab_size"] - 1,
    )
    torch.manual_seed(0)
    ref = Blip2ForConditionalGeneration(config).eval()
    ref.save_pretrained(folder)
    return ref, load_model(folder)


def _time(fn, repeats: int, warmup: int) -> tuple[float, float, torch.Tensor]:
    """Best-of-``repeats`` (wall seconds, CPU seconds) of ``fn`` after ``warmup`` calls, and its output."""
    for _ in range(warmup):
        fn()
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu, out


def run(
    shapes: Shapes, batches: list[int], dtypes: list[str], new_tokens: int, repeats: int, warmup: int = 1
) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref32, ours32 = build_pair(shapes, Path(tmp))
        size = shapes.vision["image_size"]
        bos = 2
        q = shapes.queries
        for dtype_name in dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            ref, ours = ref32.to(dtype), ours32.to(dtype)
            for batch in batches:
                pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(dtype)
                hf_ids = torch.tensor([[ref.config.image_token_index] * q + [bos]] * batch)
                prompt = torch.full((batch, 1), bos)
                for beams in (1, 5):
                    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams)

                    def hf_call(settings=settings, pixels=pixels, hf_ids=hf_ids, ref=ref):
                        with torch.inference_mode():
                            out = ref.generate(pixel_values=pixels, input_ids=hf_ids, do_sample=False, **settings)
                        return out[:, hf_ids.shape[1] :]

                    config = GenerationConfig(eos_token_id=2, pad_token_id=1, **settings)

                    def our_call(config=config, pixels=pixels, prompt=prompt, ours=ours):
                        with torch.inference_mode():
                            return ours.generate(ours.llm_prefix(pixels), prompt, None, config)

                    hf_wall, hf_cpu, hf_out = _time(hf_call, repeats, warmup)
                    our_wall, our_cpu, our_out = _time(our_call, repeats, warmup)
                    rows.append(
                        dict(
                            dtype=dtype_name,
                            batch=batch,
                            decoding="greedy" if beams == 1 else f"beam{beams}",
                            hf_wall=hf_wall,
                            hf_cpu=hf_cpu,
                            ours_wall=our_wall,
                            ours_cpu=our_cpu,
                            same=bool(torch.equal(hf_out, our_out)),
                        )
                    )
                    print_row(rows[-1], flush=True)
    return rows


HEADER = (
    f"{'dtype':5} {'batch':>5} {'decoding':8} | {'hf img/s':>9} {'ours img/s':>10} {'ratio':>6} | "
    f"{'hf img/cpu-s':>12} {'ours img/cpu-s':>14} {'ratio':>6} | same"
)


def print_row(row: dict, flush: bool = False) -> None:
    b = row["batch"]
    wall = (b / row["hf_wall"], b / row["ours_wall"])
    cpu = (b / row["hf_cpu"], b / row["ours_cpu"])
    print(
        f"{row['dtype']:5} {b:>5} {row['decoding']:8} | {wall[0]:9.2f} {wall[1]:10.2f} {wall[1] / wall[0]:6.2f} | "
        f"{cpu[0]:12.2f} {cpu[1]:14.2f} {cpu[1] / cpu[0]:6.2f} | {'yes' if row['same'] else 'no'}",
        flush=flush,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config, one repeat: a smoke test")
    parser.add_argument("--new-tokens", type=int, default=20, help="new tokens per caption (default 20)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per row, best kept (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing each row (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = TINY if args.quick else MEDIUM
    new_tokens = 3 if args.quick else args.new_tokens
    repeats = 1 if args.quick else args.repeats
    print(
        f"BLIP-2 captioning, {'tiny' if args.quick else 'medium'} config, {new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads, best of {repeats}; ratio = vlkit / transformers (> 1: vlkit faster)"
    )
    print(HEADER)
    rows = run(shapes, [1, 2] if args.quick else [1, 8], ["fp32", "bf16"], new_tokens, repeats, args.warmup)
    fp32_same = all(r["same"] for r in rows if r["dtype"] == "fp32")
    print(f"fp32 outputs token-identical: {'yes' if fp32_same else 'NO'}")
    return 0 if fp32_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
