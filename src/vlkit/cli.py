"""The ``vlkit`` command line.

Commands are an explicit dict from name to ``(module, summary)``. The module is imported only when its
command runs, so ``vlkit --help`` stays fast, and every command is a ``main(argv) -> int`` function that
tests call in process. Errors caused by bad input (:class:`vlkit.errors.VlkitError`) print as one line on
stderr and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from vlkit import __version__
from vlkit.errors import VlkitError


class Command(NamedTuple):
    module: str  # module that defines ``main(argv: list[str]) -> int``
    summary: str


COMMANDS: dict[str, Command] = {
    "data": Command("vlkit.data.cli", "generate datasets (the synthetic shapes world)"),
    "convert": Command("vlkit.checkpoints.convert", "convert a LAVIS or transformers checkpoint into a vlkit folder"),
    "train": Command("vlkit.training.cli", "train from a YAML recipe (single process or torchrun DDP/FSDP)"),
    "plot": Command("vlkit.training.plot", "draw a run's loss / lr / eval curves to a PNG"),
    "eval": Command("vlkit.evaluation.cli", "evaluate a model: caption, vqa, retrieval, classification metrics"),
    "models": Command("vlkit.commands.models", "list the model names (bundled and real-size presets)"),
    "caption": Command("vlkit.commands.caption", "caption images"),
    "vqa": Command("vlkit.commands.vqa", "answer questions about images"),
    "instruct": Command("vlkit.commands.instruct", "follow an instruction about images (InstructBLIP)"),
    "classify": Command("vlkit.commands.classify", "zero-shot classification among given labels"),
    "retrieve": Command("vlkit.commands.retrieve", "image-text retrieval over a folder of images and texts"),
    "embed": Command("vlkit.commands.embed", "image and text embeddings"),
    "serve": Command("vlkit.commands.serve", "HTTP server with dynamic batching and a web page"),
}


def _usage() -> str:
    width = max((len(name) for name in COMMANDS), default=0)
    lines = [
        "usage: vlkit [--version] [--help] COMMAND [ARGS...]",
        "",
        "BLIP-2, InstructBLIP and VLMo: train, evaluate, serve, and load the original checkpoints.",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "Run 'vlkit COMMAND --help' for the options of one command."]
    return "\n".join(lines)


def resolve(name: str) -> Callable[[list[str]], int]:
    """Return the ``main`` function of command ``name``.

    Raises:
        VlkitError: if no such command exists.
    """
    if name not in COMMANDS:
        raise VlkitError(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    return importlib.import_module(COMMANDS[name].module).main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vlkit`` console script.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The process exit status: 0 on success, 2 for bad input.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"vlkit {__version__}")
        return 0
    try:
        return int(resolve(args[0])(args[1:]) or 0)
    except VlkitError as err:
        print(f"vlkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlkit: interrupted", file=sys.stderr)
        return 130
