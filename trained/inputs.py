"""Checks of what a user hands the Python API, each failing with one message that names the fix
(instead of a JAX trace from deep inside a jitted function)."""

from __future__ import annotations

import numpy as np

from visual_tokenizers.core.data.decoding import preprocess
from visual_tokenizers.core.errors import UserError
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.tokens.layout import Vocab


class InputError(UserError, ValueError):
    """Images or indices the API cannot take; the message says how to fix them."""


def _check_image_array(array: np.ndarray, what: str) -> None:
    if array.dtype != np.uint8:
        hint = ""
        if np.issubdtype(array.dtype, np.floating):
            hint = (
                " Float images in [0, 255]: np.clip(np.round(x), 0, 255).astype(np.uint8); in "
                "[-1, 1]: np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)."
            )
        raise InputError(f"{what} must be uint8 RGB in [0, 255], got dtype {array.dtype}.{hint}")
    if array.shape[-1] != 3:
        raise InputError(
            f"{what} must have 3 (RGB) channels last, got shape {array.shape}: grayscale "
            "np.repeat(x[..., None], 3, -1), RGBA x[..., :3], channels-first x.transpose(...)"
        )


def model_images(images, image_size: int) -> np.ndarray:
    """uint8 [B, image_size, image_size, 3]: each image preprocessed as export and evaluation do
    (shorter side resized to image_size, centre crop; core.data.decoding.preprocess).

    `images`: a uint8 array [B, H, W, 3], or a list of uint8 [H, W, 3] arrays of any sizes.
    """
    if isinstance(images, list | tuple):
        items = [np.asarray(im) for im in images]
        for i, im in enumerate(items):
            if im.ndim != 3:
                raise InputError(f"images[{i}] must be [height, width, 3], got shape {im.shape}")
            _check_image_array(im, f"images[{i}]")
    else:
        items = np.asarray(images)
        if items.ndim != 4:
            one = " (one image: pass images[None])" if items.ndim == 3 else ""
            raise InputError(
                f"images must be a batch [batch, height, width, 3] or a list of [height, width, 3]"
                f" arrays, got shape {items.shape}{one}"
            )
        _check_image_array(items, "images")
    if not len(items):
        raise InputError("images is empty: pass at least one image")
    return np.stack([preprocess(np.ascontiguousarray(im), image_size) for im in items])


def check_batch(batch: int, mesh) -> None:
    """The batch is split over the mesh's data x fsdp devices, so it must divide evenly."""
    parallel = mesh_lib.batch_parallelism(mesh)
    if batch % parallel:
        raise InputError(
            f"a batch of {batch} does not split over the mesh's {parallel} data x fsdp devices: "
            f"pass a multiple of {parallel} (pad with copies and drop their outputs), or load "
            "with a smaller mesh (from_workdir(..., mesh=...))"
        )


def _upper_bounds(vocab: Vocab) -> np.ndarray:
    """Exclusive upper bound of each index (per group when the indices carry a group axis)."""
    if vocab.grouped:
        return np.array([2**bits for bits in vocab.groups], np.int64)
    return np.array(vocab.size, np.int64)


def model_indices(indices, per_image_shape: tuple, vocab: Vocab) -> np.ndarray:
    """int32 [B, *per_image_shape]; flat rows [B, prod(per_image_shape)] (an export's token
    rows, offset and delimiters removed) are reshaped."""
    array = np.asarray(indices)
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"indices must be integers, got dtype {array.dtype}")
    length = int(np.prod(per_image_shape))
    if array.ndim == 2 and array.shape[1] == length and len(per_image_shape) > 1:
        array = array.reshape(len(array), *per_image_shape)
    if tuple(array.shape[1:]) != tuple(per_image_shape):
        one = " (one image: pass indices[None])" if array.shape == tuple(per_image_shape) else ""
        raise InputError(
            f"indices must be [batch, {', '.join(map(str, per_image_shape))}] (or flat rows "
            f"[batch, {length}]), got shape {array.shape}{one}"
        )
    high = _upper_bounds(vocab)
    if array.size and (array.min() < 0 or (array >= high).any()):
        bad = array[(array < 0) | (array >= high)].ravel()[0]
        raise InputError(
            f"index {int(bad)} is outside the tokenizer's vocabulary [0, {int(high.min())}"
            f"{'' if high.ndim == 0 else ' per group'}): remove an export's vocab_offset and "
            "begin/end-of-image ids first, and decode with the tokenizer that made the indices"
        )
    return array.astype(np.int32)
