"""Tests for tokenizers/vq.py: every check is against numpy or a brute-force reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from visual_tokenizers.tokenizers.vq import VectorQuantizer, entropy_penalty, nearest_code


def make(dim=4, k=8, **kw):
    return VectorQuantizer(dim, k, rngs=nnx.Rngs(0), **kw)


# Jitted entry points: one compile per configuration instead of op-by-op dispatch (speed only).
_train = nnx.jit(lambda m, z: m(z, train=True))
_eval = nnx.jit(lambda m, z: m(z))
search = jax.jit(nearest_code, static_argnums=2)
entropy = jax.jit(entropy_penalty, static_argnums=(2, 3))


def call(vq, z, train=False):
    return (_train if train else _eval)(vq, jnp.asarray(z))


def normal(seed, *shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


def set_codes(vq, codes):
    """Puts codes into the codebook (and the EMA sums, so the EMA state is consistent)."""
    vq.codebook[...] = jnp.asarray(codes)
    if vq.use_ema:
        vq.embed_sum[...] = jnp.asarray(codes)


def sqdist(z, c):
    z, c = np.float64(z), np.float64(c)
    return ((z[:, None, :] - c[None, :, :]) ** 2).sum(-1)


def gradients(vq, z, w):
    """One jitted pass: d sum(quantized * w)/dz and d loss/d(params, z) for each loss term."""
    graphdef, params, rest = nnx.split(vq, nnx.Param, ...)

    def out(p, z):
        return nnx.merge(graphdef, p, rest)(z)

    def run(params, z):
        g_out = jax.grad(lambda z: jnp.sum(out(params, z).quantized * w))(z)
        g_loss = {
            name: jax.grad(lambda p, z, name=name: out(p, z).losses[name], (0, 1))(params, z)
            for name in ("codebook", "commitment")
        }
        return g_out, g_loss, out(params, z).indices

    return jax.jit(run)(params, jnp.asarray(z))


def test_straight_through_gradient_and_codebook_gradient():
    vq = make(4, 8, codebook_weight=0.5)
    z, w = normal(1, 3, 5, 4), normal(2, 3, 5, 4)
    g, g_loss, idx = gradients(vq, z, w)
    np.testing.assert_array_equal(g, w)  # identity, exactly

    # Codebook loss: d/dc_k [cw * mean((c[idx] - z)^2)] = cw * 2 / (N D) * sum_{idx=k} (c_k - z).
    idx = np.asarray(idx).reshape(-1)
    codes, flat = np.asarray(vq.codebook[...]), z.reshape(-1, 4)
    want = np.zeros_like(codes)
    np.add.at(want, idx, 0.5 * 2 / flat.size * (codes[idx] - flat))
    np.testing.assert_allclose(g_loss["codebook"][0]["codebook"], want, rtol=1e-5, atol=1e-7)
    # Commitment loss must not move the codebook; codebook loss must not move z.
    np.testing.assert_array_equal(g_loss["commitment"][0]["codebook"], 0.0)
    np.testing.assert_array_equal(g_loss["codebook"][1], 0.0)
    assert np.any(g_loss["commitment"][1] != 0)


def test_straight_through_gradient_through_projections():
    vq = make(6, 8, code_dim=3)
    z, w = normal(1, 10, 6), normal(2, 10, 6)
    g = gradients(vq, z, w)[0]
    w_in, w_out = np.asarray(vq.in_proj.kernel[...]), np.asarray(vq.out_proj.kernel[...])
    np.testing.assert_allclose(g, w @ w_out.T @ w_in.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"code_dim": 3, "l2_normalize": True, "dtype": jnp.bfloat16}])
def test_embed_matches_quantized_and_nearest_is_nearest(kw):
    vq = make(6, 16, **kw)
    z = normal(3, 2, 7, 6)
    out = call(vq, z)
    assert out.indices.shape == (2, 7) and out.indices.dtype == jnp.int32
    assert out.quantized.dtype == vq.dtype == vq.embed(out.indices).dtype
    np.testing.assert_allclose(
        np.float32(vq.embed(out.indices)), np.float32(out.quantized), rtol=1e-6, atol=1e-6
    )
    ze = np.asarray(vq._project_in(jnp.asarray(z.reshape(-1, 6))))
    want = sqdist(ze, np.asarray(vq.codes())).argmin(-1)
    np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), want)


@pytest.mark.parametrize("chunk", [7, 100, 4096])
def test_chunked_search_equals_brute_force(chunk):
    z, c = normal(4, 300, 5), normal(5, 100, 5)
    idx, d = search(jnp.asarray(z), jnp.asarray(c), chunk)
    full = sqdist(z, c)
    np.testing.assert_array_equal(idx, full.argmin(-1))
    np.testing.assert_allclose(d, full.min(-1), rtol=1e-4, atol=1e-4)
    # Ties go to the lower index, as a full argmin does, also across chunk borders.
    twice = jnp.asarray(np.concatenate([c, c]))
    np.testing.assert_array_equal(search(jnp.asarray(z), twice, chunk)[0], idx)
    # And through the module.
    vq = make(5, 100, search_chunk_size=chunk)
    set_codes(vq, c)
    np.testing.assert_array_equal(call(vq, z).indices, full.argmin(-1))


def dense_entropy(z, c, t):
    p = jax.nn.softmax(-jnp.sum((z[:, None] - c[None]) ** 2, -1) / t, -1)
    avg = p.mean(0)
    return -jnp.mean(jnp.sum(p * jnp.log(p), -1)) + jnp.sum(avg * jnp.log(avg))


def test_entropy_loss_matches_numpy_and_dense_gradient():
    z, c, t = normal(6, 12, 3), normal(7, 10, 3), 0.7
    logits = -sqdist(z, c) / t
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    avg = p.mean(0)
    want = -(p * np.log(p)).sum(-1).mean() + (avg * np.log(avg)).sum()
    # Chunks of 3 over 10 codes: three scanned chunks plus a remainder of one.
    np.testing.assert_allclose(entropy(jnp.asarray(z), jnp.asarray(c), t, 3), want, rtol=1e-4)

    vq = make(3, 10, entropy_weight=0.3, entropy_temperature=t)
    set_codes(vq, c)
    np.testing.assert_allclose(call(vq, z).losses["entropy"], 0.3 * want, rtol=1e-4, atol=1e-5)

    # The chunked, rematerialised backward equals the gradient of the dense formula.
    grad = jax.jit(jax.grad(lambda z, c: entropy_penalty(z, c, t, 3), (0, 1)))(z, c)
    dense = jax.jit(jax.grad(lambda z, c: dense_entropy(z, c, t), (0, 1)))(z, c)
    for a, b in zip(grad, dense, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("l2", [False, True])
def test_losses_hand_computed(l2):
    vq = make(4, 8, beta=0.3, codebook_weight=2.0, l2_normalize=l2)
    z = normal(8, 20, 4)
    out = call(vq, z)
    ze = z / np.linalg.norm(z, axis=-1, keepdims=True) if l2 else z
    codes = np.asarray(vq.codebook[...], np.float64)
    if l2:
        codes = codes / np.linalg.norm(codes, axis=-1, keepdims=True)
    q = codes[sqdist(ze, codes).argmin(-1)]
    mse = ((q - ze) ** 2).mean()
    np.testing.assert_allclose(out.losses["commitment"], 0.3 * mse, rtol=1e-5)
    np.testing.assert_allclose(out.losses["codebook"], 2.0 * mse, rtol=1e-5)
    if l2:  # cosine codes: quantized vectors and every codebook entry have unit norm
        np.testing.assert_allclose(np.linalg.norm(out.quantized, axis=-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(vq.embed(jnp.arange(8)), axis=-1), 1.0, atol=1e-5)


def test_ema_update_hand_computed():
    d, eps = 0.9, 1e-5
    codes = np.array([[0, 0], [1, 1], [-1, 2], [5, 5]], np.float32)
    z = np.array([[0.1, 0], [0.2, -0.1], [0.9, 1.2], [1.1, 0.8], [-1, 1.9], [0, 0.3]], np.float32)
    vq = make(2, 4, use_ema=True, ema_decay=d, ema_epsilon=eps)
    set_codes(vq, codes)
    out = call(vq, z, train=True)
    assert "codebook" not in out.losses

    idx = sqdist(z, codes).argmin(-1)
    counts = np.bincount(idx, minlength=4)
    sums = np.zeros((4, 2))
    np.add.at(sums, idx, z)
    size = d * 1.0 + (1 - d) * counts  # cluster sizes start at 1
    total = d * codes + (1 - d) * sums
    n = size.sum()
    want = total / ((size + eps) / (n + 4 * eps) * n)[:, None]
    np.testing.assert_allclose(vq.codebook[...], want, rtol=1e-5)
    np.testing.assert_allclose(vq.cluster_size[...], size, rtol=1e-6)
    np.testing.assert_allclose(out.indices, idx)
    assert isinstance(vq.codebook, nnx.Variable) and not isinstance(vq.codebook, nnx.Param)
    assert not jax.tree.leaves(nnx.state(vq, nnx.Param))  # nothing gradient-trained


def blobs(seed, centres, per, spread=0.05):
    centres = np.asarray(centres, np.float32)
    noise = spread * normal(seed, len(centres) * per, centres.shape[1])
    return np.repeat(centres, per, axis=0) + noise


@pytest.mark.parametrize("use_ema", [False, True])
def test_kmeans_init_finds_cluster_centres(use_ema):
    # Two separated clusters: Lloyd from any two distinct samples recovers both centres.
    x = blobs(9, [[5.0] * 8, [-5.0] * 8], 50)
    vq = make(8, 2, kmeans_init=True, kmeans_iters=5, use_ema=use_ema)
    call(vq, x, train=True)
    got = np.asarray(vq.codes())
    truth = np.stack([x[:50].mean(0), x[50:].mean(0)])
    np.testing.assert_allclose(got[np.argsort(got[:, 0])], truth[::-1], atol=1e-4)
    if use_ema:
        np.testing.assert_allclose(np.sort(vq.cluster_size[...]), [50, 50], rtol=1e-5)
    before = np.asarray(vq.codes())
    call(vq, x + 1.0, train=True)  # second call: no refit (non-EMA codebook must not move)
    if not use_ema:
        np.testing.assert_array_equal(vq.codes(), before)

    # Six clusters, six codes: whatever the random start, the result is a Lloyd fixed point:
    # every code is the mean of the batch vectors nearest to it.
    x = blobs(10, 4 * normal(11, 6, 3), 30, spread=0.2)
    vq = make(3, 6, kmeans_init=True, kmeans_iters=10)
    call(vq, x, train=True)
    c = np.asarray(vq.codes())
    idx = sqdist(x, c).argmin(-1)
    for i in np.unique(idx):
        np.testing.assert_allclose(c[i], x[idx == i].mean(0), atol=1e-4)


@pytest.mark.parametrize("use_ema", [False, True])
def test_never_used_codes_are_restarted(use_ema):
    codes = np.array([[1, 0], [-1, 0]] + [[100, 100 + i] for i in range(6)], np.float32)
    z = np.concatenate([blobs(12, [[1, 0]], 10), blobs(13, [[-1, 0]], 10)])
    vq = make(2, 8, restart_dead_codes=True, use_ema=use_ema)
    set_codes(vq, codes)
    out = call(vq, z, train=True)
    new = np.asarray(vq.codes())
    assert out.stats["restarted"] == 6
    for row in new[2:]:  # each dead code is now one of the batch vectors
        assert np.min(np.abs(z - row).max(-1)) < 1e-4  # float32 rounding of param + offset
    if not use_ema:
        np.testing.assert_array_equal(new[:2], codes[:2])  # used codes unchanged
    np.testing.assert_array_equal(vq.usage[...][2:], 0.0)
    assert np.all(vq.usage[...][:2] > 0)


def test_rarely_used_code_restarted_when_share_falls_below_threshold():
    d, thr = 0.9, 0.1
    vq = make(2, 2, restart_dead_codes=True, usage_decay=d, dead_code_threshold=thr)
    set_codes(vq, np.array([[1, 0], [-1, 0]], np.float32))
    both = np.concatenate([blobs(14, [[1, 0]], 8), blobs(15, [[-1, 0]], 8)])
    call(vq, both, train=True)
    # Afterwards only code 0's cluster: code 1's bias-corrected share decays; it must be
    # restarted exactly when the share drops under thr / K.
    only0 = blobs(16, [[1, 0]], 16)
    u = np.array([0.5, 0.5]) * (1 - d)
    for t in range(2, 30):
        u = d * u + (1 - d) * np.array([1.0, 0.0])
        dead = u[1] / (1 - d**t) < thr / 2
        out = call(vq, only0, train=True)
        code1 = np.asarray(vq.codes())[1]
        if not dead:
            np.testing.assert_array_equal(code1, [-1, 0])
            assert out.stats["restarted"] == 0
        else:
            assert out.stats["restarted"] == 1 and t > 3
            assert np.min(np.abs(only0 - code1).max(-1)) < 1e-6
            return
    pytest.fail("code 1 was never restarted")


def test_usage_and_perplexity_stats():
    d = 0.5
    vq = make(2, 4, usage_decay=d)
    set_codes(vq, np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32))
    z = np.array([[0, 0], [0, 0.1], [0.1, 0], [10, 0.1]], np.float32)  # hits 3 x code 0, 1 x code 1
    out = call(vq, z, train=True)
    p = np.array([0.75, 0.25])
    np.testing.assert_allclose(out.stats["perplexity"], np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
    assert out.stats["batch_usage"] == 0.5 and out.stats["usage"] == 0.5
    # Only code 0 from now on: code 1 is still "used" right after, and no longer once it has
    # been idle for several windows of 1 / (1 - d) = 2 steps.
    z0 = z[[0, 1, 2, 0]]  # same batch size, code 0 only
    out = call(vq, z0, train=True)
    assert out.stats["batch_usage"] == 0.25 and out.stats["usage"] == 0.5
    for _ in range(int(3 / (1 - d))):
        out = call(vq, z0, train=True)
    assert out.stats["usage"] == 0.25
    assert vq.vocab.size == 4


def test_data_parallel_matches_unsharded():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    # Every state-changing feature at once (one compile per layout keeps the test fast).
    kw = dict(use_ema=True, kmeans_init=True, entropy_weight=0.1, restart_dead_codes=True)
    kw.update(dead_code_threshold=0.5, usage_decay=0.5)  # restarts already at the second step
    vq = make(6, 64, code_dim=3, l2_normalize=True, **kw)
    graphdef, state = nnx.split(vq)

    @jax.jit
    def step(state, z):
        model = nnx.merge(graphdef, state)
        out = model(z, train=True)
        return out, nnx.state(model)

    a_state, b_state, restarted = state, state, 0
    for seed in (17, 18):
        z = normal(seed, 16, 8, 6)
        sharded = jax.device_put(z, NamedSharding(mesh, PartitionSpec("data")))
        assert len(sharded.sharding.device_set) == 8
        a, a_state = step(a_state, jnp.asarray(z))
        b, b_state = step(b_state, sharded)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        for x, y in zip(jax.tree.leaves(a_state), jax.tree.leaves(b_state), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        restarted += a.stats["restarted"]
    assert restarted > 0  # the restart path really ran


def test_train_step_pattern_updates_state_under_grad():
    # The trainer's pattern: pure-dict state, merge inside value_and_grad, return new state.
    vq = make(4, 8, restart_dead_codes=True, kmeans_init=True)
    graphdef, params, rest = nnx.split(vq, nnx.Param, ...)
    params, rest = params.to_pure_dict(), rest.to_pure_dict()

    def loss_fn(params, rest, z):
        model = nnx.merge(graphdef, params, rest)
        out = model(z, train=True)
        return sum(out.losses.values()), nnx.state(model, nnx.Not(nnx.Param)).to_pure_dict()

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, new_rest), grads = step(params, rest, normal(20, 32, 4))
    assert new_rest["step"] == 1 and new_rest["initialized"]
    assert np.any(new_rest["codebook_offset"] != 0)  # k-means wrote the codebook
    assert np.any(grads["codebook"] != 0) and np.isfinite(loss)


def test_parity_with_vector_quantize_pytorch():
    torch = pytest.importorskip("torch")
    vqp = pytest.importorskip("vector_quantize_pytorch")
    d, k, decay = 5, 16, 0.8
    codes, x = normal(18, k, d).copy(), normal(19, 64, d).copy()  # writable, for torch
    peer = vqp.VectorQuantize(
        dim=d, codebook_size=k, decay=decay, eps=1e-5, kmeans_init=False,
        threshold_ema_dead_code=0, rotation_trick=False,
    )  # fmt: skip
    with torch.no_grad():
        peer._codebook.embed.copy_(torch.from_numpy(codes)[None])
        peer._codebook.embed_avg.copy_(torch.from_numpy(codes)[None])
    ours = make(d, k, use_ema=True, ema_decay=decay, ema_epsilon=1e-5)
    set_codes(ours, codes)

    peer.eval()
    with torch.no_grad():
        q, idx, _ = peer(torch.from_numpy(x)[None])
    out = call(ours, x)
    np.testing.assert_array_equal(out.indices, idx[0].numpy())
    np.testing.assert_allclose(out.quantized, q[0].numpy(), rtol=1e-6)

    peer.train()
    with torch.no_grad():
        peer(torch.from_numpy(x)[None])
    call(ours, x, train=True)
    np.testing.assert_allclose(ours.codebook[...], peer.codebook.numpy(), rtol=1e-5, atol=1e-6)
