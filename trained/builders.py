"""A tokenizer run's pieces from its config: the model, its optimizer, the discriminator, and
`save_untrained` (a step-0 checkpoint written as a training run writes it)."""

from __future__ import annotations

import functools

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.runtime import checkpoint, optim
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.models.discriminator import DISCRIMINATORS, build_discriminator
from visual_tokenizers.tokenizers.tokenizer import DTYPES, build_tokenizer


def model_fn_from_config(config):
    """() -> the tokenizer of a train_tokenizer config (seeded: every call builds the same)."""
    m = config.model
    return functools.partial(
        build_tokenizer,
        architecture=m.architecture,
        image_size=config.data.image_size,
        latent_dim=m.latent_dim,
        encoder=m.encoder.to_dict(),
        decoder=m.decoder.to_dict(),
        quantizer=config.quantizer.to_dict(),
        dtype=m.dtype,
        seed=config.seed,
    )


def optimizer_from_config(config):
    return optim.make_optimizer(**config.optimizer.to_dict(), total_steps=config.num_steps)


def discriminator_from_config(config) -> ts.Discriminator | None:
    """The discriminator and its optimizer, or None when loss.adversarial_weight is 0."""
    if not config.loss.adversarial_weight:
        return None
    name = config.discriminator.name
    if name not in DISCRIMINATORS:
        raise ConfigError(
            f"discriminator.name {name!r} is unknown; choose one of {sorted(DISCRIMINATORS)}"
        )
    model_fn = functools.partial(
        build_discriminator,
        name=name,
        image_size=config.data.image_size,
        seed=config.seed + 1,
        dtype=DTYPES[config.model.dtype],
        **config.discriminator[name].to_dict(),
    )
    optimizer = optim.make_optimizer(
        **config.discriminator_optimizer.to_dict(), total_steps=config.num_steps
    )
    return ts.Discriminator(model_fn, optimizer)


def save_untrained(config, workdir: str) -> None:
    """A step-0 checkpoint of `config`'s tokenizer, written as a training run writes it:
    what export, MaskGIT and sampling tests and benchmarks load without training first."""
    model_fn, optimizer = model_fn_from_config(config), optimizer_from_config(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    _, _, shardings = ts.state_shardings(model_fn, optimizer, mesh, rules)
    state = ts.init_state(model_fn, optimizer, shardings)
    manager = checkpoint.manager(workdir, keep=1, async_save=False)
    checkpoint.save(manager, 0, state, config.to_dict())
    manager.close()
