"""``vlkit train RECIPE.yaml [--set a.b=value ...] [--resume DIR] [--output DIR]``."""

from __future__ import annotations

import argparse
import os
import sys

from vlkit.config import apply_overrides
from vlkit.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlkit train",
        description="Train a model from a YAML recipe (single process, or under torchrun for DDP/FSDP).",
        epilog="Multi-GPU: python -m torch.distributed.run --nproc_per_node N -m vlkit train RECIPE.yaml",
    )
    parser.add_argument("recipe", nargs="?", help="recipe YAML (optional with --resume: the run's own recipe)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe keys, e.g. --set optim.lr=1e-5 run.max_steps=100",
    )
    parser.add_argument("--resume", metavar="DIR", help="continue from a run directory or one of its checkpoints")
    parser.add_argument("--output", metavar="DIR", help="run directory (default: run.output_dir or runs/<recipe>)")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from vlkit.training.checkpointing import load_checkpoint, resolve_checkpoint
    from vlkit.training.loop import train
    from vlkit.training.recipe import load_recipe, recipe_from_dict

    if args.recipe is not None:
        recipe = load_recipe(args.recipe, args.overrides)
    elif args.resume is not None:
        _, _, meta = load_checkpoint(resolve_checkpoint(args.resume))
        try:
            recipe = recipe_from_dict(apply_overrides(meta["recipe"], args.overrides))
        except KeyError as err:
            raise ConfigError(f"{args.resume}: the checkpoint records no recipe; pass RECIPE.yaml") from err
    else:
        raise ConfigError("vlkit train: give a RECIPE.yaml (or --resume DIR to continue a run)")
    result = train(recipe, output_dir=args.output, resume=args.resume)
    if result.last_row:
        print(f"trained {result.step} steps; final loss {result.last_row['loss']:.6g}; run dir {result.run_dir}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # train() has met the other ranks at a barrier and destroyed the process group, and every file is
        # closed. Still, about one torchrun + gloo run in a hundred aborted during interpreter teardown
        # ("terminate called without an active exception", from C++ threads destroyed at exit), turning a
        # finished run into a failed one. Nothing is left to clean up, so end the process here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
