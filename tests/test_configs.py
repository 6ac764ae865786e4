"""Every config imports, its tiny variant builds what its job builds, and config mistakes give
clear errors."""

import glob
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import run
from jobs import train_tokenizer
from tokenizers import training

CONFIG_FILES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
    if not os.path.basename(p).startswith(("_", "common"))
)


def _check_tokenizer_config(full, tiny):
    assert tiny.data.image_size <= 64 and tiny.data.train.startswith("builtin:")
    model = train_tokenizer.model_fn_from_config(tiny)()
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) > 0
    # The full model is only traced abstractly: no memory is allocated.
    abstract = nnx.eval_shape(train_tokenizer.model_fn_from_config(full))
    assert abstract.vocab.size > 0
    # The training recipe: loss keys valid, discriminator buildable (abstractly).
    for config in (full, tiny):
        training.LossConfig.from_dict(config.loss.to_dict())
        disc = train_tokenizer.discriminator_from_config(config)
        assert (disc is not None) == (config.loss.adversarial_weight > 0)
        if disc is not None:
            images = jax.ShapeDtypeStruct(
                (1, config.data.image_size, config.data.image_size, 3), jnp.float32
            )
            logits = jax.eval_shape(lambda x, d=disc: d.model_fn()(x), images)
            assert logits.shape[0] == 1


def _check_export_config(full, tiny):
    from jobs import export_tokens

    assert tiny.data.source.startswith("builtin:")
    export_tokens.validate_config(tiny)
    export_tokens.validate_config(full, require_tokenizer=False)


def _check_classifier_config(full, tiny):
    from jobs import train_classifier

    assert tiny.data.train.startswith("builtin:") and tiny.num_steps <= full.num_steps
    model = train_classifier.model_fn_from_config(tiny)()
    images = jax.ShapeDtypeStruct((2, tiny.data.image_size, tiny.data.image_size, 3), np.uint8)
    assert jax.eval_shape(lambda x: model(x), images).shape == (2, tiny.model.num_classes)


def _check_evaluate_config(full, tiny):
    """Nothing of its own to build; the tiny variant must run offline (no Inception or VGG)."""
    from jobs import evaluate

    for config in (full, tiny):
        config.tokenizer.workdir = "some_run"
        evaluate.validate(config)
    assert set(tiny.metrics) <= {"psnr", "ssim", "usage", "shapes"}


# config.job -> what its tiny variant must pass. Jobs without an entry are still imported,
# dispatched by run.py and given an unknown variant below.
JOB_CHECKS = {
    "train_tokenizer": _check_tokenizer_config,
    "export_tokens": _check_export_config,
    "train_classifier": _check_classifier_config,
    "evaluate": _check_evaluate_config,
}


def test_there_are_configs():
    assert "vq_b16" in CONFIG_FILES


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_full_and_tiny_build(name):
    module = importlib.import_module(f"configs.{name}")
    full, tiny = module.get_config(), module.get_config("tiny")
    assert full.job == tiny.job and full.job in run.JOBS
    assert importlib.import_module(run.JOBS[full.job]).run
    check = JOB_CHECKS.get(full.job)
    if check is not None:
        check(full, tiny)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_unknown_variant_is_an_error(name):
    module = importlib.import_module(f"configs.{name}")
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("huge")


def test_vq_b16_matches_the_published_recipe():
    config = importlib.import_module("configs.vq_b16").get_config()
    assert config.data.image_size // config.model.encoder.patch_size == 16
    assert config.quantizer.codebook_size == 16384
    assert config.quantizer.code_dim == 8 and config.quantizer.l2_normalize
    assert (config.model.encoder.width, config.model.encoder.depth) == (768, 12)
    abstract = nnx.eval_shape(train_tokenizer.model_fn_from_config(config))
    assert abstract.vocab.size == 16384
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract.encoder)))
    assert 85e6 < count < 87e6  # ViT-B/16 backbone: ~86M parameters
