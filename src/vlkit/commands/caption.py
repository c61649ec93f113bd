"""``vlkit caption IMG...``: caption images.

Examples::

    vlkit caption cat.png dog.jpg
    vlkit caption photos/ --num-beams 3 --max-new-tokens 20 --json
    vlkit caption cat.png --model out/blip2-opt --prompt "a photo of"
    vlkit caption cat.png --decoder qformer          # a stage-1 BLIP-2's Q-Former decoder
"""

from __future__ import annotations

from vlkit.commands import common


def main(argv: list[str]) -> int:
    p = common.parser("caption", __doc__)
    p.add_argument("images", nargs="+", metavar="IMG", help="image files or folders of images")
    p.add_argument("--prompt", help="text the caption continues (LLM models)")
    p.add_argument("--decoder", choices=("auto", "llm", "qformer"), default="auto", help="which text decoder")
    common.add_generation(p)
    args = p.parse_args(argv)
    images = common.image_paths(args.images)
    pipe = common.load_pipeline(args, "caption")
    captions = pipe.caption(images, prompt=args.prompt, decoder=args.decoder, **common.generation(args))
    payload = [{"image": image, "caption": text} for image, text in zip(images, captions)]
    common.emit(args, payload, [(common.display(i), c) for i, c in zip(images, captions)], ("image", "caption"))
    return 0
