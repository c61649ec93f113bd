"""Exceptions that vlkit raises for bad input.

Every error a user can cause (a corrupt image, a wrong checkpoint, an unknown model name, a malformed
recipe) is a :class:`VlkitError`, so the CLI can print it as one line and exit 2 instead of a traceback.
Modules define narrower subclasses next to the code that raises them.
"""

from __future__ import annotations


class VlkitError(Exception):
    """Base class of every error caused by bad input rather than by a bug in vlkit."""


class ConfigError(VlkitError, ValueError):
    """A config or recipe has an unknown key, a missing key, or a value of the wrong type."""


class CheckpointError(VlkitError):
    """A checkpoint has keys or shapes that do not match the model it is loaded into."""


class ImageError(VlkitError):
    """An image file is missing, corrupt, truncated, or too large."""


class DataError(VlkitError):
    """A dataset or annotation file is missing or malformed."""
