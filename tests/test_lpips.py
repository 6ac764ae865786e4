"""LPIPS (VGG, v0.1) against the `lpips` package: random VGG trunk, the wheel's calibration."""

import numpy as np
import pytest
import reference_weights
import torch

from visual_tokenizers.core import weights
from visual_tokenizers.core.evaluation import metrics
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.models import lpips


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    vgg_path = str(tmp_path_factory.mktemp("lpips") / "random_vgg16.pth")
    reference = reference_weights.random_lpips(vgg_path)
    ours, files = lpips.load_lpips(vgg_path, None)
    return reference, ours, files


def test_lpips_matches_the_package(models):
    reference, ours, files = models
    assert files["lpips"] == weights.fetch(weights.LPIPS_VGG)  # The calibration we compared.
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 64, 48, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        to_torch = lambda a: torch.tensor(a).permute(0, 3, 1, 2)  # noqa: E731
        expected = reference(to_torch(x), to_torch(y)).numpy().reshape(-1)
    mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "model": 1})
    apply = metrics.ShardedApply(ours, lambda m, a, b: m(a, b), mesh)
    got = apply(x, y)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.all(expected > 0)
    same = apply(x, x)
    np.testing.assert_allclose(same, 0.0, atol=1e-7)


def test_missing_vgg_weights_name_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    with pytest.raises(weights.WeightsUnavailable, match="vgg16-397923af.pth"):
        lpips.load_lpips()
