"""``vlkit data``: generate datasets.

Subcommands:
    shapes OUT    write the synthetic shapes world (images + caption, retrieval, VQA, classification and
                  instruction files in the formats of the real datasets).
    tokenizers SHAPES_DIR OUT
                  train the shapes tokenizers (Q-Former WordPiece, OPT byte-level BPE, LLaMA-style BPE) and
                  save them as transformers tokenizer folders OUT/qformer, OUT/opt, OUT/llama.
"""

from __future__ import annotations

import argparse
import sys

from vlkit.data.shapes import generate_shapes_world
from vlkit.errors import DataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlkit data", description="Generate datasets.")
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    shapes = sub.add_parser(
        "shapes",
        help="the synthetic shapes world",
        description="Write the seeded synthetic shapes world to OUT (same arguments -> byte-identical files).",
    )
    shapes.add_argument("out", metavar="OUT", help="output folder (absent, empty, or a previous shapes world)")
    shapes.add_argument("--images", type=int, default=200, metavar="N", help="images per split (default 200)")
    shapes.add_argument("--train-images", type=int, default=None, metavar="N", help="images in train (default N)")
    shapes.add_argument("--val-images", type=int, default=None, metavar="N", help="images in val (default N)")
    shapes.add_argument("--test-images", type=int, default=None, metavar="M", help="images in test (default N)")
    shapes.add_argument("--size", type=int, default=64, metavar="PX", help="image side in pixels (default 64)")
    shapes.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    shapes.add_argument(
        "--questions-per-image", type=int, default=3, metavar="Q", help="VQA questions per image (default 3)"
    )
    shapes.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    tok = sub.add_parser(
        "tokenizers",
        help="tokenizers trained on a shapes world",
        description="Train the Q-Former WordPiece, OPT byte-level BPE and LLaMA-style BPE tokenizers on the text of "
        "a shapes world; write them to OUT/qformer, OUT/opt and OUT/llama (transformers tokenizer folders).",
    )
    tok.add_argument("shapes", metavar="SHAPES_DIR", help="a shapes world (vlkit data shapes)")
    tok.add_argument("out", metavar="OUT", help="output folder")
    tok.add_argument(
        "--splits", nargs="+", default=["train"], metavar="SPLIT", help="splits whose text is used (default: train)"
    )
    tok.add_argument("--qformer-vocab", type=int, default=1000, metavar="N", help="WordPiece vocabulary bound")
    tok.add_argument("--lm-vocab", type=int, default=1000, metavar="N", help="BPE vocabulary bound (OPT and LLaMA)")
    tok.add_argument("--quiet", action="store_true", help="no summary")
    return parser


def main(argv: list[str]) -> int:
    """Run ``vlkit data ...``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.dataset == "shapes":
        manifest = generate_shapes_world(
            args.out,
            images=args.images,
            size=args.size,
            seed=args.seed,
            train_images=args.train_images,
            val_images=args.val_images,
            test_images=args.test_images,
            questions_per_image=args.questions_per_image,
            progress=not args.quiet and sys.stderr.isatty(),
        )
        if not args.quiet:
            for split, stats in manifest["splits"].items():
                counts = ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in stats.items())
                print(f"{split}: {counts}")
            print(f"wrote the shapes world to {args.out} (see {args.out}/README.md)")
    elif args.dataset == "tokenizers":
        from vlkit.data.tokenizers import build_shapes_tokenizers

        if min(args.qformer_vocab, args.lm_vocab) < 16:
            raise DataError("--qformer-vocab and --lm-vocab must be at least 16")
        folders = build_shapes_tokenizers(
            args.shapes, args.out, splits=args.splits, qformer_vocab=args.qformer_vocab, lm_vocab=args.lm_vocab
        )
        if not args.quiet:
            from transformers import AutoTokenizer

            for name, folder in folders.items():
                size = len(AutoTokenizer.from_pretrained(str(folder)))
                print(f"{name}: {size} tokens -> {folder}")
    return 0
