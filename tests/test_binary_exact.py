"""The exact codebook entropy over all 2**d codes (tokenizers/binary_entropy.py): against
vector-quantize-pytorch's LFQ at d = 10, 12, 14, chunked against unchunked and float64
enumeration, its memory bound, and Open-MAGVIT2's log(p + 1e-5) form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_binary import _largest_intermediate

from visual_tokenizers.tokenizers import binary
from visual_tokenizers.tokenizers.binary import LookupFreeQuantizer
from visual_tokenizers.tokenizers.binary_entropy import exact_codebook_entropy


def normal(seed, *shape, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


def enumerate_codes(a):
    """float64 p(c | x) [N, 2**d] for per-bit logits a (code logits <a, c> / 2), MSB first."""
    d = a.shape[-1]
    codes = ((np.arange(2**d)[:, None] >> np.arange(d - 1, -1, -1)) & 1) * 2.0 - 1.0
    logits = 0.5 * np.float64(a) @ codes.T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True), codes


def entropy_and_grad64(a, eps=0.0):
    """float64 -sum pbar log(pbar + eps) and its gradient in a, by enumeration."""
    p, codes = enumerate_codes(a)
    n, pbar = len(a), p.mean(0)
    live = pbar > 0
    logs = np.log(np.where(live, pbar, 1.0) + eps)
    h = -np.sum(np.where(live, pbar * logs, 0.0))
    dh = np.where(live, -(logs + pbar / (pbar + eps)), 0.0)  # d h / d pbar_c
    # d pbar_c / d a_n = p_nc (c - tanh(a_n / 2)) / (2 N)
    weighted = p * dh[None]
    grad = (weighted @ codes - np.tanh(np.float64(a) / 2) * weighted.sum(-1, keepdims=True)) / 2
    return h, grad / n


def rel(x, y):
    return float(np.max(np.abs(np.asarray(x) - y)) / np.max(np.abs(y)))


_value_and_grad = jax.jit(
    jax.value_and_grad(lambda a, eps, bits: exact_codebook_entropy(a, eps=eps, chunk_bits=bits)),
    static_argnums=(1, 2),
)


# ----------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("scale", [0.01, 0.3])  # spread and peaked code probabilities
def test_chunked_equals_unchunked_and_enumeration_at_d14(scale):
    """d = 14, t = 100: chunks of 1, 8, 128 high codes (0, 3, 7 bits) give the value and
    gradient of one chunk and of the dense [N, 2**14] softmax (one group of all bits), and
    match float64 enumeration."""
    d, t = 14, 100.0
    a = jnp.asarray(4.0 * t * normal(1, 200, d, scale=scale))
    h64, g64 = entropy_and_grad64(a)
    one_h, one_g = _value_and_grad(a, 0.0, None)
    np.testing.assert_allclose(one_h, h64, rtol=1e-5)
    assert rel(one_g, g64) < 1e-5
    for bits in (0, 3):
        h, g = _value_and_grad(a, 0.0, bits)
        np.testing.assert_allclose(h, one_h, rtol=1e-6)
        assert rel(g, np.asarray(one_g)) < 1e-5
    dense_h, dense_g = jax.jit(jax.value_and_grad(lambda a: binary.codebook_entropy(a, (d,))))(a)
    np.testing.assert_allclose(one_h, dense_h, rtol=1e-5)
    # The dense float32 softmax loses ~1e-4 of the gradient on peaked inputs (ours: 1e-6 of the
    # float64 value above), so the dense form is held to the enumeration's tolerance there.
    assert rel(one_g, np.asarray(dense_g)) < (1e-5 if scale < 0.1 else 3e-4)


def test_open_magvit2_form_with_eps():
    """eps = 1e-5: -sum pbar log(pbar + 1e-5), as Open-MAGVIT2's lookup_free_quantize.py."""
    d = 12
    a = jnp.asarray(400.0 * normal(2, 128, d, scale=0.05))
    h64, g64 = entropy_and_grad64(a, eps=1e-5)
    h, g = _value_and_grad(a, 1e-5, 2)
    np.testing.assert_allclose(h, h64, rtol=1e-5)
    assert rel(g, g64) < 1e-5
    assert abs(float(h) - entropy_and_grad64(a)[0]) > 1e-3  # a different quantity from eps = 0


@pytest.mark.parametrize("chunk_bits", [None, 4])
def test_no_tokens_by_codes_tensor_at_d18(chunk_bits):
    """Value and gradient at d = 18 build nothing larger than [N, 2**9] tables and one
    [2**chunk_bits, 2**9] block of the code histogram (traced only): never [N, 2**18]."""
    n, d = 256, 18
    grad = jax.value_and_grad(lambda a: exact_codebook_entropy(a, chunk_bits=chunk_bits))
    jaxpr = jax.make_jaxpr(grad)(jnp.zeros((n, d), jnp.float32)).jaxpr
    block = 2 ** ((9 if chunk_bits is None else chunk_bits) + 9)
    assert _largest_intermediate(jaxpr) <= max(n * 2 * d, n * 2**9, block)


# ----------------------------------------------------------------------------- peer parity


def _peer_run(z, w, d, t, monkeypatch, log_floor):
    """vector-quantize-pytorch's LFQ (train mode) on z [B, N, d], in float64 (the same code on
    float64 tensors, so that the reference is not limited by float32 sums over 2**d codes).
    Returns indices, {term: (value, d term / dz)} for the per-sample entropy, the codebook
    entropy and the aux loss, and d(aux + sum(out * w)) / dz. log_floor: its log's clamp."""
    import torch
    from vector_quantize_pytorch import LFQ, lookup_free_quantization

    if log_floor is not None:  # the peer's own log with a lower floor: then the exact entropy
        monkeypatch.setattr(
            lookup_free_quantization, "log", lambda x, eps=log_floor: x.clamp(min=eps).log()
        )
    peer = LFQ(
        dim=d, codebook_size=2**d, num_codebooks=1, entropy_loss_weight=0.1,
        commitment_loss_weight=0.25, diversity_gamma=1.0, force_quantization_f32=False,
    ).double()  # fmt: skip
    peer.train()
    x = torch.from_numpy(np.float64(z)).requires_grad_()
    (out, idx, aux), parts = peer(x, inv_temperature=t, return_loss_breakdown=True)
    named = {"sample": parts.per_sample_entropy, "code": parts.batch_entropy, "aux": aux}
    terms = {
        k: (v.item(), torch.autograd.grad(v, x, retain_graph=True)[0].numpy())
        for k, v in named.items()
    }
    (aux + (out * torch.from_numpy(np.float64(w))).sum()).backward()
    return idx.numpy(), terms, x.grad.numpy()


@pytest.mark.parametrize("d", [10, 12, 14])
@pytest.mark.parametrize("regime", ["clamp_inactive", "sharp"])
def test_matches_vector_quantize_pytorch_lfq(d, regime, monkeypatch):
    """Indices, per-sample and codebook entropies with their gradients into the input, the
    total loss and gradient: ours (codebook_entropy='exact') against the peer's [N, 2**d]
    softmax.

    clamp_inactive: t = 0.1 and small inputs, so that every code probability is above the
    peer's log floor 1e-5 (asserted) and the peer's entropy is exact as released. sharp:
    t = 100 (the default) on unit inputs, where most probabilities are far below 1e-5; there
    the peer's own log is given a floor of 1e-30 so that it computes the entropy itself.
    """
    t, scale, floor = (0.1, 0.05, None) if regime == "clamp_inactive" else (100.0, 1.0, 1e-30)
    z, w = normal(3 + d, 2, 128, d, scale=scale), normal(4, 2, 128, d)
    if floor is None:
        assert enumerate_codes(4.0 * t * z.reshape(-1, d))[0].min() > 1e-5
    idx, peer, peer_grad = _peer_run(z, w, d, t, monkeypatch, floor)

    ours = LookupFreeQuantizer(
        d, d, commitment_weight=0.25, entropy_weight=0.1, diversity_gamma=1.0,
        inverse_temperature=t, codebook_entropy="exact", rngs=nnx.Rngs(0),
    )  # fmt: skip
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
    params, rest = params.to_pure_dict(), rest.to_pure_dict()  # as the trainer holds them

    def loss(z, rest, w):
        out = nnx.merge(graphdef, params, rest)(z, train=True)
        return sum(out.losses.values()) + jnp.vdot(out.quantized, w), out

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    ((_, out), grad) = run(jnp.asarray(z), rest, jnp.asarray(w))
    ((aux, _), aux_grad) = run(jnp.asarray(z), rest, jnp.zeros_like(w))  # the loss terms alone
    # The two entropy terms as the quantizer computes them, from its per-bit logits.
    terms = {"sample": binary.per_sample_entropy, "code": exact_codebook_entropy}
    for name, fn in terms.items():
        h, g = jax.jit(jax.value_and_grad(lambda z, fn=fn: fn(4.0 * t * z.reshape(-1, d))))(z)
        np.testing.assert_allclose(h, peer[name][0], rtol=1e-5)
        assert rel(g.reshape(z.shape), peer[name][1]) < 1e-5, name
    np.testing.assert_array_equal(out.indices, idx)
    np.testing.assert_allclose(out.stats["per_sample_entropy"], peer["sample"][0], rtol=1e-5)
    np.testing.assert_allclose(out.stats["codebook_entropy"], peer["code"][0], rtol=1e-5)
    np.testing.assert_allclose(aux, peer["aux"][0], rtol=1e-5)
    # The sum: in the sharp regime the two entropy gradients cancel to ~1/50 of each, so their
    # float32 errors (~1e-6 of each) are ~5e-5 of the total there.
    assert rel(aux_grad, peer["aux"][1]) < 1e-4
    assert rel(grad, peer_grad) < 1e-5  # with the straight-through output
