"""Training tasks: what ``vlkit train`` can train, as an explicit dict from recipe name to module.

A task module combines a model, its losses and its data into the pieces the generic trainer
(:mod:`vlkit.training.loop`) needs. It defines

- a config dataclass (named in :data:`TASKS`) that types the recipe's ``task:`` section, and
- ``build(cfg, ctx: vlkit.training.task.TaskContext) -> vlkit.training.task.TaskState``.

Modules are imported only when a recipe names them, so loading one recipe never imports every model.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

from vlkit.errors import ConfigError


class TaskEntry(NamedTuple):
    module: str  # defines ``build(cfg, ctx) -> TaskState`` and the config dataclass below
    config: str  # name of the config dataclass inside ``module``


TASKS: dict[str, TaskEntry] = {
    "toy": TaskEntry("vlkit.tasks.toy", "ToyConfig"),
    "stage1": TaskEntry("vlkit.tasks.stage1", "Stage1Config"),
    "lm_pretrain": TaskEntry("vlkit.tasks.lm_pretrain", "LMPretrainConfig"),
    "stage2": TaskEntry("vlkit.tasks.stage2", "Stage2Config"),
    "caption_ft": TaskEntry("vlkit.tasks.stage2", "CaptionFTConfig"),
    "vqa_ft": TaskEntry("vlkit.tasks.stage2", "VqaFTConfig"),
    "instruct_tune": TaskEntry("vlkit.tasks.instruct", "InstructConfig"),
    "vlmo_vqa": TaskEntry("vlkit.tasks.vlmo", "VLMoVQAConfig"),
    "vlmo_retrieval": TaskEntry("vlkit.tasks.vlmo", "VLMoRetrievalConfig"),
    "vlmo_nlvr2": TaskEntry("vlkit.tasks.vlmo", "VLMoNLVR2Config"),
}


def load_task(name: str) -> tuple[ModuleType, type]:
    """Import task ``name`` and return ``(module, config dataclass)``.

    Raises:
        ConfigError: if ``name`` is not in :data:`TASKS`, or its module lacks ``build`` or the config class.
    """
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(sorted(TASKS))}")
    entry = TASKS[name]
    module = importlib.import_module(entry.module)
    config_cls = getattr(module, entry.config, None)
    if config_cls is None or not callable(getattr(module, "build", None)):
        raise ConfigError(f"task {name!r}: module {entry.module} must define {entry.config} and build(cfg, ctx)")
    return module, config_cls
