"""Convolutional VQGAN encoder and decoder, exactly as MaskGIT's tokenizer (`maskgit.nets.
vqgan_tokenizer`, `vqgan_config`): no attention, GroupNorm (32 groups, eps 1e-6), swish, residual
blocks of two bias-free 3x3 convs, 2x2 average-pool downsampling, nearest 2x upsampling + 3x3 conv.

Quirk kept from the official code (the released weights were trained with it): in a residual
block whose channel count changes, the bias-free 1x1 shortcut conv is applied to the block's
*output*, so the block returns `h + conv1x1(h)` instead of `h + conv1x1(x)`.

The encoder maps [B, H, W, 3] images to a [B, H/f, W/f, out_dim] grid, f = 2**(levels - 1)
(16 for multipliers (1, 1, 2, 2, 4)); the decoder maps it back. Parameters are float32 with
logical axis names (conv kernels and norm params: output channels on `embed`); activations use
`dtype`.

Parameter names: our nnx path -> path in the official Flax params (`params/encoder/...`,
`params/decoder/...`; leaf names `kernel`, `bias`, `scale` are the same on both sides):

  ResBlock (`ResBlock_k` there): norm1 -> GroupNorm_0, conv1 -> Conv_0, norm2 -> GroupNorm_1,
      conv2 -> Conv_1, shortcut -> Conv_2 (only when channels change)
  ConvEncoder: conv_in -> Conv_0, blocks/k -> ResBlock_k (k counts over all levels, then the
      extra blocks at the last width), norm_out -> GroupNorm_0, conv_out -> Conv_1
  ConvDecoder: conv_in -> Conv_0, blocks/k -> ResBlock_k, upsample_convs/j -> Conv_{j+1},
      norm_out -> GroupNorm_0, conv_out -> Conv_{len(upsample_convs)+1}
  VQ codebook (tokenizers/vq.py) <- params/quantizer/codebook

Pixel range: our tokenizers see images in [-1, 1]. MaskGIT's released tokenizer was trained on
images in [0, 1] (its colab feeds `np.float32(image) / 255` and shows the decoder's output
clipped to [0, 1]); `unit_range=True` keeps the interface in [-1, 1] and converts exactly at
the network's ends (the encoder reads (x + 1) / 2, the decoder returns 2 y - 1), so the
imported weights see what they were trained on.

`maskgit_param_names(module)` returns this mapping for a built module; tests/test_conv.py
checks it against the official model's tree and outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_kernel_init = nnx.initializers.lecun_normal()  # flax.linen.Conv's default, as the official code


def _conv(din, dout, kernel, *, bias, dtype, rngs, shard_out=True):
    out_axis = "embed" if shard_out else None
    return nnx.Conv(
        din,
        dout,
        kernel_size=(kernel, kernel),
        padding="SAME",
        use_bias=bias,
        kernel_init=nnx.with_partitioning(_kernel_init, (None, None, None, out_axis)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (out_axis,)),
        dtype=dtype,
        rngs=rngs,
    )


def _group_norm(channels, *, dtype, rngs):
    return nnx.GroupNorm(
        channels,
        num_groups=32,
        epsilon=1e-6,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
        dtype=dtype,
        rngs=rngs,
    )


def downsample(x):
    """2x2 average pooling, stride 2 (MaskGIT's TF-style 'SAME' pooling on even sizes)."""
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"downsampling needs even spatial sizes, got {h}x{w}")
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample(x):
    """Nearest-neighbour 2x upsampling (jax.image.resize, as the official code)."""
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")


class ResBlock(nnx.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> conv3x3, plus the (quirky) shortcut."""

    def __init__(self, din: int, dout: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = _group_norm(din, dtype=dtype, rngs=rngs)
        self.conv1 = _conv(din, dout, 3, bias=False, dtype=dtype, rngs=rngs)
        self.norm2 = _group_norm(dout, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(dout, dout, 3, bias=False, dtype=dtype, rngs=rngs)
        self.shortcut = (
            _conv(dout, dout, 1, bias=False, dtype=dtype, rngs=rngs) if din != dout else None
        )

    def __call__(self, x):
        h = self.conv1(jax.nn.swish(self.norm1(x)))
        h = self.conv2(jax.nn.swish(self.norm2(h)))
        # Official quirk: the shortcut conv reads the block's output h, not its input x.
        residual = self.shortcut(h) if self.shortcut is not None else x
        return h + residual


def _check_size(image_size, channel_multipliers):
    factor = 2 ** (len(channel_multipliers) - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size {image_size} is not a multiple of the downsampling factor {factor} "
            f"given by channel_multipliers {tuple(channel_multipliers)}"
        )


class ConvEncoder(nnx.Module):
    """Images [B, H, W, C] -> latent grid [B, H/f, W/f, out_dim]."""

    def __init__(
        self,
        *,
        image_size: int,
        out_dim: int,
        filters: int = 128,
        channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        in_channels: int = 3,
        unit_range: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_size(image_size, channel_multipliers)
        self.dtype, self.unit_range = dtype, unit_range
        self.conv_in = _conv(in_channels, filters, 3, bias=False, dtype=dtype, rngs=rngs)
        blocks, downsample_after = [], []
        width = filters
        for level, mult in enumerate(channel_multipliers):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(width, filters * mult, dtype=dtype, rngs=rngs))
                width = filters * mult
            # Index of the block after which the grid halves (not after the last level).
            if level < len(channel_multipliers) - 1:
                downsample_after.append(len(blocks) - 1)
        for _ in range(num_res_blocks):
            blocks.append(ResBlock(width, width, dtype=dtype, rngs=rngs))
        self.downsample_after = tuple(downsample_after)
        self.blocks = nnx.List(blocks)
        self.norm_out = _group_norm(width, dtype=dtype, rngs=rngs)
        self.conv_out = _conv(width, out_dim, 1, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, images):
        images = (images + 1.0) / 2.0 if self.unit_range else images  # see the module docstring
        x = self.conv_in(images.astype(self.dtype))
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.downsample_after:
                x = downsample(x)
        return self.conv_out(jax.nn.swish(self.norm_out(x)))


class ConvDecoder(nnx.Module):
    """Latent grid [B, h, w, in_dim] -> images [B, h*f, w*f, C] (float32)."""

    def __init__(
        self,
        *,
        image_size: int,
        in_dim: int,
        filters: int = 128,
        channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        out_channels: int = 3,
        unit_range: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_size(image_size, channel_multipliers)
        self.dtype, self.unit_range = dtype, unit_range
        width = filters * channel_multipliers[-1]
        self.conv_in = _conv(in_dim, width, 3, bias=True, dtype=dtype, rngs=rngs)
        blocks = [ResBlock(width, width, dtype=dtype, rngs=rngs) for _ in range(num_res_blocks)]
        upsample_convs, upsample_after = [], []
        for level in reversed(range(len(channel_multipliers))):
            for _ in range(num_res_blocks):
                dout = filters * channel_multipliers[level]
                blocks.append(ResBlock(width, dout, dtype=dtype, rngs=rngs))
                width = dout
            if level > 0:
                upsample_after.append(len(blocks) - 1)
                upsample_convs.append(_conv(width, width, 3, bias=True, dtype=dtype, rngs=rngs))
        self.upsample_after = tuple(upsample_after)
        self.blocks = nnx.List(blocks)
        self.upsample_convs = nnx.List(upsample_convs)
        self.norm_out = _group_norm(width, dtype=dtype, rngs=rngs)
        self.conv_out = _conv(
            width, out_channels, 3, bias=True, dtype=dtype, rngs=rngs, shard_out=False
        )

    def __call__(self, latents):
        x = self.conv_in(latents.astype(self.dtype))
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.upsample_after:
                x = self.upsample_convs[self.upsample_after.index(i)](upsample(x))
        x = self.conv_out(jax.nn.swish(self.norm_out(x))).astype(jnp.float32)
        return 2.0 * x - 1.0 if self.unit_range else x


def _block_names(block: ResBlock) -> dict[tuple, tuple]:
    names = {("norm1",): ("GroupNorm_0",), ("conv1",): ("Conv_0",)}
    names.update({("norm2",): ("GroupNorm_1",), ("conv2",): ("Conv_1",)})
    if block.shortcut is not None:
        names[("shortcut",)] = ("Conv_2",)
    return names


def maskgit_param_names(module: ConvEncoder | ConvDecoder) -> dict[tuple, tuple]:
    """Our parameter path -> the official MaskGIT Flax path (relative to encoder/ or decoder/).

    Paths are tuples of keys, e.g. ('blocks', 3, 'shortcut', 'kernel') -> ('ResBlock_3',
    'Conv_2', 'kernel'), as in `nnx.to_flat_state(nnx.state(module, nnx.Param))`.
    """
    if isinstance(module, ConvEncoder):
        top = {("conv_in",): ("Conv_0",), ("norm_out",): ("GroupNorm_0",)}
        top[("conv_out",)] = ("Conv_1",)
    elif isinstance(module, ConvDecoder):
        top = {("conv_in",): ("Conv_0",), ("norm_out",): ("GroupNorm_0",)}
        top.update(
            {("upsample_convs", j): (f"Conv_{j + 1}",) for j in range(len(module.upsample_convs))}
        )
        top[("conv_out",)] = (f"Conv_{len(module.upsample_convs) + 1}",)
    else:
        raise TypeError(f"no MaskGIT name mapping for {type(module).__name__}")
    for k, block in enumerate(module.blocks):
        for ours, theirs in _block_names(block).items():
            top[("blocks", k, *ours)] = (f"ResBlock_{k}", *theirs)
    names = {}
    for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        prefix, leaf = tuple(path[:-1]), path[-1]
        if prefix not in top:
            raise KeyError(f"parameter {path} has no MaskGIT name")
        names[tuple(path)] = (*top[prefix], leaf)
    return names


def load_maskgit_params(module: ConvEncoder | ConvDecoder, params: dict) -> None:
    """Copies official MaskGIT params (the `encoder` or `decoder` subtree) into `module`."""
    state = nnx.state(module, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for ours, theirs in maskgit_param_names(module).items():
        value = params
        for key in theirs:
            value = value[key]
        target = flat[ours]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{ours} has shape {target.shape}, MaskGIT {theirs} {value.shape}")
        target.set_value(jnp.asarray(value, target.dtype))
    nnx.update(module, state)
