"""Tokenizer training losses. Each returns a dict of already-weighted scalar terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from visual_tokenizers.core.errors import ConfigError


def reconstruction_losses(images, reconstructions, *, l1_weight: float, l2_weight: float):
    """Pixel losses on [-1, 1] images; a term with weight 0 is left out."""
    diff = reconstructions.astype(jnp.float32) - images.astype(jnp.float32)
    terms = {}
    if l2_weight:
        terms["l2"] = l2_weight * jnp.mean(jnp.square(diff))
    if l1_weight:
        terms["l1"] = l1_weight * jnp.mean(jnp.abs(diff))
    if not terms:
        raise ConfigError("loss.l1_weight and loss.l2_weight are both 0: nothing to train on")
    return terms


# Adversarial terms. `real` and `fake` are discriminator logits; every function returns a scalar.

GAN_LOSSES = ("non_saturating", "hinge")


def check_gan_loss(kind: str, key: str = "loss.gan_loss"):
    if kind not in GAN_LOSSES:
        raise ConfigError(f"{key} {kind!r} is unknown; choose one of {GAN_LOSSES}")


def discriminator_loss(real, fake, kind: str):
    """Non-saturating: softplus(-D(x)) + softplus(D(G(z)));
    hinge: relu(1 - D(x)) + relu(1 + D(G(z)))."""
    check_gan_loss(kind)
    real, fake = real.astype(jnp.float32), fake.astype(jnp.float32)
    if kind == "hinge":
        return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))
    return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))


def generator_loss(fake, kind: str, *, image_mean: bool = False):
    """Non-saturating: softplus(-D(G(z))) (= -log sigmoid); hinge: -D(G(z)). image_mean: on
    each image's mean logit rather than on every logit (Open-MAGVIT2's non_saturate_gen_loss
    averages its PatchGAN's patch logits per image first)."""
    check_gan_loss(kind)
    fake = fake.astype(jnp.float32)
    if image_mean:
        fake = jnp.mean(fake.reshape(fake.shape[0], -1), axis=-1)
    if kind == "hinge":
        return -jnp.mean(fake)
    return jnp.mean(jax.nn.softplus(-fake))


def r1_penalty(discriminator_fn, real_images):
    """E_x ||grad_x D(x)||^2 over the batch (StyleGAN2 / MaskGIT R1, before gamma / 2)."""

    def summed_logits(x):
        return jnp.sum(discriminator_fn(x).astype(jnp.float32))

    grads = jax.grad(summed_logits)(real_images)
    return jnp.mean(jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))))


def lecam_penalty(real, fake, ema_real, ema_fake):
    """LeCam regulariser (Tseng et al. 2021, used by MAGVIT): pulls D(x) towards the EMA of fake
    predictions and D(G(z)) towards the EMA of real ones, one-sided."""
    real, fake = real.astype(jnp.float32), fake.astype(jnp.float32)
    return jnp.mean(jnp.square(jax.nn.relu(real - ema_fake))) + jnp.mean(
        jnp.square(jax.nn.relu(ema_real - fake))
    )


def adaptive_generator_weight(rec_grads, gan_grads, *, max_weight: float = 1e4, eps: float = 1e-4):
    """taming-transformers' weight ||grad rec|| / (||grad gan|| + eps) at the decoder's last
    layer, clipped to [0, max_weight] and never differentiated."""
    rec_norm = optax.global_norm(rec_grads)
    gan_norm = optax.global_norm(gan_grads)
    weight = jnp.clip(rec_norm / (gan_norm + eps), 0.0, max_weight)
    return jax.lax.stop_gradient(weight)
