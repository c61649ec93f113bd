"""load_image: every source kind, every mode to RGB as the reference converts, and every bad input."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlkit.data.images import DEFAULT_MAX_PIXELS, load_image
from vlkit.errors import ImageError


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def rgb_image(w=12, h=9, seed=0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but which carries no pixel data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_all_source_kinds_give_the_same_rgb(tmp_path):
    image = rgb_image()
    path = tmp_path / "a b.png"
    image.save(path)
    expected = np.asarray(image)
    sources = [
        path,
        str(path),
        path.as_uri(),
        png_bytes(image),
        bytearray(png_bytes(image)),
        io.BytesIO(png_bytes(image)),
        image,
    ]
    for src in sources:
        out = load_image(src)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), expected), src
    with open(path, "rb") as f:
        assert np.array_equal(np.asarray(load_image(f)), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1", "I;16", "I", "YCbCr"])
def test_modes_convert_like_the_reference(tmp_path, mode):
    base = rgb_image(16, 10, seed=3)
    if mode == "I;16":
        source = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    elif mode == "I":
        source = base.convert("L").convert("I")
    else:
        source = base.convert(mode)
    assert source.mode == mode
    suffix = {"CMYK": ".jpg", "YCbCr": ".jpg", "I": ".tif"}.get(mode, ".png")
    path = tmp_path / f"img{suffix}"
    source.save(path, quality=95) if suffix == ".jpg" else source.save(path)
    reopened = Image.open(path)
    expected = np.asarray(reopened.convert("RGB"))  # exactly what LAVIS does: Image.open(p).convert("RGB")
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (16, 10)
    assert np.array_equal(np.asarray(out), expected)


def test_palette_with_transparency_converts_without_warning(tmp_path, recwarn):
    image = rgb_image().convert("P")
    image.info["transparency"] = 0
    path = tmp_path / "t.png"
    image.save(path, transparency=0)
    out = load_image(path)
    assert out.mode == "RGB"
    assert not [w for w in recwarn if "Palette" in str(w.message)]


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png: no such image file"):
        load_image(tmp_path / "nope.png")


def test_random_bytes_name_the_file(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(np.random.RandomState(0).bytes(500))
    with pytest.raises(ImageError, match=r"garbage\.png: not a recognised image file"):
        load_image(path)
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(b"not an image at all")
    with pytest.raises(ImageError, match="photo.jpg"):
        load_image(b"", name="photo.jpg")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_png_names_the_file(tmp_path, keep):
    data = png_bytes(rgb_image(64, 64))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageError, match=r"cut\.png: (corrupt or truncated|cannot read)"):
        load_image(path)


def test_truncated_jpeg_names_the_file(tmp_path):
    buf = io.BytesIO()
    rgb_image(64, 64).save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[:400])
    with pytest.raises(ImageError, match=r"cut\.jpg"):
        load_image(path)


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    assert DEFAULT_MAX_PIXELS == 64_000_000
    # 9000 x 9000 = 81 M pixels: above our limit, below Pillow's own hard limit. The file has no pixel
    # data at all, so reaching the decoder would give a "truncated" error instead of the limit error.
    path = tmp_path / "bomb.png"
    path.write_bytes(header_only_png(9000, 9000))
    with pytest.raises(ImageError, match=r"bomb\.png: image is 9000x9000 = 81,000,000 pixels, above the limit"):
        load_image(path)
    # Far beyond Pillow's own limit: still an ImageError, not Pillow's exception.
    path.write_bytes(header_only_png(100_000, 100_000))
    with pytest.raises(ImageError, match=r"bomb\.png"):
        load_image(path)


def test_pixel_limit_is_configurable():
    data = png_bytes(rgb_image(20, 10))
    with pytest.raises(ImageError, match="200 pixels, above the limit of 199"):
        load_image(data, max_pixels=199)
    assert load_image(data, max_pixels=200).size == (20, 10)
    assert load_image(data, max_pixels=None).size == (20, 10)
    with pytest.raises(ImageError, match="above the limit"):
        load_image(rgb_image(20, 10), max_pixels=100)  # PIL images are checked too


@pytest.mark.parametrize("url", ["http://example.com/a.png", "https://example.com/a.jpg", "HTTPS://x/y.png"])
def test_remote_urls_are_refused(url):
    with pytest.raises(ImageError, match="remote URLs are not supported"):
        load_image(url)


def test_other_url_schemes_are_refused():
    with pytest.raises(ImageError, match="unsupported URL scheme 's3'"):
        load_image("s3://bucket/a.png")
    with pytest.raises(ImageError, match="must point to this machine"):
        load_image("file://otherhost/a.png")


def test_not_an_image_source():
    with pytest.raises(ImageError, match="not an image source"):
        load_image(12345)  # type: ignore[arg-type]
