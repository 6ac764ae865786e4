"""The tokenizer GAN recipe: one jitted step with generator, EMA and discriminator updates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from visual_tokenizers.configs import vq_b16, vqgan_f16
from visual_tokenizers.core.data.images import to_model
from visual_tokenizers.core.runtime import checkpoint
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.jobs import train_tokenizer
from visual_tokenizers.models.lpips import LPIPS
from visual_tokenizers.tokenizers import losses
from visual_tokenizers.trained import builders
from visual_tokenizers.trained.tokenizer import TrainedTokenizer


def gan_config(**loss):
    """vq_b16:tiny with every part of the recipe on (small PatchGAN with BatchNorm, hinge)."""
    config = vq_b16.get_config("tiny")
    recipe = dict(
        adversarial_weight=0.1,
        discriminator_start=1,
        r1_cost=10.0,
        r1_every=2,
        lecam_weight=0.01,
        adaptive_weight=True,
        gan_loss="hinge",
    )
    config.loss.update({**recipe, **loss})
    config.discriminator.name = "patchgan"
    config.discriminator.patchgan.update(base_channels=16, n_layers=2)
    config.ema_decay = 0.9
    # 16x16 images (4x4 tokens): every part of the step runs, the random-weight LPIPS VGG16 (the
    # bulk of the cost) on a quarter of the pixels of 32x32.
    config.data.image_size = 16
    return config


@functools.cache
def random_lpips(seed=0):
    """LPIPS with random weights (the real ones are a download) and training precision."""
    graphdef, weights = nnx.split(LPIPS(jax.lax.Precision.DEFAULT))
    leaves, tree = jax.tree.flatten(weights.to_pure_dict())
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    leaves[-5:] = [jnp.abs(x) for x in leaves[-5:]]  # calibration weights are non-negative
    return graphdef, jax.tree.unflatten(tree, leaves)


class Run:
    """A train state and its compiled GAN step on `mesh`, for `config`."""

    def __init__(self, config, mesh, lpips=None):
        self.config, self.mesh = config, mesh
        rules = tuple(config.sharding_rules)
        model_fn = builders.model_fn_from_config(config)
        self.optimizer = builders.optimizer_from_config(config)
        self.disc = builders.discriminator_from_config(config)
        self.model_def, _, self.shardings = ts.state_shardings(
            model_fn, self.optimizer, mesh, rules, ema=True, discriminator=self.disc
        )
        self.state = ts.init_state(
            model_fn, self.optimizer, self.shardings, discriminator=self.disc
        )
        lpips_def, lpips_weights = lpips if lpips else (None, None)
        self.frozen = {"lpips": lpips_weights} if lpips else {}
        step = train_tokenizer.make_train_step(
            self.model_def,
            self.optimizer,
            config.loss.to_dict(),
            discriminator_optimizer=self.disc.optimizer,
            ema_decay=config.ema_decay,
            lpips_def=lpips_def,
            adaptive_path=("decoder", "to_pixels", "kernel"),
        )
        self.batch_sh = {"image": mesh_lib.batch_sharding(mesh, 4)}
        replicated = mesh_lib.replicated(mesh)
        self.step_fn = ts.compile_train_step(
            step, self.shardings, self.batch_sh, mesh, extra_shardings=replicated
        )

    def step(self, batch):
        images = jax.device_put(batch, self.batch_sh)
        self.state, metrics = self.step_fn(self.state, images, self.frozen)
        return jax.device_get(metrics)


def batches(n, seed=0):
    """Batches of 16: two images per device of the 4 x 2 (data x fsdp) mesh."""
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)} for _ in range(n)]


def one_device():
    return mesh_lib.make_mesh({"data": 1, "fsdp": 1, "model": 1}, devices=jax.devices()[:1])


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def pairs(a, b):
    """Matching leaves of two trees of the same structure, on the host."""
    return zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b)), strict=True)


# discriminator_start 1 and R1 every 2 steps: step 0 inactive, R1 due at step 2 (not 1 or 3).
CONFIG = gan_config(discriminator_start=1, perceptual_weight=0.5)
STEPS = 4


@pytest.fixture(scope="module")
def single():
    """Four steps on one device, with the state before every step and the logged metrics."""
    run = Run(CONFIG, one_device(), random_lpips())
    states, logged = [], []
    for batch in batches(STEPS):
        states.append(host(run.state))  # the step donates run.state
        logged.append(run.step(batch))
    return run, states, logged


def test_discriminator_start_lazy_r1_and_ema_rule(single):
    run, states, logged = single
    after = states[1:] + [host(run.state)]
    for before, now in zip(states, after, strict=True):
        # EMA rule: ema <- d * ema + (1 - d) * new params, every step, with the warm-up's
        # d = min(0.9, (1 + t) / (10 + t)) at update t = step + 1 (below 0.9 until t = 80).
        t = int(before.step) + 1
        d = min(0.9, (1 + t) / (10 + t))
        expected = jax.tree.map(
            lambda e, p, d=d: d * e + (1 - d) * p, before.ema_params, now.params
        )
        for a, b in pairs(expected, now.ema_params):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Step 0 comes before discriminator_start: the discriminator did not move.
    for a, b in pairs(states[0].discriminator, states[1].discriminator):
        np.testing.assert_array_equal(a, b)
    first = logged[0]
    assert first["gan/active"] == 0 and first["loss/adversarial"] == 0
    assert first["loss/discriminator"] == 0 and first["loss/r1"] == 0
    for m in logged[1:]:
        # The hinge generator loss -mean(D(fake)) takes the sign of the random discriminator's
        # output: active means non-zero (its exact value: test_adaptive_weight_... below).
        assert m["gan/active"] == 1 and m["loss/adversarial"] != 0 and m["loss/discriminator"] > 0
        assert m["loss/lecam"] > 0
    # Lazy R1 every 2 steps: due at step 2 only among the active ones.
    assert logged[2]["loss/r1"] > 0 and logged[1]["loss/r1"] == 0 and logged[3]["loss/r1"] == 0
    final = host(run.state.discriminator)
    assert any(
        not np.array_equal(a, b) for a, b in pairs(states[1].discriminator.params, final.params)
    )
    # PatchGAN BatchNorm running statistics are carried in the discriminator state.
    stats = list(pairs(states[1].discriminator.model_state, final.model_state))
    assert stats and all(not np.array_equal(a, b) for a, b in stats)


def test_adaptive_weight_and_perceptual_term_match_direct_computation(single):
    run, states, logged = single
    state, metrics = jax.tree.map(jnp.asarray, states[1]), logged[1]  # first adversarial step
    images = to_model(jnp.asarray(batches(STEPS)[1]["image"]))
    lpips_def, lpips_weights = random_lpips()
    disc = state.discriminator

    def terms(params):
        model = run.model_def.merge(params, state.model_state)
        recon, _ = model(images, train=True)
        lpips = nnx.merge(lpips_def, lpips_weights)
        pixel = jnp.mean(jnp.square(recon - images)) + 0.5 * jnp.mean(lpips(images, recon))
        d = run.model_def.discriminator.merge(disc.params, disc.model_state)
        return pixel, losses.generator_loss(d(recon), "hinge"), lpips(images, recon)

    @jax.jit
    def expected_weight(params):
        def kernel_grad(i):
            grads = jax.grad(lambda p: terms(p)[i])(params)
            return grads["decoder"]["to_pixels"]["kernel"]

        return optax.global_norm(kernel_grad(0)) / (optax.global_norm(kernel_grad(1)) + 1e-4)

    expected = expected_weight(state.params)
    np.testing.assert_allclose(metrics["gan/adaptive_weight"], expected, rtol=1e-4)
    _, gan, lpips = jax.jit(terms)(state.params)
    np.testing.assert_allclose(metrics["loss/perceptual"], 0.5 * float(jnp.mean(lpips)), rtol=1e-4)
    np.testing.assert_allclose(
        metrics["loss/adversarial"], 0.1 * float(expected) * float(gan), rtol=1e-4
    )


def test_gan_step_sharded_matches_single_device(single):
    run, _, logged = single
    sharded = Run(CONFIG, mesh_lib.make_mesh({"data": 4, "fsdp": 2, "model": 1}), random_lpips())
    logs = [sharded.step(b) for b in batches(STEPS)]
    for key in ("loss", "loss/discriminator", "loss/r1", "gan/adaptive_weight", "loss/perceptual"):
        np.testing.assert_allclose(
            [m[key] for m in logged], [m[key] for m in logs], rtol=2e-4, err_msg=key
        )
    one, eight = host(run.state), host(sharded.state)
    for part in ("params", "ema_params", "discriminator"):
        for a, b in pairs(getattr(one, part), getattr(eight, part)):
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5, err_msg=part)
    kernel = sharded.state.discriminator.params["convs"][1]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")


def test_checkpoint_round_trips_ema_and_discriminator(single, tmp_path):
    run, _, _ = single
    mngr = checkpoint.manager(str(tmp_path), keep=1, async_save=False)
    checkpoint.save(mngr, STEPS, run.state, CONFIG.to_dict())
    mngr.wait_until_finished()
    _, restored, _ = ts.restore_or_init(
        builders.model_fn_from_config(CONFIG),
        run.optimizer,
        one_device(),
        tuple(CONFIG.sharding_rules),
        ckpt_manager=mngr,
        ema=True,
        discriminator=run.disc,
    )
    mngr.close()
    for a, b in pairs(run.state, restored):
        np.testing.assert_array_equal(a, b)
    loaded = TrainedTokenizer.from_workdir(str(tmp_path))  # the EMA: the run kept one
    assert loaded.weights == "ema" and loaded.step == STEPS
    for a, b in pairs(loaded.params, run.state.ema_params):
        np.testing.assert_array_equal(a, b)


def test_vqgan_recipe_defaults():
    config = vqgan_f16.get_config()
    assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.lr) == (0.0, 0.99, 1e-4)
    assert config.discriminator_optimizer.to_dict() == config.optimizer.to_dict()
    assert config.loss.perceptual_weight == 0.1 and config.loss.adversarial_weight == 0.1
    assert config.loss.r1_cost == 10.0 and config.discriminator.name == "stylegan"
    config = vq_b16.get_config()
    assert config.discriminator.name == "patchgan" and config.loss.gan_loss == "hinge"


def test_unknown_loss_key_and_gan_loss_are_named():
    config = gan_config()
    model_def = ts.ModelDef(None)
    with pytest.raises(ValueError, match="unknown keys.*'typo'"):
        train_tokenizer.make_train_step(model_def, optax.adam(1e-3), {"typo": 1.0})
    loss = config.loss.to_dict()
    loss["gan_loss"] = "wasserstein"
    with pytest.raises(ValueError, match="wasserstein"):
        train_tokenizer.make_train_step(model_def, optax.adam(1e-3), loss)
