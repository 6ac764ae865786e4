"""Tests for tokenizers/binary.py: against vector-quantize-pytorch's LFQ, exact enumeration of
the 2**d codes (float64 numpy) and numpy statistics; plus the binary configs."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from visual_tokenizers.core.tokens import layout
from visual_tokenizers.core.tokens.layout import Vocab
from visual_tokenizers.tokenizers import binary
from visual_tokenizers.tokenizers.binary import BinarySphericalQuantizer, LookupFreeQuantizer

CLASSES = {"lfq": LookupFreeQuantizer, "bsq": BinarySphericalQuantizer}

# Jitted entry points: one compile per configuration instead of op-by-op dispatch (speed only).
_train = nnx.jit(lambda m, z: m(z, train=True))
_eval = nnx.jit(lambda m, z: m(z))
_embed = nnx.jit(lambda m, i: m.embed(i))


def normal(seed, *shape, scale=1.0):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32) * scale


def split(module):
    """(graphdef, params, rest) with pure-dict states, as the trainer holds them."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return graphdef, params.to_pure_dict(), rest.to_pure_dict()


def make(kind="lfq", dim=10, bits=10, **kw):
    return CLASSES[kind](dim, bits, rngs=nnx.Rngs(0), **kw)


def enumerate_codes(x, scale, inverse_temperature):
    """float64 p(c | x) [N, 2**d] over all codes (MSB first), as the peer defines it."""
    d = x.shape[-1]
    codes = ((np.arange(2**d)[:, None] >> np.arange(d - 1, -1, -1)) & 1) * 2.0 - 1.0
    logits = 2.0 * inverse_temperature * np.float64(x) @ (codes * scale).T
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


def entropy64(p):
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- peer parity


@pytest.mark.parametrize("kind", ["lfq", "bsq"])
@pytest.mark.parametrize("inverse_temperature", [0.1, 100.0])
def test_matches_vector_quantize_pytorch_lfq(kind, inverse_temperature):
    """d = 10, no projections: indices, quantized, commitment, both entropies and the total.

    Peer: LFQ(num_codebooks=1, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
    diversity_gamma=1, spherical=BSQ) in train mode, forward(inv_temperature=t). The peer takes
    log(max(p, 1e-5)) in its entropies; at t = 0.1 every code probability is above 1e-5
    (asserted), so the comparison is exact; at t = 100 (the default) the clamp changes an
    entropy by sum_{p < eps} p log(eps / p) <= 2**d * eps / e = 3.8e-3 at most (4e-4 here), so
    that is the tolerance there (our entropies are checked against exact enumeration below).
    """
    import torch
    from vector_quantize_pytorch import LFQ

    d, t = 10, inverse_temperature
    z = normal(1, 4, 64, d)
    ours = make(kind, commitment_weight=0.25, entropy_weight=0.1, diversity_gamma=1.0,
                inverse_temperature=t, entropy_group_bits=d)  # fmt: skip
    out = _train(ours, jnp.asarray(z))
    peer = LFQ(
        dim=d, codebook_size=2**d, num_codebooks=1, entropy_loss_weight=0.1,
        commitment_loss_weight=0.25, diversity_gamma=1.0, spherical=kind == "bsq",
    )  # fmt: skip
    peer.train()
    (pq, pidx, paux), parts = peer(
        torch.from_numpy(z), inv_temperature=t, return_loss_breakdown=True
    )

    np.testing.assert_array_equal(out.indices, pidx.numpy())
    assert out.indices.dtype == jnp.int32
    np.testing.assert_allclose(out.quantized, pq.detach().numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(out.losses["commitment"], 0.25 * parts.commitment.item(), rtol=1e-6)
    x = unit(z) if kind == "bsq" else z
    scale = d**-0.5 if kind == "bsq" else 1.0
    exact = t < 1
    if exact:  # the peer's clamp is inactive: exact comparison
        assert enumerate_codes(x.reshape(-1, d), scale, t).min() > 1e-5
    tol = dict(rtol=1e-5) if exact else dict(rtol=0, atol=2**d * 1e-5 / np.e)
    stats = out.stats
    np.testing.assert_allclose(stats["per_sample_entropy"], parts.per_sample_entropy.item(), **tol)
    np.testing.assert_allclose(stats["codebook_entropy"], parts.batch_entropy.item(), **tol)
    np.testing.assert_allclose(sum(out.losses.values()), paux.item(), **tol)


def test_bsq_follows_its_formulas():
    """u = z/||z||, q = sign(u)/sqrt(d), ||q|| = 1; per-sample entropy = sum of binary entropies
    of sigmoid(4 t u_i / sqrt(d)); commitment = w * mean((u - q)^2); output dim 8 via projections
    is checked elsewhere, here dim = bits."""
    d, t = 12, 3.0
    z = normal(2, 50, d)
    out = _train(make("bsq", d, d, inverse_temperature=t, commitment_weight=0.5), jnp.asarray(z))
    u = unit(np.float64(z))
    q = np.where(u > 0, 1.0, -1.0) / np.sqrt(d)
    np.testing.assert_allclose(out.quantized, q, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out.quantized), axis=-1), 1.0, rtol=1e-6)
    p = 1.0 / (1.0 + np.exp(-4.0 * t * u / np.sqrt(d)))
    h = -(p * np.log(p) + (1 - p) * np.log(1 - p)).sum(-1).mean()
    np.testing.assert_allclose(out.stats["per_sample_entropy"], h, rtol=1e-5)
    np.testing.assert_allclose(out.losses["commitment"], 0.5 * np.mean((u - q) ** 2), rtol=1e-5)


# ----------------------------------------------------------------------------- entropy


def test_grouped_entropy_equals_enumeration():
    """One group of all bits = exact enumeration; g < d = sum of exact group-marginal entropies."""
    d, t = 10, 100.0
    x = normal(3, 256, d, scale=0.02)  # spread probabilities: every code gets some mass
    p = enumerate_codes(x, 1.0, t)  # [N, 1024]
    groups = layout.split_bits(d, 4)
    assert groups == (4, 3, 3)

    @jax.jit
    def ours(a):
        h = binary.codebook_entropy
        return binary.per_sample_entropy(a), h(a, (d,)), h(a, groups)

    ps, one_group, grouped = ours(jnp.asarray(4.0 * t * x))
    np.testing.assert_allclose(ps, entropy64(p).mean(), rtol=1e-5)
    exact = entropy64(p.mean(0))
    np.testing.assert_allclose(one_group, exact, rtol=1e-5)
    joint = p.mean(0).reshape((2,) * d)  # axis i = bit i (MSB first)
    marginals, start = [], 0
    for g in groups:
        rest = tuple(i for i in range(d) if not start <= i < start + g)
        marginals.append(entropy64(joint.sum(rest).reshape(-1)))
        start += g
    np.testing.assert_allclose(grouped, sum(marginals), rtol=1e-5)
    assert grouped > exact + 1e-3  # an upper bound, strictly above for correlated bits


def _largest_intermediate(jaxpr) -> int:
    """Largest array (elements) produced anywhere in a jaxpr, sub-jaxprs included."""
    best = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            best = max(best, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    best = max(best, _largest_intermediate(inner))
    return best


@pytest.mark.parametrize("bits", [20, 36])
def test_no_tensor_of_size_2_to_the_d(bits):
    """Loss and gradient for d = 20 / 36 with g = 9 build nothing above [N, 2**9] (traced only;
    the values at d = 36 are checked in test_quantizer_index_layout_and_embed)."""
    n, g = 64, 9
    q = make("lfq", 24, bits, entropy_group_bits=g, window_table_bits=8)
    graphdef, params, rest = split(q)

    def loss(params, rest, z):
        out = nnx.merge(graphdef, params, rest)(z, train=True)
        return sum(out.losses.values()) + jnp.sum(out.quantized)

    z = jnp.asarray(normal(4, n, 24))
    grad = jax.value_and_grad(loss, argnums=(0, 2))
    assert _largest_intermediate(jax.make_jaxpr(grad)(params, rest, z).jaxpr) <= n * 2**g


# ----------------------------------------------------------------------------- indices


@pytest.mark.parametrize("bits", [18, 36])
def test_factorised_index_round_trip(bits):
    groups = layout.split_bits(bits, 18)
    rng = np.random.default_rng(bits)
    b = rng.integers(0, 2, (500, bits)).astype(bool)
    idx = jax.jit(layout.bits_to_indices, static_argnums=1)(jnp.asarray(b), groups)
    assert idx.shape == (500, len(groups)) and idx.dtype == jnp.int32
    start = 0
    for j, g in enumerate(groups):  # MSB first within each group
        want = (b[:, start : start + g] * (1 << np.arange(g - 1, -1, -1))).sum(-1)
        np.testing.assert_array_equal(idx[:, j], want)
        start += g
    back = jax.jit(layout.indices_to_bits, static_argnums=1)(idx, groups)
    np.testing.assert_array_equal(back, b)


@pytest.mark.parametrize("bits", [18, 36])
def test_quantizer_index_layout_and_embed(bits):
    """d <= 31: one int32 per token; d > 31: [..., G] groups. embed(indices) == forward value."""
    q = make("lfq", bits, bits)
    groups = (18,) if bits == 18 else (18, 18)
    assert q.vocab == Vocab(size=2**bits, bits=bits, groups=groups)
    z = normal(5, 3, 7, bits)
    # Token [0, 0]: only bit 0 positive, so its index is 2**(d-1) (MSB first) or top group 2**17.
    z[0, 0] = np.eye(bits)[0] * 2 - 1
    out = _eval(q, jnp.asarray(z))
    assert out.indices.shape == (3, 7) + ((2,) if bits == 36 else ())
    np.testing.assert_array_equal(out.indices[0, 0], 2 ** (bits - 1) if bits == 18 else [2**17, 0])
    np.testing.assert_array_equal(_embed(q, out.indices), out.quantized)


def test_index_groups_for_factorised_heads_keep_flat_int32():
    q = make("lfq", 8, 18, index_group_bits=9)
    assert q.vocab.groups == (9, 9)
    out = nnx.eval_shape(lambda m, z: m(z), q, jax.ShapeDtypeStruct((4, 8), jnp.float32))
    assert out.indices.shape == (4,) and out.indices.dtype == jnp.int32


# ----------------------------------------------------------------------------- gradients


def _input_grad(q, z, w):
    graphdef, params, rest = split(q)

    def f(z, rest):
        return jnp.sum(nnx.merge(graphdef, params, rest)(z, train=True).quantized * w)

    return jax.jit(jax.grad(f))(jnp.asarray(z), rest)


def test_straight_through_gradients():
    z, w = normal(7, 20, 10), normal(8, 20, 10)
    np.testing.assert_array_equal(_input_grad(make("lfq"), z, w), w)  # identity, exactly
    # BSQ: identity after the sphere projection u = z/|z|, whose vector-Jacobian product is
    # (w - u <u, w>) / |z|.
    u, norm = unit(z), np.linalg.norm(z, axis=-1, keepdims=True)
    want = (w - u * np.sum(u * w, -1, keepdims=True)) / norm
    np.testing.assert_allclose(_input_grad(make("bsq"), z, w), want, rtol=1e-4, atol=1e-6)
    # With projections dim 8 -> 6 bits -> 8: the gradient of out_proj(in_proj(z)), w Wout' Win'.
    q = make("lfq", 8, 6)
    z8, w8 = normal(9, 20, 8), normal(10, 20, 8)
    want = w8 @ np.asarray(q.out_proj.kernel[...]).T @ np.asarray(q.in_proj.kernel[...]).T
    np.testing.assert_allclose(_input_grad(q, z8, w8), want, rtol=1e-5, atol=1e-6)


def test_losses_have_gradients_to_the_input_and_projections():
    q = make("lfq", 8, 6)
    graphdef, params, rest = split(q)
    z = jnp.asarray(normal(11, 40, 8))

    def term(params, z, rest, name):
        return nnx.merge(graphdef, params, rest)(z, train=True).losses[name]

    grads = jax.jit(
        lambda p, z, r: {n: jax.grad(term, (0, 1))(p, z, r, n) for n in ("commitment", "entropy")}
    )(params, z, rest)
    for gp, gz in grads.values():
        assert np.abs(gz).max() > 0 and np.abs(gp["in_proj"]["kernel"]).max() > 0
        np.testing.assert_array_equal(gp["out_proj"]["kernel"], 0.0)  # losses live before it


# ----------------------------------------------------------------------------- statistics


def test_usage_statistics_match_numpy():
    d = 6
    rng = np.random.default_rng(12)
    q = make("lfq", d, d, entropy_group_bits=3, usage_window=2)
    calls = [rng.integers(0, 2, (40, d)) for _ in range(3)]
    codes = [set((c * (1 << np.arange(d - 1, -1, -1))).sum(-1).tolist()) for c in calls]
    for c in calls:
        out = _train(q, jnp.asarray(c * 2.0 - 1.0, jnp.float32))
    last = calls[-1]
    f = last.mean(0)
    np.testing.assert_allclose(out.stats["bit_balance"], np.mean(1 - np.abs(2 * f - 1)), rtol=1e-6)
    np.testing.assert_allclose(out.stats["bit_balance_min"], np.min(1 - np.abs(2 * f - 1)))
    perplexities = []
    for start in (0, 3):
        group = (last[:, start : start + 3] * [4, 2, 1]).sum(-1)
        perplexities.append(np.exp(entropy64(np.bincount(group, minlength=8) / len(group))))
    np.testing.assert_allclose(out.stats["group_perplexity"], np.mean(perplexities), rtol=1e-5)
    assert out.stats["batch_distinct"] == len(codes[-1])
    window = len(codes[1] | codes[2])  # the first call has left the 2-call window
    assert out.stats["window_distinct"] == window
    np.testing.assert_allclose(out.stats["usage"], window / 2**d)
    assert (
        _eval(q, jnp.asarray(calls[0] * 2.0 - 1.0, jnp.float32)).stats["window_distinct"] == window
    )


def test_window_count_is_estimated_when_hashed():
    """d = 16 into a 2**10 table: the linear-counting estimate is close to the true count."""
    q = make("lfq", 16, 16, usage_window=10, window_table_bits=10)
    b = np.random.default_rng(13).integers(0, 2, (300, 16))
    out = _train(q, jnp.asarray(b * 2.0 - 1.0, jnp.float32))
    true = len({tuple(r) for r in b.tolist()})
    assert abs(float(out.stats["window_distinct"]) - true) < 0.1 * true
    assert out.stats["batch_distinct"] == true


# ----------------------------------------------------------------------------- configs, errors


def test_quantizer_arguments_are_checked():
    with pytest.raises(ValueError, match="disagree"):
        make("lfq", 8, 18, codebook_size=2**16)
    with pytest.raises(ValueError, match="power of 2"):
        LookupFreeQuantizer(8, codebook_size=1000, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="index_group_bits"):
        make("lfq", 8, 40, index_group_bits=32)
    assert LookupFreeQuantizer(8, codebook_size=2**12, rngs=nnx.Rngs(0)).bits == 12


def test_binary_configs_and_variants():
    b16 = importlib.import_module("visual_tokenizers.configs.binary_b16")
    one_d = importlib.import_module("visual_tokenizers.configs.binary_1d")
    full = b16.get_config()
    assert (full.quantizer.name, full.quantizer.bits) == ("lfq", 18)
    assert full.data.image_size // full.model.encoder.patch_size == 16
    assert b16.get_config("bsq").quantizer.name == "bsq"
    tiny = b16.get_config("bsq_tiny")
    assert tiny.quantizer.name == "bsq" and tiny.data.source.startswith("builtin:")
    assert b16.get_config("tiny").quantizer.name == "lfq"
    for bad in ("huge", "lfq_bsq"):
        with pytest.raises(ValueError, match="unknown variant"):
            b16.get_config(bad)
    one = one_d.get_config("bsq")
    assert (one.quantizer.name, one.quantizer.bits) == ("bsq", 16)
    assert one.model.encoder.num_latents == one.model.decoder.num_latents == 128
    tiny = one_d.get_config("tiny")
    assert tiny.model.encoder.num_latents == tiny.model.decoder.num_latents > 0


# ----------------------------------------------------------------------------- sharded step


def _train_steps(config, mesh, batches):
    """Train steps of `config` on `mesh` as in tests/test_sharding.py; (init, state, losses)."""
    from visual_tokenizers.core.runtime import mesh as mesh_lib
    from visual_tokenizers.core.runtime import train_state as ts
    from visual_tokenizers.jobs import train_tokenizer
    from visual_tokenizers.trained import builders

    model_fn = builders.model_fn_from_config(config)
    optimizer = builders.optimizer_from_config(config)
    rules = tuple(config.sharding_rules)
    model_def, _, shardings = ts.state_shardings(model_fn, optimizer, mesh, rules)
    state = ts.init_state(model_fn, optimizer, shardings)
    init = jax.device_get(state.params)
    batch_sh = {"image": mesh_lib.batch_sharding(mesh, 4)}
    step = jax.jit(
        train_tokenizer.make_train_step(model_def, optimizer, config.loss.to_dict()),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
    )
    losses = []
    for batch in batches:
        state, metrics = step(state, jax.device_put(batch, batch_sh))
        losses.append(float(metrics["loss"]))
    return init, state, losses


def test_sharded_train_step_matches_single_device():
    from visual_tokenizers.configs import binary_b16
    from visual_tokenizers.core.runtime import mesh as mesh_lib

    config = binary_b16.get_config("tiny")
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)} for _ in range(2)]
    one = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "model": 1}, devices=jax.devices()[:1])
    eight = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "model": 1})
    init, state1, losses1 = _train_steps(config, one, batches)
    _, state8, losses8 = _train_steps(config, eight, batches)
    np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
    kernel = state8.params["encoder"]["transformer"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec[0] == "fsdp"  # really sharded, ('embed', 'mlp')
    params1, params8 = jax.device_get(state1.params), jax.device_get(state8.params)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), init, params1)
    assert all(jax.tree.leaves(changed))  # every parameter moved
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    state1, state8 = jax.device_get(state1.model_state), jax.device_get(state8.model_state)
    np.testing.assert_array_equal(state1["quantizer"]["step"], 2)
    for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state8), strict=True):
        np.testing.assert_array_equal(a, b)  # usage table and step counter
