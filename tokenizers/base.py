"""What every quantizer returns (its index space, `Vocab`, is in core/tokens/layout.py)."""

from __future__ import annotations

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
