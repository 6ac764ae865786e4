"""Reconstruction and adversarial loss terms on toy inputs, against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visual_tokenizers.tokenizers import losses

REAL = jnp.array([2.0, -1.0, 0.5])
FAKE = jnp.array([-3.0, 0.2, 1.5])


def _softplus(x):
    return np.log1p(np.exp(x))


def test_reconstruction_terms_are_weighted_means():
    a, b = jnp.zeros((2, 4, 4, 3)), jnp.full((2, 4, 4, 3), 0.5)
    terms = losses.reconstruction_losses(a, b, l1_weight=2.0, l2_weight=3.0)
    assert terms["l1"] == pytest.approx(1.0) and terms["l2"] == pytest.approx(0.75)
    assert "l1" not in losses.reconstruction_losses(a, b, l1_weight=0.0, l2_weight=1.0)
    with pytest.raises(ValueError, match="both 0"):
        losses.reconstruction_losses(a, b, l1_weight=0.0, l2_weight=0.0)


def test_non_saturating_losses_match_log_sigmoid_form():
    r, f = np.asarray(REAL), np.asarray(FAKE)
    expected_d = np.mean(_softplus(-r)) + np.mean(_softplus(f))
    assert losses.discriminator_loss(REAL, FAKE, "non_saturating") == pytest.approx(expected_d)
    expected_g = -np.mean(np.log(1 / (1 + np.exp(-f))))
    assert losses.generator_loss(FAKE, "non_saturating") == pytest.approx(expected_g, rel=1e-5)


def test_hinge_losses_and_signs():
    d = losses.discriminator_loss(REAL, FAKE, "hinge")
    assert d == pytest.approx(np.mean([0, 2, 0.5]) + np.mean([0, 1.2, 2.5]))
    assert losses.generator_loss(FAKE, "hinge") == pytest.approx(-np.mean(np.asarray(FAKE)))
    # A discriminator that separates well has a lower loss; a generator that fools it, too.
    for kind in losses.GAN_LOSSES:
        good = losses.discriminator_loss(jnp.full(3, 5.0), jnp.full(3, -5.0), kind)
        bad = losses.discriminator_loss(jnp.full(3, -5.0), jnp.full(3, 5.0), kind)
        assert good < bad
        assert losses.generator_loss(jnp.full(3, 5.0), kind) < losses.generator_loss(
            jnp.full(3, -5.0), kind
        )
    with pytest.raises(ValueError, match="unknown"):
        losses.generator_loss(FAKE, "wasserstein")


def test_r1_equals_squared_gradient_norm():
    w = jax.random.normal(jax.random.key(0), (4 * 4 * 3,))

    def disc(x):
        return jnp.tanh(x.reshape(x.shape[0], -1) @ w) * 3.0

    x = jax.random.normal(jax.random.key(1), (5, 4, 4, 3))
    per_example = [jax.grad(lambda xi: disc(xi[None])[0])(x[i]) for i in range(5)]
    expected = np.mean([float(jnp.sum(g**2)) for g in per_example])
    assert losses.r1_penalty(disc, x) == pytest.approx(expected, rel=1e-5)


def test_lecam_matches_formula():
    ema_real, ema_fake = 0.7, -0.4
    r, f = np.asarray(REAL), np.asarray(FAKE)
    expected = np.mean(np.maximum(r - ema_fake, 0) ** 2) + np.mean(np.maximum(ema_real - f, 0) ** 2)
    got = losses.lecam_penalty(REAL, FAKE, ema_real, ema_fake)
    assert got == pytest.approx(expected, rel=1e-6)


def test_adaptive_weight_is_ratio_of_gradient_norms():
    last_layer = jnp.array([[1.0, -2.0], [0.5, 3.0]])
    rec = jax.grad(lambda w: jnp.sum(w**2))(last_layer)  # 2w
    gan = jax.grad(lambda w: jnp.sum(w) * 0.1)(last_layer)  # 0.1 everywhere
    expected = np.linalg.norm(2 * np.asarray(last_layer)) / (np.linalg.norm(np.full(4, 0.1)) + 1e-4)
    assert losses.adaptive_generator_weight(rec, gan) == pytest.approx(expected, rel=1e-5)
    assert losses.adaptive_generator_weight(rec, jnp.zeros_like(gan), max_weight=10.0) == 10.0
