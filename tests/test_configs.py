"""Every config imports, its tiny variant builds, and config mistakes give clear errors."""

import glob
import importlib
import os

import pytest
from flax import nnx

from jobs import train_tokenizer

CONFIG_FILES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
    if not os.path.basename(p).startswith(("_", "common"))
)


def test_there_are_configs():
    assert "vq_b16" in CONFIG_FILES


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_full_and_tiny_build(name):
    module = importlib.import_module(f"configs.{name}")
    full = module.get_config()
    tiny = module.get_config("tiny")
    assert tiny.data.image_size <= 64 and tiny.data.train.startswith("builtin:")
    model = train_tokenizer.model_fn_from_config(tiny)()
    params = nnx.state(model, nnx.Param)
    assert sum(x.size for x in __import__("jax").tree.leaves(params)) > 0
    # The full model is only traced abstractly: no memory is allocated.
    abstract = nnx.eval_shape(train_tokenizer.model_fn_from_config(full))
    assert abstract.vocab.size == full.quantizer.codebook_size


def test_unknown_variant_is_an_error():
    module = importlib.import_module("configs.vq_b16")
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("huge")


def test_vq_b16_matches_the_published_recipe():
    config = importlib.import_module("configs.vq_b16").get_config()
    assert config.data.image_size // config.model.encoder.patch_size == 16
    assert config.quantizer.codebook_size == 16384
    assert config.quantizer.code_dim == 8 and config.quantizer.l2_normalize
    assert (config.model.encoder.width, config.model.encoder.depth) == (768, 12)
    abstract = nnx.eval_shape(train_tokenizer.model_fn_from_config(config))
    count = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(abstract.encoder)))
    assert 85e6 < count < 87e6  # ViT-B/16 backbone: ~86M parameters
