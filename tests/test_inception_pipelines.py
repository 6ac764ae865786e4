"""The two Inception feature pipelines against their references, with random weights.

`adm` (TF1 resize, (x - 128) / 128) against torch-fidelity's FeatureExtractorInceptionV3, which
reimplements the ADM evaluator's 2015 TF graph on the same state dict; the sFID 'spatial'
features against the torch model's Mixed_6d.branch1x1 activation sliced and flattened as ADM
does (first 7 channels, NHWC). `pytorch_fid` parity is in test_inception.py.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import reference_weights
import torch
from flax import nnx
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.models import inception

SIZES = [(32, 32), (64, 48), (299, 299), (300, 256)]


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.mark.parametrize("size", SIZES + [(7, 517)], ids=str)
def test_adm_resize_matches_torch_fidelity_tf1(size):
    images = np.random.default_rng(size[0]).integers(0, 256, (2, *size, 3), dtype=np.uint8)
    ours = np.asarray(inception.preprocess(images, pipeline="adm"))
    x = torch.tensor(images).permute(0, 3, 1, 2).float()
    theirs = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    theirs = ((theirs - 128) / 128).permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(ours, theirs, atol=2e-6)  # 1 uint8 step is 7.8e-3 here.
    if size != (299, 299):  # The two pipelines sample different points (not a rescaling).
        torch_fid = np.asarray(inception.preprocess(images, pipeline="pytorch_fid"))
        assert np.abs(torch_fid - ours).max() > 0.1


def test_unknown_pipeline_is_refused():
    with pytest.raises(ConfigError, match="adm"):
        inception.preprocess(np.zeros((1, 8, 8, 3), np.uint8), pipeline="clean_fid")


@pytest.fixture(scope="module")
def torch_fidelity_run(tmp_path_factory):
    """(our network, torch-fidelity's features and Mixed_6d.branch1x1 activations) on _images()."""
    path = str(tmp_path_factory.mktemp("inception") / "random_inception.pth")
    reference_weights.save_random_inception(path)
    model = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path
    )
    captured = []
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: captured.append(out))
    pool, logits = [], []
    with torch.no_grad():
        for image in _images():
            p, lg = model(torch.tensor(image).permute(0, 3, 1, 2))
            pool.append(p.numpy())
            logits.append(lg.numpy())
    # ADM: spatial[..., :7] of an NHWC tensor, reshaped [N, -1].
    spatial = [a[:, :7].permute(0, 2, 3, 1).reshape(len(a), -1).numpy() for a in captured]
    net, _ = inception.load_fid_inception(path)
    expected = {k: np.concatenate(v) for k, v in (("pool", pool), ("logits", logits))}
    return net, expected | {"spatial": np.concatenate(spatial)}


def test_adm_features_match_torch_fidelity(torch_fidelity_run):
    """pool, unbiased logits and sFID features of 4 images of 4 sizes, within 1e-4 of each
    feature's scale (the issue asks 1e-3; measured <= 4e-6; the fc bias alone would be 2e-3)."""
    net, expected = torch_fidelity_run
    batch = jnp.concatenate([inception.preprocess(im, pipeline="adm") for im in _images()])
    out = nnx.jit(lambda m, x: m(x))(net, batch)
    assert out["spatial"].shape == (len(SIZES), 17 * 17 * 7)
    for key, value in expected.items():
        got = np.asarray(out[key])
        assert got.shape == value.shape, key
        scale = np.abs(value).max()
        assert scale > 0.1  # Random weights still give values of order one.
        assert np.abs(got - value).max() < 1e-4 * scale, (key, np.abs(got - value).max() / scale)
