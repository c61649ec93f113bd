"""``vlkit classify IMG... --labels a,b,c``: zero-shot classification among the given labels.

Examples::

    vlkit classify cat.png --labels cat,dog,bird
    vlkit classify photos/ --labels "red circle,blue square" --template "a picture of a {}." --top 1 --json
"""

from __future__ import annotations

from vlkit.commands import common


def main(argv: list[str]) -> int:
    p = common.parser("classify", __doc__)
    p.add_argument("images", nargs="+", metavar="IMG", help="image files or folders of images")
    p.add_argument("--labels", "-l", required=True, help="comma-separated class names")
    p.add_argument("--template", default="a photo of {}.", help="prompt with {} for the label (default: %(default)s)")
    p.add_argument("--top", type=int, default=5, help="labels shown per image (default: %(default)s)")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error(f"--top must be >= 1, got {args.top}")
    images = common.image_paths(args.images)
    pipe = common.load_pipeline(args, "classify")
    results = pipe.classify(images, args.labels, args.template, top_k=args.top)
    payload = [{"image": i, "labels": r} for i, r in zip(images, results)]
    rows = [
        (common.display(i), rank, e["label"], e["score"])
        for i, r in zip(images, results)
        for rank, e in enumerate(r, 1)
    ]
    common.emit(args, payload, rows, ("image", "rank", "label", "score"))
    return 0
