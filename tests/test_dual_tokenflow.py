"""TokenFlow's recipe in the dual-codebook tokenizer (ByteFlow-AI/TokenFlow,
tokenflow/tokenizer/vq_model.py): the codebook / commitment losses as one mean over the
concatenated code, the Linear-Tanh-Linear task layers, and the teacher's hidden-state layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from visual_tokenizers.configs import dual_b16
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.models import teacher as teacher_lib
from visual_tokenizers.models.vit import ViTEncoder
from visual_tokenizers.tokenizers.dual import DualCodebookQuantizer
from visual_tokenizers.trained import builders

SEM, PIX, K, N = 32, 8, 50, 96  # TokenFlow's code dims; inputs at code width: no projections
BETA, CODEBOOK_WEIGHT, W = 0.7, 1.3, 1.0


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _quantizer(average):
    return DualCodebookQuantizer(
        SEM, PIX, K, pixel_weight=W, beta=BETA, codebook_weight=CODEBOOK_WEIGHT,
        loss_average=average, rngs=nnx.Rngs(3),
    )  # fmt: skip


def _tokenflow_losses(z_sem, z_pix, book_sem, book_pix, idx):
    """VectorQuantizer.forward of TokenFlow's vq_model.py (l2_norm, no k-means) in jnp, written
    from its formulas: both branches l2-normalised, concatenated to [N, 40], then
    vq_loss = mean((z_q - sg(z))^2) and commit_loss = beta * mean((sg(z_q) - z)^2) over all
    N x 40 values; codebook_weight multiplies vq_loss as the trainer's loss does."""
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    z = jnp.concatenate([unit(z_sem), unit(z_pix)], -1)
    z_q = jnp.concatenate([unit(book_sem)[idx], unit(book_pix)[idx]], -1)
    sg = jax.lax.stop_gradient
    return (
        CODEBOOK_WEIGHT * jnp.mean((z_q - sg(z)) ** 2),
        BETA * jnp.mean((sg(z_q) - z) ** 2),
    )


def test_codebook_and_commitment_are_one_mean_over_the_concatenated_code():
    rng = np.random.default_rng(0)
    z_sem = jnp.asarray(rng.normal(size=(N, SEM)), jnp.float32)
    z_pix = jnp.asarray(rng.normal(size=(N, PIX)), jnp.float32)
    q = _quantizer("concatenated")
    graphdef, params, rest = nnx.split(q, nnx.Param, ...)

    def ours(params, z_sem, z_pix):
        out = nnx.merge(graphdef, params, rest)(z_sem, z_pix)
        return out.losses["codebook"], out.losses["commitment"], out.indices

    codebook, commitment, idx = ours(params, z_sem, z_pix)
    # The shared index, by hand in float64: argmin d_sem + w d_pix.
    books = [
        _unit(np.asarray(params[b]["codebook"][...], np.float64)) for b in ("semantic", "pixel")
    ]
    zs, zp = _unit(np.asarray(z_sem, np.float64)), _unit(np.asarray(z_pix, np.float64))
    d = ((zs[:, None] - books[0][None]) ** 2).sum(-1) + W * (
        (zp[:, None] - books[1][None]) ** 2
    ).sum(-1)
    clear = np.diff(np.sort(d, -1)[:, :2], axis=-1)[:, 0] > 1e-4  # float32-safe margins
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(idx)[clear], d.argmin(-1)[clear])
    # The losses in float64 numpy: one mean over N x 40.
    sq = (np.concatenate([books[0][idx], books[1][idx]], -1) - np.concatenate([zs, zp], -1)) ** 2
    assert sq.shape == (N, SEM + PIX)
    np.testing.assert_allclose(codebook, CODEBOOK_WEIGHT * sq.mean(), rtol=1e-5)
    np.testing.assert_allclose(commitment, BETA * sq.mean(), rtol=1e-5)
    # The gradients: commitment into the inputs, codebook into both codebooks, as TokenFlow's.
    ref = lambda b_sem, b_pix, zs, zp: _tokenflow_losses(zs, zp, b_sem, b_pix, idx)  # noqa: E731
    ref_books = (params["semantic"]["codebook"][...], params["pixel"]["codebook"][...])
    g_in = jax.grad(lambda zs, zp: ours(params, zs, zp)[1], (0, 1))(z_sem, z_pix)
    g_in_ref = jax.grad(lambda zs, zp: ref(*ref_books, zs, zp)[1], (0, 1))(z_sem, z_pix)
    g_books = jax.grad(lambda p: ours(p, z_sem, z_pix)[0])(params)
    g_books_ref = jax.grad(lambda a, b: ref(a, b, z_sem, z_pix)[0], (0, 1))(*ref_books)
    for got, want in zip(
        (*g_in, g_books["semantic"]["codebook"][...], g_books["pixel"]["codebook"][...]),
        (*g_in_ref, *g_books_ref),
        strict=True,
    ):
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 0
        np.testing.assert_allclose(got, want, atol=1e-5 * scale)
    # No cross terms: the commitment does not train the codebooks, nor the codebook the inputs.
    assert not any(
        np.any(g) for g in jax.tree.leaves(jax.grad(lambda p: ours(p, z_sem, z_pix)[1])(params))
    )
    assert not np.any(jax.grad(lambda z: ours(params, z, z_pix)[0])(z_sem))

    # The per-branch option: one mean per codebook, so the concatenated mean is their
    # 32:8-weighted average, and its semantic / pixel terms weigh 40/32 and 40/8 as much.
    per = _quantizer("per_branch")(z_sem, z_pix).losses
    assert set(per) == {
        "codebook_semantic",
        "codebook_pixel",
        "commitment_semantic",
        "commitment_pixel",
    }
    mixed = (SEM * per["codebook_semantic"] + PIX * per["codebook_pixel"]) / (SEM + PIX)
    np.testing.assert_allclose(mixed, codebook, rtol=1e-5)
    sem_sq = sq[:, :SEM].mean()
    np.testing.assert_allclose(per["commitment_semantic"], BETA * sem_sq, rtol=1e-5)
    with pytest.raises(ConfigError, match="loss_average"):
        _quantizer("sum")


# --- the task layers and the hidden-state layers in a (narrow) tiny model ---------------------

VIT = dict(patch_size=4, width=32, depth=3, heads=2, mlp_dim=64)


def _config(**model):
    config = dual_b16.get_config("tiny")
    for part in (config.model.encoder, config.model.decoder):
        part.pixel.update(VIT)
    config.model.encoder.semantic.update(VIT)
    config.model.decoder.semantic.update(width=48, depth=1, heads=2, mlp_dim=64)
    config.quantizer.codebook_size = 64
    for key, value in model.items():
        side, name = key.split("__")
        config.model[side][name] = value
    return config


def _images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(-1, 1, (n, 32, 32, 3)), jnp.float32)


def test_task_layers_are_linear_tanh_linear_with_tokenflows_init():
    config = _config()
    assert config.model.encoder.semantic_task_layer == "tanh"
    assert config.model.decoder.semantic_task_layer == "tanh"
    m = builders.model_fn_from_config(config)()
    width, dec_width = VIT["width"], 48
    # Encoder side: trunk -> Linear(width, width) -> Tanh -> Linear(width, 32) -> the codebook,
    # which then needs no projection of its own.
    assert m.semantic_encoder.head.kernel.shape == (width, width)
    assert m.encode_task.linear.kernel.shape == (width, SEM)
    assert m.quantizer.semantic.in_proj is None and m.quantizer.semantic.out_proj is None
    # Decoder side: trunk (fed the 32-d code) -> Linear -> Tanh -> Linear(, teacher width).
    assert m.semantic_decoder.stem.kernel.shape == (SEM, dec_width)
    assert m.semantic_decoder.to_pixels.kernel.shape == (dec_width, dec_width)
    assert m.decode_task.linear.kernel.shape == (dec_width, width)
    linears = (m.semantic_encoder.head, m.encode_task.linear, m.semantic_decoder.to_pixels,
               m.decode_task.linear)  # fmt: skip
    for linear in linears:  # TokenFlow's _init_weights: N(0, 0.02), zero bias
        assert 0.017 < float(jnp.std(linear.kernel[...])) < 0.023
        assert not np.any(np.asarray(linear.bias[...]))

    x = _images()
    layer = m.semantic_layer
    h = np.asarray(teacher_lib.hidden_state(m.semantic_encoder, x, layer), np.float64)
    lin = m.encode_task.linear
    code_in = np.tanh(h) @ np.asarray(lin.kernel[...], np.float64) + np.asarray(lin.bias[...])
    pixel = m.encoder(x).astype(jnp.float32)
    expected = m.quantizer(jnp.asarray(code_in, jnp.float32), pixel).indices
    np.testing.assert_array_equal(m.encode(x), expected)
    q_sem = m.quantizer.split(m.quantizer.embed(expected))[0]
    assert q_sem.shape[-1] == SEM
    trunk = np.asarray(m.semantic_decoder(q_sem), np.float64)  # ends with Linear(48, 48)
    lin = m.decode_task.linear
    want = np.tanh(trunk) @ np.asarray(lin.kernel[...], np.float64) + np.asarray(lin.bias[...])
    np.testing.assert_allclose(m.decode_semantic(expected), want, rtol=1e-4, atol=1e-5)

    # Without the keys (configs saved by earlier runs): the earlier linear layout, unchanged.
    old = _config()
    for part in (old.model.encoder, old.model.decoder):
        del part["semantic_task_layer"]
    del old.model.encoder["semantic_layer"], old.model.decoder["teacher_layer"]
    old.model.latent_dim = 24  # != 32, so that the semantic branch has its projections
    legacy = builders.model_fn_from_config(old)()
    assert legacy.encode_task is None and legacy.decode_task is None
    assert legacy.semantic_encoder.head.kernel.shape == (width, old.model.latent_dim)
    assert legacy.quantizer.semantic.in_proj.kernel.shape == (old.model.latent_dim, SEM)
    assert legacy.semantic_layer == 0 and legacy.teacher.layer == 0
    np.testing.assert_array_equal(legacy.teacher(x), ViTEncoder.__call__(legacy.teacher, x))
    with pytest.raises(ConfigError, match="semantic_task_layer"):
        builders.model_fn_from_config(_config(decoder__semantic_task_layer="gelu"))()


def _block_output(teacher, x, blocks):
    """The residual stream after the first `blocks` blocks, computed from the parts."""
    h = teacher.patch_embed(x).reshape(x.shape[0], -1, VIT["width"])
    h = h + teacher.transformer.pos_embedding[...]
    for block in list(teacher.transformer.blocks)[:blocks]:
        h = block(h)
    return h.reshape(x.shape[0], 8, 8, VIT["width"])


def test_teacher_layer_is_the_penultimate_block_output_without_the_final_norm():
    config = _config()
    assert config.model.decoder.teacher_layer == -2 and config.model.encoder.semantic_layer == -2
    m = builders.model_fn_from_config(config)()
    teacher, x = m.teacher, _images()
    final = teacher_lib.hidden_state(teacher, x, 0)
    np.testing.assert_array_equal(final, ViTEncoder.__call__(teacher, x))  # all blocks + norm
    penultimate = teacher(x)  # the target the semantic decoder regresses
    np.testing.assert_allclose(penultimate, _block_output(teacher, x, VIT["depth"] - 1), atol=1e-5)
    # Running the last block and the final LayerNorm on it gives the layer-0 output; -1 is the
    # last block's output before that LayerNorm.
    blocks, norm = teacher.transformer.blocks, teacher.transformer.norm
    tokens = penultimate.reshape(x.shape[0], -1, VIT["width"])
    np.testing.assert_allclose(norm(blocks[-1](tokens)).reshape(final.shape), final, atol=1e-5)
    last = teacher_lib.hidden_state(teacher, x, -1)
    np.testing.assert_allclose(norm(last), final, atol=1e-5)
    assert not np.allclose(penultimate, final, atol=1e-2)
    # The semantic encoder reads the same layer of itself (then its head).
    encoder = m.semantic_encoder
    np.testing.assert_allclose(
        teacher_lib.hidden_state(encoder, x, -2),
        encoder.head(_block_output(encoder, x, VIT["depth"] - 1)), atol=1e-5,
    )  # fmt: skip
    for bad in (1, -4):  # depth 3: layers -3 .. 0
        with pytest.raises(ConfigError, match="teacher_layer"):
            builders.model_fn_from_config(_config(decoder__teacher_layer=bad))()
    with pytest.raises(ConfigError, match="semantic_layer"):
        builders.model_fn_from_config(_config(encoder__semantic_layer=-4))()
    for bad in (True, 0.5, "-2"):
        with pytest.raises(ConfigError, match="layer"):
            teacher_lib.check_layer(bad, 3, "layer")
