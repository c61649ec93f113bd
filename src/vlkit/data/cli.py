"""``vlkit data``: generate datasets.

Subcommands:
    shapes OUT    write the synthetic shapes world (images + caption, retrieval, VQA, classification and
                  instruction files in the formats of the real datasets).
"""

from __future__ import annotations

import argparse
import sys

from vlkit.data.shapes import generate_shapes_world


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
    return 0
