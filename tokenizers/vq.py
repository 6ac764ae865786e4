"""Vector quantizer: nearest-code lookup in a learned codebook (VQ-VAE / VQGAN family).

Features, each off unless its argument turns it on:

- Low-dimensional codes (`code_dim`, the ViT-VQGAN / LlamaGen recipe): a linear in-projection
  dim -> code_dim before the search and an out-projection back after it.
- Cosine codes (`l2_normalize`): the projected input and the codebook rows are unit-normalised
  before distances and lookup.
- Losses: codebook `codebook_weight * MSE(q, sg(z))` (gradient-trained codebook only),
  commitment `beta * MSE(sg(q), z)` and optionally MaskGIT's entropy penalty
  `entropy_weight * (mean_n H(p_n) - H(mean_n p_n))`, `p_n = softmax(-||z_n - c||^2 / T)`;
  all in code space (after projection / normalisation).
- Chunked search: distances are built `search_chunk_size` codes at a time with a running
  argmin (and, for the entropy term, a running log-sum-exp), so memory is O(N * chunk), never
  O(N * codebook_size); 2**18 codes work on a CPU.
- EMA codebook (`use_ema`): VQ-VAE-2 style moving averages of cluster sizes and sums with
  Laplace smoothing replace the codebook loss.
- k-means init (`kmeans_init`): Lloyd iterations on the first training batch set the codebook.
- Dead-code restart (`restart_dead_codes`): codes that `dead_code_rule` calls dead ('share',
  this codebase's, or 'ema_count', vector-quantize-pytorch's) become random batch vectors;
  `dead_code_cooldown` spares a restarted code for that many steps (tokenizers/dead_codes.py).

Stats: 'perplexity' (exp of the entropy of this batch's code histogram), 'batch_usage'
(fraction of codes hit in this batch), 'usage' (fraction of codes whose usage EMA is above
(1 - usage_decay) / (e * N): hit at least once in roughly the last 1 / (1 - usage_decay)
steps at this batch size N) and, with restarts, 'restarted' (codes restarted this step).

State kinds: only gradient-trained arrays are nnx.Param (projections; the codebook unless
`use_ema`). Everything the forward pass writes is a CodebookState (EMA codebook and
statistics, usage, step counter, k-means flag, each code's last restart). A Param cannot be
written in place during the forward pass (the trainer keeps only non-Param updates), so
without EMA, k-means init and restarts write into `codebook_offset`, a CodebookState added to
the Param: setting row i to v stores v - param_i there (exact up to float32 rounding), and
gradient steps on the Param still move the row.

All distances and losses are computed in float32 whatever `dtype` is; `dtype` is the dtype of
the returned quantized vectors and of `embed`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from visual_tokenizers.core.tokens.layout import Vocab
from visual_tokenizers.tokenizers import dead_codes
from visual_tokenizers.tokenizers.base import QuantizerOutput

sg = jax.lax.stop_gradient


class CodebookState(nnx.Variable):
    """Codebook-related arrays updated in place by the forward pass; never differentiated."""


def _l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _dot(z: jax.Array, codes: jax.Array) -> jax.Array:
    # Full float32 products: at TPU/GPU default precision near-ties would pick the wrong code.
    return jnp.einsum("nd,kd->nk", z, codes, precision=jax.lax.Precision.HIGHEST)


def _entropy(p: jax.Array) -> jax.Array:
    """-sum p log p over the last axis; p == 0 contributes 0 with a finite gradient."""
    safe = jnp.where(p > 0, p, 1.0)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=-1)


def _over_chunks(body, carry, codes: jax.Array, chunk_size: int):
    """Folds body(carry, chunk, offset) -> (carry, per_code) over the codebook chunk by chunk.

    Full chunks go through lax.scan (rematerialised, so the backward pass keeps no [N, chunk]
    block per chunk), the remainder through one more call; per-code outputs come back
    concatenated to length K (or None).
    """
    k = codes.shape[0]
    if k <= chunk_size:  # one chunk: no loop to build
        return body(carry, codes, 0)
    size = chunk_size
    n = k // size
    step = jax.checkpoint(lambda c, xs: body(c, *xs))
    full = codes[: n * size].reshape(n, size, codes.shape[-1])
    carry, ys = jax.lax.scan(step, carry, (full, jnp.arange(n, dtype=jnp.int32) * size))
    ys = jax.tree.map(lambda y: y.reshape(n * size, *y.shape[2:]), ys)
    if k % size:
        carry, y = body(carry, codes[n * size :], n * size)
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, y)
    return carry, ys


def _min_argmin(d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row-wise (min, first argmin) of d [N, C], as jnp.min / jnp.argmin.

    XLA:CPU runs a plain min reduction ~15x faster than argmin's (value, index) reduction, so
    the argmin runs only over group minima (groups of g columns) and inside the winning group.
    """
    n, c = d.shape
    g = math.gcd(c, 128)
    groups = d.reshape(n, c // g, g)
    group_min = jnp.min(groups, -1)
    b = jnp.argmin(group_min, -1)  # first group holding the row minimum
    inner = jnp.take_along_axis(groups, b[:, None, None], 1)[:, 0]
    return jnp.min(group_min, -1), (b * g + jnp.argmin(inner, -1)).astype(jnp.int32)


def nearest_code(z: jax.Array, codes: jax.Array, chunk_size: int):
    """Index and squared distance of the nearest row of codes [K, D] for each row of z [N, D]."""

    def body(carry, chunk, offset):
        best_d, best_i = carry
        # ||z||^2 is the same for every code of a row, so it is added once at the end.
        dmin, i = _min_argmin(jnp.sum(chunk * chunk, -1) - 2.0 * _dot(z, chunk))
        better = dmin < best_d  # strict: ties keep the earlier code, as a full argmin would
        return (jnp.where(better, dmin, best_d), jnp.where(better, i + offset, best_i)), None

    init = (jnp.full(z.shape[:1], jnp.inf, jnp.float32), jnp.zeros(z.shape[:1], jnp.int32))
    (best_d, best_i), _ = _over_chunks(body, init, codes, chunk_size)
    return best_i, best_d + jnp.sum(z * z, -1)


def entropy_penalty(z: jax.Array, codes: jax.Array, temperature: float, chunk_size: int):
    """mean_n H(p_n) - H(mean_n p_n) with p_n = softmax(-||z_n - c||^2 / temperature).

    Two passes over codebook chunks: a running log-sum-exp per row, then the per-sample
    entropy and the column means of p. ||z_n||^2 is left out of the logits: a per-row
    constant changes neither softmax nor the entropies.
    """

    def logits(chunk):
        return (2.0 * _dot(z, chunk) - jnp.sum(chunk * chunk, -1)) / temperature

    def lse_body(carry, chunk, offset):
        m, s = carry
        x = logits(chunk)
        m_new = sg(jnp.maximum(m, jnp.max(x, -1)))  # the shift only keeps exp() finite
        return (m_new, s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), -1)), None

    n = z.shape[0]
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
    (m, s), _ = _over_chunks(lse_body, init, codes, chunk_size)
    lse = m + jnp.log(s)

    def entropy_body(h, chunk, offset):
        logp = logits(chunk) - lse[:, None]
        p = jnp.exp(logp)
        return h - jnp.sum(p * logp), jnp.mean(p, 0)

    h, avg_p = _over_chunks(entropy_body, jnp.zeros((), jnp.float32), codes, chunk_size)
    return h / n - _entropy(avg_p)


def kmeans(x: jax.Array, k: int, iters: int, key: jax.Array, chunk_size: int, normalize: bool):
    """Lloyd's algorithm from k random rows of x; returns centres [k, D] and cluster sizes [k]."""
    n = x.shape[0]
    centres = x[jax.random.choice(key, n, (k,), replace=n < k)]

    def assign(c):
        idx, _ = nearest_code(x, c, chunk_size)
        return jnp.zeros(k).at[idx].add(1.0), jnp.zeros_like(c).at[idx].add(x)

    def step(_, c):
        counts, sums = assign(c)
        new = sums / jnp.maximum(counts, 1.0)[:, None]
        new = _l2norm(new) if normalize else new
        return jnp.where(counts[:, None] > 0, new, c)  # an empty cluster keeps its centre

    centres = jax.lax.fori_loop(0, iters, step, centres)
    return centres, assign(centres)[0]


class VectorQuantizer(nnx.Module):
    """Nearest-neighbour vector quantizer; see the module docstring for the options."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        code_dim: int | None = None,
        l2_normalize: bool = False,
        beta: float = 0.25,
        codebook_weight: float = 1.0,
        use_ema: bool = False,
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        restart_dead_codes: bool = False,
        dead_code_threshold: float = 1e-3,
        dead_code_rule: str = "share",
        dead_code_min_count: float = 2.0,
        dead_code_cooldown: int = 0,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        usage_decay: float = 0.99,
        search_chunk_size: int = 8192,
        seed: int = 0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dim, self.codebook_size = dim, codebook_size
        self.code_dim = code_dim or dim
        self.l2_normalize, self.beta, self.codebook_weight = l2_normalize, beta, codebook_weight
        self.use_ema, self.ema_decay, self.ema_epsilon = use_ema, ema_decay, ema_epsilon
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.restart_dead_codes, self.dead_code_threshold = restart_dead_codes, dead_code_threshold
        dead_codes.check(dead_code_rule, dead_code_min_count, dead_code_cooldown)
        self.dead_code_rule, self.dead_code_min_count = dead_code_rule, dead_code_min_count
        self.dead_code_cooldown = int(dead_code_cooldown)
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.usage_decay, self.search_chunk_size = usage_decay, search_chunk_size
        self.seed, self.dtype = seed, dtype
        k, d = codebook_size, self.code_dim

        if self.code_dim != dim:
            part = nnx.with_partitioning
            kernel_init = nnx.initializers.lecun_normal()
            zeros = nnx.initializers.zeros_init()
            self.in_proj = nnx.Linear(
                dim, d, kernel_init=part(kernel_init, ("embed", None)),
                bias_init=part(zeros, (None,)), rngs=rngs,
            )  # fmt: skip
            self.out_proj = nnx.Linear(
                d, dim, kernel_init=part(kernel_init, (None, "embed")),
                bias_init=part(zeros, ("embed",)), rngs=rngs,
            )  # fmt: skip
        else:
            self.in_proj = self.out_proj = None

        # MaskGIT's VQGAN codebook init: uniform with variance 1 / codebook_size.
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
        codes = init(rngs.params(), (k, d), jnp.float32)
        codes = _l2norm(codes) if l2_normalize else codes
        kind = CodebookState if use_ema else nnx.Param
        self.codebook = kind(codes, out_sharding=("codebook", None))
        # Every code starts as a cluster of size 1 at its own position (as the peer does); the
        # 'ema_count' rule reads these sizes, also with a gradient-trained codebook.
        sized = use_ema or (restart_dead_codes and dead_code_rule == "ema_count")
        ones = CodebookState(jnp.ones((k,)), out_sharding=("codebook",))
        self.cluster_size = ones if sized else None
        self.embed_sum = CodebookState(codes, out_sharding=("codebook", None)) if use_ema else None
        offsets = not use_ema and (kmeans_init or restart_dead_codes)
        offset = CodebookState(jnp.zeros((k, d)), out_sharding=("codebook", None))
        self.codebook_offset = offset if offsets else None
        self.usage = CodebookState(jnp.zeros((k,)), out_sharding=("codebook",))
        self.step = CodebookState(jnp.zeros((), jnp.int32))
        self.initialized = CodebookState(jnp.array(not kmeans_init))
        # Only with the guard on: configs without it keep the state (and checkpoints) they had.
        never = CodebookState(dead_codes.never_restarted(k), out_sharding=("codebook",))
        self.last_restart = never if restart_dead_codes and self.dead_code_cooldown else None

    @property
    def vocab(self) -> Vocab:
        return Vocab(size=self.codebook_size)

    def codes(self) -> jax.Array:
        """The codebook in code space as used for search and lookup, float32 [K, code_dim]."""
        c = self.codebook[...].astype(jnp.float32)
        if self.codebook_offset is not None:
            c = c + self.codebook_offset[...]
        return _l2norm(c) if self.l2_normalize else c

    def _project_in(self, z: jax.Array) -> jax.Array:
        z = jnp.asarray(z, jnp.float32)
        z = self.in_proj(z) if self.in_proj is not None else z
        return _l2norm(z) if self.l2_normalize else z

    def _project_out(self, q: jax.Array) -> jax.Array:
        q = self.out_proj(q) if self.out_proj is not None else q
        return q.astype(self.dtype)

    def embed(self, indices: jax.Array) -> jax.Array:
        """Quantized vectors [..., dim] for code indices [...]."""
        return self._project_out(self.codes()[indices])

    def __call__(self, z: jax.Array, *, train: bool = False) -> QuantizerOutput:
        batch_shape = z.shape[:-1]
        ze = self._project_in(z.reshape(-1, self.dim))  # [N, code_dim] float32
        n, k = ze.shape[0], self.codebook_size
        if train and self.kmeans_init:
            self._kmeans_once(sg(ze))
        codes = self.codes()
        idx, _ = nearest_code(sg(ze), sg(codes), self.search_chunk_size)
        q = codes[idx]

        losses = {"commitment": self.beta * jnp.mean(jnp.square(sg(q) - ze))}
        if not self.use_ema:
            losses["codebook"] = self.codebook_weight * jnp.mean(jnp.square(q - sg(ze)))
        if self.entropy_weight > 0:
            penalty = entropy_penalty(ze, codes, self.entropy_temperature, self.search_chunk_size)
            losses["entropy"] = self.entropy_weight * penalty

        # Forward value is exactly the code (x - sg(x) == 0), so embed(indices) matches it;
        # the gradient is the identity from the output to ze.
        quantized = self._project_out(sg(q) + (ze - sg(ze)))
        counts = jnp.zeros((k,), jnp.float32).at[idx].add(1.0)
        stats = {"perplexity": jnp.exp(_entropy(counts / n)), "batch_usage": jnp.mean(counts > 0)}
        if train:
            stats.update(self._update_state(sg(ze), idx, counts))
        # A code hit once (out of n vectors) m steps ago has usage >= (1 - d) d^m / n, and
        # d^m >= 1/e for m up to ~1/(1 - d): above this line means "used in that window".
        recent = (1.0 - self.usage_decay) * math.exp(-1.0) / n
        stats["usage"] = jnp.mean(self.usage[...] > recent)
        return QuantizerOutput(
            quantized=quantized.reshape(*batch_shape, self.dim),
            indices=idx.reshape(batch_shape),
            losses=losses,
            stats=stats,
        )

    def _key(self, purpose: int) -> jax.Array:
        # Deterministic from state: the same on every device and after a checkpoint restore.
        return jax.random.fold_in(
            jax.random.fold_in(jax.random.key(self.seed), self.step[...]), purpose
        )

    def _write_codes(self, mask: jax.Array, values: jax.Array, sizes: jax.Array):
        """Sets rows where mask (code space) to values; EMA rows become clusters of `sizes`."""
        m = mask[:, None]
        if self.cluster_size is not None:
            self.cluster_size[...] = jnp.where(mask, sizes, self.cluster_size[...])
        if self.use_ema:
            self.codebook[...] = jnp.where(m, values, self.codebook[...])
            self.embed_sum[...] = jnp.where(m, values * sizes[:, None], self.embed_sum[...])
        else:
            param = sg(self.codebook[...].astype(jnp.float32))
            self.codebook_offset[...] = jnp.where(m, values - param, self.codebook_offset[...])

    def _kmeans_once(self, ze: jax.Array):
        """On the first train call, fits the codebook to this batch (a no-op afterwards)."""
        k = self.codebook_size

        def fit():
            args = (self.kmeans_iters, self._key(0), self.search_chunk_size, self.l2_normalize)
            return kmeans(ze, k, *args)

        def keep():
            return jnp.zeros((k, self.code_dim)), jnp.zeros((k,))

        centres, sizes = jax.lax.cond(self.initialized[...], keep, fit)
        # Size >= 1 so that an EMA row that attracts nothing keeps its centre for a while
        # instead of being pulled to the origin by the smoothing.
        todo = jnp.broadcast_to(~self.initialized[...], (k,))
        self._write_codes(todo, centres, jnp.maximum(sizes, 1.0))
        self.initialized[...] = jnp.array(True)

    def _update_state(self, ze: jax.Array, idx: jax.Array, counts: jax.Array) -> dict:
        """Train-time updates: usage EMA, EMA codebook, dead-code restarts, step counter."""
        n, d = ze.shape[0], self.usage_decay
        self.usage[...] = d * self.usage[...] + (1.0 - d) * counts / n
        stats = {}
        if self.use_ema:
            self._ema_update(ze, idx, counts)
        elif self.cluster_size is not None:  # the 'ema_count' rule's sizes (vq-pytorch's decay)
            e = self.ema_decay
            self.cluster_size[...] = e * self.cluster_size[...] + (1.0 - e) * counts
        if self.restart_dead_codes:
            stats["restarted"] = self._restart_dead(ze)
        self.step[...] = self.step[...] + 1
        return stats

    def _restart_dead(self, ze: jax.Array) -> jax.Array:
        """Restarts the codes the rule calls dead (tokenizers/dead_codes.py); returns how many."""
        n, k, step = ze.shape[0], self.codebook_size, self.step[...]
        if self.dead_code_rule == "ema_count":  # restarted: the peer's reset_cluster_size
            dead, size = self.cluster_size[...] < self.dead_code_min_count, self.dead_code_min_count
        else:
            dead, size = dead_codes.share_dead(self, step + 1), 1.0
        if self.last_restart is not None:
            dead, self.last_restart[...] = dead_codes.guard(
                dead, step, self.last_restart[...], self.dead_code_cooldown
            )
        pick = jax.random.randint(self._key(1), (k,), 0, n)
        self._write_codes(dead, ze[pick], jnp.full((k,), size, jnp.float32))
        self.usage[...] = jnp.where(dead, 0.0, self.usage[...])
        return jnp.sum(dead).astype(jnp.float32)

    def _ema_update(self, ze: jax.Array, idx: jax.Array, counts: jax.Array):
        """codebook_i = EMA(sum of vectors in i) / Laplace-smoothed EMA(size of i)."""
        k, d, eps = self.codebook_size, self.ema_decay, self.ema_epsilon
        sums = jnp.zeros((k, self.code_dim), jnp.float32).at[idx].add(ze)
        size = d * self.cluster_size[...] + (1.0 - d) * counts
        total = d * self.embed_sum[...] + (1.0 - d) * sums
        n = jnp.sum(size)
        smoothed = (size + eps) / (n + k * eps) * n
        self.cluster_size[...] = size
        self.embed_sum[...] = total
        self.codebook[...] = total / smoothed[:, None]
