"""Bicubic resampling exactly as PIL and torch compute it, as jit-friendly weights.

Two kernels exist under the name "bicubic" and feature networks depend on which one ran:

- Antialiased (PIL's `Image.resize(..., BICUBIC)`, torch's `interpolate(..., antialias=True)`):
  the cubic convolution with a = -0.5, stretched by the scale when shrinking, so every input
  pixel under an output pixel contributes (a low-pass). `antialias_weights` follows Pillow's
  `precompute_coeffs` (src/libImaging/Resample.c); torch's antialiased kernel computes the same
  weights. `pil_resize_uint8` also reproduces Pillow's 8-bit arithmetic: 22-bit fixed-point
  weights, a horizontal then a vertical pass, each rounded and clipped to uint8.
- Plain (torch's `interpolate(..., mode="bicubic")` without antialias): four taps of the cubic
  convolution with a = -0.75 whatever the scale, sampled at (i + 0.5) / scale_factor - 0.5.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

PIL_PRECISION_BITS = 22  # Pillow's Resample.c: 32 - 8 bits of pixel - 2 bits of headroom.


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a (|x| < 2 support)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.cache
def antialias_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(first input index [out], normalised float64 weights [out, taps]) of antialiased bicubic.

    Pillow's precompute_coeffs in double precision: centre (i + 0.5) * scale, support 2 * scale
    when shrinking (2 otherwise), window [trunc(centre - support + 0.5), trunc(centre + support
    + 0.5)) clipped to the image, weights cubic((j - centre + 0.5) / filterscale), a = -0.5.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    centre = (np.arange(out_size) + 0.5) * scale
    start = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)
    stop = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size)
    offsets = np.arange(taps)
    x = (offsets[None] + start[:, None] - centre[:, None] + 0.5) * (1.0 / filterscale)
    weights = np.where(offsets[None] < (stop - start)[:, None], _cubic(x, -0.5), 0.0)
    total = weights.sum(1, keepdims=True)
    return start, np.where(total != 0, weights / np.where(total != 0, total, 1), weights)


@functools.cache
def antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 matrix of antialiased bicubic (torch antialias=True, PIL in float)."""
    start, weights = antialias_weights(in_size, out_size)
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.repeat(np.arange(out_size), weights.shape[1])
    cols = np.minimum(start[:, None] + np.arange(weights.shape[1]), in_size - 1).reshape(-1)
    np.add.at(matrix, (rows, cols), weights.reshape(-1))  # Padded taps carry weight 0.
    return matrix.astype(np.float32)


@functools.cache
def _pil_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(input index [out, taps], int32 fixed-point weight [out, taps]) as Pillow rounds them."""
    start, weights = antialias_weights(in_size, out_size)
    scaled = weights * (1 << PIL_PRECISION_BITS)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    index = np.minimum(start[:, None] + np.arange(weights.shape[1]), in_size - 1)
    return index, fixed


def _pil_pass(x, axis: int, out_size: int):
    """One Pillow 8-bit pass along `axis` of int32 [B, H, W, C]: fixed-point sum, round, clip."""
    index, fixed = _pil_taps(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    acc = jnp.int32(1 << (PIL_PRECISION_BITS - 1))  # + 0.5: round half up after the shift.
    for tap in range(index.shape[1]):  # Few taps (5 for a mild resize): a sum of gathers.
        weight = jnp.asarray(fixed[:, tap].reshape(shape))
        acc = acc + jnp.take(x, jnp.asarray(index[:, tap]), axis=axis) * weight
    return jnp.clip(acc >> PIL_PRECISION_BITS, 0, 255)


def pil_vertical_first(in_size: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether Pillow resizes rows before columns. Pillow's C source (Resample.c,
    ImagingResampleInner) runs the horizontal pass first; Pillow 13 runs the vertical pass
    first when it shrinks the height much more than the width. The rule below reproduces
    Pillow 13.0 bit-exactly on every size we tried (tests/test_dinov2_preprocess.py); the two
    orders differ by a few uint8 levels on some pixels, and only for such tall inputs."""
    shrink_h = max(in_size[0] / size[0], 1.0) - 1.0
    shrink_w = max(in_size[1] / size[1], 1.0) - 1.0
    return shrink_h > 2.0 * shrink_w


def pil_resize_uint8(images, size: tuple[int, int]):
    """uint8 [B, H, W, C] -> int32 [B, h, w, C] in 0..255, bit-exact with Pillow's
    `Image.resize((w, h), Image.BICUBIC)` on each RGB image."""
    x = jnp.asarray(images).astype(jnp.int32)
    axes = (1, 2) if pil_vertical_first(x.shape[1:3], size) else (2, 1)
    for axis in axes:
        x = _pil_pass(x, axis, size[axis - 1])
    return x


@functools.cache
def torch_bicubic_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
    """[out, in] float32 weights of torch's bicubic interpolate (no antialias, align_corners
    False) called with `scale_factor`: the source coordinate uses 1 / scale_factor, not
    in / out, as torch does when a scale factor is given (its output size is floor(in * sf)).
    Computed in float32 as torch's kernel does; indices clamp at the borders."""
    scale = np.float32(1.0 / scale_factor)
    real = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    base = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    t = np.clip(real - base.astype(np.float32), 0, 1).astype(np.float32)
    a = np.float32(-0.75)
    coeffs = np.stack([_cubic(t + 1, a), _cubic(t, a), _cubic(1 - t, a), _cubic(2 - t, a)], 1)
    matrix = np.zeros((out_size, in_size), np.float32)
    for tap in range(4):
        cols = np.clip(base - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), cols), coeffs[:, tap].astype(np.float32))
    return matrix
