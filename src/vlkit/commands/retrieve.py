"""``vlkit retrieve --images DIR --texts FILE``: image-text retrieval over a small gallery, both ways.

Texts come from a file (one per line) or ``--text``. For each text the best images are listed, then for
each image the best texts (ITC candidates re-ranked by ITM + ITC, as LAVIS's retrieval evaluation).

Examples::

    vlkit retrieve --images photos/ --texts captions.txt --top 3
    vlkit retrieve --images a.png b.png --text "a red circle" --text "a blue square" --json
"""

from __future__ import annotations

from vlkit.commands import common


def main(argv: list[str]) -> int:
    p = common.parser("retrieve", __doc__)
    p.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_IMG", help="image folder(s) or files")
    p.add_argument("--texts", help="text file, one text per line")
    p.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    p.add_argument("--top", type=int, default=5, help="matches per query (default: %(default)s)")
    p.add_argument(
        "--direction",
        choices=("both", "text-to-image", "image-to-text"),
        default="both",
        help="which rankings to print (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.top < 1:
        p.error(f"--top must be >= 1, got {args.top}")
    texts = (common.read_lines(args.texts) if args.texts else []) + args.text
    if not texts:
        p.error("give texts with --texts FILE or --text")
    images = common.image_paths(args.images)
    pipe = common.load_pipeline(args, "retrieve")
    result = pipe.retrieve(images, texts, k=args.top)
    payload: dict = {}
    rows: list = []
    if args.direction in ("both", "text-to-image"):
        payload["text_to_image"] = [
            {"text": t, "matches": [{"image": images[m["index"]], "score": m["score"]} for m in matches]}
            for t, matches in zip(texts, result["text_to_image"])
        ]
        rows += [
            ("text->image", t, rank, common.display(images[m["index"]]), m["score"])
            for t, matches in zip(texts, result["text_to_image"])
            for rank, m in enumerate(matches, 1)
        ]
    if args.direction in ("both", "image-to-text"):
        payload["image_to_text"] = [
            {"image": i, "matches": [{"text": m["text"], "score": m["score"]} for m in matches]}
            for i, matches in zip(images, result["image_to_text"])
        ]
        rows += [
            ("image->text", common.display(i), rank, m["text"], m["score"])
            for i, matches in zip(images, result["image_to_text"])
            for rank, m in enumerate(matches, 1)
        ]
    common.emit(args, payload, rows, ("direction", "query", "rank", "match", "score"))
    return 0
