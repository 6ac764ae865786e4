"""MaskGIT's output heads: how tokenizer indices map to per-head group ids and back.

A plain codebook has one head over its codes. Binary codes (LFQ / BSQ, core/tokens/layout.py)
split their bits into groups, one head of 2**bits logits per group (MAGVIT-v2 / Open-MAGVIT2
factorised heads): by default the tokenizer's own groups, and whenever a group is over
AUTO_HEAD_BITS the fewest near-equal groups of at most that many bits, so that no config builds
a 2**18-way softmax by accident (18 bits -> 9 + 9). An explicit `head_group_bits` re-splits;
a head over 2**MAX_HEAD_BITS logits is refused.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.tokens.layout import (
    Vocab,
    bits_to_indices,
    indices_to_bits,
    split_bits,
)

AUTO_HEAD_BITS = 14  # larger vocabularies get factorised heads unless head_group_bits says
MAX_HEAD_BITS = 18  # 2**18 logits per token: ~68 GB of float32 logits at batch 256 x 256


def head_groups(vocab: Vocab, head_group_bits: int = 0) -> tuple[int, ...] | None:
    """Bits per factorised head for binary codes (None for a plain codebook)."""
    if vocab.bits is None:
        if vocab.size > 2**MAX_HEAD_BITS:
            raise ConfigError(
                f"a plain codebook of {vocab.size} codes needs one head over 2**{MAX_HEAD_BITS} "
                "logits: use binary codes (factorised heads) or a smaller codebook"
            )
        return None
    if head_group_bits < 0:
        raise ConfigError(f"maskgit head_group_bits={head_group_bits} must be >= 0 (0: vocab's)")
    if head_group_bits > MAX_HEAD_BITS and vocab.bits > MAX_HEAD_BITS:
        raise ConfigError(
            f"model.head_group_bits={head_group_bits} builds a head of over 2**{MAX_HEAD_BITS} "
            f"logits for {vocab.bits}-bit codes: use at most {MAX_HEAD_BITS} (e.g. "
            f"{split_bits(vocab.bits, AUTO_HEAD_BITS)[0]}), or 0 to choose automatically"
        )
    if head_group_bits:
        return split_bits(vocab.bits, head_group_bits)
    groups = tuple(vocab.groups or (vocab.bits,))
    if max(groups) > AUTO_HEAD_BITS:  # e.g. 18 bits -> 9 + 9 (MAGVIT-v2 / Open-MAGVIT2)
        return split_bits(vocab.bits, AUTO_HEAD_BITS)
    return groups


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Converts tokenizer indices to per-head group ids [B, N, G] and back (hashable)."""

    vocab: Vocab
    token_shape: tuple[int, ...]
    head_group_bits: int = 0

    @property
    def groups(self) -> tuple[int, ...] | None:
        return head_groups(self.vocab, self.head_group_bits)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Logits per head: the codebook size, or 2**bits of each group."""
        return (self.vocab.size,) if self.groups is None else tuple(2**g for g in self.groups)

    @property
    def length(self) -> int:
        return math.prod(self.token_shape)

    @property
    def index_shape(self) -> tuple[int, ...]:
        """Shape of one sample's tokenizer indices."""
        return self.vocab.index_shape(self.token_shape)

    def to_ids(self, tokens: jax.Array) -> jax.Array:
        """Tokenizer indices [B, *index_shape] -> group ids [B, N, G]."""
        if tuple(tokens.shape[1:]) != self.index_shape:
            raise ConfigError(
                f"MaskGIT expects tokens [B, {', '.join(map(str, self.index_shape))}]; got "
                f"{tuple(tokens.shape)}: check model.token_shape against the tokenizer's grid"
            )
        tokens = tokens.astype(jnp.int32)
        if self.groups is None:
            return tokens.reshape(tokens.shape[0], self.length, 1)
        grouped = tokens if self.vocab.grouped else tokens[..., None]
        bits = indices_to_bits(grouped, self.vocab.int32_groups)
        return bits_to_indices(bits, self.groups).reshape(tokens.shape[0], self.length, -1)

    def to_tokens(self, ids: jax.Array) -> jax.Array:
        """Group ids [B, N, G] -> tokenizer indices [B, *index_shape]."""
        batch = ids.shape[0]
        if self.groups is None:
            return ids[..., 0].reshape(batch, *self.token_shape)
        indices = bits_to_indices(indices_to_bits(ids, self.groups), self.vocab.int32_groups)
        indices = indices if self.vocab.grouped else indices[..., 0]
        return indices.reshape(batch, *self.index_shape)
