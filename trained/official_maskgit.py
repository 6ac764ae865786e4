"""MaskGIT's released checkpoints (tokenizer and class-conditional transformer, ImageNet 256 and
512) turned into our workdirs: what jobs/import_maskgit.py runs.

The released files are `flax.serialization` msgpack bytes of the Flax variables
({'params': ...}), read by the official `maskgit.utils.restore_from_path` with
`flax.serialization.from_bytes(None, data)`, i.e. `msgpack_restore`. Every array is mapped onto
our modules by name (models/conv.py `maskgit_param_names` for the VQGAN, models/
maskgit_official.py `official_param_names` for the transformer); a file whose tree or shapes
differ is refused naming the first difference. Each workdir is a step-0 checkpoint with the
config that rebuilds the model, as `trained/` `from_workdir` reads it, and the sha256 of the
file it came from (its config's `imported` section and the checkpoint's meta).
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, serialization

from visual_tokenizers.configs import maskgit_b16, vqgan_f16
from visual_tokenizers.core.runtime import checkpoint
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.core.tokens.layout import Vocab
from visual_tokenizers.models.conv import maskgit_param_names
from visual_tokenizers.models.maskgit_official import official_param_names
from visual_tokenizers.trained import builders
from visual_tokenizers.trained import maskgit as trained_maskgit

# Where the four files are linked (google-research/maskgit README, "Running pretrained models").
SOURCE = "https://storage.googleapis.com/maskgit-public/checkpoints/ (google-research/maskgit)"


class WrongWeights(checkpoint.CheckpointError):
    """A file that is not the released checkpoint this import expects (tree or shapes)."""


def read_checkpoint(path: str, what: str) -> tuple[dict, str]:
    """(variables tree, sha256 hex) of a released msgpack file, read as the official code does."""
    if not path or not os.path.isfile(path):
        raise checkpoint.CheckpointError(
            f"the MaskGIT {what} checkpoint {path!r} is not a file; download it from {SOURCE} "
            f"(README 'Reproducing MaskGIT') and pass its path"
        )
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as err:  # msgpack raises several unrelated types on bad bytes
        raise WrongWeights(
            f"{path} is not a flax msgpack checkpoint ({type(err).__name__}: {err}); pass the "
            f"released MaskGIT {what} file"
        ) from None
    if not isinstance(tree, dict):
        raise WrongWeights(f"{path} holds a {type(tree).__name__}, not Flax variables")
    return tree, digest


def _flat(tree, prefix=()) -> dict[tuple, object]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, (*prefix, key)))
        return out
    return {prefix: tree}


def copy_params(module: nnx.Module, variables: dict, names: dict, where: str) -> None:
    """Copies `variables` (their whole tree) into `module`'s params; `names`: our path -> their
    path under 'params'. Refuses, naming the first difference in sorted order, a missing or
    extra array or a shape that differs."""
    theirs = _flat(variables)
    wanted = {("params", *path): ours for ours, path in names.items()}
    state = nnx.state(module, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    fix = "pass the released file for this model and image size (README 'Reproducing MaskGIT')"
    for path in sorted(set(theirs) | set(wanted), key=lambda p: tuple(map(str, p))):
        name = "/".join(map(str, path))
        if path not in theirs:
            raise WrongWeights(f"{where} has no array {name}: {fix}")
        if path not in wanted:
            raise WrongWeights(f"{where} has an unexpected array {name}: {fix}")
        target, value = flat[wanted[path]], theirs[path]
        if tuple(target.shape) != tuple(value.shape):
            raise WrongWeights(
                f"{where}: {name} has shape {tuple(value.shape)}, the model built from the "
                f"config expects {tuple(target.shape)}: {fix}"
            )
        target.set_value(jnp.asarray(value, target.dtype))
    nnx.update(module, state)


def tokenizer_names(tokenizer) -> dict[tuple, tuple]:
    """Our tokenizer's param paths -> the official VQVAE's (encoder, decoder, codebook)."""
    names = {("quantizer", "codebook"): ("quantizer", "codebook")}
    for part in ("encoder", "decoder"):
        for ours, theirs in maskgit_param_names(getattr(tokenizer, part)).items():
            names[(part, *ours)] = (part, *theirs)
    return names


def tokenizer_config(c) -> ml_collections.ConfigDict:
    """The train_tokenizer config of the official VQGAN (configs/vqgan_f16.py) at c's sizes."""
    config = vqgan_f16.get_config()
    t = c.tokenizer
    conv = dict(
        filters=t.filters,
        channel_multipliers=tuple(t.channel_multipliers),
        num_res_blocks=t.num_res_blocks,
        unit_range=True,  # trained on [0, 1] images: models/conv.py
    )
    config.model.update(latent_dim=t.embedding_dim, dtype=c.dtype, encoder=conv, decoder=conv)
    config.quantizer.codebook_size = t.codebook_size
    config.data.image_size = c.image_size
    config.mesh = c.mesh
    return config


def maskgit_config(c, tokenizer_record: dict, grid: int) -> ml_collections.ConfigDict:
    """The train_maskgit config (configs/maskgit_b16.py) of the official transformer, with the
    `resolved` tokens section a training run would have saved."""
    config = maskgit_b16.maskgit_base()
    config.model.update(architecture="official", num_classes=c.num_classes, dtype=c.dtype)
    config.model.update(c.transformer.to_dict())
    config.tokenizer.workdir = tokenizer_record["workdir"]
    config.mesh = c.mesh
    config.resolved = dict(
        vocab=Vocab(size=c.tokenizer.codebook_size).to_dict(),
        token_shape=[grid, grid],
        num_classes=int(c.num_classes),
        class_names=[],
        tokenizer=tokenizer_record,
        tokens="imported: the released MaskGIT checkpoint",
        num_examples=0,
    )
    return config


def abstract_model(model_fn) -> nnx.Module:
    """model_fn()'s module with abstract params (copy_params fills every one) and real other
    state (usage counters, ...): no random init is drawn or compiled for weights that the file
    replaces (eager init compiles each initializer: 40 s for the tiny VQGAN on 2 CPU cores)."""
    model = nnx.eval_shape(model_fn)
    nnx.update(model, jax.jit(lambda: nnx.state(model_fn(), nnx.Not(nnx.Param)))())
    return model


def save_step0(workdir: str, config, model: nnx.Module, imported: dict) -> None:
    """`model`'s weights as step 0 of `workdir`, with `config` (plus `imported`) and meta."""
    _, params, rest = ts.split_model(model)
    config = ml_collections.ConfigDict(config.to_dict())
    config.imported = imported
    state = ts.TrainState(jnp.zeros((), jnp.int32), params, rest, None)
    manager = checkpoint.manager(workdir, keep=1, async_save=False)
    checkpoint.save(manager, 0, state, config.to_dict(), meta={"imported": imported})
    manager.close()


def imported_record(workdir: str) -> dict | None:
    """The `imported` meta of a workdir this module wrote; None when it holds no checkpoint."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    try:
        return checkpoint.read_meta(workdir)[1].get("imported") or {}
    except checkpoint.CheckpointError:
        return None


def import_tokenizer(c, path: str, workdir: str) -> dict:
    """The released tokenizer file -> a tokenizer workdir; returns its `imported` record."""
    variables, digest = read_checkpoint(path, "tokenizer")
    config = tokenizer_config(c)
    model = abstract_model(builders.model_fn_from_config(config))
    copy_params(model, variables, tokenizer_names(model), path)
    record = {"file": os.path.abspath(path), "sha256": digest, "source": SOURCE}
    save_step0(workdir, config, model, record)
    return record


def import_transformer(c, path: str, workdir: str, tokenizer_workdir: str) -> dict:
    """The released transformer file -> a MaskGIT workdir whose tokens are the tokenizer's."""
    variables, digest = read_checkpoint(path, "transformer")
    factor = 2 ** (len(c.tokenizer.channel_multipliers) - 1)
    tokenizer = {"workdir": os.path.abspath(tokenizer_workdir), "step": 0, "weights": "params"}
    config = maskgit_config(c, tokenizer, c.image_size // factor)
    model = abstract_model(trained_maskgit.model_fn_from_config(config))
    copy_params(model, variables, official_param_names(model), path)
    record = {"file": os.path.abspath(path), "sha256": digest, "source": SOURCE}
    save_step0(workdir, config, model, record)
    return record
