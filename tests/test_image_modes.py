"""Tests for core/data/decoding.py: every image mode and EXIF orientation decode to what a viewer
shows (16-bit scaled not clipped, alpha on the documented background, photos upright)."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from visual_tokenizers.core.data import decoding

WHITE = np.array(decoding.ALPHA_BACKGROUND, np.int64)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _decoded(data: bytes, draft=None) -> np.ndarray:
    """Through the path every source uses (decode -> to_pil)."""
    image = decoding.decode(data, "test image", draft)
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def _gray(values) -> np.ndarray:
    return np.repeat(np.asarray(values, np.int64)[..., None], 3, axis=-1)


def _png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG built by hand (Pillow cannot write 16-bit RGB): colour 2 = RGB, 6 = RGBA."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------- high bit depth

SIXTEEN = np.array([[0, 1000, 257 * 100], [40000, 65280, 65535]], np.uint16)
SIXTEEN_8BIT = [[0, 4, 100], [156, 254, 255]]  # round(v / 257)


def test_16bit_grayscale_png_is_scaled_not_clipped():
    data = _encode(Image.fromarray(SIXTEEN), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    np.testing.assert_array_equal(_decoded(data), _gray(SIXTEEN_8BIT))


def test_16bit_big_endian_tiff_is_scaled():
    image = Image.frombytes("I;16B", (3, 2), SIXTEEN.astype(">u2").tobytes())
    data = _encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    np.testing.assert_array_equal(_decoded(data), _gray(SIXTEEN_8BIT))


def test_16bit_png_transparent_gray_value_shows_the_background():
    data = _encode(Image.fromarray(SIXTEEN), "PNG", transparency=1000)
    expected = _gray(SIXTEEN_8BIT)
    expected[0, 1] = WHITE
    np.testing.assert_array_equal(_decoded(data), expected)


def test_32bit_integer_tiff_is_read_as_16bit_and_refused_beyond():
    data = _encode(Image.fromarray(SIXTEEN.astype(np.int32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(_decoded(data), _gray(SIXTEEN_8BIT))
    too_big = _encode(Image.fromarray(np.array([[0, 70000]], np.int32)), "TIFF")
    with pytest.raises(decoding.UnreadableImage, match="0..70000.*16-bit PNG"):
        decoding.decode(too_big, "big.tif")


def test_float_tiff_is_read_as_0_to_1_and_refused_beyond():
    values = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 1.001]], np.float32)
    data = _encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    np.testing.assert_array_equal(_decoded(data), _gray([[0, 64, 128], [191, 255, 255]]))
    for bad in (2.0, np.nan):
        data = _encode(Image.fromarray(np.array([[0.5, bad]], np.float32)), "TIFF")
        with pytest.raises(decoding.UnreadableImage, match=r"mode F.*\[0, 1\]"):
            decoding.decode(data, "float.tif")


def test_16bit_rgb_and_rgba_pngs_are_scaled():
    rgb = np.array([[[0, 257 * 128, 65535], [257 * 7, 0x80FF, 300]]], np.uint16)
    want = (rgb.astype(np.int64) + 128) // 257
    got = _decoded(_png16(rgb, 2))
    np.testing.assert_array_equal(got[0, 0], want[0, 0])  # Exact multiples of 257.
    assert np.abs(got - want).max() <= 1  # Pillow keeps the high byte: within 1 of v / 257.
    alpha = np.array([[[65535], [0]]], np.uint16)
    got = _decoded(_png16(np.concatenate([rgb, alpha], -1), 6))
    np.testing.assert_array_equal(got[0, 0], want[0, 0])
    np.testing.assert_array_equal(got[0, 1], WHITE)  # Fully transparent.


def test_uint16_arrays_are_scaled_and_uint8_arrays_kept():
    for array in (SIXTEEN, SIXTEEN[..., None], _gray(SIXTEEN).astype(np.uint16)):
        np.testing.assert_array_equal(decoding.to_pil(array), _gray(SIXTEEN_8BIT))
    eight = np.random.default_rng(0).integers(0, 256, (4, 5, 3), np.uint8)
    np.testing.assert_array_equal(decoding.to_pil(eight), eight)


# ----------------------------------------------------------------- alpha, palette, 1-bit, CMYK

RGBA = np.array([[[10, 20, 30, 255], [200, 100, 50, 0], [0, 0, 0, 128]]], np.uint8)


def _blend(rgba) -> np.ndarray:
    rgba = np.asarray(rgba, np.int64)
    alpha = rgba[..., 3:]
    return (rgba[..., :3] * alpha + WHITE * (255 - alpha) + 127) // 255


def test_rgba_png_is_composited_on_the_background():
    got = _decoded(_encode(Image.fromarray(RGBA), "PNG"))
    np.testing.assert_array_equal(got, _blend(RGBA))
    assert got[0, 1].tolist() == [255, 255, 255]  # Not the (200, 100, 50) hidden under alpha 0.
    assert got[0, 2].tolist() == [127, 127, 127]


def test_la_png_is_composited_on_the_background():
    la = np.array([[[40, 255], [90, 0], [0, 51]]], np.uint8)
    got = _decoded(_encode(Image.fromarray(la, "LA"), "PNG"))
    np.testing.assert_array_equal(got, _blend(np.concatenate([_gray(la[..., 0]), la[..., 1:]], -1)))


def test_palette_png_with_and_without_transparency():
    palette = [255, 0, 0, 0, 128, 0, 1, 2, 3]
    image = Image.fromarray(np.array([[0, 1, 2], [2, 1, 0]], np.uint8), "P")
    image.putpalette(palette)
    opaque = [[[255, 0, 0], [0, 128, 0], [1, 2, 3]], [[1, 2, 3], [0, 128, 0], [255, 0, 0]]]
    np.testing.assert_array_equal(_decoded(_encode(image, "PNG")), opaque)
    transparent = np.array(opaque)
    transparent[[0, 1], [2, 0]] = WHITE  # Index 2 is transparent.
    np.testing.assert_array_equal(_decoded(_encode(image, "PNG", transparency=2)), transparent)


def test_one_bit_png():
    bits = np.array([[True, False, True], [False, False, True]])
    got = _decoded(_encode(Image.fromarray(bits), "PNG"))
    np.testing.assert_array_equal(got, _gray(np.where(bits, 255, 0)))


def test_cmyk_tiff_and_jpeg():
    cmyk = np.array([[[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], np.uint8)
    want = [[[0, 255, 255], [255, 0, 255], [0, 0, 0], [255, 255, 255]]]
    image = Image.fromarray(cmyk, "CMYK")
    np.testing.assert_array_equal(_decoded(_encode(image, "TIFF")), want)
    big = image.resize((64, 16), Image.NEAREST)  # 16-px blocks survive JPEG almost intact.
    got = _decoded(_encode(big, "JPEG", quality=95))
    assert np.abs(got[8, 8::16] - np.array(want[0])).max() <= 8


# ----------------------------------------------------------------------------- EXIF orientation

# What a viewer shows for each EXIF orientation, from the stored pixels (EXIF 2.32, tag 0x0112).
UPRIGHT = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # Rotate 90 degrees clockwise.
    7: lambda a: np.rot90(np.fliplr(a), -1),
    8: lambda a: np.rot90(a, 1),
}


def _with_orientation(image: Image.Image, fmt: str, orientation: int, **kwargs) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(image, fmt, exif=exif.tobytes(), **kwargs)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png(orientation):
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # Non-square, distinct.
    got = _decoded(_with_orientation(Image.fromarray(stored), "PNG", orientation))
    np.testing.assert_array_equal(got, UPRIGHT[orientation](stored))


def test_exif_orientation_jpeg_with_draft():
    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 256, (8, 16, 3), np.uint8)).resize((128, 64))
    for orientation in (6, 2):  # A rotation and a mirror.
        data = _with_orientation(stored, "JPEG", orientation)
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(_decoded(data), UPRIGHT[orientation](pixels))
        drafted = _decoded(data, draft=16)  # JPEG decodes at 1/4 scale, then turns upright.
        assert drafted.shape == UPRIGHT[orientation](np.zeros((16, 32, 3))).shape
    # An image straight from Image.open is a file too; a transformed copy is taken as upright.
    opened = Image.open(io.BytesIO(_with_orientation(stored, "JPEG", 8)))
    assert decoding.to_pil(opened).size == (64, 128)
    assert decoding.to_pil(opened.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).size == (128, 64)
