"""``vlkit vqa IMG... --question Q``: answer questions about images (every question about every image).

Examples::

    vlkit vqa cat.png --question "what color is the sofa?"
    vlkit vqa a.png b.png --question "how many shapes are there?" --question "what shape is red?" --json
    vlkit vqa cat.png --question "what is it?" --model shapes-vlmo
"""

from __future__ import annotations

from vlkit.commands import common


def main(argv: list[str]) -> int:
    p = common.parser("vqa", __doc__)
    p.add_argument("images", nargs="+", metavar="IMG", help="image files or folders of images")
    p.add_argument("--question", "-q", action="append", required=True, help="a question (repeat for more)")
    common.add_generation(p)
    args = p.parse_args(argv)
    images = common.image_paths(args.images)
    pairs = [(image, question) for image in images for question in args.question]
    pipe = common.load_pipeline(args, "answer")
    answers = pipe.answer([i for i, _ in pairs], [q for _, q in pairs], **common.generation(args))
    payload = [{"image": i, "question": q, "answer": a} for (i, q), a in zip(pairs, answers)]
    rows = [(common.display(i), q, a) for (i, q), a in zip(pairs, answers)]
    common.emit(args, payload, rows, ("image", "question", "answer"))
    return 0
