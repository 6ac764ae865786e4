"""Image conversions between model space ([-1, 1] float) and storage (uint8), and PNG grids."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from PIL import Image


def to_model(images_uint8):
    """uint8 NHWC -> float32 NHWC in [-1, 1] (works on numpy and jax arrays)."""
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images):
    """float NHWC in [-1, 1] -> uint8, clamped and rounded (what every metric should see)."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(path: str, rows: list[np.ndarray], max_columns: int = 8) -> str:
    """Writes rows of uint8 NHWC images (e.g. originals, reconstructions) as one PNG."""
    rows = [np.asarray(r)[:max_columns] for r in rows]
    columns = min(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    canvas = np.full((len(rows) * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j in range(columns):
            canvas[i * (h + 2) : i * (h + 2) + h, j * (w + 2) : j * (w + 2) + w] = row[j]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
