"""Image-quality and codebook metrics. FID/IS live beside these once the Inception net lands."""

from __future__ import annotations

import dm_pix
import jax.numpy as jnp
import numpy as np


def psnr_ssim(images_uint8, reconstructions_uint8):
    """Per-image PSNR (dB) and SSIM on uint8 images, computed in [0, 1] as most papers do."""
    a = jnp.asarray(images_uint8, jnp.float32) / 255.0
    b = jnp.asarray(reconstructions_uint8, jnp.float32) / 255.0
    return dm_pix.psnr(a, b), dm_pix.ssim(a, b)


class CodebookStats:
    """Accumulates a histogram of code indices over an evaluation pass."""

    def __init__(self, codebook_size: int):
        self.counts = np.zeros(codebook_size, np.int64)

    def update(self, indices):
        self.counts += np.bincount(np.asarray(indices).reshape(-1), minlength=len(self.counts))

    def result(self) -> dict:
        total = self.counts.sum()
        p = self.counts[self.counts > 0] / max(total, 1)
        entropy = float(-(p * np.log(p)).sum())
        return {
            "codebook_usage": float((self.counts > 0).mean()),
            "codebook_perplexity": float(np.exp(entropy)),
        }
