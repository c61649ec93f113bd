"""Model families (one file each) and adapters for the language models they drive.

``ARCHS`` maps the ``arch`` name written in a vlkit folder's config.yaml to its config dataclass and model
class (an explicit dict: no registry, no import side effects).
"""

from __future__ import annotations

from vlkit.models.blip2 import Blip2, Blip2Config
from vlkit.models.instructblip import InstructBlip, InstructBlipConfig
from vlkit.models.vlmo import VLMo, VLMoConfig

ARCHS: dict[str, tuple[type, type]] = {
    "blip2": (Blip2Config, Blip2),
    "instructblip": (InstructBlipConfig, InstructBlip),
    "vlmo": (VLMoConfig, VLMo),
}

__all__ = ["ARCHS", "Blip2", "Blip2Config", "InstructBlip", "InstructBlipConfig", "VLMo", "VLMoConfig"]
