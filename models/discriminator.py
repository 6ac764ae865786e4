"""Image discriminators for the adversarial tokenizer loss; `__call__(images) -> logits`.

- `StyleGANDiscriminator`: MaskGIT's (`maskgit.nets.discriminator`, after StyleGAN2): residual
  blocks that halve the grid with a [1, 3, 3, 1] blur (or 2x2 average pooling), leaky ReLU 0.2,
  down to 4x4, then two dense layers -> one logit per image [B, 1]. Names map onto the official
  Flax params as: conv_in -> Conv_0, blocks/k -> ResBlock_k (conv1 -> Conv_0, shortcut -> Conv_1,
  conv2 -> Conv_2), conv_out -> Conv_1, dense -> Dense_0, logits -> Dense_1.
- `PatchGANDiscriminator`: taming-transformers' NLayerDiscriminator (pix2pix): 4x4 convs, the
  first `n_layers` with stride 2, BatchNorm, leaky ReLU 0.2 -> a grid of patch logits
  [B, h, w, 1] (30x30 for 256x256 inputs and 3 layers). With norm='batch' the module holds
  BatchNorm statistics (nnx.BatchStat): batch statistics in train mode (`.train()`, default),
  running averages after `.eval()`.

Parameters are float32 with logical axis names (output channels on `embed`); activations use
`dtype`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visual_tokenizers.core.errors import ConfigError

_xavier = nnx.initializers.xavier_uniform()  # MaskGIT's discriminator kernel init


def leaky_relu(x):
    return jax.nn.leaky_relu(x, negative_slope=0.2)


def blur_kernel(taps=(1.0, 3.0, 3.0, 1.0)) -> np.ndarray:
    """The normalised outer product of `taps` with itself: [k, k], sums to 1."""
    taps = np.asarray(taps, np.float32)
    kernel = np.outer(taps, taps)
    return kernel / kernel.sum()


def blur_downsample(x):
    """Depthwise [1, 3, 3, 1] blur with stride 2 and 'SAME' padding (MaskGIT's BlurPool2D)."""
    channels = x.shape[-1]
    kernel = jnp.tile(jnp.asarray(blur_kernel(), x.dtype)[:, :, None, None], (1, 1, 1, channels))
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(2, 2),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
        precision=jax.lax.Precision.HIGHEST,
    )


def average_downsample(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _conv(din, dout, kernel, *, bias=True, strides=1, padding="SAME", init=_xavier, dtype, rngs):
    return nnx.Conv(
        din,
        dout,
        kernel_size=(kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        use_bias=bias,
        kernel_init=nnx.with_partitioning(init, (None, None, None, "embed")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
        dtype=dtype,
        rngs=rngs,
    )


class StyleGANBlock(nnx.Module):
    """conv3x3 -> act -> downsample, shortcut downsample -> conv1x1; sum / sqrt(2)."""

    def __init__(self, din: int, dout: int, *, blur_resample: bool, dtype, rngs: nnx.Rngs):
        self.conv1 = _conv(din, din, 3, dtype=dtype, rngs=rngs)
        self.shortcut = _conv(din, dout, 1, bias=False, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(din, dout, 3, dtype=dtype, rngs=rngs)
        self.resample = blur_downsample if blur_resample else average_downsample

    def __call__(self, x):
        residual = self.shortcut(self.resample(x))
        h = self.resample(leaky_relu(self.conv1(x)))
        h = leaky_relu(self.conv2(h))
        return (residual + h) / math.sqrt(2)


def stylegan_filters(resolution: int, channel_multiplier: int) -> int:
    """Channels at a given resolution (MaskGIT / StyleGAN2 table)."""
    if resolution <= 32:
        return 512
    return (256 * 64 // resolution) * channel_multiplier


class StyleGANDiscriminator(nnx.Module):
    """Images [B, S, S, C] (S a power of 2, 8..1024) -> logits [B, 1]."""

    def __init__(
        self,
        *,
        image_size: int,
        channel_multiplier: int = 1,
        blur_resample: bool = True,
        in_channels: int = 3,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        log_size = int(round(math.log2(image_size)))
        if 2**log_size != image_size or not 8 <= image_size <= 1024:
            raise ConfigError(f"image_size {image_size} must be a power of 2 in [8, 1024]")
        self.dtype = dtype
        width = stylegan_filters(image_size, channel_multiplier)
        self.conv_in = _conv(in_channels, width, 3, dtype=dtype, rngs=rngs)
        blocks = []
        for i in range(log_size, 2, -1):
            dout = stylegan_filters(2 ** (i - 1), channel_multiplier)
            blocks.append(
                StyleGANBlock(width, dout, blur_resample=blur_resample, dtype=dtype, rngs=rngs)
            )
            width = dout
        self.blocks = nnx.List(blocks)
        self.conv_out = _conv(width, 512, 3, dtype=dtype, rngs=rngs)
        dense = dict(
            kernel_init=nnx.with_partitioning(_xavier, ("embed", None)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)),
            dtype=dtype,
            rngs=rngs,
        )
        self.dense = nnx.Linear(4 * 4 * 512, 512, **dense)
        self.logits = nnx.Linear(512, 1, **dense)

    def __call__(self, images):
        x = leaky_relu(self.conv_in(images.astype(self.dtype)))
        for block in self.blocks:
            x = block(x)
        x = leaky_relu(self.conv_out(x)).reshape(x.shape[0], -1)
        return self.logits(leaky_relu(self.dense(x))).astype(jnp.float32)


class PatchGANDiscriminator(nnx.Module):
    """Images [B, H, W, C] -> patch logits [B, H', W', 1] (taming NLayerDiscriminator)."""

    def __init__(
        self,
        *,
        image_size: int | None = None,
        base_channels: int = 64,
        n_layers: int = 3,
        norm: str = "batch",
        in_channels: int = 3,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        del image_size  # fully convolutional; accepted for a uniform constructor
        if norm not in ("batch", "none"):
            raise ConfigError(f"norm {norm!r} is unknown; choose 'batch' or 'none'")
        self.dtype = dtype
        init = nnx.initializers.normal(0.02)  # taming's weights_init
        pad = ((1, 1), (1, 1))
        conv = dict(kernel=4, padding=pad, init=init, dtype=dtype, rngs=rngs)
        widths = [base_channels * min(2**n, 8) for n in range(n_layers + 1)]
        # Stride 2 for the first n_layers convs, then one stride-1 conv, then the logit conv.
        self.convs = nnx.List(
            [_conv(in_channels, widths[0], strides=2, **conv)]
            + [
                _conv(
                    widths[n - 1],
                    widths[n],
                    bias=norm == "none",
                    strides=2 if n < n_layers else 1,
                    **conv,
                )
                for n in range(1, n_layers + 1)
            ]
        )
        self.norms = nnx.List(
            [
                nnx.BatchNorm(
                    w,
                    momentum=0.9,  # PyTorch momentum 0.1
                    epsilon=1e-5,
                    scale_init=lambda key, shape, dtype: (
                        1.0 + 0.02 * jax.random.normal(key, shape, dtype)
                    ),
                    dtype=dtype,
                    rngs=rngs,
                )
                for w in widths[1:]
            ]
            if norm == "batch"
            else []
        )
        self.out = _conv(widths[-1], 1, **conv)

    def __call__(self, images):
        x = leaky_relu(self.convs[0](images.astype(self.dtype)))
        for i, conv in enumerate(self.convs[1:]):
            x = conv(x)
            if len(self.norms):
                x = self.norms[i](x)
            x = leaky_relu(x)
        return self.out(x).astype(jnp.float32)


DISCRIMINATORS = {"stylegan": StyleGANDiscriminator, "patchgan": PatchGANDiscriminator}


def build_discriminator(*, name: str, image_size: int, seed: int = 0, dtype=jnp.float32, **kwargs):
    """A discriminator by name ('stylegan' or 'patchgan') from its constructor kwargs."""
    if name not in DISCRIMINATORS:
        raise ConfigError(
            f"discriminator.name {name!r} is unknown; choose one of {sorted(DISCRIMINATORS)}"
        )
    rngs = nnx.Rngs(params=seed)
    return DISCRIMINATORS[name](image_size=image_size, dtype=dtype, rngs=rngs, **kwargs)
