"""The official MaskGIT transformer (`maskgit.nets.maskgit_transformer.Transformer`, PyPI package
`maskgit`, Chang et al., CVPR 2022) as a variant of models/maskgit.py's MaskGIT: same loss,
sampling and token interface (inherited), the official network inside.

Differences from our default (`model.architecture = "ours"`), all as the official BERT code:
- one embedding table for codes, class tokens and the mask token, laid out as theirs: rows
  [0, K) codes, [K, K + C) class c at row K + c, row K + C the mask token (their
  `mask_token_id = -1`, the last row). The input is [class token, N tokens] plus position
  embeddings, then LayerNorm and dropout. Our "no class" label (`null_label` = C) lands on row
  K + C, the mask token: an unconditional input is a masked class slot. The released model was
  never trained with class dropout, so its guided sampling is not meaningful; without guidance
  the null label is never used.
- post-norm blocks: x = LN(x + drop(attn(x))), x = LN(x + drop(mlp(x))), with dropout on the
  attention probabilities as well (flax's dot_product_attention, broadcast over queries as
  linen's SelfAttention does);
- LayerNorm epsilon 1e-12 (BERT); every kernel and table drawn from a truncated normal
  N(0, 0.02) cut at 2 standard deviations *without* variance correction
  (`jax.random.truncated_normal(-2, 2) * 0.02`, their `truncated_normal`), biases zero;
- the MLM head: dense, GELU, LayerNorm, logits against the word-embedding table plus a bias of
  one entry per row. The official model scores all K + C + 1 rows and its sampler keeps the
  first K; here only the code rows are scored (the same numbers for those logits). The head
  runs in float32 whatever the compute dtype, so the logits are not rounded.

Plain codebooks only (the released models: K = 1024). Parameter names: our path -> their path
under `params` (see `official_param_names`): word_embed <- Embed_0/word_embeddings/embedding,
pos_embed <- Embed_0/position_embeddings/embedding, embed_norm <- Embed_0/embeddings_ln,
blocks/i/{query,key,value,out} <- TransformerLayer_i/Attention_0/self_attention/{same},
blocks/i/attn_norm <- .../Attention_0/attention_output_ln, blocks/i/fc1, fc2, mlp_norm <-
TransformerLayer_i/Mlp_0/{intermediate_output, layer_output, layer_output_ln}, head_dense,
head_norm <- MlmLayer_0/{mlm_dense, mlm_ln}, head_bias <- MlmLayer_0/mlm_bias/bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.tokens.layout import Vocab
from visual_tokenizers.models.maskgit import HeadLayout, MaskGIT

LAYERNORM_EPSILON = 1e-12  # maskgit_transformer.LAYERNORM_EPSILON (BERT)
INITIALIZER_RANGE = 0.02  # Transformer.initializer_range


def truncated_normal(stddev: float = INITIALIZER_RANGE):
    """Their `truncated_normal`: no variance correction (jax.nn.initializers' has one)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * stddev

    return init


_init = truncated_normal()
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


def _norm(width, *, dtype, rngs):
    return nnx.LayerNorm(
        width,
        epsilon=LAYERNORM_EPSILON,
        scale_init=nnx.with_partitioning(_ones, ("embed",)),
        bias_init=nnx.with_partitioning(_zeros, ("embed",)),
        dtype=dtype,
        rngs=rngs,
    )


def _general(din, dout, kernel_axes, *, axis=-1, dtype, rngs):
    """A flax DenseGeneral: kernel [*din, *dout], bias [*dout] (linen's attention shapes)."""
    return nnx.LinearGeneral(
        din,
        dout,
        axis=axis,
        kernel_init=nnx.with_partitioning(_init, kernel_axes),
        bias_init=nnx.with_partitioning(_zeros, kernel_axes[len(axis) if axis != -1 else 1 :]),
        dtype=dtype,
        rngs=rngs,
    )


class PostNormBlock(nnx.Module):
    """The official TransformerLayer: post-norm attention and MLP with three dropout sites."""

    def __init__(self, width, heads, mlp_dim, dropout, *, dtype, rngs: nnx.Rngs):
        if width % heads:
            raise ConfigError(f"model.width {width} is not divisible by model.heads {heads}")
        self.heads, self.rate = heads, dropout
        head = (heads, width // heads)
        qkv = lambda: _general(width, head, ("embed", "heads", None), dtype=dtype, rngs=rngs)  # noqa: E731
        self.query, self.key, self.value = qkv(), qkv(), qkv()
        self.out = _general(
            head, width, ("heads", None, "embed"), axis=(-2, -1), dtype=dtype, rngs=rngs
        )
        self.attn_norm = _norm(width, dtype=dtype, rngs=rngs)
        self.fc1 = _general(width, mlp_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = _general(mlp_dim, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.mlp_norm = _norm(width, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x, keys=(None, None, None)):
        """keys: dropout keys for attention probabilities, attention output, MLP output."""
        drop = lambda y, key: self.dropout(y, deterministic=key is None, rngs=key)  # noqa: E731
        q, k, v = self.query(x), self.key(x), self.value(x)
        y = nnx.dot_product_attention(
            q,
            k,
            v,
            dropout_rng=keys[0],
            dropout_rate=self.rate,
            deterministic=keys[0] is None or self.rate == 0,
            dtype=x.dtype,
        )
        x = self.attn_norm(x + drop(self.out(y), keys[1]))
        return self.mlp_norm(x + drop(self.fc2(jax.nn.gelu(self.fc1(x))), keys[2]))


class OfficialMaskGIT(MaskGIT):
    """The official MaskGIT transformer with MaskGIT's interface (loss, sample, guidance)."""

    def __init__(
        self,
        *,
        vocab: Vocab,
        token_shape: tuple[int, ...] = (16, 16),
        num_classes: int = 1000,
        width: int = 768,
        depth: int = 24,
        heads: int = 16,
        mlp_dim: int = 3072,
        dropout: float = 0.1,
        head_group_bits: int = 0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if vocab.bits is not None or head_group_bits:
            raise ConfigError(
                "model.architecture='official' needs a plain codebook (one softmax head); use "
                "model.architecture='ours' for binary codes and factorised heads"
            )
        self.layout = HeadLayout(vocab, tuple(token_shape), 0)
        self.num_classes, self.dtype = num_classes, dtype
        rows = vocab.size + num_classes + 1  # codes, classes, mask: their vocab_size
        self.word_embed = nnx.Param(
            _init(rngs.params(), (rows, width)), out_sharding=(None, "embed")
        )
        self.pos_embed = nnx.Param(
            _init(rngs.params(), (self.layout.length + 1, width)), out_sharding=(None, "embed")
        )
        self.embed_norm = _norm(width, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.blocks = nnx.List(
            [
                PostNormBlock(width, heads, mlp_dim, dropout, dtype=dtype, rngs=rngs)
                for _ in range(depth)
            ]
        )
        self.head_dense = _general(width, width, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.head_norm = _norm(width, dtype=dtype, rngs=rngs)
        self.head_bias = nnx.Param(jnp.zeros((rows,)), out_sharding=(None,))

    @property
    def mask_row(self) -> int:
        """The mask token's row of `word_embed` (their mask_token_id -1)."""
        return self.layout.vocab.size + self.num_classes

    def input_ids(self, ids: jax.Array, masked: jax.Array, labels: jax.Array) -> jax.Array:
        """Their input sequence [B, 1 + N]: class row, then code ids or the mask row."""
        tokens = jnp.where(masked, self.mask_row, ids[..., 0])
        classes = self.layout.vocab.size + labels.astype(jnp.int32)
        return jnp.concatenate([classes[:, None], tokens], 1)

    def __call__(self, ids, masked, labels, *, rng: jax.Array | None = None):
        """Logits (one float32 [B, N, K]) for ids [B, N, 1]; see MaskGIT.__call__."""
        keys = [None] * (3 * len(self.blocks) + 1)
        if rng is not None:  # one split for every dropout site
            keys = list(jax.random.split(rng, len(keys)))
        table = self.word_embed[...]
        x = table.astype(self.dtype)[self.input_ids(ids, masked, labels)]
        x = self.embed_norm(x + self.pos_embed[...].astype(self.dtype))
        x = self.dropout(x, deterministic=rng is None, rngs=keys[0])
        for i, block in enumerate(self.blocks):
            x = block(x, keys[3 * i + 1 : 3 * i + 4])
        h = self.head_norm(jax.nn.gelu(self.head_dense(x[:, 1:]))).astype(jnp.float32)
        size = self.layout.vocab.size
        logits = h @ table[:size].astype(jnp.float32).T + self.head_bias[:size]
        return (logits,)


def official_param_names(model: OfficialMaskGIT) -> dict[tuple, tuple]:
    """Our parameter path -> the official Flax path under `params` (module docstring)."""
    top = {
        ("word_embed",): ("Embed_0", "word_embeddings", "embedding"),
        ("pos_embed",): ("Embed_0", "position_embeddings", "embedding"),
        ("head_bias",): ("MlmLayer_0", "mlm_bias", "bias"),
    }
    prefixes = {
        ("embed_norm",): ("Embed_0", "embeddings_ln"),
        ("head_dense",): ("MlmLayer_0", "mlm_dense"),
        ("head_norm",): ("MlmLayer_0", "mlm_ln"),
    }
    for i in range(len(model.blocks)):
        layer = f"TransformerLayer_{i}"
        for name in ("query", "key", "value", "out"):
            prefixes[("blocks", i, name)] = (layer, "Attention_0", "self_attention", name)
        prefixes[("blocks", i, "attn_norm")] = (layer, "Attention_0", "attention_output_ln")
        prefixes[("blocks", i, "fc1")] = (layer, "Mlp_0", "intermediate_output")
        prefixes[("blocks", i, "fc2")] = (layer, "Mlp_0", "layer_output")
        prefixes[("blocks", i, "mlp_norm")] = (layer, "Mlp_0", "layer_output_ln")
    names = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(path)
        if path in top:
            names[path] = top[path]
        elif path[:-1] in prefixes:
            names[path] = (*prefixes[path[:-1]], path[-1])
        else:
            raise KeyError(f"parameter {path} has no official MaskGIT name")
    return names
