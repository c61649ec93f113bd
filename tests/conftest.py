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
