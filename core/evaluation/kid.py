"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"), as torch-fidelity
computes it (torch_fidelity/metric_kid.py, itself from the authors' MMD-GAN compute_scores.py).

Per subset: `subset_size` rows drawn without replacement from each feature set, the polynomial
kernel k(x, y) = (gamma <x, y> + coef0) ** degree (gamma = 1 / dim by default), and the unbiased
MMD^2 estimate (off-diagonal means of K_aa and K_bb, minus twice the full mean of K_ab). The
result is the mean and the (population) standard deviation over subsets. Subsets are drawn as
torch-fidelity draws them: one numpy RandomState(seed), and per subset first the rows of a then
the rows of b (`choice(n, subset_size, replace=False)`), so the same seed selects the same rows.
torch-fidelity's default seed is 2020. Like torch-fidelity, fewer images than `subset_size` on
either side is refused (clean-fid instead shrinks the subset: a different number).

Kernels are computed in float64 here; torch-fidelity keeps the float32 of its features, which
moves the result by float32 rounding only (about 1e-6 of the kernel values).
"""

from __future__ import annotations

import numpy as np

from visual_tokenizers.core.data.decoding import DataError
from visual_tokenizers.core.errors import ConfigError

TORCH_FIDELITY_SEED = 2020  # torch_fidelity.defaults: rng_seed


def polynomial_kernel(x, y, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_aa, k_ab, k_bb) -> float:
    """Unbiased MMD^2 of two equal-size samples from their kernel matrices (mmd_est='unbiased')."""
    m = len(k_aa)
    off_diagonal = k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)
    return float(off_diagonal / (m * (m - 1)) - 2 * k_ab.sum() / (m * m))


def kid(
    features_a,
    features_b,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = TORCH_FIDELITY_SEED,
) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over random subsets (see the module)."""
    a = np.asarray(features_a, np.float64)
    b = np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"KID needs two [N, D] feature sets of one D, got {a.shape}, {b.shape}")
    if subset_size < 2 or subsets < 1:
        raise ConfigError(
            f"KID needs subset_size >= 2 and subsets >= 1, got {subset_size} and {subsets}; "
            "the usual values are 1000 and 100"
        )
    if min(len(a), len(b)) < subset_size:
        raise DataError(
            f"KID with subsets of {subset_size} needs at least {subset_size} images on each side, "
            f"got {len(a)} and {len(b)}; evaluate more images or lower the KID subset size"
        )
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), subset_size, replace=False)]
        y = b[rng.choice(len(b), subset_size, replace=False)]
        mmds[i] = mmd2_unbiased(
            polynomial_kernel(x, x, degree, gamma, coef0),
            polynomial_kernel(x, y, degree, gamma, coef0),
            polynomial_kernel(y, y, degree, gamma, coef0),
        )
    return float(mmds.mean()), float(mmds.std())
