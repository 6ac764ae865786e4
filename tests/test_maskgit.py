"""MaskGIT generator: schedules, parallel decoding, guidance, factorised heads, sharded
sampling and a training sanity check. Tiny models only (CPU, 2 cores)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.tokens.layout import Vocab
from visual_tokenizers.models import maskgit_decode as dec
from visual_tokenizers.models.maskgit import HeadLayout, MaskGIT, make_sampler

TINY = dict(width=16, depth=1, heads=2, mlp_dim=32)
RNG = np.random.default_rng(0)  # test inputs come from numpy: no jax compile per input


def _build(vocab, token_shape=(4, 4), **kwargs):
    return MaskGIT(
        vocab=vocab, token_shape=token_shape, num_classes=3, rngs=nnx.Rngs(0), **TINY, **kwargs
    )


def _tiny(vocab=None, token_shape=(4, 4), **kwargs):
    """A tiny MaskGIT: a fresh module over a cached state."""
    return nnx.merge(*_tiny_state(vocab or Vocab(16), token_shape, tuple(sorted(kwargs.items()))))


@functools.cache
def _tiny_state(vocab, token_shape, extra):
    """Initialised under jit: one compile instead of many eager ops."""
    build = functools.partial(_build, vocab, token_shape, **dict(extra))
    return nnx.graphdef(nnx.eval_shape(build)), jax.jit(lambda: nnx.state(build()))()


def test_mask_schedules_and_training_mask_counts():
    r = jnp.array([0.0, 0.25, 0.5, 1.0])
    expected = {
        "cosine": [1.0, math.cos(math.pi / 8), math.sqrt(0.5), 0.0],
        "linear": [1.0, 0.75, 0.5, 0.0],
        "square": [1.0, 1 - 1 / 16, 0.75, 0.0],
        "arccos": [1.0, math.acos(0.25) * 2 / math.pi, 2 / 3, 0.0],
    }
    ratios = jax.jit(lambda r: {name: dec.mask_ratio(r, name) for name in expected})(r)
    for name, values in expected.items():
        np.testing.assert_allclose(ratios[name], values, atol=1e-6, err_msg=name)
    # Per-sample counts clip(ceil(ratio * N), 1, N): at least one masked token.
    random_mask = jax.jit(dec.random_mask, static_argnums=2)
    mask = random_mask(jax.random.key(0), jnp.array([0.0, 0.3, 0.5, 0.99, 1.0]), 20)
    np.testing.assert_array_equal(mask.sum(-1), [1, 6, 10, 20, 20])
    # Training: r ~ U(0, 1], so the mean cosine mask ratio is E[cos(pi r / 2)] = 2 / pi.
    training_mask = jax.jit(dec.training_mask, static_argnums=(1, 2, 3))
    mask, ratios = training_mask(jax.random.key(1), 2000, 16, "cosine")
    assert abs(float(ratios.mean()) - 2 / math.pi) < 0.03
    counts = np.clip(np.ceil(np.asarray(ratios) * 16), 1, 16)
    np.testing.assert_array_equal(mask.sum(-1), counts)
    partial = np.asarray(mask)[(counts > 2) & (counts < 14)][:50]
    assert len({tuple(row) for row in partial}) == len(partial) > 20  # positions differ per row


def _expected_remaining(total, steps, schedule):
    """Tokens still unknown after each step, from the MaskGIT rule (independent of the code)."""
    fns = {"cosine": lambda r: math.cos(math.pi / 2 * r), "linear": lambda r: 1 - r}
    unknown, out = total, []
    for t in range(steps):
        n = 0
        if t < steps - 1 and unknown:
            n = min(
                max(1, min(unknown - 1, math.floor(total * fns[schedule]((t + 1) / steps)))),
                unknown,
            )
        unknown = n
        out.append(n)
    return out


def test_decode_returns_certain_tokens_with_scheduled_counts():
    batch, length, sizes, steps = 3, 64, (4, 8), 8
    target = np.stack([RNG.integers(0, k, (batch, length)) for k in sizes], -1)
    # Row 0 generates everything, row 1 a random half (inpainting), row 2 nothing.
    generate = np.stack([np.ones(length), RNG.random(length) < 0.5, np.zeros(length)]) > 0
    start = (target + 1) % np.array(sizes)  # kept tokens differ from what the logits say

    def logits_fn(ids, unknown, step):  # all mass on the target tokens
        return tuple(jnp.where(jax.nn.one_hot(target[..., g], k) > 0, 0.0, -1e9)
                     for g, k in enumerate(sizes))  # fmt: skip

    for schedule in ("cosine", "linear"):
        run = jax.jit(functools.partial(dec.decode, logits_fn, steps=steps, schedule=schedule))
        ids, remaining = run(start, generate, jax.random.key(3))
        np.testing.assert_array_equal(ids, np.where(generate[..., None], target, start))
        for row in range(batch):
            expected = _expected_remaining(int(generate[row].sum()), steps, schedule)
            np.testing.assert_array_equal(remaining[:, row], expected, err_msg=schedule)
    assert _expected_remaining(64, 8, "cosine")[:3] == [62, 59, 53]  # floor(64 cos(pi t / 16))


def test_decode_remasks_the_least_confident_tokens():
    # 5 certain positions (log p = 0) and 11 coin flips (log p = log 1/2), 2 steps, no noise:
    # step 0 fixes 16 - floor(16 cos(pi / 4)) = 5 tokens, which must be the certain ones. At the
    # last step the certain positions' logits flip to token 1, so any certain position left
    # unknown by step 0 would come out as 1.
    certain = np.arange(16) % 3 == 0
    certain &= np.cumsum(certain) <= 5

    def logits_fn(ids, unknown, step):
        sure = jnp.where(step == 0, jnp.array([0.0, -jnp.inf]), jnp.array([-jnp.inf, 0.0]))
        flip = jnp.log(jnp.array([0.5, 0.5]))
        return (jnp.where(certain[None, :, None], sure, flip) * jnp.ones((2, 16, 2)),)

    run = jax.jit(functools.partial(dec.decode, logits_fn, steps=2, choice_temperature=0.0))
    ids, remaining = run(np.zeros((2, 16, 1), np.int32), np.ones((2, 16), bool), jax.random.key(0))
    np.testing.assert_array_equal(remaining[0], [11, 11])
    np.testing.assert_array_equal(ids[:, certain, 0], 0)


def test_guidance_scale_zero_is_the_unconditional_path():
    graphdef, params = nnx.split(_tiny())
    labels, null = np.array([0, 1, 2, 1]), np.full((4,), 3)
    ids, unknown = RNG.integers(0, 16, (4, 16, 1)), RNG.random((4, 16)) < 0.5

    @jax.jit
    def run(labels, scale):  # a traced scale: one compile for every case below
        model = nnx.merge(graphdef, params)
        tokens = model.sample(labels, jax.random.key(5), 4, guidance_scale=scale)
        logits = [model(ids, unknown, x)[0] for x in (labels, null)]
        return tokens, logits, model.guided_logits_fn(labels, 4, scale)(ids, unknown, 0)[0]

    tokens, (cond, uncond), guided = run(labels, 0.0)
    assert float(jnp.max(jnp.abs(cond - uncond))) > 1e-2  # the label matters
    np.testing.assert_allclose(guided, uncond, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(run(labels, 1.0)[2], cond, atol=1e-5, rtol=1e-5)
    # Sampling at scale 0 depends on the labels not at all: any labels give the null samples.
    np.testing.assert_array_equal(run(null, 0.0)[0], tokens)
    np.testing.assert_array_equal(run(labels[::-1], 0.0)[0], tokens)
    assert bool(jnp.any(run(labels, 300.0)[0] != tokens))


def test_factorised_loss_equals_full_softmax():
    logits = RNG.normal(size=(2, 5, 64)).astype(np.float32)
    y = RNG.integers(0, 64, (2, 5))
    layout = HeadLayout(Vocab(64, 6, (6,)), (5,), head_group_bits=3)  # two groups of 3 bits

    @jax.jit
    def losses(logits):
        full = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(y, 64), 0.1))
        one_group = dec.grouped_cross_entropy((logits,), y[..., None], 0.1)
        # Two groups (MSB group first) = the full softmax over the 64 joint codes whose logits
        # are the sums of the group logits.
        parts = (logits[..., :8], logits[..., 8:16])
        joint = (parts[0][..., :, None] + parts[1][..., None, :]).reshape(2, 5, 64)  # hi, lo
        joint_full = optax.softmax_cross_entropy(
            joint, optax.smooth_labels(jax.nn.one_hot(y, 64), 0.1)
        )
        return full, one_group, joint_full, dec.grouped_cross_entropy(parts, layout.to_ids(y), 0.1)

    full, one_group, joint_full, two_groups = losses(logits)
    np.testing.assert_allclose(one_group, full, rtol=1e-6)
    np.testing.assert_allclose(two_groups, joint_full, rtol=1e-5)
    # Model level: one binary group of 6 bits is the plain 64-code model, loss for loss.
    tokens, labels, key = RNG.integers(0, 64, (3, 4, 4)), np.array([0, 1, 3]), jax.random.key(3)
    plain = _tiny(Vocab(64))
    binary = nnx.eval_shape(lambda: _build(Vocab(64, 6, (6,))))
    binary = nnx.merge(nnx.graphdef(binary), nnx.state(plain))  # same parameter tree
    losses = jax.jit(lambda ms: [m.loss(tokens, labels, key, train=False)[0] for m in ms])(
        (plain, binary)
    )
    assert float(losses[0]) == float(losses[1])


def test_group_ids_round_trip_and_summed_embeddings():
    round_trip = jax.jit(
        lambda layout, t: (layout.to_ids(t), layout.to_tokens(layout.to_ids(t))), static_argnums=0
    )
    t = RNG.integers(0, 2**10, (2, 3, 4))
    layout = HeadLayout(Vocab(2**10, 10, (10,)), (3, 4), head_group_bits=4)  # groups 4, 3, 3
    ids, back = round_trip(layout, t)
    np.testing.assert_array_equal(
        ids, np.stack([t >> 6, (t >> 3) & 7, t & 7], -1).reshape(2, 12, 3)
    )
    np.testing.assert_array_equal(back, t)
    # 36 bits arrive as two 18-bit index groups [..., 2]; heads of 12 bits cut across them.
    hi, lo = RNG.integers(0, 2**18, (2, 2, 5))
    layout = HeadLayout(Vocab(2**36, 36, (18, 18)), (5,), head_group_bits=12)
    ids, back = round_trip(layout, np.stack([hi, lo], -1))
    expected = np.stack([hi >> 6, ((hi & 63) << 6) | (lo >> 12), lo & 4095], -1)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(back, np.stack([hi, lo], -1))
    # Input embedding: the sum of the group tables; the mask embedding where masked.
    model = _tiny(Vocab(2**10, 10, (10,)), (3, 4), head_group_bits=5)  # groups 5, 5
    ids, masked = np.stack([t >> 5, t & 31], -1).reshape(2, 12, 2), np.arange(12) == 0
    out = jax.jit(lambda m: m.embed(ids, np.broadcast_to(masked, (2, 12))))(model)
    tables = [np.asarray(x[...]) for x in model.token_embed]
    summed = tables[0][ids[..., 0]] + tables[1][ids[..., 1]]
    np.testing.assert_allclose(out[:, 1:], summed[:, 1:], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0], np.broadcast_to(model.mask_embed[...], (2, 16)))


def test_sharded_sampling_equals_single_device():
    # 1-D latents of a 36-bit binary code: factorised heads, [B, L, 2] index form.
    vocab = Vocab(2**36, 36, (18, 18))
    model = _tiny(vocab, (6,), head_group_bits=6)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    options = dict(steps=3, guidance_scale=2.0, guidance_schedule="linear", top_k=8)
    labels = np.arange(8) % 4
    tokens, generate = RNG.integers(0, 2**18, (8, 6, 2)), RNG.random((8, 6)) < 0.7
    key = jax.random.key(2)
    single = make_sampler(graphdef, **options)(params, rest, labels, key, tokens, generate)

    mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "model": 1})
    shardings = mesh_lib.param_shardings(params, mesh, mesh_lib.DEFAULT_RULES)
    params = jax.device_put(params.to_pure_dict(), shardings)
    assert params["mask_embed"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
    sharded = make_sampler(graphdef, mesh=mesh, **options)(
        params, rest.to_pure_dict(), labels, key, tokens, generate
    )
    assert sharded.sharding.spec[0] == ("data", "fsdp")
    assert sharded.shape == (8, 6, 2)
    np.testing.assert_array_equal(sharded, single)
    keep = ~generate[..., None]
    np.testing.assert_array_equal(np.where(keep, sharded, 0), np.where(keep, tokens, 0))


def test_tiny_model_loss_decreases():
    model = _tiny()
    graphdef, params = nnx.split(model, nnx.Param)
    labels = np.arange(8) % 3
    tokens = (labels[:, None, None] * 5 + np.arange(16).reshape(4, 4)) % 16  # label + position
    optimizer = optax.adam(2e-2)

    @jax.jit
    def step(params, opt_state, key):
        def loss_fn(p):
            # Pooled over the batch's masked tokens: per-sample means are noisier at 60 steps.
            return nnx.merge(graphdef, p).loss(tokens, labels, key, normalize="token")

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = optimizer.init(params), []
    for i in range(60):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i))
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
