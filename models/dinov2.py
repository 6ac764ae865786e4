"""DINOv2 ViT-L/14 (Oquab et al. 2023), the FD-DINOv2 feature network (Stein et al. 2023, EDM2).

FD-DINOv2 as published runs the official torch.hub model `dinov2_vitl14` (facebookresearch/dinov2,
no registers: dgm-eval's `dgm_eval/models/dinov2.py` loads `torch.hub.load('facebookresearch/
dinov2', 'dinov2_vitl14')`, EDM2's `calculate_metrics.py` `'facebookresearch/dinov2:main',
'dinov2_vitl14'`) and takes its output, the CLS token after the final LayerNorm
(`x_norm_clstoken`; the hub head is the identity), 1024-d, on 224x224 input.

Architecture (hub `vit_large`, patch 14): a 14x14 stride-14 conv patch embedding, a CLS token,
learned position embeddings for 518 px (37x37 + CLS) resampled to the input grid (224 -> 16x16),
24 pre-norm blocks x + ls1 * attn(norm1(x)), x + ls2 * mlp(norm2(x)) (LayerNorm eps 1e-6, 16
heads, fused qkv with bias, MLP 4096 with exact GELU, LayerScale), a final LayerNorm.

Position-embedding resampling (`pos_resample`):
- "hub" (default, what FD-DINOv2 numbers were computed with): DINOv2's interpolate_pos_encoding,
  torch bicubic WITHOUT antialias, called with scale_factor (g + 0.1) / 37, so the sampling uses
  37 / 16.1 rather than 37 / 16 (the "+0.1" of facebookresearch/dino issue 8, kept by the hub
  for the checkpoints without registers: interpolate_offset=0.1, interpolate_antialias=False).
  A grid equal to the trained one is used as is.
- "timm": timm 1.0.31's `vit_large_patch14_dinov2.lvd142m` (`resample_abs_pos_embed`: bicubic
  WITH antialias, output size given, no offset), whether at load (img_size=224) or per call
  (dynamic_img_size). It differs from the hub at 224 (antialiased 37 -> 16 is a wider low-pass
  and samples at 37 / 16), so timm's features are not the published FD-DINOv2 features.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visual_tokenizers.core import weights as weights_lib
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.models import bicubic

INPUT_SIZE = 224
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as dgm-eval and EDM2 normalise.
STD = (0.229, 0.224, 0.225)
PRECISION = jax.lax.Precision.HIGHEST  # A metric: no reduced-precision matmuls (TF32, bf16).
RESIZE_MODES = ("pil", "torch")
POS_RESAMPLE = ("hub", "timm")
HUB_OFFSET = 0.1
DINOV2_PREPROCESS = (
    "dgm-eval (Stein et al. 2023): torchvision Resize((224, 224), BICUBIC) on the uint8 RGB "
    "image (Pillow's antialiased bicubic, rounded to uint8), ToTensor (/255), Normalize with "
    "ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); no crop"
)


@dataclasses.dataclass(frozen=True)
class Config:
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    patch: int = 14
    trained_grid: int = 37  # 518 px / 14: the grid the position embeddings were trained at.


VITL14 = Config()


# ----------------------------------------------------------------------------- preprocessing


def preprocess(images_uint8, resize: str = "pil") -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 [B, 224, 224, 3], normalised, as FD-DINOv2 prepares input.

    resize="pil" (default) is dgm-eval's transform (see DINOV2_PREPROCESS): Pillow's 8-bit
    bicubic reproduced bit-exactly (models/bicubic.py), then /255 and ImageNet mean/std.
    resize="torch" is EDM2's default (`calculate_metrics.py`, resize_mode='torch'):
    torch.nn.functional.interpolate(x, (224, 224), mode='bicubic', antialias=True) on the
    float 0..255 image (no rounding), then the same scaling.
    """
    if resize not in RESIZE_MODES:
        raise ConfigError(f"unknown DINOv2 resize {resize!r}; use one of {RESIZE_MODES}")
    images = jnp.asarray(images_uint8)
    size = (INPUT_SIZE, INPUT_SIZE)
    if resize == "pil":
        x = bicubic.pil_resize_uint8(images, size).astype(jnp.float32)
    else:
        rows = bicubic.antialias_matrix(images.shape[1], INPUT_SIZE)
        cols = bicubic.antialias_matrix(images.shape[2], INPUT_SIZE)
        x = jnp.einsum(
            "ih,bhwc,jw->bijc", rows, images.astype(jnp.float32), cols, precision=PRECISION
        )
    x = x / 255.0
    return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


def pos_resample_matrix(trained: int, grid: int, mode: str) -> np.ndarray:
    """[grid, trained] weights resampling one axis of the position-embedding grid."""
    if mode == "hub":
        if grid == trained:
            return np.eye(grid, dtype=np.float32)
        # As the hub: scale_factor = float(g + 0.1) / M in double, sampled with its inverse.
        return bicubic.torch_bicubic_matrix(trained, grid, float(grid + HUB_OFFSET) / trained)
    if mode == "timm":
        return bicubic.antialias_matrix(trained, grid)  # The identity when grid == trained.
    raise ConfigError(f"unknown position-embedding resampling {mode!r}; use one of {POS_RESAMPLE}")


# ----------------------------------------------------------------------------- layers


def _zeros(*shape) -> nnx.Param:
    # Zeros: real values always come from a weights file (see load_dinov2).
    return nnx.Param(jnp.zeros(shape, jnp.float32))


class Linear(nnx.Module):
    def __init__(self, din: int, dout: int, precision):
        self.kernel, self.bias, self.precision = _zeros(din, dout), _zeros(dout), precision

    def __call__(self, x):
        return jnp.dot(x, self.kernel[...], precision=self.precision) + self.bias[...]


class LayerNorm(nnx.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        self.scale, self.bias, self.eps = (
            nnx.Param(jnp.ones((width,), jnp.float32)),
            _zeros(width),
            eps,
        )

    def __call__(self, x):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)  # Biased, as torch.
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class LayerScale(nnx.Module):
    def __init__(self, width: int):
        self.gamma = _zeros(width)

    def __call__(self, x):
        return x * self.gamma[...]


class Attention(nnx.Module):
    def __init__(self, width: int, heads: int, precision):
        if width % heads:
            raise ConfigError(f"DINOv2 width {width} is not divisible by heads {heads}")
        self.heads, self.precision = heads, precision
        self.qkv = Linear(width, 3 * width, precision)
        self.proj = Linear(width, width, precision)

    def __call__(self, x):
        b, n, width = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, width // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = q * (width // self.heads) ** -0.5
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision)
        weights = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision)
        return self.proj(y.reshape(b, n, width))


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, precision):
        self.fc1 = Linear(width, hidden, precision)
        self.fc2 = Linear(hidden, width, precision)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # torch's exact GELU.


class Block(nnx.Module):
    def __init__(self, config: Config, precision):
        self.norm1 = LayerNorm(config.width)
        self.attn = Attention(config.width, config.heads, precision)
        self.ls1 = LayerScale(config.width)
        self.norm2 = LayerNorm(config.width)
        self.mlp = Mlp(config.width, config.mlp_dim, precision)
        self.ls2 = LayerScale(config.width)

    def __call__(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Conv(nnx.Module):
    def __init__(self, patch: int, width: int):
        self.kernel, self.bias = _zeros(patch, patch, 3, width), _zeros(width)  # HWIO


class PatchEmbed(nnx.Module):
    def __init__(self, config: Config, precision):
        self.patch, self.precision = config.patch, precision
        self.proj = Conv(config.patch, config.width)

    def __call__(self, x):
        """[B, H, W, 3] -> [B, H/p, W/p, width] (a stride-p conv as a patch matmul)."""
        b, h, w, c = x.shape
        p = self.patch
        patches = x.reshape(b, h // p, p, w // p, p, c)
        y = jnp.einsum(
            "bipjqc,pqcd->bijd", patches, self.proj.kernel[...], precision=self.precision
        )
        return y + self.proj.bias[...]


class DINOv2(nnx.Module):
    """Normalised [B, H, W, 3] (H, W multiples of the patch) -> {'cls': [B, width]}."""

    def __init__(self, config: Config = VITL14, pos_resample: str = "hub", precision=PRECISION):
        pos_resample_matrix(2, 1, pos_resample)  # Rejects an unknown mode now, not at call time.
        self.config, self.pos_resample = config, pos_resample
        self.patch_embed = PatchEmbed(config, precision)
        self.cls_token = _zeros(1, 1, config.width)
        self.pos_embed = _zeros(1, 1 + config.trained_grid**2, config.width)
        self.blocks = nnx.List([Block(config, precision) for _ in range(config.depth)])
        self.norm = LayerNorm(config.width)
        self.precision = precision

    def position_embedding(self, grid_h: int, grid_w: int) -> jax.Array:
        """[1, 1 + grid_h * grid_w, width]: the CLS entry and the resampled patch grid."""
        m, width = self.config.trained_grid, self.config.width
        pos = self.pos_embed[...]
        patch = pos[0, 1:].reshape(m, m, width)
        rows = pos_resample_matrix(m, grid_h, self.pos_resample)
        cols = pos_resample_matrix(m, grid_w, self.pos_resample)
        patch = jnp.einsum("ih,hwc,jw->ijc", rows, patch, cols, precision=self.precision)
        return jnp.concatenate([pos[:, :1], patch.reshape(1, grid_h * grid_w, width)], 1)

    def tokens(self, x) -> jax.Array:
        """All tokens after the final LayerNorm: [B, 1 + (H/p) * (W/p), width], CLS first."""
        b, h, w, _ = x.shape
        p = self.config.patch
        if h % p or w % p:
            raise ConfigError(f"DINOv2 input {h}x{w} is not a multiple of the patch size {p}")
        x = self.patch_embed(jnp.asarray(x, jnp.float32)).reshape(b, -1, self.config.width)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.config.width))
        x = jnp.concatenate([cls, x], 1) + self.position_embedding(h // p, w // p)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def __call__(self, x) -> dict:
        return {"cls": self.tokens(x)[:, 0]}


# ----------------------------------------------------------------------------- weights


def _torch_entry(path: tuple, shape: tuple) -> tuple[str, tuple, callable]:
    """(state-dict key, its torch shape, torch -> ours) for one of our parameters.

    The official checkpoint and timm's DINOv2 share their names (blocks.N.attn.qkv.weight,
    blocks.N.ls1.gamma, patch_embed.proj.weight, ...); linear weights are [out, in] in torch,
    the patch conv OIHW, LayerNorm's scale is `weight`."""
    *modules, leaf = (str(p) for p in path)
    prefix = ".".join(modules)
    if leaf == "kernel" and len(shape) == 4:
        return (
            f"{prefix}.weight",
            (shape[3], shape[2], *shape[:2]),
            lambda a: a.transpose(2, 3, 1, 0),
        )
    if leaf == "kernel":
        return f"{prefix}.weight", shape[::-1], lambda a: a.T
    if leaf == "scale":
        return f"{prefix}.weight", shape, lambda a: a
    return ".".join([*modules, leaf]), shape, lambda a: a


def from_torch_state(
    state: dict,
    config: Config = VITL14,
    what: str = "DINOv2 weights",
    pos_resample: str = "hub",
    precision=PRECISION,
) -> DINOv2:
    """DINOv2 from a flat torch state dict (official dinov2_vitl14_pretrain.pth or timm names)."""
    if "register_tokens" in state:
        raise weights_lib.WrongWeights(f"{what} is a DINOv2 checkpoint with registers")
    net = nnx.eval_shape(lambda: DINOv2(config, pos_resample, precision))  # Nothing allocated.
    graphdef, abstract = nnx.split(net)
    pure = {}
    for path, leaf in abstract.flat_state():
        key, torch_shape, convert = _torch_entry(tuple(path), tuple(leaf.shape))
        value = convert(weights_lib.require(state, key, torch_shape, what))
        node = pure
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value, jnp.float32)
    nnx.replace_by_pure_dict(abstract, pure)
    return nnx.merge(graphdef, abstract)


def load_dinov2(
    path: str | None = None, *, config: Config = VITL14, pos_resample: str = "hub"
) -> tuple[DINOv2, str]:
    """(network, weights file path): the official DINOv2 ViT-L/14 weights from `path` or the
    weights cache (core/weights.py DINOV2_VITL14)."""
    file = weights_lib.fetch(weights_lib.DINOV2_VITL14, path or None)
    state = weights_lib.flatten_state_dict(weights_lib.load_pth(file))
    try:
        return from_torch_state(state, config, f"DINOv2 weights {file}", pos_resample), file
    except weights_lib.WrongWeights as err:
        spec = weights_lib.DINOV2_VITL14
        raise weights_lib.WrongWeights(
            f"{err}. FD-DINOv2 needs the DINOv2 ViT-L/14 backbone without registers, "
            f"{spec.name} from {spec.url}"
        ) from err
