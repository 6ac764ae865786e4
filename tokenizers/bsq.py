"""BSQ-ViT's own quantizer pieces (Zhao et al. 2024, "Image and Video Tokenization with Binary
Spherical Quantization"; zhaoyue-zephyrus/bsq-vit, transcoder/models/quantizer/bsq.py and
transcoder/losses/vqperceptual.py), used by tokenizers/binary.py when its options ask for them.

Written from bsq-vit's formulas (u = z / ||z||, d bits, s = 1/sqrt(d), t = inverse temperature):

- Straight-through: bsq-vit applies the estimator to sign(u), then multiplies by s, so the
  forward value is s sign(u) and the gradient into u is s (not 1): `scaled_straight_through`.
- Soft entropies: the per-sample entropy is the sum of the bits' binary entropies of
  sigmoid(4 t s u_i) ('analytical'; its 'group' form is the same number, since p(c | u)
  factorises over bits); the codebook entropy is the sum over groups of H(mean_n p_group).
  bsq-vit's 'analytical' mode replaces the group probabilities by the per-bit ones before the
  codebook entropy is taken, so there the codebook entropy is per bit whatever its group size
  (`embed_group_size`): entropy_group_bits = 1 in our terms. tokenizers/binary.py computes both.
- Hard entropies (its `soft_entropy=False`): per-sample, the binary entropies of each image's
  bit frequencies (mean over the image's tokens of the straight-through bits, so the gradient
  reaches u), summed over bits, mean over images; codebook, the entropy of the code histogram
  over all 2**d codes (plus eps = 1e-4 per code), whose gradient bsq-vit defines by hand
  (DifferentiableEntropyFunction): token n gets -(log p[c_n] + 1) / (N d) * sign(u_n). Both use
  the unscaled signs and log(x + 1e-8) as bsq-vit. Its released forward cannot reach this
  branch (it returns `avg_prob`, set only by the soft branch); we follow its formulas.
- Loss: beta * mean_n ||s sign(u_n) - u_n||^2 + zeta (gamma0 H_sample - gamma H_codebook) / t,
  times the trainer's codebook weight w(step) = w (r + m (1 - r)), r = min(step, R) / R: the
  weight starts at m w and falls linearly to w over R steps (codebook_rampup_multiplier m,
  codebook_rampup_steps R): `rampup_factor`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.tokens.layout import bits_to_indices

sg = jax.lax.stop_gradient

LOG_EPS = 1e-8  # bsq-vit's log(p + 1e-8) in its entropies
COUNT_EPS = 1e-4  # bsq-vit's codebook_entropy(eps=1e-4): added to every code's count
MAX_HARD_BITS = 24  # the hard codebook entropy holds a histogram of all 2**d codes


def check_options(*, bits: int, hard_entropy: bool, rampup_multiplier, rampup_steps) -> None:
    """ConfigError for BSQ options a quantizer of `bits` bits cannot run."""
    if hard_entropy and bits > MAX_HARD_BITS:
        raise ConfigError(
            f"quantizer.hard_entropy counts all 2**{bits} codes; it needs bits <= "
            f"{MAX_HARD_BITS} (set hard_entropy=False for the soft entropies)"
        )
    if rampup_steps < 0 or rampup_multiplier < 0:
        raise ConfigError(
            f"quantizer.codebook_rampup_steps={rampup_steps} and codebook_rampup_multiplier="
            f"{rampup_multiplier} must be >= 0 (steps 0: no ramp)"
        )


def scaled_straight_through(x: jax.Array, scale: float) -> jax.Array:
    """scale * sign(x) forward (zero -> -1), gradient `scale` into x (bsq-vit: STE, then scale)."""
    signs = jnp.where(x > 0, 1.0, -1.0)
    return scale * (sg(signs) + (x - sg(x)))


def rampup_factor(step: jax.Array, multiplier: float, steps: int) -> jax.Array:
    """r + multiplier (1 - r) with r = min(step, steps) / steps: multiplier at step 0, 1 from
    `steps` on (vqperceptual.py's codebook weight ramp); 1 when steps == 0."""
    if steps <= 0:
        return jnp.ones((), jnp.float32)
    r = jnp.minimum(step, steps).astype(jnp.float32) / steps
    return r + multiplier * (1.0 - r)


def _plogp(p: jax.Array) -> jax.Array:
    return p * jnp.log(p + LOG_EPS)


def hard_per_sample_entropy(signs: jax.Array, num_samples: int) -> jax.Array:
    """signs [N, d] (+-1, straight-through to x), tokens of `num_samples` images in order:
    mean over images of the summed binary entropies of the image's bit frequencies."""
    ones = ((signs + 1.0) / 2.0).reshape(num_samples, -1, signs.shape[-1])
    f = jnp.mean(ones, axis=1)  # [B, d] share of ones per bit in each image
    return jnp.mean(jnp.sum(-_plogp(f) - _plogp(1.0 - f), axis=-1))


def _code_probabilities(signs: jax.Array):
    """(code index [N], p [2**d]) of the histogram of the codes of signs [N, d], eps per code."""
    d = signs.shape[-1]
    index = bits_to_indices(signs > 0, (d,))[:, 0]
    counts = jnp.zeros((2**d,), jnp.float32).at[index].add(1.0) + COUNT_EPS
    return index, counts / jnp.sum(counts)


@jax.custom_vjp
def hard_codebook_entropy(signs: jax.Array) -> jax.Array:
    """Entropy of the histogram of the codes of signs [N, d] (+-1), with bsq-vit's gradient."""
    _, p = _code_probabilities(signs)
    return -jnp.sum(p * jnp.log(p))


def _hard_forward(signs):
    index, p = _code_probabilities(signs)
    return -jnp.sum(p * jnp.log(p)), (signs, index, p)


def _hard_backward(residuals, cotangent):
    signs, index, p = residuals
    n, d = signs.shape
    # Each token is pushed along its own sign, by how common its code already is.
    per_code = -cotangent * (jnp.log(p) + 1.0) / (n * d)
    return (per_code[index][:, None] * signs,)


hard_codebook_entropy.defvjp(_hard_forward, _hard_backward)


def hard_entropies(x: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
    """(per-sample, codebook) hard entropies of x [N, d] from its unscaled straight-through
    signs, as bsq-vit computes them before it scales the code."""
    signs = scaled_straight_through(x, 1.0)
    return hard_per_sample_entropy(signs, num_samples), hard_codebook_entropy(signs)
