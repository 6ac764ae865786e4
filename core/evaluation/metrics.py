"""Image-quality and codebook metrics, computed the way the standard tools compute them.

- PSNR/SSIM on uint8 images (dm-pix), codebook usage and perplexity.
- Fréchet distance between Gaussians of features (pytorch-fid's `calculate_frechet_distance`:
  float64, scipy sqrtm, eps on the diagonals when the product is singular, real part when the
  imaginary residue is small). FID is this distance on FID-Inception pool3 features.
- Inception Score over splits (ADM's fixed split size; torch-fidelity's equal splits), and
  k-NN precision/recall, as in the ADM evaluator. KID (kid.py) as torch-fidelity computes it.
- sFID: the same Fréchet distance on gaussian_stats of ADM's spatial features (FIDInception's
  'spatial'); ADM reference batches carry them as `mu_s`, `sigma_s`.
- `ShardedApply`: a network applied jitted to batches sharded over the mesh's batch axes,
  with host batches padded to a multiple of the batch parallelism.
- Reference statistics as npz files that carry their pipeline (reference_files.py), cached per
  data source; ADM-format sample files streamed batch by batch (npz_images.py).
"""

from __future__ import annotations

import collections
import logging

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from scipy import linalg

from visual_tokenizers.core.data.decoding import DataError
from visual_tokenizers.core.evaluation.kid import kid  # noqa: F401
from visual_tokenizers.core.evaluation.npz_images import NpzImages, pad_batch  # noqa: F401
from visual_tokenizers.core.evaluation.reference_files import (  # noqa: F401
    load_reference,
    save_stats,
    stats_cache_path,
)
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.tokens.layout import Vocab, join_groups


def psnr_ssim(images_uint8, reconstructions_uint8):
    """Per-image PSNR (dB) and SSIM on uint8 images, computed in [0, 1] as most papers do."""
    a = jnp.asarray(images_uint8, jnp.float32) / 255.0
    b = jnp.asarray(reconstructions_uint8, jnp.float32) / 255.0
    return dm_pix.psnr(a, b), dm_pix.ssim(a, b)


class CodebookStats:
    """Accumulates a histogram of code indices over an evaluation pass.

    Vocabularies up to 2**24 codes use a dense histogram; larger ones (binary codes of 18-36
    bits) count only the codes seen. Binary codes of more than 31 bits arrive as group indices
    [..., G] (`Vocab.grouped`); pass `vocab` so they are joined into one code per token.
    """

    DENSE_LIMIT = 2**24

    def __init__(self, codebook_size: int, vocab: Vocab | None = None):
        self.size = int(codebook_size)
        self.group_bits = vocab.int32_groups if vocab is not None and vocab.grouped else None
        self.dense = self.size <= self.DENSE_LIMIT
        self.counts = np.zeros(self.size, np.int64) if self.dense else collections.Counter()

    def _flat(self, indices) -> np.ndarray:
        indices = np.asarray(indices)
        if self.group_bits is None:
            return indices.reshape(-1).astype(np.int64)
        return join_groups(indices, self.group_bits).reshape(-1)

    def update(self, indices):
        flat = self._flat(indices)
        if self.dense:
            self.counts += np.bincount(flat, minlength=self.size)
        else:
            values, counts = np.unique(flat, return_counts=True)
            self.counts.update(dict(zip(values.tolist(), counts.tolist(), strict=True)))

    def result(self) -> dict:
        counts = self.counts if self.dense else np.fromiter(self.counts.values(), np.int64)
        used = counts[counts > 0]
        p = used / max(used.sum(), 1)
        entropy = float(-(p * np.log(p)).sum())
        return {
            "codebook_usage": len(used) / self.size,
            "codebook_perplexity": float(np.exp(entropy)),
        }


# ----------------------------------------------------------------------------- Fréchet distance


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) in float64, covariance as np.cov(rowvar=False) (n - 1 normalised)."""
    features = np.asarray(features, np.float64)
    if len(features) < 2:
        raise DataError(
            f"a Fréchet distance (FID) needs at least 2 images for a covariance, got "
            f"{len(features)}; evaluate more images (FID is usually reported on 50,000)"
        )
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), as pytorch-fid computes it."""
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product (e.g. fewer samples than dimensions): regularise both diagonals.
        logging.warning("Fréchet distance: singular product, adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"Fréchet distance: sqrtm has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g}; the statistics are numerically unusable "
                "(too few samples, or features that are not finite)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_of(features_a, features_b) -> float:
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


# ----------------------------------------------------------------------------- IS, precision/recall


def _log_softmax(logits) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def _split_score(log_p: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) of one split; log-softmax keeps p = 0 terms at 0, not NaN."""
    p = np.exp(log_p)
    log_marginal = np.log(p.mean(0, keepdims=True))
    return float(np.exp(np.sum(p * (log_p - log_marginal), axis=1).mean()))


def inception_score(logits, split_size: int = 5000) -> float:
    """ADM's Inception Score: the mean over consecutive splits of `split_size` (the last one may
    be shorter) of exp(E_x KL(p(y|x) || p(y))), no shuffling, softmax in float64 (ADM: float32).

    Feed the unbiased logits (pool3 @ W, FIDInception's 'logits') as ADM, the original IS code
    and torch-fidelity do; the published protocol is 50,000 samples in 10 splits of 5,000.
    """
    log_p = _log_softmax(logits)
    return float(
        np.mean([_split_score(log_p[i : i + split_size]) for i in range(0, len(log_p), split_size)])
    )


def inception_score_equal_splits(
    logits, splits: int = 10, shuffle_seed: int | None = 2020
) -> tuple[float, float]:
    """torch-fidelity's Inception Score (metric_isc.py): (mean, std) over `splits` near-equal
    splits (boundaries i * N // splits) of the samples, permuted first with numpy
    RandomState(shuffle_seed) (torch-fidelity's default: samples_shuffle=True, rng_seed=2020;
    None keeps the order). With N = 10 x 5,000 and no shuffle the mean equals ADM's score."""
    log_p = _log_softmax(logits)
    if shuffle_seed is not None:
        log_p = log_p[np.random.RandomState(shuffle_seed).permutation(len(log_p))]
    n = len(log_p)
    scores = [_split_score(log_p[i * n // splits : (i + 1) * n // splits]) for i in range(splits)]
    return float(np.mean(scores)), float(np.std(scores))


@jax.jit
def _squared_distances(a, b):
    """Pairwise squared Euclidean distances, clamped at 0 (as the ADM/Kynkäänniemi code)."""
    hi = jax.lax.Precision.HIGHEST
    norms_a = jnp.sum(a * a, 1)[:, None]
    norms_b = jnp.sum(b * b, 1)[None, :]
    return jnp.maximum(norms_a - 2 * jnp.matmul(a, b.T, precision=hi) + norms_b, 0.0)


def _blocks(a, b, rows: int):
    b = jnp.asarray(b, jnp.float32)
    for start in range(0, len(a), rows):
        yield start, np.asarray(_squared_distances(jnp.asarray(a[start : start + rows]), b))


def manifold_radii(features, k: int = 3, rows: int = 1024) -> np.ndarray:
    """Squared distance of each feature to its k-th nearest other feature (self excluded)."""
    features = np.asarray(features, np.float32)
    if len(features) <= k:
        raise DataError(
            f"precision/recall with k={k} needs more than {k} images on each side, got "
            f"{len(features)}; evaluate more images or lower config.pr_k"
        )
    radii = np.empty(len(features), np.float32)
    for start, d in _blocks(features, features, rows):
        radii[start : start + len(d)] = np.partition(d, k, axis=1)[:, k]  # Index 0 is self.
    return radii


def _inside(points, centres, radii, rows: int) -> np.ndarray:
    """Whether each point lies within some centre's radius."""
    found = np.zeros(len(points), bool)
    for start, d in _blocks(np.asarray(points, np.float32), centres, rows):
        found[start : start + len(d)] = np.any(d <= radii[None, :], axis=1)
    return found


def precision_recall(reference, samples, k: int = 3, rows: int = 1024) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al.) with k-NN balls, as ADM computes them.

    Precision: fraction of samples inside the reference manifold; recall: fraction of the
    reference inside the samples' manifold. Distances in float32 (ADM tries float16 first).
    """
    reference = np.asarray(reference, np.float32)
    samples = np.asarray(samples, np.float32)
    ref_radii, sample_radii = manifold_radii(reference, k, rows), manifold_radii(samples, k, rows)
    precision = _inside(samples, reference, ref_radii, rows).mean()
    recall = _inside(reference, samples, sample_radii, rows).mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------- sharded networks


class ShardedApply:
    """`fn(module, *arrays)` jitted over the mesh: module replicated, arrays batch-sharded.

    Call with this process's host batches (numpy; padded here to a multiple of the local share
    of the batch parallelism) or with global jax arrays already sharded over ('data', 'fsdp').
    Returns the global batch's outputs as numpy on every process, padding removed.
    `prepare(*arrays) -> array` (e.g. a resize) runs as its own jit first, so a big network
    compiles once however many input sizes it is fed.
    """

    def __init__(self, module: nnx.Module, fn, mesh, prepare=None):
        self.mesh = mesh
        graphdef, state = nnx.split(module)
        self.state = jax.device_put(state, mesh_lib.replicated(mesh))
        sharded = mesh_lib.batch_sharding(mesh, 1)
        self._prepare = jax.jit(prepare, out_shardings=sharded) if prepare else None
        self._jitted = jax.jit(
            lambda state, *arrays: fn(nnx.merge(graphdef, state), *arrays),
            out_shardings=sharded,
        )

    def _apply(self, *arrays):
        if self._prepare is not None:
            arrays = (self._prepare(*arrays),)
        return self._jitted(self.state, *arrays)

    def __call__(self, *arrays):
        if isinstance(arrays[0], jax.Array):  # Global arrays, e.g. a jitted eval step's output.
            out = self._apply(*arrays)
            return jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True))
        return self._host(*[np.asarray(a) for a in arrays])

    def replicated(self, *arrays):
        """For a full global batch that every process holds: each applies its own share."""
        share = -(-len(arrays[0]) // jax.process_count())
        start = jax.process_index() * share
        return self._host(*[np.asarray(a)[start : start + share] for a in arrays])

    def _host(self, *arrays):
        n = len(arrays[0])
        local_share = mesh_lib.batch_parallelism(self.mesh) // jax.process_count()
        padded = -(-n // max(local_share, 1)) * max(local_share, 1)
        if padded != n:
            arrays = [np.concatenate([a, np.repeat(a[-1:], padded - n, 0)]) for a in arrays]
        mask = np.arange(padded) < n
        batch = mesh_lib.host_batch_to_global(
            {str(i): a for i, a in enumerate(arrays)} | {"mask": mask}, self.mesh
        )
        out = self._apply(*[batch[str(i)] for i in range(len(arrays))])
        out, mask = multihost_utils.process_allgather((out, batch["mask"]), tiled=True)
        return jax.tree.map(lambda x: np.asarray(x)[np.asarray(mask)], out)
