"""Model families. ``ARCHS`` maps the ``arch`` name written in a vlkit folder's config.yaml to its config
dataclass and model class (an explicit dict: no registry, no import side effects)."""

from __future__ import annotations

from vlkit.models.blip2 import Blip2, Blip2Config

ARCHS: dict[str, tuple[type, type]] = {
    "blip2": (Blip2Config, Blip2),
}

__all__ = ["ARCHS", "Blip2", "Blip2Config"]
