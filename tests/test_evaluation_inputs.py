"""Evaluation inputs that cannot give a quotable number are refused with the fix: samples of
the wrong dtype or range, too few images for a statistic (FID/sFID/FD-DINOv2: 2, KID: its
subset size on each side), references whose pipeline is unknown or another one, and settings
that name no pipeline. All before any network is loaded."""

import types

import numpy as np
import pytest

from visual_tokenizers.configs import evaluate as evaluate_config
from visual_tokenizers.core.data.decoding import DataError
from visual_tokenizers.core.errors import UserError
from visual_tokenizers.core.evaluation import metrics, scores
from visual_tokenizers.core.evaluation.reference import Reference, Space
from visual_tokenizers.jobs import evaluate
from visual_tokenizers.trained import evaluation


@pytest.fixture
def no_networks(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network was loaded for inputs that cannot be evaluated")

    for name in ("inception_apply", "dinov2_apply"):
        monkeypatch.setattr(evaluation, name, refuse)


def _images(n, size=8):
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "values, fix",
    [
        (np.full((2, 8, 8, 3), 200.0, np.float32), r"span \[200, 200\]: values lie in \[0, 255\]"),
        (np.full((2, 8, 8, 3), -0.5, np.float64), r"from \[-1, 1\] save .*\(x \+ 1\) \* 127\.5"),
        (np.array([-5, 300], np.int16).repeat(192).reshape(2, 8, 8, 3), r"outside \[0, 255\]"),
    ],
)
def test_the_range_of_the_values_picks_the_conversion(tmp_path, values, fix):
    path = tmp_path / "s.npz"
    np.savez(path, values)
    with pytest.raises(DataError, match=fix):
        metrics.NpzImages(str(path))


def _config(tmp_path, n, *metric_names):
    path = tmp_path / "s.npz"
    np.savez(path, _images(n))
    config = evaluate_config.get_config("samples")
    config.metrics = metric_names
    config.samples.update(path=str(path), batch_size=8)
    return config


@pytest.mark.parametrize(
    "n, metric, message",
    [
        (1, "sfid", r"gives 1 image\(s\): sFID needs at least 2"),
        (1, "fd_dinov2", "FD-DINOv2 needs at least 2"),
        (999, "kid", r"KID with kid.subset_size=1000 \(or lower --config.kid.subset_size\) "),
    ],
)
def test_too_few_images_for_sfid_kid_and_fd_dinov2(tmp_path, no_networks, n, metric, message):
    with pytest.raises(DataError, match=message):
        evaluate.run(_config(tmp_path, n, metric), str(tmp_path / "out"))


def test_kid_refuses_a_reference_smaller_than_its_subsets():
    reference = types.SimpleNamespace(found={"adm": {"features": np.zeros((5, 4))}})
    settings = dict(fid_name="gfid", kid_subsets=10, kid_subset_size=8)
    with pytest.raises(DataError, match=r"the reference has 5 images; lower --config.kid"):
        scores.compare(reference, {"adm": {"pool": np.zeros((9, 4))}}, {"kid"}, ("adm",), settings)


def _reference(path, *names, needs=("stats",), image_size=8):
    spaces = [Space(name, apply=None, sha="unused") for name in names]
    return Reference(
        spaces,
        {name: set(needs) for name in names},
        source=None,
        reference={"path": str(path)},
        image_size=image_size,
        batch_size=8,
        seed=0,
    )


def test_references_are_only_used_in_their_own_pipeline(tmp_path):
    mu, sigma = np.zeros(4), np.eye(4)
    np.savez(tmp_path / "unknown.npz", mu=mu, sigma=sigma)  # made by some other tool
    with pytest.raises(DataError, match="does not say which pipeline made its statistics"):
        _reference(tmp_path / "unknown.npz", "pytorch_fid")
    path = metrics.save_stats(
        str(tmp_path / "ours.npz"), pipeline="pytorch_fid", mu=mu, sigma=sigma
    )
    assert _reference(path, "pytorch_fid").found["pytorch_fid"]["mu"] is not None
    with pytest.raises(DataError, match=r"holds pytorch_fid statistics and no images.*adm"):
        _reference(path, "adm")
    # An ADM batch without images: FID yes, precision/recall (reference features) no.
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    assert _reference(tmp_path / "adm.npz", "adm", needs=("stats", "spatial")).how == {
        "adm": "adm statistics of the file"
    }
    with pytest.raises(DataError, match=r"lacks \['features'\].*leave those metrics out"):
        _reference(tmp_path / "adm.npz", "adm", needs=("stats", "features"))
    # Another resolution: refused whatever the pipeline (images say 8px).
    np.savez(tmp_path / "batch.npz", _images(4))
    with pytest.raises(DataError, match="is at 8px but the evaluated images are 16px"):
        _reference(tmp_path / "batch.npz", "adm", image_size=16)


def test_a_config_naming_no_known_pipeline_is_refused():
    config = evaluate_config.get_config("samples")
    config.samples.path = "s.npz"
    for pipelines in ((), ("tf",), ("adm", "adm")):
        config.pipelines = pipelines
        with pytest.raises(UserError, match=r"config.pipelines=.*one or both of \('adm'"):
            evaluate.validate(config)
    config.pipelines = ("adm",)
    config.kid.subset_size = 1
    with pytest.raises(UserError, match="subset_size=1 must be at least 2"):
        evaluate.validate(config)
