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

from visual_tokenizers import run
from visual_tokenizers.core.runtime import train_state
from visual_tokenizers.tokenizers import training
from visual_tokenizers.trained import builders

CONFIG_FILES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
    if not os.path.basename(p).startswith(("_", "common"))
)


def _check_tokenizer_config(full, tiny):
    assert tiny.data.image_size <= 64 and tiny.data.source.startswith("builtin:")
    model = builders.model_fn_from_config(tiny)()
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) > 0
    # The full model is only traced abstractly: no memory is allocated.
    abstract = nnx.eval_shape(builders.model_fn_from_config(full))
    assert abstract.vocab.size > 0
    # The training recipe: loss keys valid, discriminator buildable (abstractly).
    for config in (full, tiny):
        training.LossConfig.from_dict(config.loss.to_dict())
        disc = builders.discriminator_from_config(config)
        assert (disc is not None) == (config.loss.adversarial_weight > 0)
        if disc is not None:
            images = jax.ShapeDtypeStruct(
                (1, config.data.image_size, config.data.image_size, 3), jnp.float32
            )
            logits = jax.eval_shape(lambda x, d=disc: d.model_fn()(x), images)
            assert logits.shape[0] == 1


def _check_export_config(full, tiny):
    from visual_tokenizers.jobs import export_tokens

    assert tiny.data.source.startswith("builtin:")
    export_tokens.validate_config(tiny)
    export_tokens.validate_config(full, require_tokenizer=False)


def _check_classifier_config(full, tiny):
    from visual_tokenizers.trained import classifier

    assert tiny.data.source.startswith("builtin:") and tiny.num_steps <= full.num_steps
    model = classifier.model_fn_from_config(tiny)()
    images = jax.ShapeDtypeStruct((2, tiny.data.image_size, tiny.data.image_size, 3), np.uint8)
    assert jax.eval_shape(lambda x: model(x), images).shape == (2, tiny.model.num_classes)


def _check_evaluate_config(full, tiny):
    """Nothing of its own to build; the tiny variant must run offline (no Inception or VGG)."""
    from visual_tokenizers.jobs import evaluate

    for config in (full, tiny):
        config.tokenizer.workdir = "some_run"
        evaluate.validate(config)
    assert set(tiny.metrics) <= {"psnr", "ssim", "usage", "shapes"}
    assert tuple(full.pipelines) == ("adm", "pytorch_fid")


def _check_reference_batch_config(full, tiny):
    """The tiny variant runs offline on built-in data; both pass the job's checks."""
    from visual_tokenizers.jobs import reference_batch

    assert tiny.data.source.startswith("builtin:") and tiny.data.image_size <= 64
    for config in (full, tiny):
        reference_batch.validate(config)


def _tokenizer_of(config):
    """The tokenizer config a MaskGIT config's tokens come from (binary when it factorises)."""
    name = "binary_b16" if config.model.head_group_bits else "vq_b16"
    return importlib.import_module(f"visual_tokenizers.configs.{name}")


def _check_maskgit_config(full, tiny):
    """The tiny MaskGIT builds and trains one step on its tiny tokenizer's token grid; the full
    one is traced abstractly on the full tokenizer's vocabulary and 16x16 grid."""
    from ml_collections import ConfigDict

    from visual_tokenizers.jobs import train_maskgit
    from visual_tokenizers.trained import maskgit

    assert tiny.data.source.startswith("builtin:") and tiny.data.image_size <= 64
    module = _tokenizer_of(full)
    cases = [(tiny, "tiny")] + ([] if full.data.source.startswith("builtin:") else [(full, None)])
    for config, variant in cases:
        tok = module.get_config(variant)
        vocab = nnx.eval_shape(builders.model_fn_from_config(tok)).vocab
        grid = tok.data.image_size // tok.model.encoder.patch_size
        config = ConfigDict(config.to_dict())
        config.resolved = {"vocab": vocab.__dict__, "token_shape": [grid, grid], "num_classes": 10}
        if variant is None:
            abstract = nnx.eval_shape(maskgit.model_fn_from_config(config))
            assert abstract.token_shape == (16, 16) and len(abstract.blocks) == full.model.depth
            continue
        model = maskgit.model_fn_from_config(config)()
        optimizer, lr_fn = train_maskgit.optimizer_from_config(config)
        model_def, params, rest = train_state.split_model(model)
        step = train_maskgit.make_train_step(
            train_state.ModelDef(model_def), optimizer, lr_fn, seed=0, loss=config.loss.to_dict()
        )
        state = train_state.TrainState(np.int32(0), params, rest, optimizer.init(params))
        tokens = np.zeros((2, grid, grid), np.int32) + (np.arange(2)[:, None, None] % 7)
        batch = {"tokens": tokens, "label": np.arange(2, dtype=np.int32)}
        _, out = jax.eval_shape(step, state, batch)
        assert out["loss"].shape == ()


def _check_sample_config(full, tiny):
    from visual_tokenizers.jobs import sample

    sample.validate(tiny)
    full.maskgit.workdir = "some_run"
    sample.validate(full)
    assert tiny.num_samples % tiny.batch_size == 0 and tiny.batch_size % 8 == 0


def _check_import_config(full, tiny):
    """Both workdir configs of an import build (full ones abstractly) at the expected grid."""
    from visual_tokenizers.jobs import import_maskgit
    from visual_tokenizers.trained import maskgit
    from visual_tokenizers.trained import official_maskgit as om

    for config, grid in ((full, 16), (tiny, 8)):
        config.update(tokenizer_path="t", maskgit_path="m")
        import_maskgit.validate(config)
        tok = nnx.eval_shape(builders.model_fn_from_config(om.tokenizer_config(config)))
        assert tok.vocab.size == config.tokenizer.codebook_size
        record = {"workdir": "t", "step": 0, "weights": "params"}
        mg = nnx.eval_shape(maskgit.model_fn_from_config(om.maskgit_config(config, record, grid)))
        assert mg.token_shape == (grid, grid) and len(mg.blocks) == config.transformer.depth


def _check_demo_config(full, tiny):
    """Every stage's sub-config is CPU-sized and passes its own job's check."""
    for key, check in (("tokenizer", _check_tokenizer_config), ("export", _check_export_config),
                       ("maskgit", _check_maskgit_config), ("sample", _check_sample_config),
                       ("classifier", _check_classifier_config),
                       ("evaluate", _check_evaluate_config)):  # fmt: skip
        assert full[key].to_dict() == tiny[key].to_dict() and tiny[key].job in run.JOBS
        check(tiny[key], tiny[key])  # the demo's default is its CPU size too


# config.job -> what its tiny variant must pass. Jobs without an entry are still imported,
# dispatched by run.py and given an unknown variant below.
JOB_CHECKS = {
    "train_tokenizer": _check_tokenizer_config,
    "export_tokens": _check_export_config,
    "train_classifier": _check_classifier_config,
    "evaluate": _check_evaluate_config,
    "train_maskgit": _check_maskgit_config,
    "sample": _check_sample_config,
    "demo": _check_demo_config,
    "reference_batch": _check_reference_batch_config,
    "import_maskgit": _check_import_config,
}


def test_there_are_configs():
    assert "vq_b16" in CONFIG_FILES


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_full_and_tiny_build(name):
    module = importlib.import_module(f"visual_tokenizers.configs.{name}")
    full, tiny = module.get_config(), module.get_config("tiny")
    assert full.job == tiny.job and full.job in run.JOBS
    assert importlib.import_module(run.JOBS[full.job]).run
    check = JOB_CHECKS.get(full.job)
    if check is not None:
        check(full, tiny)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_unknown_variant_is_an_error(name):
    module = importlib.import_module(f"visual_tokenizers.configs.{name}")
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("huge")


def test_vq_b16_matches_the_published_recipe():
    config = importlib.import_module("visual_tokenizers.configs.vq_b16").get_config()
    assert config.data.image_size // config.model.encoder.patch_size == 16
    assert config.quantizer.codebook_size == 16384
    assert config.quantizer.code_dim == 8 and config.quantizer.l2_normalize
    assert (config.model.encoder.width, config.model.encoder.depth) == (768, 12)
    abstract = nnx.eval_shape(builders.model_fn_from_config(config))
    assert abstract.vocab.size == 16384
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract.encoder)))
    assert 85e6 < count < 87e6  # ViT-B/16 backbone: ~86M parameters
