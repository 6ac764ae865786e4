"""MaskGIT generator: a bidirectional transformer over tokenizer indices, trained on masked
token prediction and sampled by parallel decoding (models/maskgit_decode.py).

Input: [class token, N token embeddings] + learned position embeddings, LayerNorm, dropout;
pre-norm blocks built from models/vit.py's Attention and MlpBlock with residual dropout (the
official model is post-norm BERT with attention-probability dropout as well); a final
LayerNorm; MaskGIT's MLM head (dense, GELU, LayerNorm) and logits tied to the token embedding
tables plus a learned bias per logit, as in the official model. Class ids run 0..num_classes,
where id `num_classes` (`null_label`) is "no class", used for class dropout in training and the
unconditional half of classifier-free guidance. Masked positions get one learned mask
embedding instead of their token's.

Vocabulary (`Vocab`, core/tokens/layout.py):
- plain codebook (bits None): one embedding table and one softmax head over `size` codes;
- binary codes (bits set): the bits of a token split into groups of `head_groups` bits (by
  default `vocab.groups`, or, when a group is over AUTO_HEAD_BITS = 14 bits, the fewest
  near-equal groups of at most 14 bits: 2 x 9 for 2**18 codes as MAGVIT-v2 / Open-MAGVIT2;
  `head_group_bits` re-splits explicitly, up to MAX_HEAD_BITS = 18), most significant group
  first: group id g of a token is its bits [start_g, start_g + groups[g]) read MSB first, the
  layout of tokenizers/binary.py. Each group
  has its own table (the embeddings are summed) and its own head of 2**groups[g] logits, so the
  largest tensor is [tokens, 2**max(group)] and 2**18 codes fit.

Tokens enter and leave in the tokenizer's index form: [B, *token_shape] int32 (token_shape
(h, w) for grids, flattened in raster order, or (L,) for 1-D latents), plus a trailing axis of
`vocab.groups` group indices for binary codes above 31 bits ([..., G], `Vocab.grouped`).

Loss: cross-entropy with label smoothing on masked tokens only, averaged (`normalize`) per
sample over its masked tokens then over samples ("sample": the official
`weighted_sequence_cross_entropy_loss`, maskgit/libml/losses.py), or over all masked tokens of
the batch ("token": samples with many masked tokens weigh more). With factorised heads it is
the SUM over groups of the per-group cross-entropies, i.e. the cross-entropy of the joint
distribution prod_g p_g: with one group it
is the full softmax loss, and with several it equals the full softmax loss over the joint
vocabulary whose logits are the sums of group logits (label smoothing included).

Parameters are float32 with logical axis names ('vocab', 'embed', 'mlp', 'heads'); `dtype` is
the compute dtype of the transformer; the MLM head (dense, LayerNorm, logits) always runs in
float32, so that neither the loss nor the sampler sees logits rounded to bfloat16 (0.06 apart
at logit 10). Dropout draws from an explicit key (`rng=None`: deterministic), so the
model holds no RNG state and `nnx.split` gives params only.

Jitting: `make_sampler(graphdef, ...)` returns a jitted pure function over the split state
(params, model_state) with the batch sharded over ('data', 'fsdp') when given a mesh; a train
step calls `model_def.merge(params, model_state).loss(tokens, labels, rng)` inside its own jit.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.tokens.layout import Vocab
from visual_tokenizers.models import maskgit_decode as dec
from visual_tokenizers.models import maskgit_sampling as ms
from visual_tokenizers.models.maskgit_heads import (  # noqa: F401 (re-exported)
    AUTO_HEAD_BITS,
    MAX_HEAD_BITS,
    HeadLayout,
    head_groups,
)
from visual_tokenizers.models.vit import Attention, MlpBlock, _dense, _norm

_embed_init = nnx.initializers.truncated_normal(stddev=0.02)  # BERT / MaskGIT init


class Block(nnx.Module):
    """Pre-norm transformer block (vit.py's attention and MLP) with residual dropout."""

    def __init__(self, width, heads, mlp_dim, dropout, *, dtype, rngs: nnx.Rngs):
        self.norm1 = _norm(width, dtype=dtype, rngs=rngs)
        self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
        self.norm2 = _norm(width, dtype=dtype, rngs=rngs)
        self.mlp = MlpBlock(width, mlp_dim, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x, keys=(None, None)):
        """keys: dropout keys for the attention and MLP branches (None: deterministic)."""
        drop = lambda y, key: self.dropout(y, deterministic=key is None, rngs=key)  # noqa: E731
        x = x + drop(self.attn(self.norm1(x)), keys[0])
        return x + drop(self.mlp(self.norm2(x)), keys[1])


def _table(rows: int, width: int, axes, rngs: nnx.Rngs) -> nnx.Param:
    return nnx.Param(_embed_init(rngs.params(), (rows, width)), out_sharding=axes)


class MaskGIT(nnx.Module):
    """Class-conditional masked token transformer; see the module docstring."""

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
        self.layout = HeadLayout(vocab, tuple(token_shape), head_group_bits)
        self.num_classes, self.dtype = num_classes, dtype
        self.token_embed = nnx.List(
            [_table(k, width, ("vocab", "embed"), rngs) for k in self.layout.sizes]
        )
        self.mask_embed = nnx.Param(_embed_init(rngs.params(), (width,)), out_sharding=("embed",))
        self.class_embed = _table(num_classes + 1, width, (None, "embed"), rngs)
        self.pos_embed = _table(self.layout.length + 1, width, (None, "embed"), rngs)
        self.embed_norm = _norm(width, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.blocks = nnx.List(
            [Block(width, heads, mlp_dim, dropout, dtype=dtype, rngs=rngs) for _ in range(depth)]
        )
        self.norm = _norm(width, dtype=dtype, rngs=rngs)
        f32 = jnp.float32  # the MLM head runs in float32 (module docstring)
        self.head_dense = _dense(width, width, ("embed", "mlp"), dtype=f32, rngs=rngs)
        self.head_norm = _norm(width, dtype=f32, rngs=rngs)
        self.head_bias = nnx.List(
            [nnx.Param(jnp.zeros((k,)), out_sharding=("vocab",)) for k in self.layout.sizes]
        )

    @property
    def null_label(self) -> int:
        """The "no class" id: unconditional sampling and class dropout."""
        return self.num_classes

    @property
    def token_shape(self) -> tuple[int, ...]:
        return self.layout.token_shape

    def embed(self, ids: jax.Array, masked: jax.Array) -> jax.Array:
        """Sum of the group embeddings of ids [B, N, G]; the mask embedding where masked."""
        x = sum(
            table[...][ids[..., g]].astype(self.dtype) for g, table in enumerate(self.token_embed)
        )
        return jnp.where(masked[..., None], self.mask_embed[...].astype(self.dtype), x)

    def __call__(self, ids, masked, labels, *, rng: jax.Array | None = None):
        """Logits (one float32 [B, N, K_g] per group) for group ids [B, N, G].

        masked [B, N] bool: positions shown as the mask token; labels [B] int in
        [0, num_classes] (num_classes = null). rng: dropout key, None for deterministic.
        """
        keys = [None] * (2 * len(self.blocks) + 1)
        if rng is not None:  # one split for every dropout site
            keys = list(jax.random.split(rng, len(keys)))
        cls = self.class_embed[...].astype(self.dtype)[labels][:, None]
        x = jnp.concatenate([cls, self.embed(ids, masked)], 1)
        x = self.embed_norm(x + self.pos_embed[...].astype(self.dtype))
        x = self.dropout(x, deterministic=rng is None, rngs=keys[0])
        for i, block in enumerate(self.blocks):
            x = block(x, keys[2 * i + 1 : 2 * i + 3])
        return self.head(self.norm(x)[:, 1:])

    def head(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """MLM head in float32: features [B, N, D] (any dtype) -> float32 logits per group."""
        h = self.head_norm(jax.nn.gelu(self.head_dense(x.astype(jnp.float32))))
        return tuple(
            h @ table[...].T + bias[...]
            for table, bias in zip(self.token_embed, self.head_bias, strict=True)
        )

    def loss(
        self,
        tokens: jax.Array,
        labels: jax.Array,
        rng: jax.Array,
        *,
        train: bool = True,
        schedule: str = "cosine",
        label_smoothing: float = 0.1,
        class_dropout: float = 0.1,
        normalize: str = "sample",
    ) -> tuple[jax.Array, dict]:
        """Masked-token loss on tokenizer indices -> (scalar loss, metrics).

        Masks clip(ceil(N * schedule(r)), 1, N) random tokens per sample, r ~ U(0, 1]; when
        `train`, replaces labels by `null_label` with probability class_dropout and applies
        dropout. normalize: "sample" or "token" (module docstring). Metrics: 'loss',
        'accuracy' (masked tokens with every group right),
        'mask_ratio' (mean masked fraction).
        """
        ids = self.layout.to_ids(tokens)
        mask_rng, label_rng, drop_rng = jax.random.split(rng, 3)
        masked, _ = dec.training_mask(mask_rng, ids.shape[0], ids.shape[1], schedule)
        labels = labels.astype(jnp.int32)
        if train and class_dropout > 0:
            dropped = jax.random.bernoulli(label_rng, class_dropout, labels.shape)
            labels = jnp.where(dropped, self.null_label, labels)
        logits = self(ids, masked, labels, rng=drop_rng if train else None)
        weights = masked.astype(jnp.float32)
        count = jnp.sum(weights)
        loss = dec.masked_mean(
            dec.grouped_cross_entropy(logits, ids, label_smoothing), weights, normalize
        )
        predicted = jnp.stack([jnp.argmax(x, -1) for x in logits], -1)
        correct = jnp.all(predicted == ids, -1).astype(jnp.float32)
        metrics = {
            "loss": loss,
            "accuracy": jnp.sum(correct * weights) / count,
            "mask_ratio": count / weights.size,
        }
        return loss, metrics

    def guided_logits_fn(
        self,
        labels: jax.Array,
        steps: int,
        guidance_scale=None,
        guidance_schedule: str = "constant",
        *,
        guidance_form: str = "ours",
        guidance_interval: tuple[float, float] = (0.0, 1.0),
    ) -> dec.LogitsFn:
        """The decoding logits function for `labels`.

        guidance_scale None: conditional logits only (one pass, as the official MaskGIT).
        Otherwise classifier-free guidance (models/maskgit_sampling.py): in our form
        uncond + s_t (cond - uncond) (scale 0: exactly the unconditional logits, 1: the
        conditional ones), in TiTok's cond + g_t (cond - uncond); s_t = 1 + g_t, g_t constant
        or TiTok's linear ramp g t/T, and 0 outside guidance_interval. The two passes run as
        one batch of 2B.
        """
        labels = labels.astype(jnp.int32)
        if guidance_scale is None:
            return lambda ids, unknown, step: self(ids, unknown, labels)
        weight = guidance_scale - 1.0 if guidance_form == "ours" else guidance_scale
        both = jnp.concatenate([labels, jnp.full_like(labels, self.null_label)])
        twice = lambda x: jnp.concatenate([x, x])  # noqa: E731

        def logits_fn(ids, unknown, step):
            g = ms.guidance_weight(step, steps, weight, guidance_schedule, guidance_interval)
            logits = self(twice(ids), twice(unknown), both)
            half = labels.shape[0]
            return tuple(ms.apply_guidance(x[:half], x[half:], g, guidance_form) for x in logits)

        return logits_fn

    def sample(
        self,
        labels: jax.Array,
        key: jax.Array,
        steps: int = 8,
        *,
        tokens: jax.Array | None = None,
        generate: jax.Array | None = None,
        **options,
    ) -> jax.Array:
        """Generates tokenizer indices [B, *index_shape] for labels [B] (null_label: none).

        Inpainting / outpainting / class-conditional editing: pass `tokens` (indices to start
        from) and `generate` (bool [B, *token_shape], True = generate, False = keep); with
        tokens but no mask every token is regenerated. key: the random key (the option `rng`
        names how draws are made from it). options: the fields of
        maskgit_sampling.SamplingOptions (temperature, top_k, top_p, choice_temperature,
        schedule, confidence, rng, guidance_*), checked before tracing.
        """
        o = ms.SamplingOptions(steps=steps, **options)
        batch, length = labels.shape[0], self.layout.length
        group_count = len(self.layout.sizes)
        if tokens is None:
            ids = jnp.zeros((batch, length, group_count), jnp.int32)
        else:
            ids = self.layout.to_ids(tokens)
        if generate is None:
            unknown = jnp.ones((batch, length), bool)
        else:
            unknown = jnp.asarray(generate, bool).reshape(batch, length)
        logits_fn = self.guided_logits_fn(
            labels,
            steps,
            o.guidance_scale,
            o.guidance_schedule,
            guidance_form=o.guidance_form,
            guidance_interval=tuple(o.guidance_interval),
        )
        ids, _ = dec.decode(logits_fn, ids, unknown, key, o, prefix=1)  # class token first
        return self.layout.to_tokens(ids)


def make_sampler(graphdef, *, mesh=None, **sample_options) -> Callable:
    """jit of `MaskGIT.sample` as a pure function over the split model.

    graphdef: from `nnx.split(model, nnx.Param, ...)` (core/runtime/train_state.py split_model) or a
    `ModelDef`. sample_options: `steps` and the keyword options of `MaskGIT.sample` (static).
    Returns fn(params, model_state, labels, rng, tokens=None, generate=None) -> tokens. With a
    mesh, labels/tokens/generate and the output are sharded over ('data', 'fsdp') (batch a
    multiple of data x fsdp); params keep the sharding they arrive with.
    """
    graphdef = getattr(graphdef, "graphdef", graphdef)

    def sample(params, model_state, labels, rng, tokens=None, generate=None):
        model = nnx.merge(graphdef, params, model_state)
        return model.sample(labels, rng, tokens=tokens, generate=generate, **sample_options)

    if mesh is None:
        return jax.jit(sample)
    batch = mesh_lib.batch_sharding(mesh, 1)  # P(('data', 'fsdp')): first axis, any rank
    jitted = jax.jit(
        sample,
        in_shardings=(None, None, batch, mesh_lib.replicated(mesh), batch, batch),
        out_shardings=batch,
    )

    def sharded(params, model_state, labels, rng, tokens=None, generate=None):
        # jit's in_shardings cover all six arguments: pass the optional ones explicitly.
        return jitted(params, model_state, labels, rng, tokens, generate)

    return sharded
