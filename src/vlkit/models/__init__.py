"""Model families (one file each) and adapters for the language models they drive.

``ARCHS`` maps the ``arch`` name written in a vlkit folder's config.yaml to its config dataclass and model
class (an explicit dict: no registry, no import side effects).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from vlkit.models.blip2 import Blip2, Blip2Config
from vlkit.models.instructblip import InstructBlip, InstructBlipConfig
from vlkit.models.vlmo import VLMo, VLMoConfig

ARCHS: dict[str, tuple[type, type]] = {
    "blip2": (Blip2Config, Blip2),
    "instructblip": (InstructBlipConfig, InstructBlip),
    "vlmo": (VLMoConfig, VLMo),
}

__all__ = ["ARCHS", "Blip2", "Blip2Config", "InstructBlip", "InstructBlipConfig", "VLMo", "VLMoConfig"]


class _ModelsPackage(types.ModuleType):
    """This package is also ``vlkit.models``, the attribute the API promises as a function: calling it
    returns :func:`vlkit.api.models` (the list of model names), so ``vlkit.models()`` works whether or not
    the package was imported first."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from vlkit.api import models

        return models(*args, **kwargs)


sys.modules[__name__].__class__ = _ModelsPackage
