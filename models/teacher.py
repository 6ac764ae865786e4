"""A frozen ViT teacher (CLIP / SigLIP image tower) and big_vision .npz weights for our ViTs.

The teacher is a models/vit.py ViTEncoder without a head (out_dim=0): its features,
[B, H/p, W/p, width], are read at `layer` (`hidden_state`): 0 = the token outputs after the final
LayerNorm; -k = Hugging Face's `hidden_states[-k]`, the output of block depth + 1 - k without the
final LayerNorm (-1 the last block, -2 the one before it: TokenFlow's SigLIP layer). Its
weights are `TeacherWeight` variables, not nnx.Param, so they land in the train state's
`model_state` (no gradient, no optimizer state; the step carries them unchanged), keep their
logical sharding names (they are sharded like the matching params) and are saved in checkpoints
with the rest of the model.

Weights file: a .npz in the big_vision ViT / SigLIP layout; the keys, prefixes and what is
read are documented in models/big_vision_npz.py.

Use from a job, after the state is initialised fresh (not when resuming a checkpoint):
`init_train_state(state, config.teacher)`, or the two pure-dict steps `init_teacher` and
`init_semantic_encoder_from_teacher`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visual_tokenizers.core import weights as weights_lib
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.models.big_vision_npz import (  # noqa: F401  (re-exported: the teacher's file format)
    TRUNK_PARTS,
    TeacherWeightsError,
    big_vision_to_vit,
    load_vit_npz,
    save_vit_npz,
    trunk_of,
    vit_to_big_vision,
)
from visual_tokenizers.models.vit import ViTEncoder


class TeacherWeight(nnx.Variable):
    """Frozen teacher weights: never an nnx.Param, so never differentiated or optimised."""


def freeze(module: nnx.Module) -> nnx.Module:
    """Turns every nnx.Param inside `module` into a TeacherWeight (same value and metadata)."""
    for path, node in list(nnx.iter_graph(module)):
        if isinstance(node, nnx.Param):
            parent = module
            for key in path[:-1]:
                parent = parent[key] if isinstance(parent, nnx.List) else getattr(parent, key)
            setattr(parent, path[-1], TeacherWeight(node.get_value(), **node.get_metadata()))
    return module


def check_layer(layer: int, depth: int, name: str) -> int:
    """`layer` as an int, checked for a ViT of `depth` blocks (see `hidden_state`)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer <= 0:
        raise ConfigError(
            f"{name}={layer!r} must be an integer in [-{depth}, 0] for this {depth}-block ViT: "
            "0 = the output after the final LayerNorm, -k = the output of block depth + 1 - k "
            "without it (Hugging Face hidden_states[-k]; -2 = the penultimate block)"
        )
    return layer


def hidden_state(vit: ViTEncoder, images, layer: int = 0):
    """`vit`'s token features at `layer`, then its head if it has one.

    layer 0: exactly ViTEncoder's forward (all blocks, the final LayerNorm). layer -k
    (1 <= k <= depth): the residual stream after the first depth + 1 - k blocks, without the
    final LayerNorm, as Hugging Face's `output_hidden_states=True` gives it in
    `hidden_states[-k]` (TokenFlow reads SigLIP's `hidden_states[-2]`). 1-D encoders return
    their latent-query positions.
    """
    if layer == 0:  # ViTEncoder's own forward, also for a Teacher (whose __call__ reads `layer`)
        return ViTEncoder.__call__(vit, images)
    blocks = vit.transformer.blocks
    check_layer(layer, len(blocks), "layer")
    x = vit.patch_embed(images.astype(vit.dtype))
    x = einops.rearrange(x, "b h w c -> b (h w) c")
    if vit.num_latents:
        queries = vit.latent_queries[...].astype(vit.dtype)
        x = jnp.concatenate([x, jnp.broadcast_to(queries, (x.shape[0], *queries.shape[1:]))], 1)
    x = x + vit.transformer.pos_embedding[...].astype(vit.dtype)
    for block in list(blocks)[: len(blocks) + 1 + layer]:
        x = block(x)
    if vit.num_latents:
        x = x[:, -vit.num_latents :]
    if vit.head is not None:
        x = vit.head(x)
    return x if vit.num_latents else einops.rearrange(x, "b (h w) c -> b h w c", h=vit.grid)


class Teacher(ViTEncoder):
    """Frozen ViT feature extractor: images [B, H, W, 3] -> features [B, H/p, W/p, width] at
    `layer` (see `hidden_state`).

    Besides the weights it carries `num_heads` (so a weights file can be checked against it
    from the pure state alone) and `loaded` (True once real weights were put in).
    """

    def __init__(
        self, *, image_size, patch_size, width, depth, heads, mlp_dim, dtype, rngs, layer=0
    ):
        super().__init__(
            image_size=image_size, patch_size=patch_size, width=width, depth=depth,
            heads=heads, mlp_dim=mlp_dim, out_dim=0, dtype=dtype, rngs=rngs,
        )  # fmt: skip
        freeze(self)
        self.layer = check_layer(layer, depth, "model.decoder.teacher_layer")
        self.num_heads = TeacherWeight(jnp.asarray(heads, jnp.int32))
        self.loaded = TeacherWeight(jnp.asarray(False))

    def __call__(self, images):
        features = hidden_state(self, images, self.layer)
        return jax.lax.stop_gradient(features.astype(jnp.float32))


def _place(value, like):
    """value (host array) as an array with `like`'s dtype and, for jax arrays, its sharding."""
    value = np.asarray(value, dtype=like.dtype)
    if value.shape != like.shape:
        raise TeacherWeightsError(f"shape {value.shape} does not fit {like.shape}")
    if isinstance(like, jax.Array):
        return jax.make_array_from_callback(like.shape, like.sharding, lambda idx: value[idx])
    return jnp.asarray(value)


def resolve_weights_path(path: str) -> str:
    """`path` itself, or a file of that name in the weights cache ($TOKENIZERS_CACHE)."""
    if os.path.isfile(path):
        return path
    cached = os.path.join(weights_lib.cache_dir(), path)
    if os.path.isfile(cached):
        return cached
    raise TeacherWeightsError(
        f"config.teacher.weights={path!r}: no such file (nor {cached!r}). Point it at a local "
        "big_vision ViT .npz, e.g. the SigLIP B/16 256 image tower "
        "(gs://big_vision/siglip/webli_en_b16_256_60500360.npz, prefix params/img/)"
    )


def check_weights(teacher_cfg: Mapping, *, warn: bool = True) -> str | None:
    """The teacher weights file `teacher_cfg` names, checked to exist (before any model is
    built); None when there is none and `random_init` allows it (with a warning)."""
    path = teacher_cfg.get("weights") or ""
    if path:
        return resolve_weights_path(path)
    if teacher_cfg.get("random_init", False):
        if not warn:
            return None
        logging.warning(
            "teacher.random_init=True and no teacher.weights: the teacher is RANDOM, so the "
            "semantic features it gives (and the semantic branch trained on them) are "
            "meaningless. Use this for smoke tests only."
        )
        return None
    raise TeacherWeightsError(
        "config.teacher.weights is empty: the dual tokenizer needs a frozen teacher (a "
        "big_vision / SigLIP ViT .npz, layout in models/teacher.py). Set "
        "--config.teacher.weights=/path/to/teacher.npz, or --config.teacher.random_init=True "
        "for a smoke test with a random (meaningless) teacher."
    )


def init_teacher(model_state: Mapping, teacher_cfg: Mapping, *, key: str = "teacher") -> dict:
    """model_state with the teacher weights from `teacher_cfg['weights']` put in.

    teacher_cfg: {'weights': path to the .npz ('' = none), 'random_init': bool, 'prefix':
    key prefix in the file ('auto' = detect)}. With no weights path it raises, unless
    random_init is set: then the random teacher is kept and a warning says so. Arrays keep the
    dtype and sharding of model_state's (works multi-host: every process reads the file).
    """
    if key not in model_state:
        raise TeacherWeightsError(f"the model has no {key!r} state: is it a dual tokenizer?")
    path = check_weights(teacher_cfg)
    if path is None:
        return dict(model_state)
    teacher = model_state[key]
    heads = int(np.asarray(teacher["num_heads"]))
    loaded = load_vit_npz(path, teacher, heads, prefix=teacher_cfg.get("prefix", "auto"))
    new = dict(teacher)
    for part in TRUNK_PARTS:
        new[part] = jax.tree.map(_place, loaded[part], trunk_of(teacher)[part])
    new["loaded"] = _place(True, teacher["loaded"])
    logging.info("teacher: loaded %s (sha256 %s)", path, weights_lib.sha256_of(path))
    return {**model_state, key: new}


def init_semantic_encoder_from_teacher(
    params: Mapping, model_state: Mapping, *, encoder: str = "semantic_encoder",
    teacher: str = "teacher",
) -> dict:  # fmt: skip
    """params with the semantic encoder's trunk (patch_embed, transformer) set to the teacher's.

    The head (width -> latent) keeps its init. Latent queries of a 1-D encoder keep theirs too:
    only the first N (patch) rows of its position embedding come from the teacher.
    """
    if encoder not in params or teacher not in model_state:
        raise TeacherWeightsError(f"no params[{encoder!r}] or model_state[{teacher!r}]")

    def copy(path, dst, src):
        if dst.shape != src.shape:
            if path[-1].key == "pos_embedding" and dst.shape[2] == src.shape[2]:
                n = src.shape[1]
                return jax.device_put(dst.at[:, :n].set(src.astype(dst.dtype)), dst.sharding)
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise TeacherWeightsError(
                f"semantic encoder {name} has shape {dst.shape}, the teacher's {src.shape}: "
                "build the semantic encoder with the teacher's architecture"
            )
        # A copy: params and model_state are donated separately by the train step.
        return jax.device_put(src, dst.sharding, may_alias=False).astype(dst.dtype)

    trunk = jax.tree_util.tree_map_with_path(
        copy, trunk_of(params[encoder]), trunk_of(model_state[teacher])
    )
    return {**params, encoder: {**params[encoder], **trunk}}


def init_train_state(state, teacher_cfg: Mapping, *, init_semantic_encoder: bool | None = None):
    """A fresh core.train_state.TrainState with the teacher loaded (see `init_teacher`).

    With teacher_cfg['init_semantic_encoder'] (or the argument) the semantic encoder starts from
    the teacher, and so does the generator EMA when the state keeps one. Call it once after a
    fresh init, never on a resumed state (that would reset the trained semantic encoder).
    """
    model_state = init_teacher(state.model_state, teacher_cfg)
    state = state.replace(model_state=model_state)
    if init_semantic_encoder is None:
        init_semantic_encoder = teacher_cfg.get("init_semantic_encoder", True)
    if not init_semantic_encoder:
        return state
    params = init_semantic_encoder_from_teacher(state.params, model_state)
    state = state.replace(params=params)
    if getattr(state, "ema_params", None) is not None:
        state = state.replace(ema_params=jax.tree.map(jnp.copy, params))
    return state
