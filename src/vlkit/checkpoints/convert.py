"""``vlkit convert SRC OUT``: turn a LAVIS, transformers or unilm VLMo checkpoint into a vlkit folder.

Examples::

    vlkit convert blip2_pretrained.pth out/blip2-vitg --vision eva_vit_g.pth
    vlkit convert blip2_pretrained_vitL.pth out/blip2-vitl --vision clip_vit_L.pth --preset blip2-vitl-pretrain
    vlkit convert blip2_finetune_coco.pth out/blip2-coco              # ViT weights are inside
    vlkit convert path/to/hf/blip2-itm-vit-g out/blip2-itm            # transformers folder
    vlkit convert path/to/hf/blip2-opt-2.7b out/blip2-opt             # stage 2, with its tokenizer
    # LAVIS stage 2 / InstructBLIP: the trimmed checkpoint + the ViT file + the LLM's local folder
    vlkit convert blip2_pretrained_opt2.7b.pth out/blip2-opt --vision eva_vit_g.pth
        --llm path/to/opt-2.7b --preset blip2-opt2.7b-pretrain
    vlkit convert instruct_blip_vicuna7b_trimmed.pth out/ib-vicuna --vision eva_vit_g.pth
        --llm path/to/vicuna-7b-v1.1 --qformer-tokenizer path/to/bert-base-uncased
    vlkit convert vlmo_base_patch16_480_vqa.pt out/vlmo-base-vqa       # unilm VLMo (.pt / .ckpt)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vlkit.checkpoints.folder import load_checkpoint, save_pretrained

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
    p.add_argument("--llm", help="LAVIS stage 2 / InstructBLIP: local transformers folder of the frozen LLM")
    p.add_argument("--preset", help="LAVIS: architecture preset from vlkit.zoo (default: inferred from the file)")
    p.add_argument(
        "--qformer-tokenizer",
        help="LAVIS InstructBLIP: bert-base-uncased vocab.txt or tokenizer folder (default: an installed copy)",
    )
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
    loaded = load_checkpoint(
        args.src,
        vision=args.vision,
        llm=args.llm,
        preset=args.preset,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        drop_lm=args.drop_lm,
        qformer_tokenizer=args.qformer_tokenizer,
    )
    model = loaded.model
    out = save_pretrained(
        model,
        args.out,
        preset=args.preset,
        source=loaded.source or str(Path(args.src).resolve()),
        llm_tokenizer=loaded.llm_tokenizer,
        qformer_tokenizer=loaded.qformer_tokenizer,
    )
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n:,} parameters)")
    config = model.config
    if getattr(config, "lm", None) is not None and loaded.llm_tokenizer is None:
        print("note: no LLM tokenizer found in the source; the folder holds no llm_tokenizer/")
    if getattr(config, "instruction_aware", False) and loaded.qformer_tokenizer is None:
        print("note: no Q-Former tokenizer found (pass --qformer-tokenizer); the folder holds no qformer_tokenizer/")
    return 0
