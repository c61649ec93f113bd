"""``vlkit convert SRC OUT``: turn a LAVIS, transformers or unilm VLMo checkpoint into a vlkit folder.

Examples::

    vlkit convert blip2_pretrained.pth out/blip2-vitg --vision eva_vit_g.pth
    vlkit convert blip2_pretrained_vitL.pth out/blip2-vitl --vision clip_vit_L.pth --preset blip2-vitl-pretrain
    vlkit convert blip2_finetune_coco.pth out/blip2-coco              # ViT weights are inside
    vlkit convert path/to/hf/blip2-itm-vit-g out/blip2-itm            # transformers folder
    vlkit convert vlmo_base_patch16_480_vqa.pt out/vlmo-base-vqa       # unilm VLMo (.pt / .ckpt)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vlkit.checkpoints.folder import load_model, save_pretrained

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlkit convert", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "src", help="LAVIS .pth checkpoint, transformers BLIP-2 folder, unilm VLMo .pt/.ckpt, or vlkit folder"
    )
    p.add_argument("out", help="output vlkit folder (config.yaml + model.safetensors)")
    p.add_argument("--vision", help="LAVIS: the ViT weights file (eva_vit_g.pth / clip_vit_L.pth)")
    p.add_argument("--preset", help="LAVIS: architecture preset from vlkit.zoo (default: inferred from the file)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="cast floating-point weights (default: as stored)")
    p.add_argument(
        "--drop-lm",
        action="store_true",
        help="transformers Blip2Model/ForConditionalGeneration: keep only the vision encoder and Q-Former",
    )
    return p


def main(argv: list[str]) -> int:
    """Convert ``SRC`` and write a vlkit folder to ``OUT``; prints the output path."""
    args = _parser().parse_args(argv)
    model = load_model(
        args.src,
        vision=args.vision,
        preset=args.preset,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        drop_lm=args.drop_lm,
    )
    source = str(Path(args.src).resolve()) + (f" + {Path(args.vision).resolve()}" if args.vision else "")
    out = save_pretrained(model, args.out, preset=args.preset, source=source)
    n = sum(t.numel() for t in model.state_dict().values())
    print(f"wrote {out} ({n:,} parameters)")
    return 0
