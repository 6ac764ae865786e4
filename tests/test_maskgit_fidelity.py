"""MaskGIT generator fidelity: float32 logits under bfloat16, the official per-sample loss,
factorised heads chosen from the vocabulary, and the generator EMA's update rule."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from visual_tokenizers.configs import maskgit_b16
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.core.tokens.layout import Vocab
from visual_tokenizers.jobs.train_maskgit import make_train_step
from visual_tokenizers.models import maskgit_decode as dec
from visual_tokenizers.models.maskgit import MaskGIT, head_groups
from visual_tokenizers.trained.maskgit import model_fn_from_config

TINY = dict(token_shape=(4, 4), num_classes=3, width=32, depth=1, heads=2, mlp_dim=64)
RNG = np.random.default_rng(0)


def _model(dtype=jnp.float32):
    """A fresh module over a cached state (initialised under jit: one compile, not many ops)."""
    return nnx.merge(*_state(dtype))


@functools.cache
def _state(dtype):
    build = functools.partial(MaskGIT, vocab=Vocab(64), dtype=dtype, rngs=nnx.Rngs(0), **TINY)
    return nnx.graphdef(nnx.eval_shape(build)), jax.jit(lambda: nnx.state(build()))()


def test_head_logits_are_float32_under_bfloat16():
    """The same features through the MLM head of a bfloat16 and a float32 model (same
    params): equal, where a bfloat16 head was ~0.06 off at logit 10."""
    f32, bf16 = _model(), _model(jnp.bfloat16)
    x = jnp.asarray(RNG.normal(size=(2, 16, 32)), jnp.float32)
    table = f32.token_embed[0][...]
    for m in (f32, bf16):  # logits around +-10
        m.token_embed[0][...] = table * 40.0
    want, got = f32.head(x)[0], bf16.head(x.astype(jnp.bfloat16))[0]
    assert got.dtype == jnp.float32 and float(jnp.max(jnp.abs(want))) > 8
    # Features rounded to bfloat16 on the way in are all that may differ.
    np.testing.assert_allclose(got, f32.head(x.astype(jnp.bfloat16))[0], atol=1e-5)
    assert float(jnp.max(jnp.abs(got - want))) < 0.05
    ids, masked = jnp.asarray(RNG.integers(0, 64, (2, 16, 1))), jnp.zeros((2, 16), bool)
    assert all(y.dtype == jnp.float32 for y in bf16(ids, masked, jnp.array([0, 1])))


def test_per_sample_loss_is_the_official_loss():
    losses = pytest.importorskip("maskgit.libml.losses")
    model = _model()
    tokens = jnp.asarray(RNG.integers(0, 64, (6, 4, 4)))
    labels, key = jnp.array([0, 1, 2, 0, 1, 2]), jax.random.key(3)
    per_sample = model.loss(tokens, labels, key, train=False, normalize="sample")[0]
    pooled = model.loss(tokens, labels, key, train=False, normalize="token")[0]
    # The same mask and logits as MaskGIT.loss draws them (train=False: no dropout).
    masked, _ = dec.training_mask(jax.random.split(key, 3)[0], 6, 16, "cosine")
    ids = model.layout.to_ids(tokens)
    logits = model(ids, masked, labels)[0]
    official = losses.weighted_sequence_cross_entropy_loss(
        labels=ids[..., 0], logits=logits, weights=masked.astype(jnp.float32),
        label_smoothing=0.1,
    )  # fmt: skip
    np.testing.assert_allclose(per_sample, official, rtol=1e-5)
    counts = np.asarray(masked.sum(-1))
    assert len(set(counts.tolist())) > 1  # unequal counts: the two means differ
    assert abs(float(per_sample) - float(pooled)) > 1e-4
    with pytest.raises(ConfigError, match="normalize"):
        model.loss(tokens, labels, key, normalize="batch")


def _resolved(vocab: Vocab):
    config = maskgit_b16.get_config()
    config.resolved = ml_collections.ConfigDict(
        dict(vocab=vocab.to_dict(), token_shape=[16, 16], num_classes=1000)
    )
    return config


def test_large_binary_vocabularies_get_factorised_heads():
    assert head_groups(Vocab(2**18, 18, (18,))) == (9, 9)  # MAGVIT-v2's split
    assert head_groups(Vocab(2**14, 14, (14,))) == (14,)  # up to 2**14: one head
    assert head_groups(Vocab(2**36, 36, (18, 18))) == (12, 12, 12)
    assert head_groups(Vocab(2**16, 16, (16,)), 16) == (16,)  # explicit: as asked
    # configs/maskgit_b16.py on 18-bit binary tokens: two heads of 512, not one of 2**18.
    model = nnx.eval_shape(model_fn_from_config(_resolved(Vocab(2**18, 18, (18,)))))
    assert model.layout.sizes == (512, 512)
    assert [b.shape for b in model.head_bias] == [(512,), (512,)]
    with pytest.raises(ConfigError, match="head_group_bits=20"):
        head_groups(Vocab(2**20, 20, (20,)), 20)
    with pytest.raises(ConfigError, match="plain codebook"):
        head_groups(Vocab(2**19))


def test_generator_ema_follows_the_update_rule():
    model = _model()
    graphdef, params, rest = ts.split_model(model)
    optimizer = optax.sgd(0.5)
    state = ts.TrainState(jnp.int32(0), params, rest, optimizer.init(params), params)
    loss = dict(mask_schedule="cosine", label_smoothing=0.1, class_dropout=0.1)
    step = jax.jit(
        make_train_step(
            ts.ModelDef(graphdef), optimizer, lambda s: 0.5, seed=0, loss=loss,
            ema_decay=0.9, ema_warmup=False,
        )
    )  # fmt: skip
    batch = {"tokens": jnp.asarray(RNG.integers(0, 64, (4, 4, 4))), "label": jnp.arange(4) % 3}
    one, _ = step(state, batch)
    two, _ = step(one, batch)
    mix = functools.partial(jax.tree.map, lambda e, p: 0.9 * e + 0.1 * p)
    for want, got in ((mix(params, one.params), one.ema_params),
                      (mix(one.ema_params, two.params), two.ema_params)):  # fmt: skip
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), two.ema_params,
                                         two.params))  # fmt: skip
    assert max(float(x) for x in moved) > 0  # an average, not a copy
    with pytest.raises(ConfigError, match="loss.mask_schedule"):
        make_train_step(None, optimizer, None, seed=0, loss={**loss, "mask_schedule": "cos"})
