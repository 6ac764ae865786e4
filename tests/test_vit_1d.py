"""1-D latent tokens (models/vit.py, num_latents = L): shapes with every quantizer, what depends
on what, and the 2-D path left as it was."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from visual_tokenizers.configs import common
from visual_tokenizers.models.vit import ViTDecoder, ViTEncoder
from visual_tokenizers.tokenizers.tokenizer import build_tokenizer

IMAGE, PATCH, LATENTS = 16, 4, 6
GRID = IMAGE // PATCH

QUANTIZERS = {
    "vq": (common.vq_quantizer(codebook_size=64, code_dim=4), ()),
    "lfq": (common.binary_quantizer("lfq", 12), ()),
    "bsq": (common.binary_quantizer("bsq", 10), ()),
    "lfq_36_bits": (common.binary_quantizer("lfq", 36), (2,)),  # two 18-bit group indices
}


def vit(num_latents=LATENTS):
    return dict(patch_size=PATCH, width=32, depth=1, heads=2, mlp_dim=64, num_latents=num_latents)


def build(quantizer, num_latents=LATENTS):
    return build_tokenizer(
        architecture="vit",
        image_size=IMAGE,
        latent_dim=8,
        encoder=vit(num_latents),
        decoder=vit(num_latents),
        quantizer=quantizer.to_dict(),
    )


def images(seed=0, batch=2):
    return jax.random.uniform(jax.random.key(seed), (batch, IMAGE, IMAGE, 3), minval=-1, maxval=1)


@nnx.jit
def _round_trip(model, x):
    indices = model.encode(x)
    reconstruction, out = model(x)
    return indices, model.decode(indices), reconstruction, out.quantized


# Plain LFQ runs in the dependency test below; these cover the other index layouts.
@pytest.mark.parametrize("name", ["vq", "bsq", "lfq_36_bits"])
def test_encode_to_latent_sequence_and_decode_back(name):
    quantizer, group_axis = QUANTIZERS[name]
    model = build(quantizer)
    latents = nnx.eval_shape(lambda m, x: m.encoder(x), model, images())
    assert latents.shape == (2, LATENTS, 8)  # only the latents leave the encoder
    indices, decoded, reconstruction, quantized = _round_trip(model, images())
    assert indices.shape == (2, LATENTS, *group_axis) and indices.dtype == jnp.int32
    assert decoded.shape == (2, IMAGE, IMAGE, 3) and decoded.dtype == jnp.float32
    assert np.all(np.isfinite(decoded))
    # The model's own forward pass reconstructs from exactly what encode/decode exchange.
    np.testing.assert_allclose(reconstruction, decoded, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(quantized, model.quantizer.embed(indices), rtol=1e-6, atol=1e-6)


def test_latents_see_every_patch_and_every_patch_sees_the_latents():
    model = build(QUANTIZERS["lfq"][0])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = params.to_pure_dict(), rest.to_pure_dict()
    x = images(1, batch=1)
    z = jax.random.normal(jax.random.key(2), (1, LATENTS, 8))

    @jax.jit
    def grads(params, rest, x, z):
        m = nnx.merge(graphdef, params, rest)
        first_latent = jax.grad(lambda x: jnp.sum(m.encoder(x)[0, 0]))(x)
        first_patch = jax.grad(lambda z: jnp.sum(m.decoder(z)[0, :PATCH, :PATCH]))(z)
        last_patch = jax.grad(lambda z: jnp.sum(m.decoder(z)[0, -PATCH:, -PATCH:]))(z)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x)[0] ** 2)
        return first_latent, first_patch, last_patch, jax.grad(loss)(params)

    first_latent, first_patch, last_patch, g = grads(params, rest, x, z)
    per_patch = np.abs(np.asarray(first_latent[0])).reshape(GRID, PATCH, GRID, PATCH, 3)
    assert np.all(per_patch.sum((1, 3, 4)) > 0)  # latent 0 depends on all 16 patches
    for grad in (first_patch, last_patch):  # each output patch depends on all L latents
        assert np.all(np.abs(np.asarray(grad[0])).sum(-1) > 0)
    assert np.abs(g["encoder"]["latent_queries"]).max() > 0
    assert np.abs(g["decoder"]["mask_token"]).max() > 0


def test_grid_path_has_its_own_parameters_only():
    kw = dict(image_size=IMAGE, patch_size=PATCH, width=32, depth=1, heads=2, mlp_dim=64)
    kw.update(rngs=nnx.Rngs(0))
    enc = ViTEncoder(out_dim=8, **kw)
    dec = ViTDecoder(in_dim=8, **kw)
    assert set(nnx.state(enc, nnx.Param).keys()) == {"patch_embed", "transformer", "head"}
    assert set(nnx.state(dec, nnx.Param).keys()) == {"stem", "transformer", "to_pixels"}
    assert enc.transformer.pos_embedding.shape == (1, GRID**2, 32)
    one_d = ViTEncoder(out_dim=8, num_latents=5, **kw)
    assert one_d.transformer.pos_embedding.shape == (1, GRID**2 + 5, 32)
    assert one_d.latent_queries.shape == (1, 5, 32)


def test_mismatched_latent_settings_are_errors():
    q = QUANTIZERS["lfq"][0].to_dict()
    kw = dict(architecture="vit", image_size=IMAGE, latent_dim=8, quantizer=q)
    with pytest.raises(ValueError, match="num_latents"):
        build_tokenizer(encoder=vit(4), decoder=vit(6), **kw)
    dec = ViTDecoder(image_size=IMAGE, in_dim=8, rngs=nnx.Rngs(0), **vit(4))
    with pytest.raises(ValueError, match=r"latents \[B, 4, C\]"):
        dec(jnp.zeros((1, GRID, GRID, 8)))
