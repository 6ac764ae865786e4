"""The tokenizer train step: pixel, perceptual, quantizer and adversarial losses, generator EMA
and the discriminator update, all in one jitted call.

In order, one step (`TokenizerStep.train_step`)
1. updates the tokenizer (the generator) on pixel + perceptual (LPIPS) + quantizer terms, plus
   the adversarial term from `discriminator_start` on (optionally with taming-transformers'
   adaptive weight): `generator_update`, with `pixel_terms` and `adversarial_cotangent`;
2. moves its EMA: ema = d_t * ema + (1 - d_t) * params (when the state keeps one):
   `ema_update`, with the warm-up below;
3. updates the discriminator on the same batch (`discriminator_update`): real images against
   the reconstructions of step 1 (non-saturating or hinge), plus LeCam and a lazy R1 penalty
   every `r1_every` steps (scaled by `r1_every`, as StyleGAN2's lazy regularisation: `lazy_r1`).
   Before `discriminator_start` the discriminator, its optimizer and the LeCam EMAs stay as
   they are.

The generator's backward pass is a single vjp: the gradients of the pixel/perceptual terms and
of the adversarial term with respect to the reconstruction are combined, then pulled back
through the tokenizer once. The adaptive weight pulls each of the two back separately too, but
only the decoder's output kernel of those is used, so XLA keeps only that last layer's part.

EMA warm-up (`ema_warmup`, on by default): the EMA starts as a copy of the random init, so at
a constant decay d it still holds d**t of it after t steps (e**-2 ~ 13.5 % at d = 0.9999, step
20k). With the warm-up the update at step t uses d_t = min(d, (1 + t) / (10 + t)), t counting
the optimizer steps taken with this one (t = 1 at the first): TensorFlow's
ExponentialMovingAverage with num_updates (tensorflow/python/training/moving_averages.py),
counted as latent-diffusion's LitEma with use_num_upates does (CompVis/latent-diffusion
ldm/modules/ema.py; Open-MAGVIT2's copy turns it off by default). d_t reaches d only at
t = (10 d - 1) / (1 - d), ~900 steps at d = 0.99, ~90k at d = 0.9999; before that the EMA
averages over roughly the last t / 9 steps. The effective decay of the last update is saved
with every checkpoint (`ema_record`; read it back with core/runtime/checkpoint.py
`read_meta`). Nothing is added to the train state, so runs saved without the warm-up resume;
their saved config lacks `ema_warmup`, so a resume under a config with it on applies the cap
from the resumed step on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from visual_tokenizers.core.data.images import to_model
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.models.conv import ConvDecoder
from visual_tokenizers.models.vit import ViTDecoder
from visual_tokenizers.tokenizers import losses

# The decoder layer whose gradients set the adaptive generator weight (taming: `last_layer`).
OUTPUT_LAYERS = {ViTDecoder: "to_pixels", ConvDecoder: "conv_out"}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """config.loss: weights of every tokenizer training term (0 leaves a term out)."""

    l2_weight: float = 1.0
    l1_weight: float = 0.0
    perceptual_weight: float = 0.0  # LPIPS (VGG16), weights from lpips_vgg16 / lpips_weights
    lpips_vgg16: str = ""  # '' = the weights cache (core/weights.py)
    lpips_weights: str = ""
    adversarial_weight: float = 0.0  # generator's adversarial weight; 0 = no discriminator
    gan_loss: str = "non_saturating"  # or 'hinge'
    generator_gan_loss: str = ""  # '' = gan_loss; set to pair e.g. a hinge D with a non-sat. G
    generator_image_mean: bool = False  # G's loss on each image's mean logit (Open-MAGVIT2)
    discriminator_start: int = 0  # step from which the adversarial terms are on
    discriminator_loss_scale: float = 1.0  # multiplies D's real + fake loss
    adaptive_weight: bool = False  # taming-transformers' ||grad rec|| / ||grad gan||
    adaptive_weight_max: float = 1e4
    r1_cost: float = 0.0  # R1 weight on E ||grad_x D(x)||^2 (MaskGIT: grad_penalty_cost)
    r1_every: int = 1  # lazy R1: every k steps, scaled by k
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999  # EMA of the mean real / fake logits

    @classmethod
    def from_dict(cls, values: dict) -> LossConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"config.loss has unknown keys {unknown}; known: {sorted(known)}")
        config = cls(**values)
        losses.check_gan_loss(config.gan_loss)
        if config.generator_gan_loss:
            losses.check_gan_loss(config.generator_gan_loss, "loss.generator_gan_loss")
        if config.r1_every < 1:
            raise ConfigError(f"loss.r1_every must be >= 1, got {config.r1_every}")
        return config

    @property
    def uses_discriminator(self) -> bool:
        return self.adversarial_weight > 0


def ema_decay_at(decay: float, t, warmup: bool = True) -> jax.Array:
    """The decay of EMA update number t (t = 1 at the first step): min(decay, (1 + t) / (10 + t))
    with the warm-up, else decay; float32, as the train step uses it."""
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    t = jnp.asarray(t, jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def ema_record(decay: float, warmup: bool, step: int) -> dict:
    """What a checkpoint at `step` records about the EMA it holds ({} without one): the
    configured decay, the warm-up switch and `effective_decay`, the decay of its last update."""
    if not decay:
        return {}
    effective = float(ema_decay_at(decay, step, warmup)) if step else None  # none made yet
    return {
        "ema": {"decay": decay, "warmup": warmup, "updates": step, "effective_decay": effective}
    }


def output_kernel_path(model) -> tuple[str, ...]:
    """Path of the decoder's output kernel in the params tree (for the adaptive weight)."""
    for cls, name in OUTPUT_LAYERS.items():
        if isinstance(model.decoder, cls):
            return ("decoder", name, "kernel")
    raise ConfigError(
        f"loss.adaptive_weight needs the decoder's output layer; {type(model.decoder).__name__} "
        f"is not in tokenizers/training.py OUTPUT_LAYERS"
    )


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _apply(model_def: ts.ModelDef, params, model_state, x):
    """Calls a merged module on x; returns (output, its variables after the call)."""
    model = model_def.merge(params, model_state)
    return model(x), ts.model_state_of(model)


def make_train_step(
    model_def: ts.ModelDef,
    optimizer: optax.GradientTransformation,
    loss_config: dict,
    *,
    discriminator_optimizer: optax.GradientTransformation | None = None,
    ema_decay: float = 0.0,
    ema_warmup: bool = True,
    lpips_def=None,
    adaptive_path: tuple[str, ...] | None = None,
):
    """train_step(state, batch, frozen) -> (state, metrics); `frozen` holds fixed networks'
    weights passed as arguments rather than baked into the program ({'lpips': params} or {}).

    lpips_def: graphdef of models.lpips.LPIPS (needed when perceptual_weight > 0).
    adaptive_path: `output_kernel_path(model)` (needed when loss.adaptive_weight).
    """
    cfg = LossConfig.from_dict(loss_config)
    if cfg.perceptual_weight and lpips_def is None:
        raise ValueError("loss.perceptual_weight > 0 needs the LPIPS network (lpips_def)")
    if cfg.uses_discriminator and discriminator_optimizer is None:
        raise ValueError("loss.adversarial_weight > 0 needs a discriminator optimizer")
    step = TokenizerStep(
        model_def,
        optimizer,
        cfg,
        discriminator_optimizer,
        ema_decay,
        lpips_def,
        adaptive_path,
        ema_warmup,
    )
    return step.train_step


# eq=False: hashed by identity, so jit can key its cache on the bound `train_step`.
@dataclasses.dataclass(frozen=True, eq=False)
class TokenizerStep:
    """The named parts of one tokenizer train step; `make_train_step` checks and builds it."""

    model_def: ts.ModelDef
    optimizer: optax.GradientTransformation
    cfg: LossConfig
    discriminator_optimizer: optax.GradientTransformation | None = None
    ema_decay: float = 0.0
    lpips_def: Any = None
    adaptive_path: tuple[str, ...] | None = None
    ema_warmup: bool = True

    def train_step(self, state: ts.TrainState, batch, frozen=None):
        """Generator update, EMA, then the discriminator on the same batch and reconstructions."""
        images = to_model(batch["image"])
        gan_on = state.step >= self.cfg.discriminator_start
        new, fakes, logged = self.generator_update(state, images, frozen or {}, gan_on)
        if self.ema_decay:
            new = self.ema_update(new, state.ema_params)
        if self.cfg.uses_discriminator:

            def update():
                return self.discriminator_update(state.discriminator, images, fakes, state.step)

            def keep():  # Before discriminator_start: no update, zeros logged.
                logged = jax.tree.map(jnp.zeros_like, jax.eval_shape(update)[1])
                return state.discriminator, logged

            disc, d_logged = jax.lax.cond(gan_on, update, keep)
            new = new.replace(discriminator=disc)
            logged.update(d_logged, **{"gan/active": gan_on.astype(jnp.float32)})
        return new.replace(step=state.step + 1), logged

    # ------------------------------------------------------------------ generator

    def pixel_terms(self, images, reconstructions, frozen):
        """(total, {name: weighted term}) of the L2 / L1 and perceptual (LPIPS) losses."""
        cfg = self.cfg
        terms = losses.reconstruction_losses(
            images, reconstructions, l1_weight=cfg.l1_weight, l2_weight=cfg.l2_weight
        )
        if cfg.perceptual_weight:
            lpips = nnx.merge(self.lpips_def, frozen["lpips"])
            terms["perceptual"] = cfg.perceptual_weight * jnp.mean(lpips(images, reconstructions))
        return sum(terms.values()), terms

    def reconstruct(self, state: ts.TrainState, images):
        """The tokenizer's forward pass, kept open for one pull-back: returns
        ((reconstructions, quantizer total), pull_back, (quantizer terms, stats, model state))."""

        def forward(params):
            model = self.model_def.merge(params, state.model_state)
            reconstructions, quantized = model(images, train=True)
            quantizer_total = sum(quantized.losses.values(), jnp.zeros((), jnp.float32))
            aux = (quantized.losses, quantized.stats, ts.model_state_of(model))
            return (reconstructions, quantizer_total), aux

        return jax.vjp(forward, state.params, has_aux=True)

    def adversarial_cotangent(self, disc, recon, pixel_grad, pull_back, quantizer_total):
        """(weighted gradient of the adversarial term w.r.t. `recon`, its weighted value, the
        adaptive weight (1 when off)); the gradient is added to the pixel terms' cotangent."""
        cfg = self.cfg

        def adversarial(r):
            logits, _ = _apply(self.model_def.discriminator, disc.params, disc.model_state, r)
            kind = cfg.generator_gan_loss or cfg.gan_loss
            return losses.generator_loss(logits, kind, image_mean=cfg.generator_image_mean)

        gan_value, gan_grad = jax.value_and_grad(adversarial)(recon)
        adaptive = jnp.ones((), jnp.float32)
        if cfg.adaptive_weight:

            def last_layer(g):  # XLA keeps only the output layer's part of this pull-back.
                zero = jnp.zeros_like(quantizer_total)
                return _at(pull_back((g, zero))[0], self.adaptive_path)

            adaptive = losses.adaptive_generator_weight(
                last_layer(pixel_grad), last_layer(gan_grad), max_weight=cfg.adaptive_weight_max
            )
        weight = cfg.adversarial_weight * adaptive
        return weight * gan_grad, weight * gan_value, adaptive

    def generator_update(self, state: ts.TrainState, images, frozen, gan_on):
        """(state with the tokenizer updated, reconstructions without gradient, logged)."""
        cfg = self.cfg
        (recon, quantizer_total), pull_back, aux = self.reconstruct(state, images)
        quantizer_terms, stats, model_state = aux
        (pixel_total, terms), pixel_grad = jax.value_and_grad(self.pixel_terms, 1, has_aux=True)(
            images, recon, frozen
        )
        cotangent, logged = pixel_grad, {}
        if cfg.uses_discriminator:

            def active():
                return self.adversarial_cotangent(
                    state.discriminator, recon, pixel_grad, pull_back, quantizer_total
                )

            # Before discriminator_start the adversarial term is skipped, not just zeroed.
            gan_grad, terms["adversarial"], adaptive = jax.lax.cond(
                gan_on, active, lambda: jax.tree.map(jnp.zeros_like, jax.eval_shape(active))
            )
            cotangent = pixel_grad + gan_grad
            if cfg.adaptive_weight:
                logged["gan/adaptive_weight"] = adaptive
        # The single pull-back of the combined cotangent through the tokenizer.
        (grads,) = pull_back((cotangent, jnp.ones_like(quantizer_total)))
        params, opt_state = ts.apply_gradients(self.optimizer, state, grads)
        terms.update(quantizer_terms)
        logged.update({f"loss/{k}": v for k, v in terms.items()})
        logged.update({f"quantizer/{k}": v for k, v in stats.items()})
        logged["loss"] = pixel_total + quantizer_total + terms.get("adversarial", 0.0)
        logged["grad_norm"] = optax.global_norm(grads)
        state = state.replace(params=params, model_state=model_state, opt_state=opt_state)
        return state, jax.lax.stop_gradient(recon), logged

    def ema_update(self, state: ts.TrainState, ema_params) -> ts.TrainState:
        """ema = d_t * ema + (1 - d_t) * the just-updated params; `state.step` is still the
        count before this step, so this is update t = step + 1 (module docstring)."""
        decay = ema_decay_at(self.ema_decay, state.step + 1, self.ema_warmup)
        ema = optax.incremental_update(state.params, ema_params, 1.0 - decay)
        return state.replace(ema_params=ema)

    # ------------------------------------------------------------------ discriminator

    def discriminator_loss(self, d_params, disc, images, fakes, step):
        """(total, (weighted terms, D's model state, mean real / fake logits))."""
        cfg, d_def = self.cfg, self.model_def.discriminator
        real, d_state = _apply(d_def, d_params, disc.model_state, images)
        fake, d_state = _apply(d_def, d_params, d_state, fakes)
        terms = {
            "discriminator": cfg.discriminator_loss_scale
            * losses.discriminator_loss(real, fake, cfg.gan_loss)
        }
        if cfg.lecam_weight:
            terms["lecam"] = cfg.lecam_weight * losses.lecam_penalty(
                real, fake, disc.lecam["real"], disc.lecam["fake"]
            )
        if cfg.r1_cost:
            terms["r1"] = self.lazy_r1(d_params, disc, images, step)
        means = {"real": jnp.mean(real), "fake": jnp.mean(fake)}
        return sum(terms.values()), (terms, d_state, means)

    def lazy_r1(self, d_params, disc, images, step):
        """The weighted R1 penalty every `r1_every` steps (scaled by it), else 0."""
        cfg, d_def = self.cfg, self.model_def.discriminator

        def r1():
            # A fresh module per call: BatchNorm updates stay inside this branch.
            return losses.r1_penalty(
                lambda x: _apply(d_def, d_params, disc.model_state, x)[0], images
            )

        due = step % cfg.r1_every == 0
        penalty = jax.lax.cond(due, r1, lambda: jnp.zeros((), jnp.float32))
        return cfg.r1_cost * cfg.r1_every * penalty

    def discriminator_update(self, disc, images, fakes, step):
        """(DiscriminatorState after one optimizer step and the LeCam EMA move, logged)."""
        cfg = self.cfg
        grad_fn = jax.value_and_grad(self.discriminator_loss, has_aux=True)
        (_, (terms, d_state, means)), grads = grad_fn(disc.params, disc, images, fakes, step)
        updates, opt_state = self.discriminator_optimizer.update(grads, disc.opt_state, disc.params)
        params = optax.apply_updates(disc.params, updates)
        lecam = {
            k: cfg.lecam_decay * disc.lecam[k] + (1 - cfg.lecam_decay) * means[k] for k in means
        }
        new = disc.replace(params=params, model_state=d_state, opt_state=opt_state, lecam=lecam)
        logged = {f"loss/{k}": v for k, v in terms.items()}
        logged.update({"gan/logits_real": means["real"], "gan/logits_fake": means["fake"]})
        return new, logged
