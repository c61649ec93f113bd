"""``vlkit instruct IMG --prompt P``: follow an instruction about images (InstructBLIP).

Examples::

    vlkit instruct cat.png --prompt "Describe the image in detail."
    vlkit instruct --img_path cat.png --prompt "What is unusual about this image?"   # the seed's spelling
    vlkit instruct a.png b.png --prompt "Which shapes do you see?" --max-new-tokens 40 --json
"""

from __future__ import annotations

from vlkit.commands import common


def main(argv: list[str]) -> int:
    from vlkit.api import DEFAULT_INSTRUCT_MODEL

    p = common.parser("instruct", __doc__, default_model=DEFAULT_INSTRUCT_MODEL)
    p.add_argument("images", nargs="*", metavar="IMG", help="image files or folders of images")
    p.add_argument("--img_path", "--img-path", action="append", default=[], help="an image (repeatable)")
    p.add_argument("--prompt", "-p", required=True, help="the instruction")
    common.add_generation(p)
    args = p.parse_args(argv)
    images = common.image_paths([*args.images, *args.img_path])
    pipe = common.load_pipeline(args, "instruct")
    responses = pipe.instruct(images, [args.prompt] * len(images), **common.generation(args))
    payload = [{"image": i, "prompt": args.prompt, "response": r} for i, r in zip(images, responses)]
    rows = [(common.display(i), r) for i, r in zip(images, responses)]
    common.emit(args, payload, rows, ("image", "response"))
    return 0
