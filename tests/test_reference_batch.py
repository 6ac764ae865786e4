"""The ADM-format reference batch job (jobs/reference_batch.py) and references that carry their
pipeline: a batch written here is `adm`, serves `pytorch_fid` through its images, is refused at
another resolution, and a finished batch is not rewritten. The FID Inception is the stand-in
of stand_in_inception.py (no download)."""

import json
import os

import numpy as np
import pytest
from stand_in_inception import features, stand_in_dinov2_apply, stand_in_inception_apply

from visual_tokenizers import run as run_py
from visual_tokenizers.configs import evaluate as evaluate_config
from visual_tokenizers.configs import reference_batch as reference_config
from visual_tokenizers.core.data import builtin as builtin_data
from visual_tokenizers.core.evaluation import metrics
from visual_tokenizers.jobs import evaluate, reference_batch
from visual_tokenizers.trained import evaluation


@pytest.fixture(autouse=True)
def stand_in(monkeypatch):
    monkeypatch.setattr(evaluation, "inception_apply", stand_in_inception_apply)


def _shapes(count, size=32):
    source = builtin_data.ShapesSource("test", size)
    items = [source.read(i) for i in range(count)]
    return np.stack([x for x, _ in items]), np.array([y for _, y in items])


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    config = reference_config.get_config("tiny")
    config.data.num_examples = 24  # not a multiple of the batch: the last one is partial
    config.weights.inception = "inception.pth"
    workdir = str(tmp_path_factory.mktemp("reference"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "inception_apply", stand_in_inception_apply)
        result = run_py.job_module(config.job).run(config, workdir)
    return config, workdir, result


def test_reference_batch_is_adm_format_with_adm_statistics(batch):
    config, workdir, result = batch
    assert os.path.basename(result["path"]) == "VIRTUAL_shapes_test32.npz"
    images, labels = _shapes(24)
    with np.load(result["path"]) as f:
        np.testing.assert_array_equal(f["arr_0"], images)  # the first N, in order
        np.testing.assert_array_equal(f["arr_1"], labels)
        assert f["arr_0"].dtype == np.uint8 and str(f["pipeline"]) == "adm"
        adm = features(images, "adm")
        for key, kind in (("mu", "pool"), ("mu_s", "spatial")):
            np.testing.assert_allclose(f[key], adm[kind].mean(0), atol=1e-5)
        np.testing.assert_allclose(f["sigma"], np.cov(adm["pool"], rowvar=False), atol=1e-5)
    assert [n for n in os.listdir(workdir) if n.startswith(".")] == []  # no temporary left
    # A rerun finds the finished file; other settings are refused.
    assert reference_batch.run(config, workdir) == result
    config.data.num_examples = 25
    with pytest.raises(ValueError, match="other settings"):
        reference_batch.run(config, workdir)


def _samples(tmp_path, images):
    path = str(tmp_path / "samples.npz")
    np.savez(path, images)
    return path


def test_evaluation_against_the_batch_uses_each_pipeline_correctly(batch, tmp_path):
    path = batch[2]["path"]
    images = _shapes(40)[0][24:]  # other images than the reference's
    config = evaluate_config.get_config("samples")
    config.metrics = ("fid", "sfid")
    config.samples.update(path=_samples(tmp_path, images), batch_size=8)
    config.reference.path = path
    config.weights.inception = "inception.pth"
    results = evaluate.run(config, str(tmp_path / "out"))
    how = results["reference"]["statistics"]
    assert how == {
        "adm": "adm statistics of the file",
        "pytorch_fid": "computed with pytorch_fid from the file's images",
    }
    reference = _shapes(24)[0]
    for p in ("adm", "pytorch_fid"):
        ours, theirs = features(images, p), features(reference, p)
        expected = metrics.frechet_distance_of(ours["pool"], theirs["pool"])
        assert results[f"gfid_{p}"] == pytest.approx(expected, rel=1e-3)
    # Statistics only (no images): pytorch_fid is refused, naming the fix.
    with np.load(path) as f:
        stats = {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}  # as ADM writes them
    np.savez(tmp_path / "adm_stats.npz", **stats)
    config.reference.path = str(tmp_path / "adm_stats.npz")
    with pytest.raises(ValueError, match=r"holds adm statistics.*pipelines='\(\"adm\",\)'"):
        evaluate.run(config, str(tmp_path / "out2"))
    config.pipelines = ("adm",)
    alone = evaluate.run(config, str(tmp_path / "out3"))
    assert alone["gfid_adm"] == pytest.approx(results["gfid_adm"])


def test_fd_dinov2_is_measured_in_its_own_space(batch, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "dinov2_apply", stand_in_dinov2_apply)
    images = _shapes(40)[0][24:]
    config = evaluate_config.get_config("samples")
    config.metrics = ("fd_dinov2",)
    config.samples.update(path=_samples(tmp_path, images), batch_size=8)
    config.reference.path = batch[2]["path"]  # adm statistics: DINOv2 ones come from arr_0
    config.weights.dinov2 = "dinov2.pth"
    results = evaluate.run(config, str(tmp_path / "out"))
    ours, theirs = (2 * features(x, "adm")["pool"] for x in (images, _shapes(24)[0]))
    assert results["fd_dinov2"] == pytest.approx(metrics.frechet_distance_of(ours, theirs))
    assert results["pipeline_of"] == {"fd_dinov2": "dinov2"} and "gfid_adm" not in results
    assert (
        "FD-DINOv2 (DINOv2 ViT-L/14 CLS features)" in (tmp_path / "out" / "report.md").read_text()
    )


def test_a_reference_of_another_resolution_is_refused(batch, tmp_path):
    config = evaluate_config.get_config("samples")
    config.metrics = ("fid",)
    config.samples.update(path=_samples(tmp_path, _shapes(8, size=64)[0]), batch_size=8)
    config.reference.path = batch[2]["path"]
    config.weights.inception = "inception.pth"
    with pytest.raises(ValueError, match="is at 32px but the evaluated images are 64px"):
        evaluate.run(config, str(tmp_path / "out"))
    config.reference.update(path="", source="builtin:shapes", image_size=32)
    with pytest.raises(ValueError, match="at 64px"):
        evaluate.run(config, str(tmp_path / "out"))


def test_the_job_is_registered_and_refuses_an_unusable_source(tmp_path):
    assert "reference_batch" in run_py.JOBS
    config = reference_config.get_config("tiny")
    config.data.source = "folder:" + str(tmp_path / "missing")
    with pytest.raises(ValueError, match="missing"):
        reference_batch.run(config, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / reference_batch.RECORD)
    config = reference_config.get_config("tiny")
    config.data.num_examples = 1
    with pytest.raises(ValueError, match="at least 2"):
        reference_batch.validate(config)
    assert json.loads(run_py.config_json(config))["job"] == "reference_batch"
