"""Shared test set-up: seeding, the ``--full`` switch for slow checks, and subprocess environments."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="run @slow checks in their full (not reduced) form")


@pytest.fixture
def full(request: pytest.FixtureRequest) -> bool:
    """True when slow checks should run at full size (``pytest --full``); CI runs them reduced."""
    return bool(request.config.getoption("--full"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for running ``python -m vlkit`` in a child process against this checkout's sources."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHON"] = sys.executable
    return env


# ----------------------------------------------------------------------------------------------------------
# Tiny saved models and a tiny shapes world, shared by the CLI / evaluation / serving tests
# ----------------------------------------------------------------------------------------------------------


def _randomize(model: torch.nn.Module, std: float, seed: int) -> None:
    # Default initialisations are so small that a random model says the same thing for every image;
    # larger weights make outputs depend on the input, so tests can tell samples apart.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _bert_vocab(folder: Path) -> Path:
    from vlkit.processors import find_bert_vocab

    found = find_bert_vocab()
    if found is not None:
        return found
    from stage2_reference import write_bert_vocab

    path = folder / "vocab.txt"
    write_bert_vocab(path)
    return path


@pytest.fixture(scope="session")
def tiny_stage1_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved vlkit folder of a tiny stage-1 BLIP-2 ("tiny-blip2-eva": 32 px images, ITC/ITM heads and the
    Q-Former LM head) with ``qformer_tokenizer/`` (bert-base-uncased vocabulary). Random weights (std 0.3)
    that make captions and scores depend on the image. Treat it as read-only."""
    from vlkit import zoo
    from vlkit.checkpoints.folder import save_pretrained
    from vlkit.processors import QFormerTokenizer

    root = tmp_path_factory.mktemp("tiny_stage1")
    model = zoo.build("tiny-blip2-eva")
    _randomize(model, 0.3, seed=1)
    return save_pretrained(
        model, root / "model", preset="tiny-blip2-eva", qformer_tokenizer=QFormerTokenizer(_bert_vocab(root))
    )


@pytest.fixture(scope="session")
def tiny_opt_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved vlkit folder of a tiny stage-2 BLIP-2 with an OPT-style LLM ("tiny-blip2-opt", no prompt) and
    ``llm_tokenizer/`` (a tiny byte-level BPE OPT tokenizer from ``stage2_reference``). Random weights
    (std 0.5) that make generations depend on the image. Treat it as read-only."""
    from stage2_reference import tokenizer

    from vlkit import zoo
    from vlkit.checkpoints.folder import save_pretrained

    model = zoo.build("tiny-blip2-opt")
    _randomize(model, 0.5, seed=2)
    path = tmp_path_factory.mktemp("tiny_opt") / "model"
    return save_pretrained(model, path, preset="tiny-blip2-opt", llm_tokenizer=tokenizer("opt"))


@pytest.fixture(scope="session")
def tiny_shapes_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes world (``vlkit data shapes``) with 4 images per split at 32 px and 2 questions per image.
    Treat it as read-only."""
    from vlkit.data.shapes import generate_shapes_world

    path = tmp_path_factory.mktemp("shapes") / "world"
    generate_shapes_world(path, images=4, size=32, questions_per_image=2)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models saved as vlkit folders with tokenizers: ``{"blip2", "stage1", "instructblip", "vlmo":
    folder}`` (see tests/surfaces_fixtures.py)."""
    from surfaces_fixtures import KINDS, build

    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build(kind, root) for kind in KINDS}


@pytest.fixture(scope="session")
def shape_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four small PNG files of coloured shapes."""
    from surfaces_fixtures import write_images

    return write_images(tmp_path_factory.mktemp("shape-images"))
