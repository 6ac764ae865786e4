"""The FID Inception against pytorch-fid's, with random weights loaded through our .pth reader."""

import numpy as np
import pytest
import reference_weights
import torch
import torch.nn.functional as F

from visual_tokenizers.core import weights
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.models import inception
from visual_tokenizers.trained import evaluation

SIZES = [(64, 64), (256, 256), (300, 200)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(random state dict, its .pth path, pytorch-fid's pool3 model, full model with fc)."""
    path = str(tmp_path_factory.mktemp("inception") / "random_inception.pth")
    state = reference_weights.save_random_inception(path)
    pool_model, full_model = reference_weights.pytorch_fid_models(state)
    return state, path, pool_model, full_model


@pytest.mark.parametrize("size", [64, 200, 299, 300, 517])
def test_resize_matches_torch_bilinear(size):
    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, (1, size, 37, 3), dtype=np.uint8)
    ours = np.asarray(inception.preprocess(images))
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255.0
    theirs = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    theirs = (2 * theirs - 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)  # f32 summation order; 1 uint8 = 8e-3


def test_pool_features_and_logits_match_pytorch_fid(reference):
    """The evaluation job's Inception (file -> resize -> network, batch sharded over the (4, 2)
    test mesh, 2 images padded to 8) against pytorch-fid's.

    Tolerance: max |ours - theirs| < 1e-4 x the largest |value| (measured: <= 2e-6 x).
    """
    state, path, pool_model, full_model = reference
    mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "model": 1})
    apply, sha = evaluation.inception_apply(path, mesh)
    assert sha == weights.sha256_of(path)
    rng = np.random.default_rng(0)
    for size in SIZES:
        images = rng.integers(0, 256, (2, *size, 3), dtype=np.uint8)
        with torch.no_grad():
            x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255.0
            pool = pool_model(x)[0][:, :, 0, 0]
            # Unbiased logits (pool3 @ W): what the Inception Score is computed from.
            expected = {"pool": pool.numpy(), "logits": (pool @ full_model.fc.weight.T).numpy()}
        out = apply(images)
        for key, value in expected.items():
            assert out[key].shape == value.shape
            scale = np.abs(value).max()
            assert scale > 0.1  # Random weights still give values of order one.
            assert np.abs(out[key] - value).max() < 1e-4 * scale, (size, key)


def test_missing_or_misshapen_weights_are_named(reference):
    state = {k: v.numpy() for k, v in reference[0].items()}
    broken = dict(state)
    del broken["Mixed_6c.branch7x7_2.bn.running_var"]
    with pytest.raises(KeyError, match="Mixed_6c.branch7x7_2.bn.running_var"):
        inception.from_torch_state(broken)
    broken = dict(state, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(ValueError, match=r"fc.weight has shape \(1000, 2048\)"):
        inception.from_torch_state(broken)


def test_published_file_identity():
    """The canonical file: pytorch-fid's URL, and a sha256 whose prefix is in its name."""
    spec = weights.FID_INCEPTION
    assert spec.url.endswith("/" + spec.name)
    assert spec.name.endswith(spec.sha256[:8] + ".pth")
    from pytorch_fid.inception import FID_WEIGHTS_URL

    assert spec.url == FID_WEIGHTS_URL
