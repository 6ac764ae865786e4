"""Conv VQGAN against the official MaskGIT tokenizer (PyPI `maskgit`, `vqgan_config`, random
weights), and the discriminators' shapes and blur kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from visual_tokenizers.models import discriminator as disc
from visual_tokenizers.models.conv import (
    ConvDecoder,
    ConvEncoder,
    load_maskgit_params,
    maskgit_param_names,
)
from visual_tokenizers.tokenizers.tokenizer import build_tokenizer

vqgan_tokenizer = pytest.importorskip("maskgit.nets.vqgan_tokenizer")
vqgan_config = pytest.importorskip("maskgit.configs.vqgan_config")

# Encoder and decoder outputs, float32 on CPU, weights copied through the name mapping.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4


def _official(image_size):
    config = vqgan_config.get_config()
    model = vqgan_tokenizer.VQVAE(config=config, train=False)

    def encode_decode(module, images):
        quantized, _ = module.encode({"image": images})
        return module.decode(quantized)

    def init(images):
        return model.init(jax.random.PRNGKey(1), images, method=encode_decode)

    return config, model, init


def _ours(config, image_size, *, abstract=False):
    vq = config.vqvae
    kwargs = dict(
        image_size=image_size,
        filters=vq.filters,
        channel_multipliers=tuple(vq.channel_multipliers),
        num_res_blocks=vq.num_res_blocks,
    )

    def build():
        rngs = nnx.Rngs(0)
        encoder = ConvEncoder(out_dim=vq.embedding_dim, rngs=rngs, **kwargs)
        return encoder, ConvDecoder(in_dim=vq.embedding_dim, rngs=rngs, **kwargs)

    return nnx.eval_shape(build) if abstract else build()


def _flat_shapes(tree, prefix=()):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat_shapes(value, (*prefix, key)))
        return out
    return {prefix: tuple(tree.shape)}


def test_same_tree_and_parameter_count_as_official_at_256():
    config, _, init = _official(256)
    theirs = jax.eval_shape(init, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))["params"]
    encoder, decoder = _ours(config, 256, abstract=True)
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        ours = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
        mapping = maskgit_param_names(module)
        assert set(mapping) == set(ours)
        mapped = {mapping[p]: shape for p, shape in ours.items()}
        assert mapped == _flat_shapes(theirs[name]), name
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    ours_total = count(nnx.state(encoder, nnx.Param)) + count(nnx.state(decoder, nnx.Param))
    assert ours_total == count(theirs["encoder"]) + count(theirs["decoder"])
    # Whole tokenizer, as configs/vqgan_f16.py builds it: plus the 1024 x 256 codebook.
    from visual_tokenizers.configs import vqgan_f16
    from visual_tokenizers.trained import builders

    tokenizer = nnx.eval_shape(builders.model_fn_from_config(vqgan_f16.get_config()))
    assert count(nnx.state(tokenizer, nnx.Param)) == count(theirs)
    assert theirs["quantizer"]["codebook"].shape == (1024, 256)


def _random_like(tree, seed):
    """Random values for every leaf of the official tree: kernels ~ N(0, 1/fan_in), GroupNorm
    scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1). Stronger than the official init (unit scales,
    zero biases) and far cheaper than drawing its truncated normals with jax on 2 CPU cores."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape, dtype=np.float32)
        if name == "kernel":
            return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray((1.0 if name == "scale" else 0.0) + 0.1 * noise)

    return jax.tree.map_with_path(draw, tree)


def test_outputs_match_official_with_copied_weights():
    # 16x16 images -> 1x1 latents at the full vqgan_config widths.
    config, model, init = _official(16)
    images = jax.random.uniform(jax.random.PRNGKey(2), (2, 16, 16, 3), minval=-1.0, maxval=1.0)
    abstract = jax.eval_shape(init, images)["params"]
    params = _random_like(abstract, 1)
    # Our modules are traced abstractly and get every value from the official params.
    encoder, decoder = _ours(config, 16, abstract=True)
    load_maskgit_params(encoder, params["encoder"])
    load_maskgit_params(decoder, params["decoder"])

    latents = jax.random.normal(jax.random.PRNGKey(3), (2, 1, 1, 256))
    variables = {"params": params}
    want_z = model.apply(variables, images, method=lambda m, x: m.encoder(x))
    want_x = model.apply(variables, latents, method=lambda m, z: m.decode(z))
    got_z, got_x = encoder(images), decoder(latents)
    assert got_z.shape == want_z.shape == (2, 1, 1, 256)
    assert got_x.shape == want_x.shape == (2, 16, 16, 3)
    # Non-trivial outputs, so that agreement means something.
    assert float(jnp.std(want_z)) > 1e-2 and float(jnp.std(want_x)) > 1e-2
    np.testing.assert_allclose(got_z, want_z, atol=PARITY_ATOL, rtol=PARITY_RTOL)
    np.testing.assert_allclose(got_x, want_x, atol=PARITY_ATOL, rtol=PARITY_RTOL)


def test_shortcut_reads_the_block_output():
    from visual_tokenizers.models.conv import ResBlock

    @nnx.jit  # one compilation instead of many eager ops
    def outputs(block, x):
        h = block.conv2(jax.nn.swish(block.norm2(block.conv1(jax.nn.swish(block.norm1(x))))))
        return block(x), h + block.shortcut(h)

    block = ResBlock(32, 64, rngs=nnx.Rngs(0))
    got, quirk = outputs(block, jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 32)))
    np.testing.assert_allclose(got, quirk, atol=1e-5)
    # The shortcut conv maps 64 -> 64 channels: it can only read the block's output.
    assert block.shortcut.kernel.shape == (1, 1, 64, 64)


def test_tokenizer_with_conv_architecture_round_trips_shapes():
    tokenizer = build_tokenizer(
        architecture="conv",
        image_size=32,
        latent_dim=16,
        encoder=dict(filters=32, channel_multipliers=(1, 2), num_res_blocks=1),
        decoder=dict(filters=32, channel_multipliers=(1, 2), num_res_blocks=1),
        quantizer=dict(name="vq", codebook_size=64),
    )
    images = jnp.zeros((2, 32, 32, 3))
    indices = nnx.jit(lambda t, x: t.encode(x))(tokenizer, images)
    assert indices.shape == (2, 16, 16)
    assert nnx.jit(lambda t, i: t.decode(i))(tokenizer, indices).shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="multiple of the downsampling factor"):
        ConvEncoder(image_size=24, out_dim=8, filters=32, rngs=nnx.Rngs(0))


def test_blur_kernel_is_the_normalised_1331_outer_product():
    taps = np.array([1.0, 3.0, 3.0, 1.0])
    want = np.outer(taps, taps) / 64.0
    np.testing.assert_allclose(disc.blur_kernel(), want, rtol=1e-7)
    # A constant image stays constant away from the zero-padded border; grid halves.
    out = disc.blur_downsample(jnp.ones((1, 8, 8, 2)))
    assert out.shape == (1, 4, 4, 2)
    np.testing.assert_allclose(out[0, 1:3, 1:3], 1.0, rtol=1e-6)


@pytest.mark.parametrize("blur", [True, False])
def test_stylegan_discriminator_shapes(blur):
    def run():  # traced abstractly: shapes only, nothing allocated or compiled
        model = disc.StyleGANDiscriminator(image_size=16, blur_resample=blur, rngs=nnx.Rngs(0))
        return model, model(jnp.zeros((3, 16, 16, 3)))

    model, logits = nnx.eval_shape(run)
    assert logits.shape == (3, 1)
    assert len(model.blocks) == 2  # 16 -> 8 -> 4
    with pytest.raises(ValueError, match="power of 2"):
        disc.StyleGANDiscriminator(image_size=48, rngs=nnx.Rngs(0))


def _official_discriminator_module():
    """maskgit/nets/discriminator.py as published in maskgit==0.0.1.dev0 ends with a stray,
    unparsable line (`def squared_euclidean_distance`); run the file without it."""
    import importlib.util
    import types

    path = importlib.util.find_spec("maskgit.nets").submodule_search_locations[0]
    with open(f"{path}/discriminator.py") as f:
        source = f.read()
    cut = source.find("\n  def squared_euclidean_distance")
    module = types.ModuleType("maskgit_discriminator")
    exec(compile(source if cut < 0 else source[:cut], f.name, "exec"), module.__dict__)
    return module


def test_stylegan_discriminator_matches_official():
    official = _official_discriminator_module()
    config = vqgan_config.get_config()
    config.image_size = 16
    theirs = official.Discriminator(config=config, train=False)
    images = jax.random.uniform(jax.random.PRNGKey(4), (2, 16, 16, 3), minval=-1.0, maxval=1.0)
    abstract = jax.eval_shape(theirs.init, jax.random.PRNGKey(5), images)["params"]
    params = _random_like(abstract, 5)
    variables = {"params": params}
    ours = nnx.eval_shape(lambda: disc.StyleGANDiscriminator(image_size=16, rngs=nnx.Rngs(0)))
    names = {"conv_in": "Conv_0", "conv_out": "Conv_1", "dense": "Dense_0", "logits": "Dense_1"}
    block_names = {"conv1": "Conv_0", "shortcut": "Conv_1", "conv2": "Conv_2"}
    state = nnx.state(ours, nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        if path[0] == "blocks":
            source = params[f"ResBlock_{path[1]}"][block_names[path[2]]][path[3]]
        else:
            source = params[names[path[0]]][path[1]]
        assert tuple(variable.shape) == tuple(source.shape), path
        variable.set_value(source)
    nnx.update(ours, state)
    want = theirs.apply(variables, images)
    assert float(jnp.std(want)) > 1e-3
    np.testing.assert_allclose(ours(images), want, atol=PARITY_ATOL, rtol=PARITY_RTOL)
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    assert count(state) == count(params)


@pytest.mark.parametrize(("size", "layers", "grid"), [(256, 3, 30), (32, 2, 6)])
def test_patchgan_output_shape(size, layers, grid):
    def run():
        model = disc.PatchGANDiscriminator(n_layers=layers, base_channels=8, rngs=nnx.Rngs(0))
        return model, model(jnp.zeros((2, size, size, 3)))

    model, logits = nnx.eval_shape(run)
    assert logits.shape == (2, grid, grid, 1)
    assert len(model.norms) == layers and model.convs[1].bias is None
