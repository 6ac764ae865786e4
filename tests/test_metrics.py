"""Fréchet distance, IS, precision/recall, PSNR/SSIM, codebook statistics, sharded application
and the sample/reference file helpers, each against an independent computation."""

import jax
import numpy as np
import pytest
from pytorch_fid.fid_score import calculate_frechet_distance
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from visual_tokenizers.core.evaluation import metrics
from visual_tokenizers.core.runtime import mesh as mesh_lib


def _stats(x):
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize(
    "n, d, shift",
    [(300, 16, 0.5), (200, 8, 0.0), (10, 32, 1.0)],
    ids=["full-rank", "same-distribution", "rank-deficient"],
)
def test_frechet_distance_equals_pytorch_fid(n, d, shift):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5 + shift
    expected = calculate_frechet_distance(*_stats(a), *_stats(b))
    got = metrics.frechet_distance(*metrics.gaussian_stats(a), *metrics.gaussian_stats(b))
    assert got == pytest.approx(expected, rel=1e-6)
    assert metrics.frechet_distance_of(a, b) == pytest.approx(expected, rel=1e-6)


def test_singular_and_complex_sqrtm_are_handled_like_pytorch_fid(monkeypatch):
    """A non-finite sqrtm retries with eps on the diagonals; a large imaginary part is an error."""
    from scipy import linalg

    real_sqrtm, calls = linalg.sqrtm, []

    def first_call_fails(m, disp=True):
        calls.append(m)
        root = np.full_like(m, np.nan) if len(calls) % 2 else real_sqrtm(m)
        return root if disp else (root, 0.0)  # pytorch-fid asks for (root, error) first.

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    monkeypatch.setattr(linalg, "sqrtm", first_call_fails)
    expected = calculate_frechet_distance(*_stats(a), *_stats(b))
    got = metrics.frechet_distance(*_stats(a), *_stats(b))
    assert len(calls) == 4 and got == pytest.approx(expected, rel=1e-9)
    monkeypatch.setattr(linalg, "sqrtm", lambda m, *a, **k: m + 1j * np.eye(len(m)))
    with pytest.raises(ValueError, match="imaginary component"):
        metrics.frechet_distance(*_stats(a), *_stats(b))


def test_frechet_distance_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 6))
    assert abs(metrics.frechet_distance_of(x, x)) < 1e-8


def test_gaussian_stats_are_float64_np_cov():
    x = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = metrics.gaussian_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def _numpy_inception_score(logits, split_size):
    scores = []
    for start in range(0, len(logits), split_size):
        part = logits[start : start + split_size].astype(np.float64)
        p = np.exp(part) / np.exp(part).sum(1, keepdims=True)
        py = p.mean(0)
        kl = [
            sum(p[i, c] * np.log(p[i, c] / py[c]) for c in range(p.shape[1])) for i in range(len(p))
        ]
        scores.append(np.exp(np.mean(kl)))
    return np.mean(scores)


def test_inception_score_matches_numpy_and_known_values():
    logits = np.random.default_rng(0).normal(0, 3, (250, 12))
    expected = _numpy_inception_score(logits, 100)  # Splits of 100, 100 and 50.
    assert metrics.inception_score(logits, split_size=100) == pytest.approx(expected, rel=1e-10)
    assert metrics.inception_score(np.zeros((40, 7))) == pytest.approx(1.0)
    confident = np.eye(8)[np.arange(64) % 8] * 60.0  # Certain, and evenly spread over 8 classes.
    assert metrics.inception_score(confident) == pytest.approx(8.0, rel=1e-6)


def _brute_force_pr(ref, samples, k):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]  # Column 0 is the point itself.

    def inside(points, centres, r):
        d = ((points[:, None] - centres[None]) ** 2).sum(-1)
        return (d <= r[None]).any(1).mean()

    return inside(samples, ref, radii(ref)), inside(ref, samples, radii(samples))


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(120, 5))
    samples = rng.normal(0.7, 0.6, size=(90, 5))
    expected = _brute_force_pr(ref, samples, 3)
    got = metrics.precision_recall(ref, samples, k=3, rows=32)  # Several row blocks.
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert metrics.precision_recall(ref, ref) == (1.0, 1.0)


def test_psnr_ssim_agree_with_scikit_image():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 48, 40, 3), dtype=np.uint8)
    noise = rng.integers(-30, 31, a.shape)
    b = np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)
    psnr, ssim = (np.asarray(v) for v in metrics.psnr_ssim(a, b))
    for i in range(3):
        assert psnr[i] == pytest.approx(
            peak_signal_noise_ratio(a[i], b[i], data_range=255), abs=1e-3
        )
        expected = structural_similarity(
            a[i],
            b[i],
            channel_axis=-1,
            data_range=255,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert ssim[i] == pytest.approx(expected, abs=1e-4)


def test_codebook_stats():
    stats = metrics.CodebookStats(8)
    stats.update(np.array([[0, 1], [1, 3]]))
    result = stats.result()
    assert result["codebook_usage"] == pytest.approx(3 / 8)
    p = np.array([1, 2, 1]) / 4
    assert result["codebook_perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_codebook_stats_for_huge_and_grouped_binary_vocabularies():
    from visual_tokenizers.core.tokens.layout import Vocab

    dense = metrics.CodebookStats(2**18)
    sparse = metrics.CodebookStats(2**30)  # counts only the codes seen
    codes = np.array([5, 5, 2**17 + 3, 7, 5])
    dense.update(codes)
    sparse.update(codes)
    assert not sparse.dense
    assert sparse.result()["codebook_perplexity"] == pytest.approx(
        dense.result()["codebook_perplexity"]
    )
    assert sparse.result()["codebook_usage"] == pytest.approx(3 / 2**30)
    # 36-bit codes as two 18-bit groups: (a, b) and (b, a) are different codes.
    grouped = metrics.CodebookStats(2**36, Vocab(size=2**36, bits=36, groups=(18, 18)))
    grouped.update(np.array([[[1, 2], [2, 1], [1, 2]]]))
    assert grouped.result()["codebook_usage"] == pytest.approx(2 / 2**36)
    p = np.array([2, 1]) / 3
    assert grouped.result()["codebook_perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_sharded_apply_pads_and_unpads():
    from flax import nnx

    class Scale(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.float32(3.0))

    mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "model": 1})
    apply = metrics.ShardedApply(Scale(), lambda m, x: {"y": x * m.w[...]}, mesh)
    x = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)  # 5 rows on 8 devices: padded.
    np.testing.assert_array_equal(apply(x)["y"], 3 * x)
    global_x = mesh_lib.host_batch_to_global({"x": np.ones((8, 2), np.float32)}, mesh)["x"]
    np.testing.assert_array_equal(apply(global_x)["y"], np.full((8, 2), 3.0))
    assert jax.device_count() == 8


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_images_stream_in_padded_batches(tmp_path, compressed):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(10)
    path = str(tmp_path / "samples.npz")
    (np.savez_compressed if compressed else np.savez)(path, images, labels)
    reader = metrics.NpzImages(path)
    assert (reader.num_images, reader.image_size, reader.num_batches(4)) == (10, 8, 3)
    np.testing.assert_array_equal(reader.labels, labels)
    batches = list(reader.batches(4))
    assert [count for _, count in batches] == [4, 4, 2]
    assert all(len(b) == 4 for b, _ in batches)
    np.testing.assert_array_equal(np.concatenate([b[:c] for b, c in batches]), images)
    np.savez(path, images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 NHWC"):
        metrics.NpzImages(path)


def test_reference_files_and_cache_keys(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 4))
    mu, sigma = metrics.gaussian_stats(x)
    path = metrics.save_stats(str(tmp_path / "ref.npz"), pipeline="adm", mu=mu, sigma=sigma)
    found = metrics.load_reference(path)
    np.testing.assert_allclose(found["stats"]["mu"], x.mean(0))
    np.testing.assert_allclose(found["stats"]["sigma"], np.cov(x, rowvar=False))
    assert not found["has_images"] and found["pipeline"] == "adm"
    np.savez(str(tmp_path / "batch.npz"), np.zeros((2, 4, 4, 3), np.uint8))
    batch = metrics.load_reference(str(tmp_path / "batch.npz"))
    assert batch["has_images"] and batch["image_size"] == 4 and batch["pipeline"] is None
    np.savez(str(tmp_path / "bad.npz"), other=x)
    with pytest.raises(ValueError, match="neither statistics"):
        metrics.load_reference(str(tmp_path / "bad.npz"))
    key = ("tfds:imagenet2012", "validation", 256, 50_000)
    assert metrics.stats_cache_path(*key, "a" * 64, "adm") != metrics.stats_cache_path(
        *key, "b" * 64, "adm"
    )
    assert metrics.stats_cache_path(*key, "a" * 64, "adm") != metrics.stats_cache_path(
        *key, "a" * 64, "pytorch_fid"
    )
