"""KID and Inception Score against torch-fidelity on the same features / logits."""

import numpy as np
import pytest
import torch
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from visual_tokenizers.core.data.decoding import DataError
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.evaluation import metrics


def _features(seed=0):
    """Two float32 sets that differ (shifted, rescaled), of unequal sizes, non-negative as pool3."""
    rng = np.random.default_rng(seed)
    a = np.abs(rng.normal(0.3, 0.4, (130, 48))).astype(np.float32)
    b = np.abs(rng.normal(0.35, 0.5, (110, 48))).astype(np.float32)
    return a, b


@pytest.mark.parametrize(
    "options",
    [dict(), dict(degree=2, gamma=0.05, coef0=0.5), dict(seed=7)],
    ids=["defaults", "kernel-options", "seed"],
)
def test_kid_equals_torch_fidelity(options):
    a, b = _features()
    ours = metrics.kid(a, b, subsets=25, subset_size=60, **options)
    theirs = kid_features_to_metric(
        torch.tensor(a),
        torch.tensor(b),
        kid_subsets=25,
        kid_subset_size=60,
        kid_kernel="poly",
        kid_kernel_poly_degree=options.get("degree", 3),
        kid_kernel_poly_gamma=options.get("gamma"),
        kid_kernel_poly_coef0=options.get("coef0", 1),
        rng_seed=options.get("seed", 2020),
        verbose=False,
    )
    expected = theirs["kernel_inception_distance_mean"], theirs["kernel_inception_distance_std"]
    assert expected[0] > 3 * expected[1] > 0  # A real difference, not noise around 0.
    # Same subsets (same RandomState draws); only float32 vs float64 kernel rounding differs.
    assert ours == pytest.approx(expected, rel=1e-5)


def test_kid_of_one_distribution_is_near_zero_and_subsets_matter():
    a, _ = _features()
    mean, std = metrics.kid(a[:65], a[65:], subsets=20, subset_size=50)
    shifted, _ = metrics.kid(a[:65], a[65:] + 0.2, subsets=20, subset_size=50)
    assert abs(mean) < 3 * std + 1e-6 and shifted > 10 * abs(mean)


def test_kid_refuses_too_few_images_and_bad_subsets():
    a, b = _features()
    with pytest.raises(DataError, match="at least 1000 images on each side, got 130 and 110"):
        metrics.kid(a, b)
    with pytest.raises(ConfigError, match="subset_size >= 2"):
        metrics.kid(a, b, subset_size=1)


def _logits(n=300, classes=20, seed=0):
    return np.random.default_rng(seed).normal(0, 3, (n, classes)).astype(np.float32)


def test_inception_score_equals_torch_fidelity():
    """torch-fidelity's protocol (10 shuffled equal splits, mean and std), and ADM's fixed split
    size, which is torch-fidelity's without the shuffle when the splits come out equal."""
    logits = _logits()
    theirs = isc_features_to_metric(torch.tensor(logits), splits=10, shuffle=True, rng_seed=2020)
    ours = metrics.inception_score_equal_splits(logits, splits=10, shuffle_seed=2020)
    expected = theirs["inception_score_mean"], theirs["inception_score_std"]
    assert ours == pytest.approx(expected, rel=1e-10)
    unshuffled = isc_features_to_metric(torch.tensor(logits), splits=3, shuffle=False)
    adm = metrics.inception_score(logits, split_size=100)
    assert adm == pytest.approx(unshuffled["inception_score_mean"], rel=1e-10)
    uneven = isc_features_to_metric(torch.tensor(logits[:250]), splits=7, shuffle=False)
    got = metrics.inception_score_equal_splits(logits[:250], splits=7, shuffle_seed=None)
    assert got == pytest.approx((uneven["inception_score_mean"], uneven["inception_score_std"]))


def test_inception_score_survives_probabilities_that_underflow():
    """exp(-2000) is 0 in float64: the score stays finite (log-softmax), as torch-fidelity's."""
    logits = np.zeros((40, 5))
    logits[np.arange(40), np.arange(40) % 5] = 2000.0
    assert metrics.inception_score(logits) == pytest.approx(5.0)
    assert metrics.inception_score_equal_splits(logits, 2, None)[0] == pytest.approx(5.0)
