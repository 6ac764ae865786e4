"""BSQ-ViT parity: tokenizers/binary.py + tokenizers/bsq.py against a torch re-statement of
zhaoyue-zephyrus/bsq-vit's quantizer (transcoder/models/quantizer/bsq.py, with the l2
normalisation of transcoder/models/bsqvit.py VITBSQModel.encode) and the codebook weight and
its ramp (transcoder/losses/vqperceptual.py); plus the configs that carry its recipe.

The reference below is written from bsq-vit's formulas, term by term, in float32 torch as it
runs; the quantizer under test is built from the config's own keyword arguments, so a config
value that drifts from the recipe fails here too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from visual_tokenizers.configs import binary_b16
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.tokenizers import bsq, training
from visual_tokenizers.tokenizers.binary import BinarySphericalQuantizer
from visual_tokenizers.trained import builders


class _HardCodebookEntropy(torch.autograd.Function):
    """bsq-vit's DifferentiableEntropyFunction: histogram entropy, hand-made gradient."""

    @staticmethod
    def forward(ctx, signs, d, eps):
        basis = 2 ** torch.arange(d - 1, -1, -1)
        index = (((signs + 1) / 2) * basis).sum(-1).long()
        counts = torch.zeros(2**d).scatter_add_(0, index.flatten(), torch.ones(index.numel()))
        p = (counts + eps) / (counts + eps).sum()
        ctx.save_for_backward(signs, index, p)
        ctx.d = d
        return -(p * torch.log(p)).sum()

    @staticmethod
    def backward(ctx, g):
        signs, index, p = ctx.saved_tensors
        per_code = -g * (torch.log(p) + 1) / index.numel() / ctx.d
        return per_code[index.flatten()].reshape(index.shape).unsqueeze(-1) * signs, None, None


def _entropy(p, dim=-1):
    return -(p * torch.log(p + 1e-8)).sum(dim)  # bsq-vit get_entropy(normalize=False)


def bsq_reference(z, w, *, group_size, analytical=True, soft=True, beta=0.0, gamma0=1.0,
                  gamma=1.0, zeta=1.0, inv_t=1.0, codebook_weight=0.1, multiplier=3.0,
                  rampup_steps=2000, step=0):  # fmt: skip
    """bsq-vit on z [B, L, d] (float32): (loss, grad of loss + <w, zq> into z, indices,
    per-sample entropy, codebook entropy, zq)."""
    z = torch.tensor(z, requires_grad=True)
    u = torch.nn.functional.normalize(z, dim=-1)  # VITBSQModel.encode, l2_norm=True
    d = u.shape[-1]
    s = d**-0.5  # post_q_l2_norm=True
    signs = torch.where(u > 0, 1.0, -1.0)
    zq = u + (signs - u).detach()
    indices = (((signs + 1) / 2) * 2 ** torch.arange(d - 1, -1, -1)).sum(-1).long()
    if soft:
        g = group_size
        k = torch.arange(2**g)[:, None]
        codes = ((k >> torch.arange(g - 1, -1, -1)) & 1) * 2.0 - 1.0  # MSB first
        groups = u.reshape(*u.shape[:-1], d // g, g)
        prob = (2 * torch.einsum("...gc,kc->...gk", groups, codes * s) * inv_t).softmax(-1)
        if analytical:  # replaces the group probabilities before the codebook entropy
            p = torch.sigmoid(-4 * u * s * inv_t)
            prob = torch.stack([p, 1 - p], -1)
        per_sample = _entropy(prob).sum(-1).mean()
        codebook = _entropy(prob.reshape(-1, *prob.shape[-2:]).mean(0)).sum()
    else:
        f = ((zq + 1) / 2).reshape(z.shape[0], -1, d).mean(1)
        per_sample = (-f * torch.log(f + 1e-8) - (1 - f) * torch.log(1 - f + 1e-8)).sum(-1)
        per_sample = per_sample.mean()
        codebook = _HardCodebookEntropy.apply(zq, d, 1e-4)
    zq = zq * s
    commit = beta * ((zq.detach() - u) ** 2).sum(-1).mean()
    quantizer_loss = commit + zeta * (gamma0 * per_sample - gamma * codebook) / inv_t
    rate = min(rampup_steps, step) / rampup_steps
    loss = codebook_weight * (rate + multiplier * (1 - rate)) * quantizer_loss
    (loss + (zq * torch.tensor(w)).sum()).backward()
    out = (loss, z.grad, indices, per_sample, codebook, zq)
    return tuple(t.detach().numpy() for t in out)


def ours(kwargs, z, w, steps):
    """Per step of `steps`: (loss, grad of loss + <w, quantized> into z, indices, stats,
    quantized); one quantizer, one compile."""
    q = BinarySphericalQuantizer(z.shape[-1], rngs=nnx.Rngs(0), **kwargs)
    graphdef, state = nnx.split(q)
    state = state.to_pure_dict()  # plain arrays: merged afresh inside the traced function

    def total(z, state):
        out = nnx.merge(graphdef, state)(z, train=True)
        loss = sum(out.losses.values())
        return loss + jnp.sum(out.quantized * w), (loss, out)

    grad_fn = jax.jit(jax.value_and_grad(total, has_aux=True))
    results = []
    for step in steps:
        state["step"] = jnp.asarray(step, jnp.int32)  # the ramp reads the train-call count
        (_, (loss, out)), grad = grad_fn(jnp.asarray(z), state)
        results.append((loss, grad, out.indices, out.stats, out.quantized))
    return results


def recipe_kwargs(variant):
    kwargs = dict(binary_b16.get_config(variant).quantizer)
    assert kwargs.pop("name") == "bsq"
    return kwargs


def normal(seed, *shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


def check(mine, ref, grad_atol):
    loss, grad, indices, stats, quantized = mine
    r_loss, r_grad, r_indices, r_sample, r_codebook, r_zq = ref
    np.testing.assert_array_equal(indices, r_indices)
    np.testing.assert_allclose(quantized, r_zq, rtol=1e-6)
    np.testing.assert_allclose(stats["per_sample_entropy"], r_sample, rtol=1e-5)
    np.testing.assert_allclose(stats["codebook_entropy"], r_codebook, rtol=1e-5)
    # The loss is a small difference of two entropies: compare it on their scale.
    np.testing.assert_allclose(loss, r_loss, rtol=0, atol=1e-6 * (abs(r_sample) + abs(r_codebook)))
    np.testing.assert_allclose(grad, r_grad, rtol=1e-4, atol=grad_atol)
    assert np.abs(r_grad).max() > 100 * grad_atol  # the comparison sees real gradients


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("variant, group_size", [("bsq", 1), ("bsq_b18g2", 9)])
def test_recipe_quantizer_matches_bsq_vit(variant, group_size):
    """configs/binary_b16.py:bsq (b18g18) and :bsq_b18g2 against bsq-vit's yaml values: loss
    with the codebook weight 0.1 ramped from 3x (steps 0, 500: 3x, 2.5x; 2000 on: 1x),
    gradient into z (encoder side: STE scaled by 1/sqrt(18), through the sphere projection),
    indices (MSB first; b18g2: its two 9-bit group indices, bsq.py codes_to_group_indexes, read
    from our flat index) and both entropies, on 2 x 64 random tokens of 18 dimensions."""
    z, w = normal(0, 2, 64, 18), normal(1, 2, 64, 18)
    kwargs = recipe_kwargs(variant)
    steps = (0, 500, 2000, 7000)
    for step, mine in zip(steps, ours(kwargs, z, w, steps), strict=True):
        ref = bsq_reference(z, w, group_size=group_size, step=step)
        check(mine, ref, grad_atol=1e-6)
    flat = np.asarray(mine[2])
    groups = (9, 9) if group_size == 9 else (18,)  # b18g18: the plain index
    assert BinarySphericalQuantizer(18, rngs=nnx.Rngs(0), **kwargs).vocab.groups == groups
    if group_size == 9:
        bits = (z > 0).astype(np.int64)
        for j in range(2):
            want = (bits[..., 9 * j : 9 * (j + 1)] * 2 ** np.arange(8, -1, -1)).sum(-1)
            np.testing.assert_array_equal((flat >> (9 * (1 - j))) & 511, want)


def _general_kwargs(d, group_size, analytical, beta, gamma0, gamma, zeta, t, cb, hard=False):
    """bsq-vit's (beta, gamma0, gamma, zeta, inv_temperature, codebook_weight) in our terms:
    its commitment is summed over the d dimensions (ours: their mean), its entropy penalty is
    divided by t, and the trainer's codebook weight multiplies all of it."""
    return dict(
        bits=d, inverse_temperature=t, commitment_weight=cb * beta * d,
        entropy_weight=cb * zeta * gamma0 / t, diversity_gamma=gamma / gamma0,
        entropy_group_bits=1 if analytical else group_size, scaled_straight_through=True,
        hard_entropy=hard, codebook_rampup_multiplier=2.0, codebook_rampup_steps=100,
    )  # fmt: skip


@pytest.mark.parametrize("analytical", [True, False])
def test_general_options_match_bsq_vit(analytical):
    """d = 12 in groups of 3, both per-sample modes ('group': codebook entropy over the 2**3
    codes of each group), commitment beta 0.25, gamma0 0.5, gamma 2, zeta 0.7, t = 3."""
    weights = dict(beta=0.25, gamma0=0.5, gamma=2.0, zeta=0.7, inv_t=3.0, codebook_weight=0.2)
    z, w = normal(3, 4, 16, 12), normal(4, 4, 16, 12)
    kwargs = _general_kwargs(12, 3, analytical, *(weights[k] for k in weights))
    (mine,) = ours(kwargs, z, w, steps=(30,))
    ref = bsq_reference(z, w, group_size=3, analytical=analytical, multiplier=2.0,
                        rampup_steps=100, step=30, **weights)  # fmt: skip
    check(mine, ref, grad_atol=1e-6)


def test_hard_entropies_match_bsq_vit():
    """bsq-vit's hard entropies (soft_entropy=False): per-image bit frequencies and the 2**10
    code histogram with its hand-made gradient; 3 images of 40 tokens, so codes repeat."""
    weights = dict(beta=0.25, gamma0=1.0, gamma=1.0, zeta=1.0, inv_t=1.0, codebook_weight=0.1)
    rng = np.random.default_rng(5)
    z = normal(5, 3, 40, 10) + rng.choice([-1.0, 1.0], (1, 1, 10)).astype(np.float32)
    w = normal(6, 3, 40, 10)
    kwargs = _general_kwargs(10, 10, False, *(weights[k] for k in weights), hard=True)
    (mine,) = ours(kwargs, z, w, steps=(0,))
    ref = bsq_reference(z, w, group_size=10, soft=False, multiplier=2.0, rampup_steps=100,
                        step=0, **weights)  # fmt: skip
    check(mine, ref, grad_atol=1e-7)


# ----------------------------------------------------------------------------- pieces, configs


def test_rampup_and_straight_through_scale():
    np.testing.assert_allclose(
        [bsq.rampup_factor(jnp.asarray(s), 3.0, 2000) for s in (0, 1000, 2000, 10**6)],
        [3.0, 2.0, 1.0, 1.0],
    )
    assert bsq.rampup_factor(jnp.asarray(5), 3.0, 0) == 1.0
    x = jnp.asarray(normal(7, 5, 18))
    value, pull = jax.vjp(lambda x: bsq.scaled_straight_through(x, 18**-0.5), x)
    np.testing.assert_array_equal(value, jnp.where(x > 0, 1.0, -1.0) * 18**-0.5)
    np.testing.assert_allclose(pull(jnp.ones_like(x))[0], 18**-0.5, rtol=1e-7)


def test_bsq_option_errors():
    with pytest.raises(ConfigError, match="hard_entropy"):
        BinarySphericalQuantizer(30, 30, rngs=nnx.Rngs(0), hard_entropy=True)
    with pytest.raises(ConfigError, match="codebook_rampup"):
        BinarySphericalQuantizer(8, 8, rngs=nnx.Rngs(0), codebook_rampup_steps=-1)


def test_bsq_configs():
    """BSQ's 256 recipe: f8 (32x32 tokens), L1, its GAN weights and optimizer; the tiny variant
    keeps the quantizer recipe; grouping words imply bsq and refuse lfq."""
    full = binary_b16.get_config("bsq")
    assert full.data.image_size // full.model.encoder.patch_size == 32
    assert full.model.decoder.patch_size == 8
    assert (full.loss.l1_weight, full.loss.l2_weight, full.loss.r1_every) == (1.0, 0.0, 16)
    assert full.optimizer.lr == pytest.approx(4e-7 * 256) and full.data.batch_size == 256
    assert binary_b16.get_config("b18g2").quantizer.index_group_bits == 9
    tiny = binary_b16.get_config("bsq_b18g2_tiny")
    assert tiny.data.source.startswith("builtin:") and tiny.quantizer.index_group_bits == 9
    for key in ("inverse_temperature", "commitment_weight", "codebook_rampup_steps"):
        assert binary_b16.get_config("bsq_tiny").quantizer[key] == full.quantizer[key]
    assert binary_b16.get_config("").model.encoder.patch_size == 16  # LFQ unchanged
    for bad in ("lfq_b18g2", "b18g2_b18g18", "b18g3"):
        with pytest.raises(ValueError, match="unknown variant"):
            binary_b16.get_config(bad)
    # The full recipe builds (abstractly) with its loss keys and 2**18 codes.
    training.LossConfig.from_dict(full.loss.to_dict())
    assert nnx.eval_shape(builders.model_fn_from_config(full)).vocab.size == 2**18


def test_ramp_runs_in_the_train_step():
    """bsq_tiny through the tokenizer train step: the logged entropy term is 3 x 0.1 x
    (H_sample - H_codebook) at step 0 and the quantizer's step counter (the ramp's clock)
    follows the trainer's."""
    from visual_tokenizers.core.runtime import mesh as mesh_lib
    from visual_tokenizers.core.runtime import train_state as ts
    from visual_tokenizers.jobs import train_tokenizer

    config = binary_b16.get_config("bsq_tiny")
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "model": 1}, devices=jax.devices()[:1])
    model_fn, optimizer = (
        builders.model_fn_from_config(config),
        builders.optimizer_from_config(config),
    )
    model_def, _, shardings = ts.state_shardings(model_fn, optimizer, mesh, ())
    state = ts.init_state(model_fn, optimizer, shardings)
    step = jax.jit(train_tokenizer.make_train_step(model_def, optimizer, config.loss.to_dict()))
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for want in (3.0, 3.0 - 2.0 / 2000):
        state, logged = step(state, {"image": images})
        penalty = logged["quantizer/per_sample_entropy"] - logged["quantizer/codebook_entropy"]
        np.testing.assert_allclose(logged["loss/entropy"], want * 0.1 * penalty, rtol=1e-5)
        assert "loss/l1" in logged and "loss/l2" not in logged
    assert int(jax.device_get(state.model_state)["quantizer"]["step"]) == int(state.step) == 2
