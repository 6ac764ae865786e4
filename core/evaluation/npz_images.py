"""ADM-format npz files of images (generated samples, reference batches), streamed and checked.

The format of the ADM evaluator (openai/guided-diffusion, evaluations/evaluator.py) is
`np.savez(path, images, labels)`: `arr_0` uint8 [N, H, W, 3] RGB, optionally `arr_1` integer
class labels [N]. A file that breaks it is refused before any network runs, with a DataError
naming the file, what it holds and the conversion that fixes it: no images, another dtype (the
values of the first images say which range they are in: float in [0, 1], [-1, 1] or [0, 255],
integers within or outside [0, 255]), channels first, grey or RGBA images, and labels that are
not one integer per image.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from visual_tokenizers.core.data.decoding import DataError

_FLOAT_FIX = (
    "convert with np.clip(np.round(x * 255), 0, 255).astype(np.uint8) from [0, 1], or "
    "np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8) from [-1, 1]"
)


def _range_fix(dtype: np.dtype, value_range) -> str:
    """The conversion to uint8 for values of `dtype` spanning `value_range` (None: unknown)."""
    if value_range is None:
        unknown = "check the values lie in [0, 255], then save x.astype(np.uint8)"
        return _FLOAT_FIX if dtype.kind == "f" else unknown
    lo, hi = value_range
    seen = f"the first images span [{lo:.4g}, {hi:.4g}]"
    if dtype.kind == "f" and lo >= 0 and hi <= 1:
        return f"{seen}: from [0, 1] save np.clip(np.round(x * 255), 0, 255).astype(np.uint8)"
    if dtype.kind == "f" and lo >= -1 and hi <= 1:
        return (
            f"{seen}: from [-1, 1] save np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)"
        )
    if lo >= 0 and hi <= 255:
        return f"{seen}: values lie in [0, 255]: save np.round(x).astype(np.uint8)"
    return (
        f"{seen}, outside [0, 255]: rescale to [0, 255] (e.g. (x - x.min()) / (x.max() - "
        "x.min()) * 255 for one image), then save np.round(x).astype(np.uint8)"
    )


def _layout_fixes(shape: tuple, dtype: np.dtype, value_range=None) -> list[str]:
    """What to change so that an array of `shape`/`dtype` (whose first images span
    `value_range`, if read) becomes uint8 [N, H, W, 3]."""
    fixes = []
    if dtype.kind in "fiub" and dtype != np.uint8:
        fixes.append(_range_fix(dtype, value_range))
    elif dtype != np.uint8:
        fixes.append("save the pixels as uint8")
    if len(shape) == 4 and shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):
        fixes.append("channels come first: save x.transpose(0, 2, 3, 1)")
    elif len(shape) == 4 and shape[3] == 1:
        fixes.append("grey images: save np.repeat(x, 3, axis=3)")
    elif len(shape) == 4 and shape[3] == 4:
        fixes.append("RGBA images: save x[..., :3]")
    elif len(shape) == 3 and shape[2] == 3:
        fixes.append("one image, not a batch: save x[None]")
    elif len(shape) == 3:
        fixes.append("grey images: save np.repeat(x[..., None], 3, axis=3)")
    elif len(shape) != 4 or shape[3] != 3:
        fixes.append("save a batch of RGB images shaped [N, H, W, 3]")
    return fixes


def check_images(path: str, what: str, shape: tuple, dtype: np.dtype, value_range=None) -> None:
    """Raises a DataError unless arr_0 is a non-empty uint8 [N, H, W, 3] array."""
    fixes = _layout_fixes(tuple(shape), np.dtype(dtype), value_range)
    if fixes:
        raise DataError(
            f"{what} {path}: arr_0 is {dtype} {tuple(shape)}, not uint8 NHWC RGB [N, H, W, 3] "
            f"(samples stored losslessly); {'; '.join(fixes)}"
        )
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise DataError(
            f"{what} {path} holds no images (arr_0 has shape {tuple(shape)}); point the config at "
            "a file with images, or regenerate it (e.g. jobs/sample.py, config.num_samples > 0)"
        )


def check_labels(path: str, what: str, labels: np.ndarray, num_images: int) -> np.ndarray:
    """arr_1 as int64 [N]; a DataError names the file and both lengths when they differ."""
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{what} {path}: arr_1 (labels) is {labels.dtype} {labels.shape}; save one integer "
            f"class id per image: np.savez(path, images, labels.astype(np.int64)) with "
            f"labels of shape [{num_images}]"
        )
    if len(labels) != num_images:
        raise DataError(
            f"{what} {path}: arr_1 holds {len(labels)} labels but arr_0 holds {num_images} "
            "images; save one label per image (in the same order), or drop arr_1"
        )
    return labels.astype(np.int64)


class NpzImages:
    """Streams `arr_0` (uint8 NHWC) of an ADM-format npz batch by batch; `arr_1` labels if any.

    50,000 samples at 256x256 are ~10 GB: reading the array whole is not an option.
    `what` names the file in errors ('samples file', 'reference file'); `labels=False` leaves
    arr_1 unread (a reference batch's labels are never used).
    """

    def __init__(self, path: str, what: str = "samples file", labels: bool = True):
        if not os.path.isfile(path):
            raise DataError(f"{what} {path} does not exist; check the path in the config")
        self.path = path
        if not zipfile.is_zipfile(path):
            raise DataError(
                f"{what} {path} is not an npz archive; save it with np.savez(path, images, labels)"
            )
        self.labels = None
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "arr_0.npy" not in names:
                held = sorted(n.removesuffix(".npy") for n in names)
                raise DataError(
                    f"{what} {path} holds no arr_0 (it holds {held}); ADM format is "
                    "np.savez(path, images, labels)"
                )
            with archive.open("arr_0.npy") as f:
                shape, dtype, _ = _npy_header(f, path)
                value_range = _first_values_range(f, shape, dtype)
            check_images(path, what, shape, dtype, value_range)
            if labels and "arr_1.npy" in names:
                with archive.open("arr_1.npy") as f:
                    found = np.load(f, allow_pickle=False)
                self.labels = check_labels(path, what, found, shape[0])
        self.num_images, self.image_size = shape[0], shape[1]
        self._frame_bytes = int(np.prod(shape[1:]))
        self._shape = shape[1:]

    def num_batches(self, batch_size: int) -> int:
        return -(-self.num_images // batch_size)

    def batches(self, batch_size: int):
        """Yields (images padded to batch_size by repeating the last one, number valid)."""
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as f:
            _npy_header(f, self.path)
            for start in range(0, self.num_images, batch_size):
                count = min(batch_size, self.num_images - start)
                raw = f.read(count * self._frame_bytes)
                images = np.frombuffer(raw, np.uint8).reshape(count, *self._shape)
                yield pad_batch(images, batch_size), count


def _npy_header(f, path: str) -> tuple:
    version = np.lib.format.read_magic(f)
    read = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    if version not in read:
        raise DataError(f"{path}: unsupported .npy version {version} inside the npz; re-save it")
    shape, fortran, dtype = read[version](f)
    if fortran:
        raise DataError(f"{path}: arr_0 is Fortran-ordered; save np.ascontiguousarray(images)")
    return shape, dtype, version


def _first_values_range(f, shape: tuple, dtype: np.dtype, limit: int = 1 << 22):
    """(min, max) of the first values of a numeric non-uint8 array (at most `limit` bytes
    read), to name the right conversion; None for uint8 or other dtypes."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8 or dtype.kind not in "fiub" or not shape or 0 in shape:
        return None
    count = min(int(np.prod(shape)), max(limit // dtype.itemsize, 1))
    values = np.frombuffer(f.read(count * dtype.itemsize), dtype)
    values = values[np.isfinite(values)] if dtype.kind == "f" else values
    return (float(values.min()), float(values.max())) if len(values) else None


def pad_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Pads a short final batch to `size` rows by repeating its last row (masked out later)."""
    if len(images) == size:
        return images
    return np.concatenate([images, np.repeat(images[-1:], size - len(images), 0)])
