"""Binary-latent quantizers: LFQ (MAGVIT-v2) and BSQ (BSQ-ViT), one implementation.

Each token is projected to d values x (a linear `dim -> d` when dim != d, as in the VQ) and
quantized per dimension to a sign: LFQ keeps x, q = sign(x) in {-1, +1}; BSQ first projects to
the unit sphere, x = z / ||z||, and q = sign(x) / sqrt(d). Zero maps to the negative code, as in
vector-quantize-pytorch. The output is straight-through: forward value q, gradient identity
to x (and through the sphere projection for BSQ).

Index layout: bit i of a token is 1 where x_i > 0, most significant bit first (dimension 0 is
the top bit, as vector-quantize-pytorch's LFQ; `bit_order='lsb'` reverses the dimensions first,
so that dimension i is bit i of a flat index, 2**i, as Open-MAGVIT2's lookup_free_quantize.py
numbers its codes). The bits split into index groups, taken in order
(`vocab.groups`, larger groups first): for d <= 31 the index is one int32 per token whose bits
read as those groups from the top (MaskGIT's factorised heads split it the same way); for
d > 31 it does not fit an int32 and `indices` holds the G group indices, shape [..., G], each
group's bits MSB first (`vocab.grouped`, core/tokens/layout.py). `vocab.size` is 2**d either
way.

Losses (already weighted): commitment `commitment_weight * MSE(x, sg(q))` and the entropy
regulariser `entropy_weight * (E_n[H(p(c | x_n))] - diversity_gamma * H(E_n[p(c | x_n)]))`
with p(c | x) = softmax over the 2**d codes of 2 * inverse_temperature * <x, c>, the peer's
definition (c are the code vectors above: +-1, or +-1/sqrt(d) for BSQ).

- Per-sample entropy, exact: p(c | x) factorises over bits, so H(p(c | x)) is the sum of the
  binary entropies of p(bit i = 1 | x) = sigmoid(a_i), a_i = 4 * inverse_temperature * s * x_i
  (s = 1 for LFQ, 1/sqrt(d) for BSQ; BSQ's "analytical" form).
- Codebook entropy, exact (`codebook_entropy='exact'`, d <= 24): H(E_n[p(c | x_n)]) over all
  2**d codes from a matrix product of the two half-code marginals, chunked over the codebook
  (tokenizers/binary_entropy.py; memory O(N 2**(d/2)), never [N, 2**d]). `codebook_entropy_eps`
  > 0 takes Open-MAGVIT2's -sum p log(p + eps) instead.
- Codebook entropy, by groups (`codebook_entropy='grouped'`): the code entropy does not
  factorise, so it is estimated as the sum over groups of g <= entropy_group_bits bits of the
  entropy of E_n[p_group(c | x_n)], where p_group is the exact marginal of the group's bits, a
  softmax over its 2**g codes. One group of all d bits is the exact form; more groups give an
  upper bound (subadditivity of entropy).
  The largest tensor is [tokens, 2**g]: nothing of size 2**d is built when g < d. Means over
  tokens are over the whole (global) batch, also when jit shards it over devices.

BSQ-ViT's own forms, as options (tokenizers/bsq.py): `scaled_straight_through` (forward s q,
gradient s into x, s = 1/sqrt(d), as bsq-vit scales after its estimator), `hard_entropy` (the
per-image bit-frequency and 2**d code-histogram entropies with bsq-vit's hand-made gradient,
d <= 24) and `codebook_rampup_multiplier` / `codebook_rampup_steps` (every quantizer term times
m at step 0, falling linearly to 1 at step R; the step is this quantizer's train-call count).

Stats (scalars, never differentiated) for codebooks too large to enumerate:
'bit_balance' / 'bit_balance_min' (1 - |2 f_i - 1| of each bit's frequency f_i of ones, mean and
worst), 'group_perplexity' (exp of the entropy of each entropy group's 2**g histogram, mean over
groups), 'batch_distinct' (distinct codes in this batch), 'per_sample_entropy' and
'codebook_entropy' (unweighted, when the entropy term is on), 'window_distinct' (distinct codes
seen in the last `usage_window` train calls) and 'usage' (window_distinct / 2**d). The window is
a table of the last train call that hit each code: exact for d <= window_table_bits; above that,
codes are hashed into 2**window_table_bits buckets and the count is the linear-counting
estimate -m log(1 - occupied / m) (Whang et al. 1990).

Optional MAGVIT-v2 GroupNorm before quantization (`group_norm_groups` = G > 0): the d values
of each example (first axis; all its tokens together) are normalised per group of d / G
channels to zero mean and unit variance, without scale or bias (torch.nn.GroupNorm(G, d,
affine=False) on the channels-first latents), before the sign.

State kinds: only the projections are nnx.Param; the usage table and the step counter are
UsageState (written by train calls, never differentiated).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.tokens.layout import (
    MAX_INT32_BITS,
    Vocab,
    bits_to_indices,
    indices_to_bits,
    split_bits,
)
from visual_tokenizers.tokenizers import bsq
from visual_tokenizers.tokenizers.base import QuantizerOutput
from visual_tokenizers.tokenizers.binary_entropy import (
    MAX_EXACT_BITS,
    code_signs,
    exact_codebook_entropy,
)

sg = jax.lax.stop_gradient


class UsageState(nnx.Variable):
    """Usage arrays updated in place by train calls; never differentiated."""


@jax.custom_jvp
def binary_entropy(a: jax.Array) -> jax.Array:
    """Entropy (nats) of Bernoulli(sigmoid(a)), elementwise, finite for any a."""
    # -p log p - (1 - p) log(1 - p) with log sigmoid(a) = -softplus(-a), 1 - p = sigmoid(-a).
    return jax.nn.sigmoid(a) * jax.nn.softplus(-a) + jax.nn.sigmoid(-a) * jax.nn.softplus(a)


@binary_entropy.defjvp
def _binary_entropy_jvp(primals, tangents):
    # dH/da = -a p (1 - p) with 1 - p = sigmoid(-a): autodiff's p (1 - p) loses all float32
    # precision once p rounds near 1 (|a| > ~10, common at inverse temperature 100).
    (a,), (da,) = primals, tangents
    return binary_entropy(a), -a * jax.nn.sigmoid(a) * jax.nn.sigmoid(-a) * da


def _entropy(p: jax.Array) -> jax.Array:
    """-sum p log p over the last axis; p == 0 contributes 0 with a finite gradient."""
    safe = jnp.where(p > 0, p, 1.0)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=-1)


def per_sample_entropy(a: jax.Array) -> jax.Array:
    """Mean over tokens of H(p(c | x)) for per-bit logits a [N, d]: exact, O(N d)."""
    return jnp.mean(jnp.sum(binary_entropy(a), -1))


def codebook_entropy(a: jax.Array, groups: tuple[int, ...]) -> jax.Array:
    """Sum over bit groups of H(mean_n p_group(c | x_n)) for per-bit logits a [N, d].

    p_group is the exact marginal of a group's bits: softmax over its 2**g codes of <a, c> / 2
    (the full code logit 2 t s <x, c> restricted to the group, since a = 4 t s x).
    """
    total, start = jnp.zeros((), jnp.float32), 0
    for g in groups:
        part = a[:, start : start + g]
        # Full float32 products: accelerators' default precision would blur the softmax.
        logits = 0.5 * jnp.einsum(
            "nk,ck->nc", part, code_signs(g), precision=jax.lax.Precision.HIGHEST
        )
        total = total + _entropy(jnp.mean(jax.nn.softmax(logits, -1), 0))
        start += g
    return total


def count_distinct(keys: jax.Array) -> jax.Array:
    """Number of distinct rows of int32 keys [N, G] (sort, then count changes)."""
    order = jnp.lexsort(tuple(keys[:, j] for j in reversed(range(keys.shape[1]))))
    ranked = keys[order]
    changes = jnp.any(ranked[1:] != ranked[:-1], axis=-1)
    return 1 + jnp.sum(changes)


def _hash_rows(keys: jax.Array, table_bits: int) -> jax.Array:
    """Bucket in [0, 2**table_bits) of each row of int32 keys [N, G] (multiplicative hash)."""
    h = jnp.zeros(keys.shape[:1], jnp.uint32)
    for j in range(keys.shape[1]):
        h = (h ^ keys[:, j].astype(jnp.uint32)) * jnp.uint32(0x9E3779B1)
        h = h ^ (h >> 15)
    return (h >> (32 - table_bits)).astype(jnp.int32)


class BinaryQuantizer(nnx.Module):
    """Sign quantizer on d bits; LFQ and BSQ below set `spherical`. See the module docstring."""

    spherical = False

    def __init__(
        self,
        dim: int,
        bits: int | None = None,
        *,
        codebook_size: int | None = None,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        inverse_temperature: float = 100.0,
        entropy_group_bits: int = 9,
        codebook_entropy: str = "grouped",
        codebook_entropy_eps: float = 0.0,
        bit_order: str = "msb",
        group_norm_groups: int = 0,
        index_group_bits: int = 0,
        usage_window: int = 100,
        window_table_bits: int = 20,
        scaled_straight_through: bool = False,
        hard_entropy: bool = False,
        codebook_rampup_multiplier: float = 1.0,
        codebook_rampup_steps: int = 0,
        seed: int = 0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dim, self.bits = dim, _resolve_bits(bits, codebook_size)
        d = self.bits
        self.commitment_weight, self.entropy_weight = commitment_weight, entropy_weight
        self.diversity_gamma, self.inverse_temperature = diversity_gamma, inverse_temperature
        if entropy_group_bits < 1:
            raise ConfigError(f"quantizer entropy_group_bits={entropy_group_bits} must be >= 1")
        self.entropy_groups = split_bits(d, entropy_group_bits)
        self.codebook_entropy, self.codebook_entropy_eps = codebook_entropy, codebook_entropy_eps
        self.bit_order, self.group_norm_groups = bit_order, group_norm_groups
        _check_lfq_options(d, codebook_entropy, bit_order, group_norm_groups)
        self.index_groups = _index_groups(d, index_group_bits)
        self.flat_indices = not self.vocab.grouped
        self.scale = 1.0 / math.sqrt(d) if self.spherical else 1.0
        self.usage_window, self.seed, self.dtype = usage_window, seed, dtype
        # BSQ-ViT's options (tokenizers/bsq.py).
        bsq.check_options(
            bits=d, hard_entropy=hard_entropy, rampup_multiplier=codebook_rampup_multiplier,
            rampup_steps=codebook_rampup_steps,
        )  # fmt: skip
        self.scaled_straight_through, self.hard_entropy = scaled_straight_through, hard_entropy
        self.rampup = (codebook_rampup_multiplier, codebook_rampup_steps)
        self.in_proj, self.out_proj = _projections(dim, d, rngs) if dim != d else (None, None)
        self.table_bits = min(d, window_table_bits)
        table = jnp.full((2**self.table_bits,), -1, jnp.int32)
        self.last_seen = UsageState(table, out_sharding=("codebook",))
        self.step = UsageState(jnp.zeros((), jnp.int32))

    @property
    def vocab(self) -> Vocab:
        return Vocab(size=2**self.bits, bits=self.bits, groups=self.index_groups)

    def _project_in(self, z: jax.Array) -> jax.Array:
        """[..., dim] -> [N, d] float32 (tokens flattened after the optional GroupNorm)."""
        x = jnp.asarray(z, jnp.float32)
        x = self.in_proj(x) if self.in_proj is not None else x
        if self.group_norm_groups:
            x = _group_norm(x, self.group_norm_groups)
        x = x.reshape(-1, self.bits)
        if self.spherical:  # F.normalize's eps, so that the peer comparison is exact
            x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return x

    def _project_out(self, q: jax.Array) -> jax.Array:
        q = self.out_proj(q) if self.out_proj is not None else q
        return q.astype(self.dtype)

    def embed(self, indices: jax.Array) -> jax.Array:
        """Quantized vectors [..., dim] for indices [...] (d <= 31) or [..., G] (d > 31)."""
        # A flat index reads as one group of all d bits (vocab.int32_groups == (d,)).
        groups = indices[..., None] if self.flat_indices else indices
        bits = self._to_dims(indices_to_bits(groups, self.vocab.int32_groups))
        return self._project_out(jnp.where(bits, self.scale, -self.scale))

    def __call__(self, z: jax.Array, *, train: bool = False) -> QuantizerOutput:
        batch_shape = z.shape[:-1]
        x = self._project_in(z)  # [N, d] float32
        positive = x > 0
        q = jnp.where(positive, self.scale, -self.scale)
        losses = {"commitment": self.commitment_weight * jnp.mean(jnp.square(x - sg(q)))}
        stats = {}
        if self.entropy_weight > 0:
            if self.hard_entropy:
                sample_h, code_h = bsq.hard_entropies(x, batch_shape[0] if batch_shape else 1)
            else:
                a = (4.0 * self.inverse_temperature * self.scale) * x
                sample_h, code_h = per_sample_entropy(a), self._codebook_entropy(a)
            penalty = sample_h - self.diversity_gamma * code_h
            losses["entropy"] = self.entropy_weight * penalty
            stats.update(per_sample_entropy=sg(sample_h), codebook_entropy=sg(code_h))
        if self.rampup[1] > 0:  # BSQ's codebook-weight ramp on every quantizer term
            factor = bsq.rampup_factor(self.step[...], *self.rampup)
            losses = {name: factor * value for name, value in losses.items()}
        # Forward value exactly q (x - sg(x) == 0), so embed(indices) matches it.
        if self.scaled_straight_through:
            quantized = self._project_out(bsq.scaled_straight_through(x, self.scale))
        else:
            quantized = self._project_out(sg(q) + (x - sg(x)))
        keys = bits_to_indices(self._to_dims(positive), self.vocab.int32_groups)
        stats.update(self._batch_stats(positive, keys))
        stats.update(self._window_stats(keys, train))
        indices = keys[:, 0] if self.flat_indices else keys
        return QuantizerOutput(
            quantized=quantized.reshape(*batch_shape, self.dim),
            indices=indices.reshape(*batch_shape, *indices.shape[1:]),
            losses=losses,
            stats=stats,
        )

    def _to_dims(self, bits: jax.Array) -> jax.Array:
        """Dimension order <-> index bit order (an involution): reversed for 'lsb'."""
        return bits[..., ::-1] if self.bit_order == "lsb" else bits

    def _codebook_entropy(self, a: jax.Array) -> jax.Array:
        if self.codebook_entropy == "exact":
            return exact_codebook_entropy(a, eps=self.codebook_entropy_eps)
        return codebook_entropy(a, self.entropy_groups)

    def _batch_stats(self, positive: jax.Array, keys: jax.Array) -> dict:
        """Per-bit balance, per-group perplexity and distinct codes of this batch."""
        balance = 1.0 - jnp.abs(2.0 * jnp.mean(positive.astype(jnp.float32), 0) - 1.0)
        groups = bits_to_indices(positive, self.entropy_groups)  # [N, G_entropy]
        perplexities = [
            jnp.exp(_entropy(jnp.zeros((2**g,)).at[groups[:, j]].add(1.0) / groups.shape[0]))
            for j, g in enumerate(self.entropy_groups)
        ]
        return {
            "bit_balance": jnp.mean(balance),
            "bit_balance_min": jnp.min(balance),
            "group_perplexity": jnp.mean(jnp.stack(perplexities)),
            "batch_distinct": count_distinct(keys).astype(jnp.float32),
        }

    def _window_stats(self, keys: jax.Array, train: bool) -> dict:
        """Distinct codes over the last usage_window train calls (updates the table if train)."""
        exact = self.table_bits == self.bits
        bucket = keys[:, 0] if exact else _hash_rows(keys, self.table_bits)
        if train:
            step = self.step[...]
            self.last_seen[...] = self.last_seen[...].at[bucket].max(step)
            self.step[...] = step + 1
        seen = self.last_seen[...]  # -1: never seen
        recent = (seen >= 0) & (seen > self.step[...] - 1 - self.usage_window)
        occupied = jnp.sum(recent).astype(jnp.float32)
        if exact:
            distinct = occupied
        else:  # linear counting; a full table (no estimate possible) reads as m log m
            m = float(2**self.table_bits)
            distinct = -m * jnp.log(jnp.maximum(1.0 - occupied / m, 1.0 / m))
        return {"window_distinct": distinct, "usage": distinct / 2.0**self.bits}


class LookupFreeQuantizer(BinaryQuantizer):
    """LFQ (MAGVIT-v2): q = sign(x) per dimension."""

    spherical = False


class BinarySphericalQuantizer(BinaryQuantizer):
    """BSQ (BSQ-ViT): x projected to the unit sphere, q = sign(x) / sqrt(d)."""

    spherical = True


def _resolve_bits(bits: int | None, codebook_size: int | None) -> int:
    """d from `bits` or `codebook_size` (= 2**bits); both given must agree."""
    if bits is None and codebook_size is None:
        raise ConfigError("binary quantizer: set quantizer.bits (or codebook_size = 2**bits)")
    if codebook_size is not None:
        from_size = int(codebook_size).bit_length() - 1
        if codebook_size < 2 or 2**from_size != codebook_size:
            raise ConfigError(f"quantizer.codebook_size={codebook_size} is not a power of 2")
        if bits is not None and bits != from_size:
            raise ConfigError(
                f"quantizer.bits={bits} and codebook_size={codebook_size} disagree "
                f"(codebook_size must be 2**bits = {2**bits}); change both together"
            )
        bits = from_size
    if bits < 1:
        raise ConfigError(f"quantizer.bits={bits} must be >= 1")
    return int(bits)


def _check_lfq_options(bits: int, entropy: str, bit_order: str, norm_groups: int) -> None:
    if entropy not in ("exact", "grouped"):
        raise ConfigError(f"quantizer.codebook_entropy={entropy!r}: use 'exact' or 'grouped'")
    if entropy == "exact" and bits > MAX_EXACT_BITS:
        raise ConfigError(
            f"quantizer.codebook_entropy='exact' enumerates 2**{bits} codes; above "
            f"{MAX_EXACT_BITS} bits use 'grouped' (the bound over entropy_group_bits groups)"
        )
    if bit_order not in ("msb", "lsb"):
        raise ConfigError(f"quantizer.bit_order={bit_order!r}: use 'msb' or 'lsb'")
    if norm_groups < 0 or (norm_groups and bits % norm_groups):
        raise ConfigError(
            f"quantizer.group_norm_groups={norm_groups} must divide bits={bits} (0 = off)"
        )


def _group_norm(x: jax.Array, groups: int, eps: float = 1e-5) -> jax.Array:
    """GroupNorm without affine over x [B, ..., d]: statistics per example and channel group,
    over all its tokens (torch.nn.GroupNorm's, eps 1e-5, biased variance)."""
    shape = x.shape
    x = x.reshape(shape[0], -1, groups, shape[-1] // groups)
    mean = jnp.mean(x, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 3), keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + eps)).reshape(shape)


def _index_groups(bits: int, index_group_bits: int) -> tuple[int, ...]:
    """Index group layout: one group (flat int32) for d <= 31 unless asked, <= 31 bits each."""
    if index_group_bits < 0 or index_group_bits > MAX_INT32_BITS:
        raise ConfigError(
            f"quantizer.index_group_bits={index_group_bits} must be in [1, 31] (0 = automatic)"
        )
    return split_bits(bits, index_group_bits or MAX_INT32_BITS)


def _projections(dim: int, bits: int, rngs: nnx.Rngs):
    """Linear dim -> bits and bits -> dim with logical axis names (as the VQ's projections)."""
    part = nnx.with_partitioning
    kernel_init = nnx.initializers.lecun_normal()
    zeros = nnx.initializers.zeros_init()
    in_proj = nnx.Linear(
        dim, bits, kernel_init=part(kernel_init, ("embed", None)),
        bias_init=part(zeros, (None,)), rngs=rngs,
    )  # fmt: skip
    out_proj = nnx.Linear(
        bits, dim, kernel_init=part(kernel_init, (None, "embed")),
        bias_init=part(zeros, ("embed",)), rngs=rngs,
    )  # fmt: skip
    return in_proj, out_proj
