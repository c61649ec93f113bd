"""Safe image loading.

Every image vlkit reads goes through :func:`load_image`. It accepts a path, a ``file://`` URL, raw bytes, a
binary file object or an already opened PIL image, and returns an RGB PIL image converted exactly as the
reference pipelines do (``Image.convert("RGB")``: alpha is dropped, palettes are expanded, CMYK and
grayscale are converted, 16-bit values are clipped to 255, EXIF orientation is *not* applied).

Two things are checked before any pixel is decoded, so a hostile file costs nothing:

- the header size against a pixel limit (``max_pixels``) — a decompression bomb raises instead of
  allocating gigabytes;
- the source kind — ``http(s)://`` URLs are refused, vlkit never touches the network.

A corrupt, truncated or non-image file raises :class:`vlkit.errors.ImageError` naming the file.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from PIL import Image, UnidentifiedImageError

from vlkit.errors import ImageError

#: Default limit on width * height (64 megapixels: ~200 MB as RGB, far above any model's input size).
DEFAULT_MAX_PIXELS = 64_000_000

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image


def describe_source(src: ImageSource) -> str:
    """A short human-readable name for an image source, used in error messages."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.mode} {src.width}x{src.height}>"
    name = getattr(src, "name", None)
    return str(name) if isinstance(name, (str, os.PathLike)) else "<file object>"


def _resolve_path(src: str | os.PathLike) -> Path:
    text = os.fspath(src)
    if isinstance(text, bytes):  # os.PathLike may return bytes
        text = os.fsdecode(text)
    if "://" in text:
        scheme = urlparse(text).scheme.lower()
        if scheme in ("http", "https", "ftp"):
            raise ImageError(f"{text}: remote URLs are not supported (vlkit never downloads); save the image locally")
        if scheme != "file":
            raise ImageError(f"{text}: unsupported URL scheme {scheme!r}; give a local path or a file:// URL")
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise ImageError(f"{text}: file:// URLs must point to this machine")
        return Path(url2pathname(unquote(parsed.path)))
    return Path(text)


def check_pixel_limit(image: Image.Image, name: str, max_pixels: int | None) -> None:
    """Raise :class:`ImageError` if ``image`` (possibly not yet decoded) has more than ``max_pixels`` pixels."""
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageError(
            f"{name}: image is {image.width}x{image.height} = {image.width * image.height:,} pixels, above the "
            f"limit of {max_pixels:,} (possible decompression bomb; raise max_pixels if the image is genuine)"
        )


def load_image(
    src: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Open and fully decode an image as RGB, safely.

    Args:
        src: a path, a ``file://`` URL, encoded bytes, a binary file object, or a PIL image.
        max_pixels: refuse images with more than this many pixels (checked from the header, before
            decoding); None disables the check (Pillow's own bomb limit still applies).
        name: how to call the image in error messages (defaults to the path or a description).

    Returns:
        A decoded PIL image in mode ``"RGB"``.

    Raises:
        ImageError: for a missing, corrupt, truncated, non-image or oversized file, or a remote URL.
    """
    label = name or describe_source(src)
    if isinstance(src, Image.Image):
        check_pixel_limit(src, label, max_pixels)
        return _to_rgb(src, label)

    if isinstance(src, (str, os.PathLike)):
        path = _resolve_path(src)
        label = name or str(path)
        if not path.is_file():
            raise ImageError(f"{label}: no such image file")
        try:
            with open(path, "rb") as stream:
                return _decode(stream, label, max_pixels)
        except OSError as err:  # raised by open(); decoding errors are already ImageError
            raise ImageError(f"{label}: cannot read ({err.strerror or err})") from err
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(src)), label, max_pixels)
    if hasattr(src, "read"):
        return _decode(src, label, max_pixels)
    raise ImageError(f"{label}: not an image source (expected a path, bytes, a file object or a PIL image)")


def _decode(stream: IO[bytes], label: str, max_pixels: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own limit replaces Pillow's warning; Pillow's hard limit (2x its warning size) still raises.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except UnidentifiedImageError as err:
        raise ImageError(f"{label}: not a recognised image file") from err
    except Image.DecompressionBombError as err:
        raise ImageError(f"{label}: image too large ({err})") from err
    except Exception as err:  # Pillow's header parsers raise many types for garbage input
        raise ImageError(f"{label}: cannot read image header ({type(err).__name__}: {err})") from err

    check_pixel_limit(image, label, max_pixels)  # from the header: nothing has been decoded yet
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Exception as err:  # truncated data -> OSError, bad chunks -> SyntaxError/ValueError, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"{label}: corrupt or truncated image ({reason})") from err
    return _to_rgb(image, label)


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    if image.mode == "RGB":
        return image
    try:
        with warnings.catch_warnings():
            # "Palette images with Transparency expressed in bytes should be converted to RGBA": the reference
            # converts straight to RGB, and so do we.
            warnings.simplefilter("ignore", UserWarning)
            return image.convert("RGB")
    except Exception as err:
        raise ImageError(f"{label}: cannot convert image mode {image.mode!r} to RGB ({err})") from err
