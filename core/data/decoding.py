"""Decoding and preprocessing of stored images, the data errors, and the base of decoding sources.

The bottom of core/data: sources.py (folders, the spec parser), tfds.py and builtin.py build
on it, pipeline.py batches what they read.
"""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
from PIL import Image

from visual_tokenizers.core.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_PERM_TAG, _AUG_TAG = 0x7E12, 0xA09  # Keep permutation and augmentation seeds disjoint.


class DataError(UserError, ValueError):
    """A user-facing data problem; the message names the cause and the fix."""


class UnreadableImage(DataError):
    """One example could not be decoded; iterators skip it and count it."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: {reason}")
        self.what = what


# ----------------------------------------------------------------------------- decoding


def to_pil(image, draft: int | None = None) -> Image.Image:
    """Encoded bytes, a file path, an array or a PIL image -> RGB PIL image.

    `draft` lets JPEG decode at a reduced scale whose shorter side is still >= draft,
    which makes training on large JPEGs several times cheaper.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        pil = Image.fromarray(image)
    else:
        pil = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
        if draft:
            pil.draft("RGB", (draft, draft))
    return pil.convert("RGB")  # Also forces the full decode, so errors surface here.


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
