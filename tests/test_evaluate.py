"""The evaluation job end to end on CPU, with no downloads.

The shapes classifier (tiny: >= 98%), rFID during tokenizer training, a tokenizer checkpoint
(rFID, PSNR, SSIM, LPIPS with a random VGG, usage, shapes signals) and ADM-format samples (gFID,
IS, precision/recall, shapes signals), each checked against an independent computation.

The FID Inception is replaced here by a small stand-in with the same interface: on 2 CPU cores
one 2048-d sqrtm takes tens of seconds. The real network, loaded and run exactly as the job
does (`trained.evaluation.inception_apply`), is checked against pytorch-fid in test_inception.py.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_weights
from stand_in_inception import features as _features
from stand_in_inception import stand_in_inception_apply

from visual_tokenizers.configs import evaluate as evaluate_config
from visual_tokenizers.configs import shapes_classifier, vq_b16
from visual_tokenizers.core import weights
from visual_tokenizers.core.data import builtin as builtin_data
from visual_tokenizers.core.data.images import to_model, to_uint8
from visual_tokenizers.core.evaluation import metrics
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.jobs import evaluate, train_classifier, train_tokenizer
from visual_tokenizers.trained import classifier as classifier_lib
from visual_tokenizers.trained import evaluation
from visual_tokenizers.trained.classifier import TrainedClassifier
from visual_tokenizers.trained.tokenizer import TrainedTokenizer

N = 16  # Images per evaluation: enough to exercise batching, small enough for CPU.


@pytest.fixture(scope="module", autouse=True)
def offline_cache(tmp_path_factory):
    """A private weights/statistics cache; the network is never tried."""
    saved = {k: os.environ.get(k) for k in (weights.CACHE_ENV, weights.OFFLINE_ENV)}
    os.environ[weights.CACHE_ENV] = str(tmp_path_factory.mktemp("cache"))
    os.environ[weights.OFFLINE_ENV] = "1"
    yield os.environ[weights.CACHE_ENV]
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module", autouse=True)
def stand_in_inception():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "inception_apply", stand_in_inception_apply)
        yield


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "vgg16.pth")
    reference_weights.random_lpips(path)
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("shapes_classifier"))
    return workdir, train_classifier.run(shapes_classifier.get_config("tiny"), workdir)


def _shapes(split, start, count, size=32):
    source = builtin_data.ShapesSource(split, size)
    items = [source.read(i) for i in range(start, start + count)]
    return np.stack([x for x, _ in items]), np.array([y for _, y in items])


def test_shapes_classifier_reaches_98_percent(classifier):
    workdir, result = classifier
    assert result["test_accuracy"] >= 0.98
    # Independently, on held-out images the job's own evaluation did not use.
    model = TrainedClassifier.from_workdir(workdir).model()
    images, labels = _shapes("test", 5000, 1000)
    predicted = np.asarray(jax.jit(lambda x: model(x).argmax(-1))(images))
    assert (predicted == labels).mean() >= 0.98


def _down_up(images, factor: int) -> np.ndarray:
    b, h, w, c = images.shape
    x = jnp.asarray(images, jnp.float32)
    small = jax.image.resize(x, (b, h // factor, w // factor, c), "bilinear", antialias=True)
    return np.asarray(jnp.clip(jax.image.resize(small, x.shape, "bilinear"), 0, 255))


def test_shapes_classifier_judges_shape_not_sharpness(classifier):
    """Trained on decoder-like degraded copies too (trained/classifier.py degrade): without them it
    classified 31 % of 2x down-up images correctly; it also knows builtin:shapes_plain."""
    model = TrainedClassifier.from_workdir(classifier[0]).model()
    accuracy = jax.jit(lambda x, y: (model(x).argmax(-1) == y).mean())
    images, labels = _shapes("test", 6000, 500)
    assert accuracy(_down_up(images, 2), labels) >= 0.85
    plain = builtin_data.PlainShapesSource("test", 32)
    images, labels = map(np.stack, zip(*[plain.read(i) for i in range(500)], strict=True))
    assert accuracy(images, labels) >= 0.9


def test_degrade_blurs_and_noises_but_keeps_the_coarse_image():
    images, _ = _shapes("test", 0, 64)
    key = jax.random.key(0)
    untouched = classifier_lib.degrade(images, key, probability=0.0, block=4)
    np.testing.assert_array_equal(untouched, images)
    degraded = np.asarray(classifier_lib.degrade(images, key, probability=1.0, block=4))
    assert degraded.min() >= 0 and degraded.max() <= 255
    changed = np.abs(degraded - images).reshape(64, -1).mean(1)
    assert (changed > 3).all()  # Every image altered, the fine detail most.
    coarse = lambda x: x.reshape(64, 4, 8, 4, 8, 3).mean((2, 4))  # noqa: E731
    assert np.abs(coarse(degraded) - coarse(images)).mean() < 0.4 * changed.mean()


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    """4 steps of the tiny tokenizer, evaluated every 2 steps, with rFID every 4 steps."""
    config = vq_b16.get_config("tiny")
    config.update(num_steps=4, log_every=2, checkpoint_every=4, eval_every=2)
    config.data.batch_size = 16
    config.eval.update(
        batch_size=N,
        num_examples=N,
        fid_every=4,
        fid_num_examples=N,
        fid_inception_weights="inception.pth",
    )
    workdir = str(tmp_path_factory.mktemp("tokenizer"))
    return workdir, train_tokenizer.run(config, workdir)


def test_tokenizer_training_reports_rfid(tokenizer_run, offline_cache):
    workdir, result = tokenizer_run
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = {line["step"]: "eval/rfid_adm" in line for line in lines if "eval/psnr" in line}
    assert evals == {2: False}  # Every eval_every steps; rFID only every fid_every.
    finals = [line for line in lines if "final/psnr" in line]  # The last step's eval, once.
    assert [(x["step"], "final/rfid_pytorch_fid" in x) for x in finals] == [(4, True)]
    assert result["eval/rfid_adm"] > 0 and result["eval/rfid_pytorch_fid"] > 0
    assert result["eval/rfid_adm"] != result["eval/rfid_pytorch_fid"]
    cached = sorted(os.listdir(os.path.join(offline_cache, "fid_stats")))
    assert [name.split("-")[0] for name in cached] == [
        f"builtin_shapes_test_32px_{N}_{p}" for p in ("adm", "pytorch_fid")
    ]
    # Each cached reference holds the statistics of the held-out originals in its pipeline.
    originals, _ = _shapes("test", 0, N)
    for name, pipeline in zip(cached, ("adm", "pytorch_fid"), strict=True):
        stats = np.load(os.path.join(offline_cache, "fid_stats", name))
        assert str(stats["pipeline"]) == pipeline and int(stats["image_size"]) == 32
        expected = _features(originals, pipeline)["pool"].mean(0)
        np.testing.assert_allclose(stats["mu"], expected, atol=1e-5)


def _tokenizer_config(tokenizer_workdir, classifier_workdir, vgg_file):
    config = evaluate_config.get_config("tiny")
    config.metrics = ("fid", "sfid", "psnr", "ssim", "lpips", "usage", "shapes")
    config.tokenizer.workdir = tokenizer_workdir
    config.num_examples = N
    config.data.batch_size = N
    config.weights.update(inception="inception.pth", vgg16=vgg_file)
    config.shapes.classifier_workdir = classifier_workdir
    return config


def _same_as_saved(results, path):
    saved = json.load(open(path))
    assert saved.keys() == results.keys()
    for key, value in results.items():
        assert saved[key] == (pytest.approx(value) if isinstance(value, float) else value), key


def test_evaluate_tokenizer(tokenizer_run, classifier, vgg_file, tmp_path):
    workdir, trained = tokenizer_run
    config = _tokenizer_config(workdir, classifier[0], vgg_file)
    results = evaluate.run(config, str(tmp_path))
    _same_as_saved(results, tmp_path / "metrics.json")
    # The trainer's final evaluation saw the same N images with the same networks.
    rfid = ("rfid_adm", "rfid_pytorch_fid")
    for key in ("psnr", "ssim", "codebook_usage", "codebook_perplexity", *rfid):
        assert results[key] == pytest.approx(trained[f"eval/{key}"], rel=1e-5), key
    assert results["num_examples"] == N
    # Independently: reconstruct outside the job, then each metric from its definition.
    tokenizer = TrainedTokenizer.from_workdir(workdir)
    originals, labels = _shapes("test", 0, N)
    model = tokenizer.model()
    recon = to_uint8(jax.jit(lambda x: model(x, train=False)[0])(to_model(originals)))
    for pipeline in ("adm", "pytorch_fid"):
        ours, theirs = _features(recon, pipeline), _features(originals, pipeline)
        expected = metrics.frechet_distance_of(ours["pool"], theirs["pool"])
        assert results[f"rfid_{pipeline}"] == pytest.approx(expected, rel=1e-3)
        expected = metrics.frechet_distance_of(ours["spatial"], theirs["spatial"])
        assert results[f"sfid_{pipeline}"] == pytest.approx(expected, rel=1e-3)
        assert results["pipeline_of"][f"sfid_{pipeline}"] == pipeline
    report = (tmp_path / "report.md").read_text()
    assert f"| rFID | {results['rfid_adm']:.4g} | {results['rfid_pytorch_fid']:.4g} |" in report
    mesh = mesh_lib.make_mesh(config.mesh)
    lpips_values = evaluation.lpips_apply(vgg_file, "", mesh)(
        originals, recon
    )  # Parity: test_lpips.
    assert results["lpips"] == pytest.approx(lpips_values.mean(), rel=1e-4)
    net = TrainedClassifier.from_workdir(classifier[0]).model()
    apply = jax.jit(lambda x: net.features_and_logits(x))
    on_recon, on_originals = apply(recon), apply(originals)
    accuracy = (np.asarray(on_recon["logits"]).argmax(-1) == labels).mean()
    assert results["shapes_accuracy"] == pytest.approx(accuracy)
    expected_fd = metrics.frechet_distance_of(on_recon["features"], on_originals["features"])
    assert results["shapes_fd"] == pytest.approx(expected_fd, rel=1e-3)


def _write_samples(path, images, labels=None):
    np.savez(path, images, *([] if labels is None else [labels]))
    return str(path)


def _expected_per_pipeline(results, samples, reference, fid="gfid"):
    """FID, sFID and KID of each pipeline, recomputed from the stand-in's features."""
    for p in ("adm", "pytorch_fid"):
        ours, theirs = _features(samples, p), _features(reference, p)
        expected = metrics.frechet_distance_of(ours["pool"], theirs["pool"])
        assert results[f"{fid}_{p}"] == pytest.approx(expected, rel=1e-4), p
        expected = metrics.frechet_distance_of(ours["spatial"], theirs["spatial"])
        assert results[f"sfid_{p}"] == pytest.approx(expected, rel=1e-4), p
        if f"kid_{p}" in results:
            expected = metrics.kid(ours["pool"], theirs["pool"], subset_size=8)
            assert (results[f"kid_{p}"], results[f"kid_{p}_std"]) == pytest.approx(expected)
        assert results["pipeline_of"][f"{fid}_{p}"] == p
    assert results["gfid_adm"] != pytest.approx(results["gfid_pytorch_fid"])


def test_evaluate_samples(classifier, tmp_path):
    images, labels = _shapes("test", 0, N)
    reference, _ = _shapes("train", 0, 2 * N)
    config = evaluate_config.get_config("samples")
    assert tuple(config.pipelines) == ("adm", "pytorch_fid")
    config.metrics = ("fid", "sfid", "is", "pr", "kid", "shapes")
    config.kid.subset_size = 8
    config.samples.update(
        path=_write_samples(tmp_path / "samples.npz", images, labels), batch_size=8
    )
    # As jobs/sample.py records them: samples of the shape classes, so the shapes signals apply.
    names = list(builtin_data.SHAPE_CLASSES)
    (tmp_path / "samples.json").write_text(json.dumps({"class_names": names}))
    config.reference.path = _write_samples(tmp_path / "ref.npz", reference)  # ADM-style arr_0.
    config.weights.inception = "inception.pth"
    config.shapes.classifier_workdir = classifier[0]
    config.is_split_size = 5
    results = evaluate.run(config, str(tmp_path / "out"))
    _expected_per_pipeline(results, images, reference)
    # IS and precision/recall on the adm features (as ADM tables), and the report says so.
    ours, theirs = _features(images, "adm"), _features(reference, "adm")
    expected = metrics.inception_score(ours["logits"], split_size=5)
    assert results["inception_score"] == pytest.approx(expected, rel=1e-4)
    expected = metrics.precision_recall(theirs["pool"], ours["pool"], k=3)
    assert (results["precision"], results["recall"]) == pytest.approx(expected, abs=1e-9)
    assert results["pipeline_of"]["inception_score"] == results["pipeline_of"]["recall"] == "adm"
    assert results["num_samples"] == N and results["shapes_accuracy"] >= 0.9  # Real shapes.
    assert "shapes_unverified" not in results and "shapes_skipped" not in results
    _same_as_saved(results, tmp_path / "out" / "metrics.json")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| metric | `adm` | `pytorch_fid` |" in report and f"{N} images" in report
    assert f"| Inception Score | {results['inception_score']:.4g} | - |" in report
    assert os.path.abspath(config.reference.path) in report
    # Statistics saved with their pipeline give the same gFID; noise is far from the shapes.
    mu, sigma = metrics.gaussian_stats(_features(reference)["pool"])
    path = str(tmp_path / "stats.npz")
    metrics.save_stats(path, pipeline="pytorch_fid", image_size=32, mu=mu, sigma=sigma)
    config.reference.path = str(tmp_path / "stats.npz")
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    config.samples.path = _write_samples(tmp_path / "noise.npz", noise)
    config.update(metrics=("fid", "shapes"), pipelines=("pytorch_fid",))
    again = evaluate.run(config, str(tmp_path / "out2"))
    expected = metrics.frechet_distance_of(_features(noise)["pool"], _features(reference)["pool"])
    assert again["gfid_pytorch_fid"] == pytest.approx(expected, rel=1e-4)
    assert "gfid_adm" not in again and again["pipelines"] == ["pytorch_fid"]
    assert again["shapes_fd"] > 2 * results["shapes_fd"] and "shapes_accuracy" not in again
    assert "nothing says what" in again["shapes_unverified"]  # a bare npz: computed as asked


def test_samples_against_a_cached_data_source(tmp_path, offline_cache):
    images, _ = _shapes("test", 0, N)
    config = evaluate_config.get_config("samples")
    config.metrics = ("fid", "sfid", "pr")
    config.samples.update(path=_write_samples(tmp_path / "s.npz", images), batch_size=8)
    config.reference.update(source="builtin:shapes", split="train", image_size=32, num_examples=N)
    config.weights.inception = "inception.pth"
    first = evaluate.run(config, str(tmp_path / "a"))
    reference, _ = _shapes("train", 0, N)  # Eval order: the first N images of the split.
    _expected_per_pipeline(first, images, reference)
    cache = [f for f in os.listdir(os.path.join(offline_cache, "fid_stats")) if "train" in f]
    assert sorted(f.split("-")[0].rsplit("_", 1)[-1] for f in cache) == ["adm", "fid"]  # keyed
    again = evaluate.run(config, str(tmp_path / "b"))
    assert again["gfid_adm"] == pytest.approx(first["gfid_adm"])
    assert again["reference"]["statistics"] == {p: "cached statistics" for p in config.pipelines}


def test_configuration_mistakes_are_explained(tmp_path):
    config = evaluate_config.get_config("samples")
    with pytest.raises(ValueError, match="samples.path"):
        evaluate.validate(config)
    config.metrics = ("psnr",)
    config.samples.path = "x.npz"
    with pytest.raises(ValueError, match="not available in mode 'samples'"):
        evaluate.validate(config)
    config = evaluate_config.get_config("tiny")
    with pytest.raises(ValueError, match="tokenizer.workdir"):
        evaluate.validate(config)
    images, _ = _shapes("test", 0, 4)
    config = evaluate_config.get_config("samples")
    config.samples.path = _write_samples(tmp_path / "s.npz", images)
    config.metrics = ("fid",)
    config.weights.inception = "inception.pth"
    with pytest.raises(ValueError, match="reference.path"):
        evaluate.run(config, str(tmp_path / "out"))
