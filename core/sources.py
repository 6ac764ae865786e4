"""Image sources picked by a string spec, decoding and preprocessing (see core/data.py).

`make_source(spec, split, image_size=..)` returns a source with `__len__`, `name`,
`num_classes`, `num_skipped` and random access `load(index)`; TFDS sources live in
core/data_tfds.py, the built-in ones in core/builtin_data.py.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_PERM_TAG, _AUG_TAG = 0x7E12, 0xA09  # Keep permutation and augmentation seeds disjoint.


class DataError(ValueError):
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


# ----------------------------------------------------------------------------- sources


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


class FolderSource(_DecodingSource):
    """Image files under a directory, found recursively and sorted for determinism."""

    def __init__(self, path: str, split: str):
        super().__init__()
        root = os.path.join(path, split) if os.path.isdir(os.path.join(path, split)) else path
        if not os.path.isdir(root):
            raise DataError(f"folder:{path}: no such directory. Pass an existing image folder.")
        self.root = os.path.abspath(root)
        self.files = _list_images(self.root)
        if not self.files:
            raise DataError(
                f"folder:{path}: no {'/'.join(IMAGE_EXTENSIONS)} files found under "
                f"{self.root}. Point the spec at a folder of images (class subfolders optional)."
            )
        self.class_names, self.labels = _folder_labels(self.files)
        self.num_classes = len(self.class_names)
        self.name = f"folder:{self.root}"

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, draft: int | None = None) -> tuple[Image.Image, int]:
        path = os.path.join(self.root, self.files[index])
        return self._decode(path, path, draft), self.labels[index]


def _list_images(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(found)


def _folder_labels(files: list[str]) -> tuple[list[str], list[int]]:
    """Class = top-level subfolder (sorted names), unless some images sit in the root."""
    tops = [f.split(os.sep, 1)[0] if os.sep in f else None for f in files]
    if None in tops:
        return ["all"], [0] * len(files)
    names = sorted(set(tops))
    index = {n: i for i, n in enumerate(names)}
    return names, [index[t] for t in tops]


def make_source(spec: str, split: str, *, image_size: int, data_dir: str | None = None):
    """The source named by `spec` (see the module docstring); a split in the spec wins."""
    scheme, sep, rest = spec.partition(":")
    if scheme == "builtin" and sep:
        from core import builtin_data

        if rest not in builtin_data.BUILTINS:
            raise DataError(
                f"Unknown builtin dataset {rest!r}; valid: "
                + ", ".join(f"builtin:{n}" for n in builtin_data.BUILTINS)
            )
        return builtin_data.BUILTINS[rest](split, image_size)
    if scheme == "folder" and rest:
        return FolderSource(rest, split)
    if scheme == "tfds" and rest:
        name, spec_split = _parse_tfds(rest)
        return open_tfds(name, spec_split or split, data_dir)
    raise DataError(
        f"Unknown data spec {spec!r}; valid forms: tfds:NAME[:SPLIT], folder:PATH, "
        "builtin:shapes, builtin:shapes_plain, builtin:photos."
    )


def _parse_tfds(rest: str) -> tuple[str, str | None]:
    """'NAME[/CONFIG][:X.Y.Z][:SPLIT]'; splits may contain ':' inside slices."""
    match = re.fullmatch(r"([^:\[]+(?::\d+\.\d+\.\d+)?)(?::(.+))?", rest)
    if not match:
        raise DataError(f"Bad TFDS spec 'tfds:{rest}'; expected tfds:NAME[:SPLIT].")
    return match.group(1), match.group(2)


def open_tfds(name: str, split: str, data_dir: str | None):
    """A random-access TfdsSource when stored as ArrayRecord/Parquet, else a TfdsStream.

    Lives in core/data_tfds.py, which imports this module, hence the lazy import.
    """
    from core import data_tfds

    return data_tfds.open_tfds(name, split, data_dir)
