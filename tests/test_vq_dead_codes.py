"""Dead-code rules of tokenizers/vq.py (tokenizers/dead_codes.py): vector-quantize-pytorch's
absolute EMA-count rule against the peer itself, and the guard against re-restarting a code."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.tokenizers import dead_codes
from visual_tokenizers.tokenizers.vq import VectorQuantizer

_train = nnx.jit(lambda m, z: m(z, train=True))


def make(dim, k, **kw):
    return VectorQuantizer(dim, k, rngs=nnx.Rngs(0), restart_dead_codes=True, **kw)


def set_codes(vq, codes):
    if vq.use_ema:
        vq.codebook[...] = jnp.asarray(codes)
        vq.embed_sum[...] = jnp.asarray(codes) * vq.cluster_size[...][:, None]
    else:  # the Param itself, so that rows are exact (no offset rounding)
        vq.codebook[...] = jnp.asarray(codes)


def peer_codebook(vqp, torch, d, k, decay, threshold, use_ema, codes, sizes):
    """vector-quantize-pytorch's Codebook with our codebook and EMA cluster sizes; records the
    mask of every `replace` (its dead codes)."""
    peer = vqp.vector_quantize_pytorch.Codebook(
        dim=d, codebook_size=k, decay=decay, eps=1e-5, kmeans_init=False,
        threshold_ema_dead_code=threshold, learnable_codebook=not use_ema, ema_update=use_ema,
    )  # fmt: skip
    with torch.no_grad():
        peer.embed.data.copy_(torch.from_numpy(codes)[None])
        peer.cluster_size.copy_(torch.from_numpy(sizes)[None])
        peer.embed_avg.copy_(torch.from_numpy(codes * sizes[:, None])[None])
    masks = []
    replace = peer.replace

    def recording(samples, batch_mask, seq_mask=None):
        masks.append(batch_mask[0].clone().numpy())
        return replace(samples, batch_mask, seq_mask)

    peer.replace = recording
    return peer, masks


@pytest.mark.parametrize("use_ema", [True, False])
def test_ema_count_rule_flags_the_codes_vector_quantize_pytorch_flags(use_ema):
    torch = pytest.importorskip("torch")
    vqp = pytest.importorskip("vector_quantize_pytorch")
    d, k, n, decay, threshold = 3, 16, 96, 0.8, 2.0
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(k, d)).astype(np.float32)
    codes[12:] += 20.0  # far from the data: these win nothing
    sizes = rng.uniform(0.0, 6.0, k).astype(np.float32)  # some above, some below threshold
    x = rng.normal(size=(n, d)).astype(np.float32)

    # The guard with a cooldown records which codes were restarted; at the first step nothing
    # was restarted before, so it spares none.
    ours = make(d, k, use_ema=use_ema, ema_decay=decay, dead_code_rule="ema_count",
                dead_code_min_count=threshold, dead_code_cooldown=5)  # fmt: skip
    ours.cluster_size[...] = jnp.asarray(sizes)
    set_codes(ours, codes)
    peer, masks = peer_codebook(vqp, torch, d, k, decay, threshold, use_ema, codes, sizes)

    idx = np.asarray(_train(ours, jnp.asarray(x)).indices)
    peer.train()
    with torch.no_grad():
        _, peer_idx, _ = peer(torch.from_numpy(x)[None])
    np.testing.assert_array_equal(idx, peer_idx.reshape(-1).numpy())

    counts = np.bincount(idx, minlength=k)
    expected = decay * np.float64(sizes) + (1 - decay) * counts < threshold
    assert 0 < expected.sum() < k  # both kinds of code are present
    ours_dead = np.asarray(ours.last_restart[...]) == 0
    (peer_dead,) = masks
    np.testing.assert_array_equal(ours_dead, expected)
    np.testing.assert_array_equal(peer_dead, expected)
    # Same sizes after the step: the EMA for kept codes, reset to the threshold for restarted.
    np.testing.assert_allclose(ours.cluster_size[...], peer.cluster_size[0].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ours.cluster_size[...])[expected], threshold)
    new = np.asarray(ours.codes())
    for row in new[expected]:  # each restarted code is one of the batch vectors
        assert np.min(np.abs(x - row).max(-1)) < 1e-6
    if use_ema:  # kept codes: the same EMA codebook row as the peer's
        peer_rows = peer.embed[0].numpy()
        np.testing.assert_allclose(new[~expected], peer_rows[~expected], rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(new[~expected], codes[~expected])
    assert int(ours.step[...]) == 1


def stuck_code(rule, cooldown, steps=10):
    """Code 1 can never win: every vector is exactly code 0, and a restarted code 1 (set to one
    of them) ties with code 0, which keeps the tie. Returns codes restarted per step and the
    quantizer."""
    # ema_decay 0.5: code 0's EMA count passes the threshold 2 at the first step (8 vectors).
    vq = make(2, 2, dead_code_rule=rule, dead_code_cooldown=cooldown, ema_decay=0.5)
    set_codes(vq, np.array([[1, 0], [-5, -5]], np.float32))
    z = jnp.tile(jnp.array([[1.0, 0.0]]), (8, 1))
    restarted = [float(_train(vq, z).stats["restarted"]) for _ in range(steps)]
    np.testing.assert_array_equal(np.asarray(vq.codes())[1], [1, 0])  # restarted, never won
    return restarted, vq


@pytest.mark.parametrize("rule", ["share", "ema_count"])
def test_without_the_guard_a_stuck_code_is_restarted_every_step(rule):
    restarted, vq = stuck_code(rule, cooldown=0)
    assert restarted == [1.0] * 10
    assert vq.last_restart is None  # no guard, no extra state


@pytest.mark.parametrize("rule", ["share", "ema_count"])
@pytest.mark.parametrize("cooldown", [1, 3])
def test_guard_spares_a_restarted_code_for_cooldown_steps(rule, cooldown):
    restarted, vq = stuck_code(rule, cooldown)
    # Restarted at step 0, spared at 1 .. cooldown, restarted again at cooldown + 1, ...
    expected = [1.0 if s % (cooldown + 1) == 0 else 0.0 for s in range(10)]
    assert restarted == expected
    last = max(s for s in range(10) if expected[s])
    np.testing.assert_array_equal(vq.last_restart[...], [dead_codes.NEVER, last])


def test_default_options_keep_the_old_state_and_bad_options_are_named():
    # Configs without the new options carry exactly the state they had (checkpoints restore).
    names = set(nnx.state(make(4, 8)).to_pure_dict())
    assert names == {"codebook", "codebook_offset", "usage", "step", "initialized"}
    with pytest.raises(ConfigError, match="dead_code_rule"):
        make(4, 8, dead_code_rule="absolute")
    with pytest.raises(ConfigError, match="dead_code_cooldown"):
        make(4, 8, dead_code_cooldown=-1)
    with pytest.raises(ConfigError, match="dead_code_min_count"):
        make(4, 8, dead_code_rule="ema_count", dead_code_min_count=0.0)
