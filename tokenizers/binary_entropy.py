"""The exact codebook entropy of a binary quantizer over all 2**d codes, without ever building a
[tokens, 2**d] tensor, and its gradient.

With per-bit logits a [N, d] (tokens.binary: a = 4 * inverse_temperature * s * x), the code
distribution p(c | x) = softmax over the 2**d codes of <a, c> / 2 factorises over the bits:
p(c | x) = prod_i sigmoid(c_i a_i) for c in {-1, +1}**d. Split the d bits into a high part of h
bits and a low part of l = d - h bits; then p(c | x) = p_hi(c_hi | x) p_lo(c_lo | x) and the
batch mean over tokens is a matrix product:

    pbar[c_hi, c_lo] = (1 / N) sum_n P_hi[n, c_hi] P_lo[n, c_lo] = (P_hi^T P_lo)[c_hi, c_lo] / N

with P_hi [N, 2**h] and P_lo [N, 2**l] the exact marginals of the two halves. The entropy is
-sum pbar log pbar over all 2**d entries: the same quantity vector-quantize-pytorch and
Open-MAGVIT2 compute from the full [N, 2**d] softmax, at N 2**d multiply-adds in a matrix
product (no 2**d exponentials per token).

Chunking: the 2**h high codes are taken 2**chunk_bits at a time by a `lax.scan`; one step builds
P_hi for its chunk ([N, 2**chunk_bits]) and its [2**chunk_bits, 2**l] block of pbar, and adds
the block's entropy. The step is rematerialised (`jax.checkpoint`), so the backward pass also
holds one chunk at a time: memory O(N (2**l + 2**chunk_bits) + 2**(chunk_bits + l)) both ways
(at d = 18: two [N, 512] tables and a 512 x 512 block), never O(N 2**d).

Accuracy: at inverse temperature 100 the code logits are in the hundreds and most p(c | x)
underflow; log p(c | x) = -sum_i softplus(-c_i a_i) is therefore computed as a sum of
non-negative terms (relu(-c_i a_i), from a matrix product of [relu(-a), relu(a)] with the
code's bit indicators, plus sum_i log1p(exp(-|a_i|))) rather than as a difference of large
logits, and every matrix product runs at full float32 precision.

`eps` > 0 gives Open-MAGVIT2's form -sum pbar log(pbar + eps) (its lookup_free_quantize.py adds
1e-5 inside the log); eps = 0 is the entropy itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from visual_tokenizers.core.tokens.layout import indices_to_bits

HIGHEST = jax.lax.Precision.HIGHEST
MAX_EXACT_BITS = 24  # N 2**d multiply-adds per call: beyond this, use the grouped bound


def code_signs(g: int) -> jax.Array:
    """[2**g, g] float32 +-1 code vectors of g bits, row k = the bits of k, MSB first."""
    return jnp.where(indices_to_bits(jnp.arange(2**g)[:, None], (g,)), 1.0, -1.0)


def code_log_probs(a: jax.Array, signs: jax.Array) -> jax.Array:
    """log p(c | x) [N, K] of the K codes `signs` [K, g] over the g bits whose logits are a
    [N, g]: -sum_i softplus(-c_i a_i), as sums of non-negative terms (see the module doc)."""
    positive = (signs > 0).astype(jnp.float32)
    indicators = jnp.concatenate([positive, 1.0 - positive], -1)  # [K, 2g]
    # relu(-a_i) counts where c_i = +1, relu(a_i) where c_i = -1: softplus(-c a) - log1p(...).
    hinge = jnp.concatenate([jax.nn.relu(-a), jax.nn.relu(a)], -1)  # [N, 2g]
    mismatch = jnp.einsum("nk,ck->nc", hinge, indicators, precision=HIGHEST)
    floor = jnp.sum(jnp.log1p(jnp.exp(-jnp.abs(a))), -1, keepdims=True)
    return -mismatch - floor


def _neg_p_log_p(p: jax.Array, eps: float, codes: int) -> jax.Array:
    """sum of -p log(p + eps) over a block of the code histogram of `codes` codes in all.

    The value is exact; the gradient uses dH/dp minus its value at the uniform histogram, a
    constant: the histogram always sums to 1, so a constant added to dH/dp changes nothing in
    exact arithmetic, but near uniform use it avoids the float32 cancellation of
    sum_c (log p_c + 1) dp_c (terms of ~log(codes) summing to ~0): 100x smaller gradient
    error there. p == 0 contributes 0 with a finite gradient.
    """
    live = p > 0
    logs = jnp.log(jnp.where(live, p, 1.0) + eps)
    value = -jnp.sum(jnp.where(live, p * logs, 0.0))
    uniform = 1.0 / codes
    slope = jnp.where(live, logs + p / (p + eps), 0.0) - (math.log(uniform + eps) + 1.0)
    if eps > 0:  # at the uniform histogram dH/dp = -(log(1/K + eps) + (1/K) / (1/K + eps))
        slope = slope + 1.0 - uniform / (uniform + eps)
    surrogate = -jnp.sum(p * jax.lax.stop_gradient(slope))
    return jax.lax.stop_gradient(value) + surrogate - jax.lax.stop_gradient(surrogate)


def exact_codebook_entropy(
    a: jax.Array, *, eps: float = 0.0, chunk_bits: int | None = None
) -> jax.Array:
    """H(mean_n p(c | x_n)) over all 2**d codes for per-bit logits a [N, d] (module doc).

    chunk_bits: high codes per scan step are 2**chunk_bits (default: all of them, one step;
    the high part has d // 2 bits, 9 at d = 18). The value does not depend on it.
    """
    a = jnp.asarray(a, jnp.float32)
    n, d = a.shape
    high = d // 2
    step_bits = high if chunk_bits is None else max(0, min(int(chunk_bits), high))
    # The low half's marginals are shared by every chunk: one [N, 2**l] table.
    p_low = jnp.exp(code_log_probs(a[:, high:], code_signs(d - high)))
    a_high = a[:, :high]
    chunks = code_signs(high).reshape(2 ** (high - step_bits), 2**step_bits, high)

    @jax.checkpoint  # the backward pass recomputes each chunk instead of storing them all
    def step(total, signs):
        p_high = jnp.exp(code_log_probs(a_high, signs))  # [N, 2**chunk_bits]
        block = jnp.einsum("nh,nl->hl", p_high, p_low, precision=HIGHEST) / n
        return total + _neg_p_log_p(block, eps, 2**d), None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), chunks)
    return total
