"""``vlkit embed [IMG...] [--text T]``: image and text embeddings (L2-normalised, BLIP-2 ITC space).

An image embeds as one vector per query token (Q x E), a text as one vector (E); their similarity is the
maximum over queries of the dot products. ``--out FILE.safetensors`` saves them as ``image_embeds``
(N, Q, E) and ``text_embeds`` (M, E); ``--json`` prints them.

Examples::

    vlkit embed cat.png dog.png --text "a cat" --out embeddings.safetensors
    vlkit embed --texts captions.txt --json
"""

from __future__ import annotations

import json

from vlkit.commands import common
from vlkit.errors import DataError


def main(argv: list[str]) -> int:
    p = common.parser("embed", __doc__)
    p.add_argument("images", nargs="*", metavar="IMG", help="image files or folders of images")
    p.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    p.add_argument("--texts", help="text file, one text per line")
    p.add_argument("--out", help="write the embeddings to this .safetensors file")
    args = p.parse_args(argv)
    texts = (common.read_lines(args.texts) if args.texts else []) + args.text
    if not args.images and not texts:
        p.error("give images and/or texts (--text, --texts)")
    if args.out and not args.out.endswith(".safetensors"):
        raise DataError(f"--out {args.out}: the file name must end in .safetensors")
    images = common.image_paths(args.images) if args.images else []
    pipe = common.load_pipeline(args, "embed")
    image_embeds = pipe.embed_images(images) if images else None
    text_embeds = pipe.embed_texts(texts) if texts else None
    if args.out:
        from vlkit.checkpoints.io import save_safetensors

        tensors = {}
        if image_embeds is not None:
            tensors["image_embeds"] = image_embeds.contiguous()
        if text_embeds is not None:
            tensors["text_embeds"] = text_embeds.contiguous()
        meta = {"model": pipe.name, "images": json.dumps(images), "texts": json.dumps(texts)}
        save_safetensors(tensors, args.out, metadata=meta)
    payload = {
        "images": [{"image": i, "embedding": e.tolist()} for i, e in zip(images, _rows(image_embeds))],
        "texts": [{"text": t, "embedding": e.tolist()} for t, e in zip(texts, _rows(text_embeds))],
    }
    rows = [
        ("image", common.display(i), "x".join(map(str, e.shape)), _head(e)) for i, e in zip(images, _rows(image_embeds))
    ]
    rows += [("text", t, "x".join(map(str, e.shape)), _head(e)) for t, e in zip(texts, _rows(text_embeds))]
    common.emit(args, payload, rows, ("kind", "input", "shape", "first values"))
    if args.out and not args.json:
        print(f"wrote {args.out}")
    return 0


def _head(embedding) -> str:
    flat = embedding.reshape(-1)[:4].tolist()
    return " ".join(f"{v:+.3f}" for v in flat) + " ..."


def _rows(embeds) -> list:
    return list(embeds) if embeds is not None else []
