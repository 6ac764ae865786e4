"""MaskGIT training masks and loss, and parallel decoding.

Pure functions over arrays (no nnx), shared by models/maskgit.py and testable on their own. The
sampling rules (mask schedules, guidance, temperatures, filters, options and their checks) are
in models/maskgit_sampling.py.

Tokens are handled here as group ids `ids` [B, N, G] int32: one group for a plain codebook,
G groups of bits for binary codes (see models/maskgit.py). Logits are a tuple with one
[B, N, K_g] array per group, and a token's log-probability is the sum over its groups (the
heads are independent given the transformer output).

Decoding (MaskGIT, Chang et al. 2022; the official `parallel_decode.decode`): with N0 tokens
to generate in a sample and T steps, step t = 0..T-1

1. samples every unknown token from categorical(logits / temperature_t) (optionally only among
   the top-k / top-p logits of each group; argmax when temperature_t = 0);
2. scores it: confidence = log p(sampled) (or its logit) + choice_temperature * (1 - (t+1)/T)
   * Gumbel noise, where p is the distribution it was sampled from; known tokens score +inf;
3. keeps the n lowest-confidence tokens unknown for the next step, with
   n = clip(floor(N0 * schedule((t+1)/T)), 1, unknown - 1) (at least one stays unknown, at
   least one is fixed, as in the official code) and n = 0 at the last step, which fills all.

The steps run in `lax.fori_loop`, so the compiled graph holds one copy of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.models import maskgit_sampling as ms
from visual_tokenizers.models.maskgit_sampling import SCHEDULES, mask_ratio  # noqa: F401

# (ids, unknown [B, N] bool, step) -> one [B, N, K_g] float32 logits array per group.
LogitsFn = Callable[[jax.Array, jax.Array, jax.Array], Sequence[jax.Array]]


def random_mask(rng: jax.Array, ratios: jax.Array, length: int) -> jax.Array:
    """bool [B, length]: clip(ceil(ratio * length), 1, length) random positions per row."""
    return _mask_from_scores(jax.random.uniform(rng, (ratios.shape[0], length)), ratios)


def _mask_from_scores(scores: jax.Array, ratios: jax.Array) -> jax.Array:
    length = scores.shape[-1]
    counts = jnp.clip(jnp.ceil(ratios * length), 1, length).astype(jnp.int32)
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)  # a random permutation per row
    return ranks < counts[:, None]


def training_mask(rng: jax.Array, batch: int, length: int, schedule: str = "cosine"):
    """MaskGIT training mask: r ~ U(0, 1], ratio = schedule(r); returns (mask, ratios).
    (`log` / `exp` take N0 = length, every token being maskable.)"""
    uniform = jax.random.uniform(rng, (batch, length + 1))  # one draw: r, then position scores
    ratios = mask_ratio(1.0 - uniform[:, 0], schedule, length)  # 1 - U[0, 1) is uniform on (0, 1]
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


LOSS_NORMALIZE = ("sample", "token")


def masked_mean(loss: jax.Array, weights: jax.Array, normalize: str = "sample") -> jax.Array:
    """Mean of loss [B, N] over the tokens of weight 1 (every row has at least one).

    "sample": per sample over its masked tokens, then over samples, as the official
    `weighted_sequence_cross_entropy_loss` (maskgit/libml/losses.py); "token": over all masked
    tokens of the batch pooled (rows with many masked tokens weigh more).
    """
    if normalize == "sample":
        return jnp.mean(jnp.sum(loss * weights, -1) / jnp.sum(weights, -1))
    if normalize == "token":
        return jnp.sum(loss * weights) / jnp.sum(weights)
    raise ConfigError(f"loss.normalize={normalize!r} is unknown; choose one of {LOSS_NORMALIZE}")


def remask_count(step, steps: int, total: jax.Array, unknown: jax.Array, schedule: str):
    """How many tokens stay unknown after `step`: see the module docstring, point 3."""
    ratio = mask_ratio((jnp.asarray(step, jnp.float32) + 1.0) / steps, schedule, total)
    n = jnp.floor(total.astype(jnp.float32) * ratio).astype(jnp.int32)
    n = jnp.maximum(1, jnp.minimum(unknown - 1, n))
    n = jnp.minimum(n, unknown)  # nothing unknown (inpainting with nothing to do): 0
    return jnp.where(step == steps - 1, 0, n)


def _choose(scaled, temperature, draw, greedy_logits):
    """ids [B, N] drawn by `draw(scaled)`, or argmax of greedy_logits where temperature is 0."""
    drawn = draw(scaled)
    greedy = jnp.argmax(greedy_logits, axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def _official_categorical(key, logits: jax.Array, prefix: int) -> jax.Array:
    """jax.random.categorical over the official sequence [B, prefix + N, K]: the draw covers
    the `prefix` leading positions (the class token) too, and their samples are dropped."""
    padded = jnp.pad(logits, ((0, 0), (prefix, 0), (0, 0)))
    return jax.random.categorical(key, padded)[:, prefix:]


def sample_groups(
    keys, logits: Sequence[jax.Array], temperature, o: ms.SamplingOptions, prefix: int = 0
):
    """Samples each group independently; (ids [B, N, G], confidence [B, N] without noise).

    keys: ("ours", Gumbel noise [B, N, >= sum_g K_g] sliced per group) or ("official", key):
    jax.random.categorical per group (the key itself for one group, as the official decode).
    Confidence: the summed log-probability of the sampled ids under the (filtered, tempered)
    distribution, or their summed logits (o.confidence = 'logit'). Greedy steps (temperature 0)
    score under temperature 1: their point mass would give every token log p = 0.
    """
    mode, source = keys
    group_keys = [source] * len(logits)
    if mode == "official" and len(logits) > 1:  # groups: independent keys (no official rule)
        group_keys = list(jax.random.split(source, len(logits)))
    safe = jnp.where(temperature > 0, temperature, 1.0)  # 0 is greedy: no division by zero
    ids, confidence, start = [], 0.0, 0
    for g, group_logits in enumerate(logits):
        size = group_logits.shape[-1]
        logits32 = group_logits.astype(jnp.float32)
        # Temperature first, then the filters on the tempered distribution (as top-p expects).
        scaled = ms.filter_logits(logits32 / safe, o.top_k, o.top_p)
        if mode == "ours":  # argmax(logits + Gumbel) is how jax.random.categorical samples
            noise = source[..., start : start + size]
            draw = lambda x, noise=noise: jnp.argmax(x + noise, axis=-1)  # noqa: E731
        else:
            draw = lambda x, key=group_keys[g]: _official_categorical(key, x, prefix)  # noqa: E731
        choice = _choose(scaled, temperature, draw, logits32)
        if o.confidence == "logit":
            score = scaled
        elif mode == "official":  # log(softmax), as the official decode scores, bit for bit
            score = jnp.log(jax.nn.softmax(scaled, axis=-1))
        else:
            score = jax.nn.log_softmax(scaled, axis=-1)
        confidence = confidence + jnp.take_along_axis(score, choice[..., None], -1)[..., 0]
        ids.append(choice)
        start += size
    return jnp.stack(ids, -1), confidence


def _step_noise(rng, step, shape, logits, mode, prefix: int = 0):
    """(state key, sampling noise or key, choice noise [B, N]) for one step in `mode`."""
    if mode == "official":  # parallel_decode.decode's splitting, in its order
        rng, sample_rng = jax.random.split(rng)
        rng, choice_rng = jax.random.split(rng)
        full = (shape[0], prefix + shape[1])  # the official sequence: class token first
        return rng, ("official", sample_rng), jax.random.gumbel(choice_rng, full)[:, prefix:]
    # One draw per step: the groups' sampling noise, then the choice noise in the last slot
    # (each draw is a threefry hash to compile and run).
    width = sum(x.shape[-1] for x in logits) + 1
    noise = jax.random.gumbel(jax.random.fold_in(rng, step), (*shape, width))
    return rng, ("ours", noise), noise[..., -1]


def _keep_unknown(confidence, count, mode):
    """bool [B, N]: the `count` least confident positions (known ones score +inf)."""
    if mode == "official":  # the official cut-off: strictly below the count-th smallest
        cut = jnp.take_along_axis(jnp.sort(confidence, axis=-1), count[:, None], axis=-1)
        return confidence < cut
    ranks = jnp.argsort(jnp.argsort(confidence, axis=-1), axis=-1)
    return ranks < count[:, None]


def decode(
    logits_fn: LogitsFn,
    ids: jax.Array,
    unknown: jax.Array,
    key: jax.Array,
    options: ms.SamplingOptions | None = None,
    *,
    prefix: int = 0,
    **kwargs,
):
    """MaskGIT parallel decoding from `ids` [B, N, G], generating where `unknown` [B, N].

    logits_fn(ids, unknown, step) returns the (guided) logits, one [B, N, K_g] per group; it
    must ignore `ids` where `unknown` is set. Tokens outside `unknown` are returned unchanged.
    key: the random key (a state advanced per step when options.rng is 'official').
    prefix: with rng 'official', positions in front of the N tokens in the official sequence
    (1 for MaskGIT's class token, as `generate_samples` decodes [class, tokens]): the official
    draws cover them, so the tokens get the same random numbers as there.
    options: a SamplingOptions, or its fields as keywords (steps, schedule, temperature, ...;
    the guidance fields belong to logits_fn). Returns (ids [B, N, G], remaining [T, B] int32:
    tokens still unknown after each step).
    """
    o = options if options is not None else ms.SamplingOptions(**kwargs)
    steps = o.steps
    total = jnp.sum(unknown, -1, dtype=jnp.int32)

    def body(step, carry):
        ids, unknown, remaining, state = carry
        logits = logits_fn(ids, unknown, step)
        state, sample_noise, choice_noise = _step_noise(
            state, step, unknown.shape, logits, o.rng, prefix
        )
        temperature = ms.temperature_at(step, steps, o.temperature, o.temperature_end)
        sampled, confidence = sample_groups(sample_noise, logits, temperature, o, prefix)
        ids = jnp.where(unknown[..., None], sampled, ids)
        ratio = (step + 1.0) / steps  # as the official: 1. * (step + 1) / num_iter
        confidence = confidence + o.choice_temperature * (1.0 - ratio) * choice_noise
        confidence = jnp.where(unknown, confidence, jnp.inf)
        count = remask_count(step, steps, total, jnp.sum(unknown, -1, dtype=jnp.int32), o.schedule)
        unknown = _keep_unknown(confidence, count, o.rng)
        remaining = remaining.at[step].set(jnp.sum(unknown, -1, dtype=jnp.int32))
        return ids, unknown, remaining, state

    remaining = jnp.zeros((steps, ids.shape[0]), jnp.int32)
    carry = (ids, unknown, remaining, key)
    ids, _, remaining, _ = jax.lax.fori_loop(0, steps, body, carry)
    return ids, remaining
