"""Random-weight MaskGIT checkpoints built with the official package (PyPI `maskgit`) and stored
as the released ones are: `flax.serialization.to_bytes` of the variables {'params': ...}, the
bytes `maskgit.utils.restore_from_path` reads. No download happens.

Sizes are configs/import_maskgit.py:tiny's, written into the official configs (the official
vqgan / class-conditional configs shrunk), so both sides build the same networks.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from visual_tokenizers.configs import import_maskgit


def import_config(**overrides):
    config = import_maskgit.get_config("tiny")
    config.update(overrides)
    return config


def official_config(c):
    """maskgit_class_cond_config (with its vqgan_config part) at import config c's sizes."""
    from maskgit.configs import maskgit_class_cond_config

    cf = maskgit_class_cond_config.get_config()
    t, m = c.tokenizer, c.transformer
    cf.image_size, cf.num_class = c.image_size, c.num_classes
    cf.vqvae.update(
        filters=t.filters,
        channel_multipliers=list(t.channel_multipliers),
        num_res_blocks=t.num_res_blocks,
        embedding_dim=t.embedding_dim,
        codebook_size=t.codebook_size,
    )
    cf.transformer.update(
        num_embeds=m.width, num_layers=m.depth, num_heads=m.heads, intermediate_size=m.mlp_dim
    )
    cf.transformer.patch_size = 2 ** (len(t.channel_multipliers) - 1)  # pixels per token
    cf.transformer.latent_size = c.image_size // cf.transformer.patch_size
    return cf


def official_models(cf):
    """(tokenizer VQVAE, transformer) as ImageNet_class_conditional_generator builds them."""
    from maskgit.nets import maskgit_transformer, vqgan_tokenizer

    tokenizer = vqgan_tokenizer.VQVAE(config=cf, dtype=jnp.float32, train=False)
    length = (cf.image_size // cf.transformer.patch_size) ** 2 + 1
    transformer = maskgit_transformer.Transformer(
        vocab_size=cf.vqvae.codebook_size + cf.num_class + 1,
        hidden_size=cf.transformer.num_embeds,
        num_hidden_layers=cf.transformer.num_layers,
        num_attention_heads=cf.transformer.num_heads,
        intermediate_size=cf.transformer.intermediate_size,
        hidden_dropout_prob=cf.transformer.dropout_rate,
        attention_probs_dropout_prob=cf.transformer.dropout_rate,
        max_position_embeddings=length,
    )
    return tokenizer, transformer, length


def random_like(tree, seed: int):
    """Random values of order one for every leaf: kernels ~ N(0, 1/fan_in), tables and the
    codebook ~ N(0, 1), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1). Stronger than the
    official init (N(0, 0.02) tables give near-uniform logits) so that agreement means
    something; numpy keeps it cheap."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape, dtype=np.float32)
        if name == "kernel":
            return noise / np.sqrt(np.prod(leaf.shape[:-1]))
        if name in ("embedding", "codebook"):
            return noise
        return (1.0 if name == "scale" else 0.0) + 0.1 * noise

    return jax.tree.map_with_path(draw, tree)


def random_variables(cf, seed: int = 0):
    """({'params'} of the tokenizer, {'params'} of the transformer), random numpy arrays."""
    tokenizer, transformer, length = official_models(cf)

    def encode_decode(module, images):
        quantized, _ = module.encode({"image": images})
        return module.decode(quantized)

    images = jax.ShapeDtypeStruct((1, cf.image_size, cf.image_size, 3), jnp.float32)
    key = jax.random.PRNGKey(0)
    tok = jax.eval_shape(lambda x: tokenizer.init(key, x, method=encode_decode), images)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    tra = jax.eval_shape(lambda x: transformer.init(key, x), ids)
    return (
        {"params": random_like(dict(tok["params"]), seed)},
        {"params": random_like(dict(tra["params"]), seed + 1)},
    )


def checkpoint_names(image_size: int) -> tuple[str, str]:
    """The released file names (ImageNet_class_conditional_generator.checkpoint_canonical_path)."""
    return (
        f"checkpoints/tokenizer_imagenet{image_size}_checkpoint",
        f"checkpoints/maskgit_imagenet{image_size}_checkpoint",
    )


def write_checkpoints(directory: str, cf, seed: int = 0):
    """Writes both files under directory/checkpoints; returns (paths, variables)."""
    variables = random_variables(cf, seed)
    paths = tuple(os.path.join(directory, n) for n in checkpoint_names(cf.image_size))
    os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
    for path, tree in zip(paths, variables, strict=True):
        with open(path, "wb") as f:
            f.write(serialization.to_bytes(tree))
    return paths, variables
