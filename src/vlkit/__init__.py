"""vlkit: BLIP-2, InstructBLIP and VLMo on current PyTorch.

``vlkit.load(name_or_path)`` returns a :class:`~vlkit.api.Pipeline` with the tasks its model supports and
``vlkit.models()`` lists the model names. They live in :mod:`vlkit.api` and are imported on first use, so
``import vlkit`` stays light (no torch, no transformers). ``vlkit.models`` is also the package of model
families; calling it lists the names (see ``vlkit/models/__init__.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Pipeline", "__version__", "load", "models"]

_LAZY = {"load", "models", "Pipeline"}

if TYPE_CHECKING:
    from vlkit.api import Pipeline, load, models


def __getattr__(name: str) -> Any:
    if name == "models":  # the subpackage, callable as vlkit.api.models (importing it binds the attribute)
        import vlkit.models

        return vlkit.models
    if name in _LAZY:
        from vlkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'vlkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
