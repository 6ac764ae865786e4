"""The token index layout (core/tokens/layout.py): one "more than 31 bits means [..., G] group
indices" rule, the same for the quantizer, MaskGIT, the token-file rows and codebook stats."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from visual_tokenizers.core.evaluation.metrics import CodebookStats
from visual_tokenizers.core.tokens.layout import (
    TokenRowLayout,
    Vocab,
    bits_to_indices,
    join_groups,
    split_bits,
)
from visual_tokenizers.models.maskgit import HeadLayout
from visual_tokenizers.tokenizers.binary import LookupFreeQuantizer


@pytest.mark.parametrize("bits, grouped", [(31, False), (32, True)])
def test_every_user_agrees_on_the_grouped_rule(bits, grouped):
    q = LookupFreeQuantizer(bits, bits, entropy_weight=0.0, window_table_bits=4, rngs=nnx.Rngs(0))
    vocab = q.vocab
    assert vocab.grouped == grouped
    z = jax.ShapeDtypeStruct((2, 3, bits), jnp.float32)
    indices = nnx.eval_shape(lambda m, x: m(x), q, z).indices
    groups = (len(vocab.groups),) if grouped else ()
    assert indices.shape == (2, 3) + groups  # what encode returns for a [3]-token latent
    assert vocab.index_shape((3,)) == (3,) + groups
    assert HeadLayout(vocab, (3,)).index_shape == (3,) + groups  # MaskGIT's expected input
    rows = TokenRowLayout.create(indices.shape[1:], vocab)
    assert rows.grouped == grouped and rows.matches(vocab)
    assert rows.value_vocab == (2 ** max(vocab.groups) if grouped else 2**bits)
    assert (CodebookStats(vocab.size, vocab).group_bits is not None) == grouped


def test_head_layout_round_trips_grouped_indices_through_its_heads():
    vocab = Vocab(2**32, 32, split_bits(32, 31))  # (16, 16): grouped input
    layout = HeadLayout(vocab, (4,), head_group_bits=11)  # heads of 11, 11, 10 bits
    tokens = jax.random.randint(jax.random.key(0), (2, 4, 2), 0, 2**16)
    ids = layout.to_ids(tokens)
    assert ids.shape == (2, 4, 3)
    np.testing.assert_array_equal(layout.to_tokens(ids), tokens)


def test_join_groups_reads_groups_most_significant_first():
    bits = np.random.default_rng(0).integers(0, 2, (5, 36)).astype(bool)
    groups = split_bits(36, 31)  # (18, 18)
    indices = np.asarray(bits_to_indices(jnp.asarray(bits), groups))
    want = (bits * (1 << np.arange(35, -1, -1, dtype=np.uint64))).sum(-1).astype(np.uint64)
    np.testing.assert_array_equal(join_groups(indices, groups), want)


def test_vocab_dict_round_trip_keeps_manifest_keys():
    vocab = Vocab(2**36, 36, (18, 18))
    stored = {"size": 2**36, "bits": 36, "groups": [18, 18]}  # as manifests hold it
    assert Vocab.from_dict(stored) == vocab
    assert Vocab.from_dict(vocab.to_dict()) == vocab
    assert set(vocab.to_dict()) == set(stored)
    assert Vocab.from_dict({"size": 512, "bits": None, "groups": None}) == Vocab(512)
