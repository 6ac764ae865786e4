"""MaskGIT mask schedules, training masks and loss, classifier-free guidance, parallel decoding.

Pure functions over arrays (no nnx), shared by models/maskgit.py and testable on their own.

Tokens are handled here as group ids `ids` [B, N, G] int32: one group for a plain codebook,
G groups of bits for binary codes (see models/maskgit.py). Logits are a tuple with one
[B, N, K_g] array per group, and a token's log-probability is the sum over its groups (the
heads are independent given the transformer output).

Decoding (MaskGIT, Chang et al. 2022; the official `parallel_decode.decode`): with N0 tokens
to generate in a sample and T steps, step t = 0..T-1

1. samples every unknown token from categorical(logits / temperature) (optionally only among
   the top-k logits of each group);
2. scores it: confidence = log p(sampled) + choice_temperature * (1 - (t+1)/T) * Gumbel noise,
   where p is the distribution it was sampled from; known tokens score +inf;
3. keeps the n lowest-confidence tokens unknown for the next step, with
   n = clip(floor(N0 * schedule((t+1)/T)), 1, unknown - 1) (at least one stays unknown, at
   least one is fixed, as in the official code) and n = 0 at the last step, which fills all.

The steps run in `lax.fori_loop`, so the compiled graph holds one copy of the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from visual_tokenizers.core.errors import ConfigError

# ratio r in [0, 1] -> mask ratio in [0, 1]: 1 at r = 0 (all masked), 0 at r = 1.
SCHEDULES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "cosine": lambda r: jnp.cos(0.5 * math.pi * r),  # MaskGIT's default
    "linear": lambda r: 1.0 - r,
    "square": lambda r: 1.0 - r * r,
    "arccos": lambda r: jnp.arccos(r) / (0.5 * math.pi),  # MUSE / MAGE
}
GUIDANCE_SCHEDULES = ("constant", "linear")

# (ids, unknown [B, N] bool, step) -> one [B, N, K_g] float32 logits array per group.
LogitsFn = Callable[[jax.Array, jax.Array, jax.Array], Sequence[jax.Array]]


def mask_ratio(r, schedule: str = "cosine") -> jax.Array:
    """The fraction of tokens masked at progress r in [0, 1] under `schedule`."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown mask schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    r = jnp.clip(jnp.asarray(r, jnp.float32), 0.0, 1.0)
    # cos(pi/2) is -4e-8 in float32: clip so that counts never go negative.
    return jnp.clip(SCHEDULES[schedule](r), 0.0, 1.0)


def random_mask(rng: jax.Array, ratios: jax.Array, length: int) -> jax.Array:
    """bool [B, length]: clip(ceil(ratio * length), 1, length) random positions per row."""
    return _mask_from_scores(jax.random.uniform(rng, (ratios.shape[0], length)), ratios)


def _mask_from_scores(scores: jax.Array, ratios: jax.Array) -> jax.Array:
    length = scores.shape[-1]
    counts = jnp.clip(jnp.ceil(ratios * length), 1, length).astype(jnp.int32)
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)  # a random permutation per row
    return ranks < counts[:, None]


def training_mask(rng: jax.Array, batch: int, length: int, schedule: str = "cosine"):
    """MaskGIT training mask: r ~ U(0, 1], ratio = schedule(r); returns (mask, ratios)."""
    uniform = jax.random.uniform(rng, (batch, length + 1))  # one draw: r, then position scores
    ratios = mask_ratio(1.0 - uniform[:, 0], schedule)  # 1 - U[0, 1) is uniform on (0, 1]
    return _mask_from_scores(uniform[:, 1:], ratios), ratios


def grouped_cross_entropy(logits, ids: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Sum over groups of the label-smoothed cross-entropy, [B, N] from ids [B, N, G].

    Per group: (1 - eps) * -log p(y) + eps * mean_k -log p(k), which is optax's
    softmax_cross_entropy against smooth_labels(one_hot(y), eps) without building one-hots.
    """
    total = 0.0
    for g, group_logits in enumerate(logits):
        log_probs = jax.nn.log_softmax(group_logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(log_probs, ids[..., g : g + 1], -1)[..., 0]
        total = total + (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(-1)
    return total


def guidance_scale_at(step, steps: int, scale: float, schedule: str = "constant"):
    """Guidance scale at step t: constant `scale`, or `scale * (t+1)/T` for 'linear'."""
    if schedule == "constant":
        return jnp.float32(scale)
    if schedule == "linear":
        return scale * (jnp.asarray(step, jnp.float32) + 1.0) / steps
    raise ConfigError(f"unknown guidance schedule {schedule!r}; choose one of {GUIDANCE_SCHEDULES}")


def apply_guidance(cond: jax.Array, uncond: jax.Array, scale) -> jax.Array:
    """Classifier-free guidance: uncond + scale * (cond - uncond).

    scale 0 is exactly the unconditional logits, scale 1 the conditional ones, scale > 1
    pushes away from the unconditional prediction.
    """
    return uncond + scale * (cond - uncond)


def _top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
    """Logits below the k-th largest of each row set to -inf (top_k <= 0: unchanged)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def sample_groups(noise: jax.Array, logits: Sequence[jax.Array], temperature=1.0, top_k: int = 0):
    """Samples each group independently by Gumbel-max; (ids [B, N, G], summed log-prob [B, N]).

    noise: standard Gumbel noise [B, N, >= sum_g K_g], sliced per group, so that one random
    draw per decoding step serves every group (each draw is a threefry hash to compile and run).
    argmax(logits + Gumbel) is exactly how jax.random.categorical samples.
    """
    ids, logp, start = [], 0.0, 0
    for group_logits in logits:
        size = group_logits.shape[-1]
        scaled = _top_k_filter(group_logits.astype(jnp.float32) / temperature, top_k)
        choice = jnp.argmax(scaled + noise[..., start : start + size], axis=-1)
        log_probs = jax.nn.log_softmax(scaled, axis=-1)
        logp = logp + jnp.take_along_axis(log_probs, choice[..., None], -1)[..., 0]
        ids.append(choice.astype(jnp.int32))
        start += size
    return jnp.stack(ids, -1), logp


def remask_count(step, steps: int, total: jax.Array, unknown: jax.Array, schedule: str):
    """How many tokens stay unknown after `step`: see the module docstring, point 3."""
    ratio = mask_ratio((jnp.asarray(step, jnp.float32) + 1.0) / steps, schedule)
    n = jnp.floor(total.astype(jnp.float32) * ratio).astype(jnp.int32)
    n = jnp.maximum(1, jnp.minimum(unknown - 1, n))
    n = jnp.minimum(n, unknown)  # nothing unknown (inpainting with nothing to do): 0
    return jnp.where(step == steps - 1, 0, n)


def decode(
    logits_fn: LogitsFn,
    ids: jax.Array,
    unknown: jax.Array,
    rng: jax.Array,
    *,
    steps: int = 8,
    schedule: str = "cosine",
    temperature: float = 1.0,
    top_k: int = 0,
    choice_temperature: float = 4.5,
):
    """MaskGIT parallel decoding from `ids` [B, N, G], generating where `unknown` [B, N].

    logits_fn(ids, unknown, step) returns the (guided) logits, one [B, N, K_g] per group; it
    must ignore `ids` where `unknown` is set. Tokens outside `unknown` are returned unchanged.
    Returns (ids [B, N, G], remaining [T, B] int32: tokens still unknown after each step).
    """
    if steps < 1:
        raise ConfigError(f"decoding needs steps >= 1, got {steps}")
    total = jnp.sum(unknown, -1, dtype=jnp.int32)

    def body(step, carry):
        ids, unknown, remaining = carry
        logits = logits_fn(ids, unknown, step)
        # One draw per step: the groups' sampling noise, then the choice noise in the last slot.
        width = sum(x.shape[-1] for x in logits) + 1
        noise = jax.random.gumbel(jax.random.fold_in(rng, step), (*unknown.shape, width))
        sampled, logp = sample_groups(noise, logits, temperature, top_k)
        ids = jnp.where(unknown[..., None], sampled, ids)
        noise_scale = choice_temperature * (1.0 - (step + 1.0) / steps)
        confidence = logp + noise_scale * noise[..., -1]
        confidence = jnp.where(unknown, confidence, jnp.inf)
        count = remask_count(step, steps, total, jnp.sum(unknown, -1, dtype=jnp.int32), schedule)
        # Rank 0 = least confident; known tokens (+inf) rank last and count <= unknown tokens.
        ranks = jnp.argsort(jnp.argsort(confidence, axis=-1), axis=-1)
        unknown = ranks < count[:, None]
        remaining = remaining.at[step].set(jnp.sum(unknown, -1, dtype=jnp.int32))
        return ids, unknown, remaining

    remaining = jnp.zeros((steps, ids.shape[0]), jnp.int32)
    ids, _, remaining = jax.lax.fori_loop(0, steps, body, (ids, unknown, remaining))
    return ids, remaining
