"""Vision Transformer encoder and decoder on 2-D patch grids (ViT-VQGAN / LlamaGen style) or
1-D latent sequences (TiTok / Instella-T2I style).

2-D (num_latents = 0): the encoder turns [B, H, W, 3] images into a [B, H/p, W/p, out_dim]
latent grid; the decoder maps such a grid back to pixels through a linear patch head.

1-D (num_latents = L > 0): L learnable latent queries are appended to the patch tokens and
encoded together with them; only the latents leave the encoder, [B, L, out_dim], so only they
are quantized. The decoder appends the L (quantized) latents to H/p x W/p copies of one learned
mask token, and the mask-token outputs become the patches. One learned position embedding covers
patches and latents.

Parameters are float32 and carry logical axis names for sharding; activations use `dtype`
(bfloat16 on accelerators).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from visual_tokenizers.core.errors import ConfigError

_dense_init = nnx.initializers.xavier_uniform()
_pos_init = nnx.initializers.normal(stddev=0.02)


def _dense(din, dout, axes, *, dtype, rngs):
    return nnx.Linear(
        din,
        dout,
        kernel_init=nnx.with_partitioning(_dense_init, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[-1:]),
        dtype=dtype,
        rngs=rngs,
    )


def _norm(width, *, dtype, rngs):
    return nnx.LayerNorm(
        width,
        epsilon=1e-6,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
        dtype=dtype,
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Multi-head self-attention (bidirectional), fused qkv projection."""

    def __init__(self, width: int, heads: int, *, dtype, rngs: nnx.Rngs):
        if width % heads:
            raise ConfigError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = _dense(width, 3 * width, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.out = _dense(width, width, ("heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        q, k, v = (einops.rearrange(t, "b n (h d) -> b n h d", h=self.heads) for t in (q, k, v))
        y = jax.nn.dot_product_attention(q, k, v)
        return self.out(einops.rearrange(y, "b n h d -> b n (h d)"))


class MlpBlock(nnx.Module):
    def __init__(self, width: int, mlp_dim: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = _dense(width, mlp_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = _dense(mlp_dim, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, width, heads, mlp_dim, *, dtype, rngs: nnx.Rngs):
        self.norm1 = _norm(width, dtype=dtype, rngs=rngs)
        self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
        self.norm2 = _norm(width, dtype=dtype, rngs=rngs)
        self.mlp = MlpBlock(width, mlp_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nnx.Module):
    """Learned position embedding, a stack of blocks and a final LayerNorm."""

    def __init__(self, length, width, depth, heads, mlp_dim, *, dtype, rngs: nnx.Rngs):
        self.pos_embedding = nnx.Param(
            _pos_init(rngs.params(), (1, length, width)), out_sharding=(None, None, "embed")
        )
        self.blocks = nnx.List(
            [Block(width, heads, mlp_dim, dtype=dtype, rngs=rngs) for _ in range(depth)]
        )
        self.norm = _norm(width, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x):
        x = x + self.pos_embedding[...].astype(self.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _check_sizes(image_size: int, patch_size: int, num_latents: int):
    if image_size % patch_size:
        raise ConfigError(f"image_size {image_size} is not a multiple of patch {patch_size}")
    if num_latents < 0:
        raise ConfigError(f"num_latents={num_latents} must be >= 0 (0: 2-D latent grid)")


def _token_param(shape, *, rngs: nnx.Rngs) -> nnx.Param:
    """A learned [1, n, width] token block (latent queries, mask token), sharded over width."""
    return nnx.Param(_pos_init(rngs.params(), shape), out_sharding=(None, None, "embed"))


class ViTEncoder(nnx.Module):
    """Images [B, H, W, C] -> latent grid [B, H/p, W/p, out_dim], or [B, L, out_dim] latents.

    out_dim = 0 builds no head: the outputs are the transformer's token features (after the
    final LayerNorm), [B, H/p, W/p, width] or [B, L, width] (a ViT feature extractor / teacher).
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        out_dim: int,
        in_channels: int = 3,
        num_latents: int = 0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_sizes(image_size, patch_size, num_latents)
        self.grid = image_size // patch_size
        self.num_latents = num_latents
        self.dtype = dtype
        self.patch_embed = nnx.Conv(
            in_channels,
            width,
            kernel_size=(patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            kernel_init=nnx.with_partitioning(_dense_init, (None, None, None, "embed")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
            dtype=dtype,
            rngs=rngs,
        )
        self.transformer = Transformer(
            self.grid**2 + num_latents, width, depth, heads, mlp_dim, dtype=dtype, rngs=rngs
        )
        self.head = (
            _dense(width, out_dim, ("embed", None), dtype=dtype, rngs=rngs) if out_dim else None
        )
        # Created last so that the 2-D path draws the same initial values as before.
        self.latent_queries = (
            _token_param((1, num_latents, width), rngs=rngs) if num_latents else None
        )

    def __call__(self, images):
        x = self.patch_embed(images.astype(self.dtype))
        x = einops.rearrange(x, "b h w c -> b (h w) c")
        if not self.num_latents:
            x = self._head(self.transformer(x))
            return einops.rearrange(x, "b (h w) c -> b h w c", h=self.grid)
        queries = self.latent_queries[...].astype(self.dtype)
        x = jnp.concatenate([x, jnp.broadcast_to(queries, (x.shape[0], *queries.shape[1:]))], 1)
        return self._head(self.transformer(x)[:, -self.num_latents :])

    def _head(self, x):
        return self.head(x) if self.head is not None else x


class ViTDecoder(nnx.Module):
    """Latent grid [B, h, w, in_dim] (or latents [B, L, in_dim]) -> images [B, h*p, w*p, C]."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        in_dim: int,
        out_channels: int = 3,
        num_latents: int = 0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_sizes(image_size, patch_size, num_latents)
        self.grid = image_size // patch_size
        self.patch_size = patch_size
        self.num_latents = num_latents
        self.dtype = dtype
        self.stem = _dense(in_dim, width, (None, "embed"), dtype=dtype, rngs=rngs)
        self.transformer = Transformer(
            self.grid**2 + num_latents, width, depth, heads, mlp_dim, dtype=dtype, rngs=rngs
        )
        self.to_pixels = _dense(
            width, patch_size * patch_size * out_channels, ("embed", None), dtype=dtype, rngs=rngs
        )
        self.mask_token = _token_param((1, 1, width), rngs=rngs) if num_latents else None

    def __call__(self, latents):
        if self.num_latents:
            x = self._from_latents(latents)
        else:
            x = einops.rearrange(latents.astype(self.dtype), "b h w c -> b (h w) c")
            x = self.transformer(self.stem(x))
        x = self.to_pixels(x)
        p = self.patch_size
        images = einops.rearrange(x, "b (h w) (p q c) -> b (h p) (w q) c", h=self.grid, p=p, q=p)
        return images.astype(jnp.float32)

    def _from_latents(self, latents):
        """[B, L, in_dim] latents -> [B, grid**2, width] outputs at the mask-token positions."""
        if latents.ndim != 3 or latents.shape[1] != self.num_latents:
            raise ConfigError(
                f"1-D decoder expects latents [B, {self.num_latents}, C]; got {latents.shape}"
            )
        x = self.stem(latents.astype(self.dtype))
        n = self.grid**2
        masks = jnp.broadcast_to(
            self.mask_token[...].astype(self.dtype), (x.shape[0], n, x.shape[2])
        )
        return self.transformer(jnp.concatenate([masks, x], 1))[:, :n]
