"""`rng="official"`: our decoder draws its random numbers as the official MaskGIT
`parallel_decode.decode` (PyPI package `maskgit`), so that with the same key and the same logits
function both give the same tokens and fix the same number of tokens at every step, for the
official mask schedules too. The logits function is a fixed random map of the tokens (a stand-in
for the transformer that both decoders call)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visual_tokenizers.models import maskgit_decode as dec

parallel_decode = pytest.importorskip("maskgit.libml.parallel_decode")

K, N, B, D = 32, 16, 4, 24  # codebook, tokens, batch, features of the stand-in network
MASK = K  # the official decode marks unknown tokens with a mask id
RNG = np.random.default_rng(0)
TABLE = RNG.normal(size=(K + 1, D)).astype(np.float32)
MIX = (RNG.normal(size=(N, N)) / np.sqrt(N)).astype(np.float32)
OUT = (RNG.normal(size=(D, K)) * 0.6).astype(np.float32)


def network(tokens):
    """int [B, N] with MASK where unknown -> logits [B, N, K]: depends on every token."""
    x = jnp.asarray(TABLE)[tokens]
    return jnp.einsum("nm,bmd,dk->bnk", MIX, x, OUT) + x @ OUT


@functools.partial(jax.jit, static_argnames=("steps", "schedule", "choice"))
def official(start, key, *, steps, schedule, choice):
    def tokens_to_logits(ids):  # records how many tokens each step starts with unknown
        jax.debug.callback(COUNTS.append, jnp.sum(ids == MASK, -1), ordered=True)
        return network(ids)

    seqs = parallel_decode.decode(
        start, key, tokens_to_logits, mask_token_id=MASK, num_iter=steps,
        choice_temperature=choice, mask_scheduling_method=schedule,
    )  # fmt: skip
    return seqs[:, -1]


COUNTS: list = []


@functools.partial(jax.jit, static_argnames=("steps", "schedule", "choice", "rng"))
def ours(start, key, *, steps, schedule, choice, rng="official"):
    def logits_fn(ids, unknown, step):
        return (network(jnp.where(unknown, MASK, ids[..., 0])),)

    options = dict(steps=steps, schedule=schedule, choice_temperature=choice, rng=rng)
    ids, remaining = dec.decode(logits_fn, start[..., None] % K, start == MASK, key, **options)
    return ids[..., 0], remaining


@pytest.mark.parametrize(
    "schedule,steps,choice",
    [("cosine", 8, 4.5), ("uniform", 6, 4.5), ("log", 8, 2.0), ("exp", 8, 4.5),
     ("pow2.5", 12, 4.5), ("cosine", 5, 0.0)],
)  # fmt: skip
def test_official_random_draws_give_the_official_tokens(schedule, steps, choice):
    start = np.full((B, N), MASK, np.int32)
    start[1, :5] = RNG.integers(0, K, 5)  # inpainting: some rows start with known tokens
    start[2, ::3] = RNG.integers(0, K, len(start[2, ::3]))
    key = jax.random.key(7)
    COUNTS.clear()
    theirs = np.asarray(official(start, key, steps=steps, schedule=schedule, choice=choice))
    jax.effects_barrier()
    mine, remaining = ours(start, key, steps=steps, schedule=schedule, choice=choice)
    np.testing.assert_array_equal(np.asarray(mine), theirs)
    # Unknown tokens at the start of steps 1..T-1 in the official run = ours after steps 0..T-2.
    started = np.stack([np.asarray(c) for c in COUNTS])
    assert started.shape == (steps, B)
    np.testing.assert_array_equal(started[0], (start == MASK).sum(-1))
    np.testing.assert_array_equal(np.asarray(remaining)[:-1], started[1:])
    assert np.all(np.asarray(remaining)[-1] == 0)
    # Known tokens stay; the draws matter: our own random numbers give other tokens.
    np.testing.assert_array_equal(theirs[start != MASK], start[start != MASK])
    if choice:
        other, _ = ours(start, key, steps=steps, schedule=schedule, choice=choice, rng="ours")
        assert np.any(np.asarray(other) != theirs)
