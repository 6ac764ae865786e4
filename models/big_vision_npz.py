"""big_vision ViT .npz weights <-> our models/vit.py ViTEncoder (pure-dict state).

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
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Mapping

import jax
import numpy as np
import scipy.ndimage

from visual_tokenizers.core.errors import UserError

_ATTN = "MultiHeadDotProductAttention_0"
TRUNK_PARTS = ("patch_embed", "transformer")  # the ViTEncoder parts a teacher file provides


class TeacherWeightsError(UserError, ValueError):
    """The teacher weights are missing or do not fit the model; the message says what to fix."""


def vit_to_big_vision(tree: Mapping, heads: int, prefix: str = "") -> dict[str, np.ndarray]:
    """Our ViTEncoder state (pure dict: patch_embed, transformer) -> flat big_vision arrays."""
    t = jax.tree.map(lambda x: np.asarray(x, np.float32), trunk_of(tree))
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
    like = jax.tree.map(lambda x: tuple(np.shape(x)), trunk_of(like))
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
    try:
        with np.load(path) as npz:
            return big_vision_to_vit(npz, like, heads, prefix=prefix, source=path)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        if isinstance(err, TeacherWeightsError):
            raise
        raise TeacherWeightsError(
            f"{path} is not a readable .npz ({type(err).__name__}: {err}); the file is damaged "
            "(e.g. a partial copy) or not a weights file: copy it again"
        ) from err


def trunk_of(tree: Mapping) -> dict:
    missing = [k for k in TRUNK_PARTS if k not in tree]
    if missing:
        raise TeacherWeightsError(f"not a ViTEncoder state: it has no {missing}")
    return {k: tree[k] for k in TRUNK_PARTS}


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
