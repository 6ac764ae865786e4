"""Open-MAGVIT2 compatibility of the LFQ: bit order, MAGVIT-v2's GroupNorm before the sign,
the generator loss on per-image mean logits, and configs/binary_b16.py's recipe values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from visual_tokenizers.configs import binary_b16
from visual_tokenizers.tokenizers import losses, training
from visual_tokenizers.tokenizers.binary import LookupFreeQuantizer

_eval = nnx.jit(lambda m, z: m(z))
_embed = nnx.jit(lambda m, i: m.embed(i))


def normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def make(bits, **kw):
    return LookupFreeQuantizer(bits, bits, rngs=nnx.Rngs(0), **kw)


# ----------------------------------------------------------------------------- bit order


@pytest.mark.parametrize("bits", [10, 18])
def test_lsb_indices_follow_open_magvit2(bits):
    """bit_order='lsb': index = sum_i [x_i > 0] 2**i, Open-MAGVIT2's LFQ (its mask
    2 ** arange(d) on the bits, dimension 0 lowest); 'msb' (default) = sum_i [x_i > 0]
    2**(d-1-i), unchanged. embed(indices) gives back the quantized values in both orders."""
    z = normal(1, 4, 6, bits)
    z[0, 0] = np.eye(bits)[0] * 2 - 1  # only dimension 0 positive
    positive = (z > 0).astype(np.int64)
    for order, weights in (("lsb", 2 ** np.arange(bits)), ("msb", 2 ** np.arange(bits)[::-1])):
        q = make(bits, bit_order=order)
        out = _eval(q, jnp.asarray(z))
        np.testing.assert_array_equal(out.indices, (positive * weights).sum(-1))
        np.testing.assert_array_equal(_embed(q, out.indices), out.quantized)
        assert out.indices[0, 0] == (1 if order == "lsb" else 2 ** (bits - 1))


def test_lsb_round_trip_with_grouped_indices():
    """d = 36 (two int32 groups of 18 bits): lsb indices still decode to the forward value."""
    q = make(36, bit_order="lsb", codebook_entropy="grouped")
    out = _eval(q, jnp.asarray(normal(2, 5, 36)))
    assert out.indices.shape == (5, 2)
    np.testing.assert_array_equal(_embed(q, out.indices), out.quantized)
    msb = _eval(make(36), jnp.asarray(normal(2, 5, 36)))
    assert not np.array_equal(out.indices, msb.indices)


def test_option_errors_name_the_fix():
    for kw, match in (
        (dict(bit_order="big"), "bit_order"),
        (dict(codebook_entropy="full"), "codebook_entropy"),
        (dict(group_norm_groups=4), "group_norm_groups"),  # 18 is not a multiple of 4
    ):
        with pytest.raises(ValueError, match=match):
            make(18, **kw)
    with pytest.raises(ValueError, match="grouped"):
        make(36, codebook_entropy="exact")  # 2**36 codes: the bound is the way there


# ----------------------------------------------------------------------------- GroupNorm


def test_group_norm_matches_torch_before_the_sign():
    """group_norm_groups=G: indices and commitment are those of sign(GroupNorm(G, d,
    affine=False)(z)) with z channels-first, as torch computes it; gradients flow through."""
    import torch

    d, groups = 12, 3
    z = normal(3, 2, 4, 5, d) * 3.0 + 1.5  # [B, h, w, d], off-centre so the norm matters
    zt = torch.from_numpy(z).permute(0, 3, 1, 2).requires_grad_()  # [B, d, h, w]
    x = torch.nn.GroupNorm(groups, d, affine=False)(zt).permute(0, 2, 3, 1)
    commitment = 0.25 * ((x - torch.where(x > 0, 1.0, -1.0)) ** 2).mean()
    commitment.backward()
    want = ((x > 0).long() * (2 ** torch.arange(d - 1, -1, -1))).sum(-1)

    q = make(d, group_norm_groups=groups, commitment_weight=0.25, entropy_weight=0.0)
    graphdef, params, rest = nnx.split(q, nnx.Param, ...)
    params, rest = params.to_pure_dict(), rest.to_pure_dict()

    def loss(z, rest):
        out = nnx.merge(graphdef, params, rest)(z, train=True)
        return out.losses["commitment"], out

    (value, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(z), rest)
    np.testing.assert_array_equal(out.indices, want.numpy())
    np.testing.assert_allclose(value, commitment.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, zt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-7)
    plain = _eval(make(d), jnp.asarray(z))
    assert not np.array_equal(plain.indices, out.indices)  # the option changes the codes


# ----------------------------------------------------------------------------- losses


def test_generator_loss_on_per_image_mean_logits():
    """Open-MAGVIT2's non_saturate_gen_loss: softplus(-mean of each image's patch logits),
    averaged over images; the hinge discriminator loss keeps its per-logit form."""
    fake = jnp.asarray(normal(4, 3, 4, 4, 1))
    image_means = np.asarray(fake).reshape(3, -1).mean(-1)
    want = np.mean(np.log1p(np.exp(-image_means)))
    got = losses.generator_loss(fake, "non_saturating", image_mean=True)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    per_logit = np.mean(np.log1p(np.exp(-np.asarray(fake))))
    np.testing.assert_allclose(losses.generator_loss(fake, "non_saturating"), per_logit, rtol=1e-6)
    assert abs(float(got) - per_logit) > 1e-3


def test_generator_kind_is_checked():
    with pytest.raises(ValueError, match="loss.generator_gan_loss"):
        training.LossConfig.from_dict(dict(generator_gan_loss="wasserstein"))
    cfg = training.LossConfig.from_dict(dict(gan_loss="hinge", generator_gan_loss=""))
    assert (cfg.generator_gan_loss or cfg.gan_loss) == "hinge"  # '' = the discriminator's kind


def test_train_step_uses_open_magvit2_gan_losses():
    """One step of binary_b16:tiny with the recipe's GAN part on: the logged adversarial term is
    0.1 x softplus(-per-image mean D logit) and the discriminator term 0.5 x hinge, computed
    directly from the state before the step."""
    from visual_tokenizers.core.data.images import to_model
    from visual_tokenizers.core.runtime import mesh as mesh_lib
    from visual_tokenizers.core.runtime import train_state as ts
    from visual_tokenizers.jobs import train_tokenizer
    from visual_tokenizers.trained import builders

    config = binary_b16.get_config("tiny")
    config.loss.update(adversarial_weight=0.1, lecam_weight=0.05)
    config.discriminator.patchgan.update(base_channels=8, n_layers=2)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "model": 1}, devices=jax.devices()[:1])
    model_fn, optimizer = (
        builders.model_fn_from_config(config),
        builders.optimizer_from_config(config),
    )
    disc = builders.discriminator_from_config(config)
    model_def, _, shardings = ts.state_shardings(
        model_fn, optimizer, mesh, tuple(config.sharding_rules), discriminator=disc
    )
    state = ts.init_state(model_fn, optimizer, shardings, discriminator=disc)
    step = train_tokenizer.make_train_step(
        model_def, optimizer, config.loss.to_dict(), discriminator_optimizer=disc.optimizer
    )
    images = np.random.default_rng(5).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x = to_model(jnp.asarray(images))

    @jax.jit
    def expected(state):
        model = model_def.merge(state.params, state.model_state)
        recon, _ = model(x, train=True)
        d = state.discriminator
        d_model = model_def.discriminator.merge(d.params, d.model_state)
        fake_g = d_model(recon).reshape(4, -1).mean(-1)  # as the generator sees it
        real, fake = d_model(x), d_model(recon)  # then the discriminator, same module state
        hinge = jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))
        return 0.1 * jnp.mean(jax.nn.softplus(-fake_g)), 0.5 * hinge

    want_g, want_d = expected(state)
    _, metrics = jax.jit(step)(state, {"image": jnp.asarray(images)})
    # Per-logit instead of per-image means would be ~2 % off here.
    np.testing.assert_allclose(metrics["loss/adversarial"], want_g, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss/discriminator"], want_d, rtol=1e-4)
    assert "loss/lecam" in metrics and "loss/l1" in metrics and "loss/l2" not in metrics


# ----------------------------------------------------------------------------- config


def test_binary_b16_default_is_open_magvit2():
    """Values of configs/Open-MAGVIT2/gpu/imagenet_lfqgan_256_L.yaml and the losses and
    quantizer it names (see lfq_recipe); tiny keeps the quantizer and pixel loss."""
    config = binary_b16.get_config()
    loss = config.loss
    assert (loss.l1_weight, loss.l2_weight, loss.perceptual_weight) == (1.0, 0.0, 1.0)
    assert (loss.gan_loss, loss.discriminator_loss_scale) == ("hinge", 0.5)
    assert (loss.generator_gan_loss, loss.generator_image_mean) == ("non_saturating", True)
    assert (loss.adversarial_weight, loss.adaptive_weight) == (0.1, False)
    assert (loss.lecam_weight, loss.lecam_decay, loss.r1_cost) == (0.05, 0.999, 0.0)
    assert (config.discriminator.name, config.discriminator.patchgan.n_layers) == ("patchgan", 3)
    opt = config.optimizer
    assert (opt.lr, opt.b1, opt.b2, opt.schedule, opt.grad_clip_norm) == (
        1e-4, 0.5, 0.9, "constant", 0.0
    )  # fmt: skip
    assert config.discriminator_optimizer.b1 == 0.5 and config.ema_decay == 0.999
    assert config.data.batch_size == 256
    q = config.quantizer
    assert (q.commitment_weight, q.entropy_weight, q.diversity_gamma) == (0.25, 0.1, 1.0)
    assert (q.inverse_temperature, q.codebook_entropy, q.codebook_entropy_eps) == (
        100.0, "exact", 1e-5
    )  # fmt: skip
    assert q.bit_order == "msb" and q.group_norm_groups == 0  # token files keep their meaning
    training.LossConfig.from_dict(loss.to_dict())
    tiny = binary_b16.get_config("tiny")
    assert tiny.quantizer.codebook_entropy == "exact" and tiny.loss.l1_weight == 1.0
    assert binary_b16.get_config("bsq").quantizer.codebook_entropy == "grouped"
