"""Reference statistics files: what they hold, which feature pipeline made them, at what size.

An npz reference may hold `mu`, `sigma` (Gaussian of the pool features: FID; of the CLS
features for DINOv2), `mu_s`, `sigma_s` (of ADM's spatial features: sFID), `features` (up to
10k pool/CLS features: precision/recall, KID), `arr_0` uint8 images, and the metadata written
here: `pipeline` ('adm', 'pytorch_fid' or 'dinov2') and `image_size`.

Statistics are only comparable with statistics of the same pipeline (models/inception.py), so:
- a file that records `pipeline` pairs with that pipeline only;
- a file without it that holds mu, sigma, mu_s and sigma_s is an ADM reference batch (openai/
  guided-diffusion `evaluations/evaluator.py` writes all four, from the TF Inception): `adm`;
- a file with statistics and neither is of unknown pipeline: its statistics are never used
  (its images, if any, are).
A pipeline without statistics in the file is computed from the file's images when it has some.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from visual_tokenizers.core import files
from visual_tokenizers.core.data.decoding import DataError
from visual_tokenizers.core.evaluation.npz_images import NpzImages

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
ADM = "adm"


def save_stats(
    path: str, *, pipeline: str, image_size: int = 0, mu=None, sigma=None, **extra
) -> str:
    """Writes a reference npz (atomically): `mu`, `sigma`, extra arrays (`mu_s`, `sigma_s`,
    `features`, `arr_0`...) and the pipeline and image size they were computed with."""
    meta = {"pipeline": np.array(pipeline), "image_size": np.int64(image_size)}
    files.save_npz(path, mu=mu, sigma=sigma, **extra, **meta)  # a crash never leaves half a file
    return path


def load_reference(path: str) -> dict:
    """{'stats': {mu, sigma, mu_s, sigma_s present}, 'features' (or None), 'pipeline' (None when
    unknown), 'image_size' (None when unknown), 'has_images'}; images (arr_0) stay on disk."""
    if not os.path.isfile(path):
        raise DataError(f"reference file {path} does not exist; check config.reference.path")
    with np.load(path) as f:
        keys = sorted(f.files)
        stats = {k: f[k] for k in STAT_KEYS if k in keys}
        features = f["features"] if "features" in keys else None
        pipeline = str(f["pipeline"]) if "pipeline" in keys else None
        size = int(f["image_size"]) if "image_size" in keys else 0
    has_images = "arr_0" in keys
    if not ("mu" in stats and "sigma" in stats) and not has_images:
        raise DataError(
            f"reference file {path} holds neither statistics (mu, sigma) nor images (arr_0): "
            f"{keys}; use an ADM reference batch or write one with jobs/reference_batch.py"
        )
    if pipeline is None and all(k in stats for k in STAT_KEYS):
        pipeline = ADM  # what the ADM evaluator writes
    if has_images:
        size = size or NpzImages(path, "reference file", labels=False).image_size
    return {
        "stats": stats,
        "features": features,
        "pipeline": pipeline,
        "image_size": size or None,
        "has_images": has_images,
    }


def check_image_size(path: str, found: int | None, evaluated: int | None) -> None:
    """Refuses a reference of another resolution than the evaluated images."""
    if found and evaluated and found != evaluated:
        raise DataError(
            f"reference {path} is at {found}px but the evaluated images are {evaluated}px; "
            f"use a reference at {evaluated}px (e.g. ADM's VIRTUAL_imagenet{evaluated}_labeled"
            f".npz, or write one with jobs/reference_batch.py at data.image_size={evaluated})"
        )


def stats_cache_path(
    spec: str, split: str, image_size: int, num: int, weights_sha: str, pipeline: str
) -> str:
    """Where a data source's statistics are cached: keyed by the pipeline and weights too."""
    from visual_tokenizers.core import weights  # Lazy: weights is only needed when FID is.

    key = f"{spec}|{split}|{image_size}|{num}|{weights_sha}|{pipeline}"
    readable = f"{spec}_{split}_{image_size}px_{num}_{pipeline}"
    readable = re.sub(r"[^A-Za-z0-9]+", "_", readable)[-80:]
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(weights.cache_dir(), "fid_stats", f"{readable}-{digest}.npz")
