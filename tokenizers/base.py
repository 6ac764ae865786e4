"""What every quantizer returns and how it describes its index space."""

from __future__ import annotations

import dataclasses

import jax
from flax import struct


@struct.dataclass
class QuantizerOutput:
    """Result of quantizing a batch of vectors z with shape [..., dim].

    quantized: [..., dim] straight-through vectors (forward: the codes, backward: identity to z).
    indices: int32 [...] code index per vector.
    losses: scalar terms, already multiplied by their weights; the trainer sums them.
    stats: scalar diagnostics (perplexity, usage, ...), never differentiated.
    """

    quantized: jax.Array
    indices: jax.Array
    losses: dict[str, jax.Array]
    stats: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Vocab:
    """The index space of a quantizer.

    size: number of distinct indices (codebook size, or 2**bits for binary codes).
    bits / groups: for binary codes, the number of bits per token and how they split into
    groups (MaskGIT's factorized heads use the same layout); None for plain codebooks.
    """

    size: int
    bits: int | None = None
    groups: tuple[int, ...] | None = None
