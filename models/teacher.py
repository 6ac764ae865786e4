"""A frozen ViT teacher (CLIP / SigLIP image tower) and big_vision .npz weights for our ViTs.

The teacher is a models/vit.py ViTEncoder without a head (out_dim=0): its features are the
token outputs after the final LayerNorm, [B, H/p, W/p, width]. Its weights are `TeacherWeight`
variables, not nnx.Param, so they land in the train state's `model_state` (no gradient, no
optimizer state; the step carries them unchanged), keep their logical sharding names (they are
sharded like the matching params) and are saved in checkpoints with the rest of the model.

Weights file: a .npz in the big_vision ViT layout (google-research/big_vision
big_vision/models/vit.py, unscanned or scanned Encoder), keys joined with '/', optionally under a
prefix: '' (plain ViT), 'params/' (a big_vision checkpoint) or 'params/img/' (a SigLIP / LiT
two-tower checkpoint: the image tower). With D = width, H = heads, p = patch size, N = tokens:

    embedding/kernel                                      [p, p, 3, D]
    embedding/bias                                        [D]
    pos_embedding                                         [1, N, D]  ('learn' posemb)
    Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias}                       [D]
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}/kernel
                                                          [D, H, D/H]
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}/bias
                                                          [H, D/H]
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/out/kernel  [H, D/H, D]
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/out/bias    [D]
    Transformer/encoderblock_{i}/LayerNorm_1/{scale,bias}                       [D]
    Transformer/encoderblock_{i}/MlpBlock_0/Dense_0/{kernel [D, mlp], bias [mlp]}
    Transformer/encoderblock_{i}/MlpBlock_0/Dense_1/{kernel [mlp, D], bias [D]}
    Transformer/encoder_norm/{scale,bias}                                       [D]

A scanned checkpoint ('Transformer/encoderblock/...' with a leading depth axis) is read too.
Other keys (head, MAPHead_0, the text tower) are ignored. A [cls] token ('cls', pool_type 'tok')
is not used: the teacher runs on patch tokens only, so such a model's features differ from the
original (a warning says so). A pos_embedding for another square grid is resampled bilinearly,
as big_vision's `resample_posemb` does. Both are pre-norm ViTs with LayerNorm eps 1e-6 and tanh
GELU, so the loaded teacher computes the big_vision function. The teacher sees the model's
images in [-1, 1], the SigLIP / big_vision input range; CLIP-normalised towers would need their
first layer folded (as big_vision's DeiT-3 conversions do).

Use from a job, after the state is initialised fresh (not when resuming a checkpoint):
`init_train_state(state, config.teacher)`, or the two pure-dict steps `init_teacher` and
`init_semantic_encoder_from_teacher`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from flax import nnx

from core import weights as weights_lib
from models.vit import ViTEncoder

_ATTN = "MultiHeadDotProductAttention_0"
_TRUNK = ("patch_embed", "transformer")  # the ViTEncoder parts a teacher file provides


class TeacherWeight(nnx.Variable):
    """Frozen teacher weights: never an nnx.Param, so never differentiated or optimised."""


class TeacherWeightsError(ValueError):
    """The teacher weights are missing or do not fit the model; the message says what to fix."""


def freeze(module: nnx.Module) -> nnx.Module:
    """Turns every nnx.Param inside `module` into a TeacherWeight (same value and metadata)."""
    for path, node in list(nnx.iter_graph(module)):
        if isinstance(node, nnx.Param):
            parent = module
            for key in path[:-1]:
                parent = parent[key] if isinstance(parent, nnx.List) else getattr(parent, key)
            setattr(parent, path[-1], TeacherWeight(node.get_value(), **node.get_metadata()))
    return module


class Teacher(ViTEncoder):
    """Frozen ViT feature extractor: images [B, H, W, 3] -> features [B, H/p, W/p, width].

    Besides the weights it carries `num_heads` (so a weights file can be checked against it
    from the pure state alone) and `loaded` (True once real weights were put in).
    """

    def __init__(self, *, image_size, patch_size, width, depth, heads, mlp_dim, dtype, rngs):
        super().__init__(
            image_size=image_size, patch_size=patch_size, width=width, depth=depth,
            heads=heads, mlp_dim=mlp_dim, out_dim=0, dtype=dtype, rngs=rngs,
        )  # fmt: skip
        freeze(self)
        self.num_heads = TeacherWeight(jnp.asarray(heads, jnp.int32))
        self.loaded = TeacherWeight(jnp.asarray(False))

    def __call__(self, images):
        return jax.lax.stop_gradient(super().__call__(images).astype(jnp.float32))


# --- big_vision layout <-> our ViTEncoder pure-dict layout -----------------------------------


def vit_to_big_vision(tree: Mapping, heads: int, prefix: str = "") -> dict[str, np.ndarray]:
    """Our ViTEncoder state (pure dict: patch_embed, transformer) -> flat big_vision arrays."""
    t = jax.tree.map(lambda x: np.asarray(x, np.float32), _trunk(tree))
    tr = t["transformer"]
    d = tr["pos_embedding"].shape[-1]
    h, dh = heads, d // heads
    out = {
        "embedding/kernel": t["patch_embed"]["kernel"],
        "embedding/bias": t["patch_embed"]["bias"],
        "pos_embedding": tr["pos_embedding"],
        "Transformer/encoder_norm/scale": tr["norm"]["scale"],
        "Transformer/encoder_norm/bias": tr["norm"]["bias"],
    }
    for i in range(len(tr["blocks"])):
        blk, p = tr["blocks"][i], f"Transformer/encoderblock_{i}/"
        qkv_k = np.split(blk["attn"]["qkv"]["kernel"], 3, axis=1)
        qkv_b = np.split(blk["attn"]["qkv"]["bias"], 3)
        for name, kernel, bias in zip(("query", "key", "value"), qkv_k, qkv_b, strict=True):
            out[f"{p}{_ATTN}/{name}/kernel"] = kernel.reshape(d, h, dh)
            out[f"{p}{_ATTN}/{name}/bias"] = bias.reshape(h, dh)
        out[f"{p}{_ATTN}/out/kernel"] = blk["attn"]["out"]["kernel"].reshape(h, dh, d)
        out[f"{p}{_ATTN}/out/bias"] = blk["attn"]["out"]["bias"]
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            out[f"{p}{theirs}/scale"] = blk[ours]["scale"]
            out[f"{p}{theirs}/bias"] = blk[ours]["bias"]
        for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out[f"{p}MlpBlock_0/{theirs}/kernel"] = blk["mlp"][ours]["kernel"]
            out[f"{p}MlpBlock_0/{theirs}/bias"] = blk["mlp"][ours]["bias"]
    return {prefix + k: v for k, v in out.items()}


def save_vit_npz(path: str, tree: Mapping, heads: int, prefix: str = "") -> None:
    """Writes our ViTEncoder trunk (params or teacher state) as a big_vision-layout .npz."""
    np.savez(path, **vit_to_big_vision(tree, heads, prefix))


class _Reader:
    """Reads big_vision keys with expected shapes, collecting every problem before failing."""

    def __init__(self, flat: Mapping, prefix: str, source: str):
        self.flat, self.prefix, self.source = flat, prefix, source
        self.problems: list[str] = []

    def __call__(self, key: str, shape: tuple) -> np.ndarray:
        name = self.prefix + key
        if name not in self.flat:
            self.problems.append(f"missing {name!r} (expected shape {tuple(shape)})")
            return np.zeros(shape, np.float32)
        value = np.asarray(self.flat[name], np.float32)
        if value.shape != tuple(shape):
            self.problems.append(f"{name!r} has shape {value.shape}, expected {tuple(shape)}")
            return np.zeros(shape, np.float32)
        return value

    def check(self, what: str):
        if self.problems:
            shown = "\n  - ".join(self.problems[:20])
            more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            raise TeacherWeightsError(
                f"{self.source} does not fit {what} ({len(self.problems)} problems):\n  - "
                f"{shown}{more}\nUse a big_vision ViT .npz of the same width, depth, heads, "
                "patch and MLP size (layout in models/teacher.py), or change the model config "
                "to match the file."
            )


def big_vision_to_vit(
    flat: Mapping, like: Mapping, heads: int, *, prefix: str = "auto", source: str = "weights"
) -> dict:
    """Flat big_vision arrays -> our ViTEncoder trunk pure dict, shaped like `like`.

    like: our pure dict (arrays or ShapeDtypeStructs) with patch_embed and transformer.
    Raises TeacherWeightsError naming every missing or mis-shaped key.
    """
    prefix = _detect_prefix(flat, source) if prefix == "auto" else prefix
    flat = _unscan(flat, prefix)
    if prefix + "cls" in flat:
        logging.warning(
            "%s has a [cls] token (pool_type 'tok'); the teacher runs on patch tokens only, so "
            "its features differ from the original model's",
            source,
        )
    like = jax.tree.map(lambda x: tuple(np.shape(x)), _trunk(like))
    tr = like["transformer"]
    d = tr["pos_embedding"][-1]
    h, dh = heads, d // heads
    read = _Reader(flat, prefix, source)
    pos = _read_pos_embedding(read, tr["pos_embedding"])
    out = {
        "patch_embed": {
            "kernel": read("embedding/kernel", like["patch_embed"]["kernel"]),
            "bias": read("embedding/bias", like["patch_embed"]["bias"]),
        },
        "transformer": {"pos_embedding": pos, "blocks": {}},
    }
    out["transformer"]["norm"] = {
        "scale": read("Transformer/encoder_norm/scale", tr["norm"]["scale"]),
        "bias": read("Transformer/encoder_norm/bias", tr["norm"]["bias"]),
    }
    for i in sorted(tr["blocks"]):
        blk, p = tr["blocks"][i], f"Transformer/encoderblock_{i}/"
        qkv = [read(f"{p}{_ATTN}/{n}/kernel", (d, h, dh)) for n in ("query", "key", "value")]
        qkv_b = [read(f"{p}{_ATTN}/{n}/bias", (h, dh)) for n in ("query", "key", "value")]
        block = {
            "attn": {
                "qkv": {
                    "kernel": np.concatenate([k.reshape(d, d) for k in qkv], axis=1),
                    "bias": np.concatenate([b.reshape(d) for b in qkv_b]),
                },
                "out": {
                    "kernel": read(f"{p}{_ATTN}/out/kernel", (h, dh, d)).reshape(d, d),
                    "bias": read(f"{p}{_ATTN}/out/bias", blk["attn"]["out"]["bias"]),
                },
            },
            "mlp": {},
        }
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            block[ours] = {k: read(f"{p}{theirs}/{k}", blk[ours][k]) for k in ("scale", "bias")}
        for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            block["mlp"][ours] = {
                k: read(f"{p}MlpBlock_0/{theirs}/{k}", blk["mlp"][ours][k])
                for k in ("kernel", "bias")
            }
        out["transformer"]["blocks"][i] = block
    depth = len(tr["blocks"])
    if prefix + f"Transformer/encoderblock_{depth}/LayerNorm_0/scale" in flat:
        read.problems.append(f"the file has more than {depth} encoder blocks")
    read.check(f"a ViT of width {d}, depth {depth}, {h} heads")
    return out


def load_vit_npz(path: str, like: Mapping, heads: int, *, prefix: str = "auto") -> dict:
    """Reads a big_vision-layout .npz into our ViTEncoder trunk layout (see module docstring)."""
    with np.load(path) as npz:
        return big_vision_to_vit(npz, like, heads, prefix=prefix, source=path)


def _trunk(tree: Mapping) -> dict:
    missing = [k for k in _TRUNK if k not in tree]
    if missing:
        raise TeacherWeightsError(f"not a ViTEncoder state: it has no {missing}")
    return {k: tree[k] for k in _TRUNK}


def _detect_prefix(flat: Mapping, source: str) -> str:
    suffix = "embedding/kernel"
    found = sorted(k[: -len(suffix)] for k in flat if k == suffix or k.endswith("/" + suffix))
    if len(found) == 1:
        return found[0]
    if not found:
        raise TeacherWeightsError(
            f"{source} has no '[prefix]embedding/kernel' entry: it is not a big_vision ViT .npz "
            "(layout in models/teacher.py)"
        )
    raise TeacherWeightsError(
        f"{source} holds several ViTs (prefixes {found}); set config.teacher.prefix to one"
    )


def _unscan(flat: Mapping, prefix: str) -> Mapping:
    """Splits a scanned 'Transformer/encoderblock/...' [depth, ...] into encoderblock_{i}."""
    scanned = prefix + "Transformer/encoderblock/"
    keys = [k for k in flat if k.startswith(scanned)]
    if not keys:
        return flat
    out = {k: flat[k] for k in flat if not k.startswith(scanned)}
    for key in keys:
        stacked = np.asarray(flat[key])
        rest = key[len(scanned) :]
        for i in range(stacked.shape[0]):
            out[f"{prefix}Transformer/encoderblock_{i}/{rest}"] = stacked[i]
    return out


def _read_pos_embedding(read: _Reader, shape: tuple) -> np.ndarray:
    """pos_embedding [1, N, D]; a square grid of another size is resampled (bilinear)."""
    name = read.prefix + "pos_embedding"
    value = read.flat.get(name)
    if value is not None and value.shape != tuple(shape) and value.shape[-1] == shape[-1]:
        old, new = math.isqrt(value.shape[1]), math.isqrt(shape[1])
        if old * old == value.shape[1] and new * new == shape[1]:
            logging.info(
                "teacher: resampling pos_embedding from %dx%d to %dx%d", old, old, new, new
            )
            grid = np.asarray(value, np.float32).reshape(old, old, -1)
            grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
            return grid.reshape(shape).astype(np.float32)
    return read("pos_embedding", shape)


# --- putting the weights into a train state ---------------------------------------------------


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


def init_teacher(model_state: Mapping, teacher_cfg: Mapping, *, key: str = "teacher") -> dict:
    """model_state with the teacher weights from `teacher_cfg['weights']` put in.

    teacher_cfg: {'weights': path to the .npz ('' = none), 'random_init': bool, 'prefix':
    key prefix in the file ('auto' = detect)}. With no weights path it raises, unless
    random_init is set: then the random teacher is kept and a warning says so. Arrays keep the
    dtype and sharding of model_state's (works multi-host: every process reads the file).
    """
    if key not in model_state:
        raise TeacherWeightsError(f"the model has no {key!r} state: is it a dual tokenizer?")
    path = teacher_cfg.get("weights") or ""
    if not path:
        if teacher_cfg.get("random_init", False):
            logging.warning(
                "teacher.random_init=True and no teacher.weights: the teacher is RANDOM, so the "
                "semantic features it gives (and the semantic branch trained on them) are "
                "meaningless. Use this for smoke tests only."
            )
            return dict(model_state)
        raise TeacherWeightsError(
            "config.teacher.weights is empty: the dual tokenizer needs a frozen teacher (a "
            "big_vision / SigLIP ViT .npz, layout in models/teacher.py). Set "
            "--config.teacher.weights=/path/to/teacher.npz, or --config.teacher.random_init=True "
            "for a smoke test with a random (meaningless) teacher."
        )
    path = resolve_weights_path(path)
    teacher = model_state[key]
    heads = int(np.asarray(teacher["num_heads"]))
    loaded = load_vit_npz(path, teacher, heads, prefix=teacher_cfg.get("prefix", "auto"))
    new = dict(teacher)
    for part in _TRUNK:
        new[part] = jax.tree.map(_place, loaded[part], _trunk(teacher)[part])
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
        copy, _trunk(params[encoder]), _trunk(model_state[teacher])
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
