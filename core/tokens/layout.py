"""The token index layout: what one token's index is, how bits pack into int32 indices, and
how a tokenizer's indices become one stored row of a token file.

Quantizers, MaskGIT, the export and the token statistics all read the layout from here, so
the rule "a code of more than 31 bits does not fit an int32 and comes as [..., G] group
indices" has a single definition (`Vocab.grouped`).

Bit order: bit i of a binary code is dimension i, most significant first. The bits split into
groups taken in order (larger groups first); group j's index reads its bits MSB first. A flat
index (<= 31 bits) is the same bits read as one group, so it splits into any grouping by
shifting, which is how MaskGIT's factorised heads read it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_INT32_BITS = 31  # a non-negative int32 holds 31 bits
INT32_MAX = 2**MAX_INT32_BITS - 1


# ----------------------------------------------------------------------------- vocabulary


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

    @property
    def grouped(self) -> bool:
        """True when a token's code is too large for one int32: indices are [..., G] groups."""
        return self.bits is not None and self.bits > MAX_INT32_BITS

    @property
    def int32_groups(self) -> tuple[int, ...] | None:
        """Bits held by each int32 index of one token: (bits,) for a flat binary index, the
        groups when grouped, None for a plain codebook."""
        if self.bits is None:
            return None
        return tuple(self.groups or ()) if self.grouped else (self.bits,)

    @property
    def value_vocab(self) -> int:
        """Distinct values of one stored int32 index (2**(largest group) when grouped)."""
        return 2 ** max(self.groups) if self.grouped else int(self.size)

    def index_shape(self, token_shape) -> tuple[int, ...]:
        """One image's indices for a token grid `token_shape`: [*token_shape] or [..., G]."""
        groups = (len(self.groups),) if self.grouped else ()
        return tuple(int(d) for d in token_shape) + groups

    def to_dict(self) -> dict:
        """{size, bits, groups}: the form configs and manifests store (key names are kept)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        """The inverse of to_dict, also for dicts read back from JSON (groups as a list)."""
        bits, groups = d.get("bits"), d.get("groups")
        groups = tuple(int(g) for g in groups) if groups else None
        return cls(int(d["size"]), None if bits is None else int(bits), groups)


# ----------------------------------------------------------------------------- bit groups


def split_bits(bits: int, max_group: int) -> tuple[int, ...]:
    """Split of `bits` into the fewest near-equal groups of at most max_group bits, larger first."""
    count = -(-bits // max_group)
    base, extra = divmod(bits, count)
    return tuple(base + 1 if i < extra else base for i in range(count))


def bits_to_indices(bits: jax.Array, groups: tuple[int, ...]) -> jax.Array:
    """Bits [..., d] (bool or 0/1, most significant first) -> int32 group indices [..., G]."""
    out, start = [], 0
    for g in groups:
        weights = jnp.left_shift(1, jnp.arange(g - 1, -1, -1, dtype=jnp.int32))
        out.append(jnp.sum(bits[..., start : start + g].astype(jnp.int32) * weights, -1))
        start += g
    return jnp.stack(out, -1)


def indices_to_bits(indices: jax.Array, groups: tuple[int, ...]) -> jax.Array:
    """Group indices [..., G] -> bool bits [..., d], most significant bit first."""
    parts = []
    for j, g in enumerate(groups):
        shifts = jnp.arange(g - 1, -1, -1, dtype=jnp.int32)
        parts.append(jnp.right_shift(indices[..., j, None].astype(jnp.int32), shifts) & 1)
    return jnp.concatenate(parts, -1).astype(bool)


def join_groups(indices: np.ndarray, groups: tuple[int, ...]) -> np.ndarray:
    """Group indices [..., G] -> one uint64 code per token [...] (host side, up to 64 bits)."""
    indices = np.asarray(indices)
    codes = np.zeros(indices.shape[:-1], np.uint64)
    for j, bits in enumerate(groups):  # most significant group first
        codes = (codes << np.uint64(bits)) | indices[..., j].astype(np.uint64)
    return codes


# ----------------------------------------------------------------------------- stored rows


@dataclasses.dataclass(frozen=True)
class TokenRowLayout:
    """How a tokenizer's indices become one `tokens` row of a token file, and back.

    indices_shape: one image's indices as encode returns them ([h, w] grid, [L] sequence, or
      [h, w, G] / [L, G] group indices for binary codes of more than 31 bits).
    value_vocab: distinct values of one stored index (codebook size, 2**bits, or 2**(largest
      group) when grouped).
    Stored row = [boi] + (indices flattened row-major, + offset) + [eoi]; boi/eoi are None
    unless begin/end-of-image ids were asked for (then offset + value_vocab and that + 1).
    Manifests store to_dict() under `tokens.layout`; its keys are part of the file format.
    """

    indices_shape: tuple[int, ...]
    value_vocab: int
    grouped: bool = False
    offset: int = 0
    boi: int | None = None
    eoi: int | None = None

    @classmethod
    def create(cls, indices_shape, vocab: Vocab, *, offset: int = 0, delimiters: bool = False):
        """Layout for a tokenizer's `vocab` and encode's per-image output shape."""
        if vocab.grouped and (not vocab.groups or indices_shape[-1] != len(vocab.groups)):
            raise ValueError(
                f"a {vocab.bits}-bit code needs group indices [..., {len(vocab.groups or ())}]"
                f" from encode; got per-image shape {tuple(indices_shape)}"
            )
        value_vocab = vocab.value_vocab
        boi = offset + value_vocab if delimiters else None
        top = offset + value_vocab + (2 if delimiters else 0) - 1
        if offset < 0 or top > INT32_MAX:
            raise ValueError(
                f"vocab_offset={offset} with {value_vocab} values does not fit int32 tokens; "
                "use a smaller offset"
            )
        eoi = boi + 1 if delimiters else None
        shape = tuple(int(d) for d in indices_shape)
        return cls(shape, value_vocab, vocab.grouped, int(offset), boi, eoi)

    @property
    def delimited(self) -> bool:
        return self.boi is not None

    @property
    def length(self) -> int:
        """Tokens per stored row."""
        return math.prod(self.indices_shape) + (2 if self.delimited else 0)

    @property
    def order(self) -> str:
        grid = {1: "sequence order", 2: "raster order (row-major over [h, w])"}
        spatial = len(self.indices_shape) - (1 if self.grouped else 0)
        text = grid.get(spatial, f"row-major over {list(self.indices_shape)}")
        return text + (", group indices innermost" if self.grouped else "")

    def matches(self, vocab: Vocab) -> bool:
        """Whether rows of this layout can hold indices of `vocab`."""
        return self.grouped == vocab.grouped and self.value_vocab == vocab.value_vocab

    def to_stored(self, indices: np.ndarray) -> np.ndarray:
        """Indices [B, *indices_shape] -> int32 rows [B, length]."""
        flat = np.asarray(indices, np.int64).reshape(len(indices), -1) + self.offset
        if self.delimited:
            n = len(flat)
            flat = np.concatenate([np.full((n, 1), self.boi), flat, np.full((n, 1), self.eoi)], 1)
        return flat.astype(np.int32)

    def raw(self, tokens: np.ndarray) -> np.ndarray:
        """Stored rows [N, length] -> raw index values [N, prod(indices_shape)]."""
        tokens = np.asarray(tokens, np.int64)
        if self.delimited:
            if not (np.all(tokens[:, 0] == self.boi) and np.all(tokens[:, -1] == self.eoi)):
                raise ValueError("token rows do not start/end with the begin/end-of-image ids")
            tokens = tokens[:, 1:-1]
        return tokens - self.offset

    def from_stored(self, tokens: np.ndarray) -> np.ndarray:
        """Stored rows -> int32 indices [N, *indices_shape], what the decoder takes."""
        return self.raw(tokens).reshape(-1, *self.indices_shape).astype(np.int32)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["indices_shape"] = list(self.indices_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TokenRowLayout:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        return cls(**{**values, "indices_shape": tuple(values["indices_shape"])})
