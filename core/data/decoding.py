"""Decoding and preprocessing of stored images, the data errors, and the base of decoding sources.

The bottom of core/data: sources.py (folders, the spec parser), tfds.py and builtin.py build
on it, pipeline.py batches what they read.
"""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

from visual_tokenizers.core.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_PERM_TAG, _AUG_TAG = 0x7E12, 0xA09  # Keep permutation and augmentation seeds disjoint.
# Transparent pixels are shown on white, as viewers and browsers show PNGs; what
# convert("RGB") did instead (drop alpha) exposes whatever colour hides under alpha 0.
ALPHA_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class DataError(UserError, ValueError):
    """A user-facing data problem; the message names the cause and the fix."""


class UnreadableImage(DataError):
    """One example could not be decoded; iterators skip it and count it."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: {reason}")
        self.what = what


# ----------------------------------------------------------------------------- decoding


def to_pil(image, draft: int | None = None) -> Image.Image:
    """Encoded bytes, a file path, an array or a PIL image -> 8-bit RGB PIL image.

    `draft` lets JPEG decode at a reduced scale whose shorter side is still >= draft,
    which makes training on large JPEGs several times cheaper. It is applied before the
    decode, the EXIF orientation after it.

    Every image is read as it is meant to be seen, never silently clipped:
    - EXIF orientation (all 8 values) is applied to what is decoded from bytes or a file
      (including a PIL image straight from Image.open); in-memory images and arrays are
      taken as already upright.
    - 16-bit grayscale (I;16, I;16L, I;16B) and 32-bit integer `I` (read as 16-bit, the
      range PNG and TIFF decoders give it) are scaled to 8 bits with round(v / 257);
      `I` values outside 0..65535 make the image unreadable, not clipped. 16-bit RGB(A)
      PNGs are reduced to 8 bits by Pillow itself (the high byte, within 1 of v / 257).
    - Float `F` is taken to be in [0, 1] (scaled by 255 and rounded); other values, NaN
      or infinities make the image unreadable.
    - Alpha (RGBA, LA, PA, premultiplied RGBa/La, a palette or PNG tRNS transparency)
      is blended onto ALPHA_BACKGROUND: out = round((c * a + bg * (255 - a)) / 255).
    - Palette `P`, 1-bit `1`, `L`, CMYK (Pillow's conversion; ICC profiles are not
      applied) and other modes go through Pillow's convert("RGB").
    - uint16 arrays are scaled like 16-bit images; uint8 arrays are used as they are.
    Unreadable values raise DataError (a ValueError, so decode() reports them).
    """
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.dtype.kind == "u" and image.dtype.itemsize == 2:
            image = _sixteen_to_eight(image)
        return _to_rgb(Image.fromarray(image))
    if not isinstance(image, Image.Image):
        image = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
        if draft:
            image.draft("RGB", (draft, draft))
    if isinstance(image, ImageFile.ImageFile):
        image.load()  # The full decode happens here, so errors surface inside decode().
        # A camera stores the sensor's pixels plus this tag; 1 (or none) means upright.
        # Looked up first because exif_transpose copies even upright images.
        if image.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
            image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB, as documented in to_pil."""
    mode, transparency = image.mode, image.info.get("transparency")
    if mode == "RGB" and transparency is None:
        return image  # The common path (8-bit JPEG, PNG): no extra work.
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return _high_bit_to_rgb(image, transparency)
    if mode in _ALPHA_MODES or transparency is not None:
        return _composite(np.asarray(image.convert("RGBA")))
    return image.convert("RGB")


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 with round(v / 257) (no ties: 257 is odd), so 65535 -> 255."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _high_bit_to_rgb(image: Image.Image, transparency) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "F":
        scaled = np.round(values.astype(np.float64) * 255)
        if values.size and not (
            np.isfinite(scaled).all() and 0 <= scaled.min() <= scaled.max() <= 255
        ):
            raise DataError(
                f"float (mode F) pixels span {values.min()}..{values.max()}, outside the [0, 1] "
                "this reader assumes; save the image as 8- or 16-bit PNG (or scale it to [0, 1])"
            )
        gray = scaled.astype(np.uint8)
    else:
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(
                f"32-bit (mode {image.mode}) pixels span {values.min()}..{values.max()}, outside "
                "the 16-bit range 0..65535 this reader assumes; save the image as 8- or 16-bit PNG"
            )
        gray = _sixteen_to_eight(values)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    if isinstance(transparency, int):  # PNG tRNS: one 16-bit gray value is transparent.
        rgb[values == transparency] = ALPHA_BACKGROUND
    return Image.fromarray(rgb)


def _composite(rgba: np.ndarray) -> Image.Image:
    """uint8 [H, W, 4] blended onto ALPHA_BACKGROUND (exact integer rounding)."""
    rgba = rgba.astype(np.uint16)  # 255 * 255 + 127 still fits.
    alpha = rgba[..., 3:]
    background = np.array(ALPHA_BACKGROUND, np.uint16)
    out = (rgba[..., :3] * alpha + background * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8))


def decode(image, what: str, draft: int | None = None) -> Image.Image:
    """to_pil, turning any decode failure into UnreadableImage naming `what`."""
    try:
        return to_pil(image, draft)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise UnreadableImage(what, f"{type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- preprocessing


def resize_shorter(image: Image.Image, target: int) -> Image.Image:
    """ADM's resize: halve with BOX while >= 2x too large, then BICUBIC to shorter == target."""
    if min(image.size) == target:
        return image
    while min(image.size) >= 2 * target:
        image = image.resize((image.width // 2, image.height // 2), Image.BOX)
    scale = target / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.BICUBIC)


def preprocess(
    image, size: int, rng: np.random.Generator | None = None, max_upscale: float = 1.0
) -> np.ndarray:
    """uint8 [size, size, 3]. Eval (rng=None): shorter side to `size`, centre crop.

    Train: shorter side to size * U(1, max_upscale), random crop, random horizontal flip
    (ADM/MaskGIT style; no Inception random-resized crop).
    """
    if isinstance(image, np.ndarray) and image.shape == (size, size, 3) and max_upscale <= 1:
        array = image  # Builtin sources render at the target size: skip PIL entirely.
    else:
        target = size
        if rng is not None and max_upscale > 1:
            target = round(size * rng.uniform(1.0, max_upscale))
        array = np.asarray(resize_shorter(to_pil(image), target))
    h, w = array.shape[:2]
    if rng is None:
        y0, x0 = (h - size) // 2, (w - size) // 2
        return array[y0 : y0 + size, x0 : x0 + size]
    y0, x0 = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    array = array[y0 : y0 + size, x0 : x0 + size]
    return np.ascontiguousarray(array[:, ::-1] if rng.random() < 0.5 else array)


# ----------------------------------------------------------------------------- base source


class _DecodingSource:
    """Base of sources that decode stored images: counts unreadable ones, warns once each.

    Subclasses define __len__, name, num_classes and load(index, draft) -> (PIL image, label).
    """

    def __init__(self):
        self.skipped: dict[str, str] = {}  # What -> why, for every unreadable example seen.
        self._lock = threading.Lock()  # load() runs in the iterator's threads.

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def _decode(self, image, what: str, draft: int | None) -> Image.Image:
        try:
            return decode(image, what, draft)
        except UnreadableImage as e:
            with self._lock:
                new = e.what not in self.skipped
                self.skipped[e.what] = str(e)
            if new:
                log.warning("Skipping unreadable image %s (%d skipped)", e, self.num_skipped)
            raise

    def read(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self.load(index)
        return np.asarray(image), label
