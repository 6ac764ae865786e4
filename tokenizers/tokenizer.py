"""Encoder -> quantizer -> decoder, and the registries that pick each part by name."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.models.conv import ConvDecoder, ConvEncoder
from visual_tokenizers.models.vit import ViTDecoder, ViTEncoder
from visual_tokenizers.tokenizers.base import QuantizerOutput
from visual_tokenizers.tokenizers.binary import BinarySphericalQuantizer, LookupFreeQuantizer
from visual_tokenizers.tokenizers.dual_tokenizer import build_dual_tokenizer
from visual_tokenizers.tokenizers.vq import VectorQuantizer

# Architecture name -> (encoder class, decoder class); both take the same keyword arguments
# apart from the latent size (encoder: out_dim, decoder: in_dim).
ARCHITECTURES = {
    "vit": (ViTEncoder, ViTDecoder),
    "conv": (ConvEncoder, ConvDecoder),
}
QUANTIZERS = {"vq": VectorQuantizer, "lfq": LookupFreeQuantizer, "bsq": BinarySphericalQuantizer}
# Tokenizer families with their own module layout, built by their own builder from the same
# keyword dicts (see that builder for what encoder / decoder / quantizer hold).
FAMILIES = {"dual": build_dual_tokenizer}  # TokenFlow dual codebook: tokenizers/dual_tokenizer.py

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise ConfigError(f"{what} {name!r} is unknown; choose one of {sorted(registry)}")
    return registry[name]


class Tokenizer(nnx.Module):
    """Images [B, H, W, 3] in [-1, 1] <-> code indices.

    Indices are [B, h, w] for a latent grid or [B, L] for 1-D latents (encoder and decoder built
    with num_latents = L), with a trailing group axis [..., G] for binary codes of more than 31
    bits (see `vocab` and tokenizers/binary.py).
    """

    def __init__(self, *, encoder: nnx.Module, quantizer: nnx.Module, decoder: nnx.Module):
        self.encoder = encoder
        self.quantizer = quantizer
        self.decoder = decoder

    @property
    def vocab(self):
        return self.quantizer.vocab

    def __call__(self, images, *, train: bool = False) -> tuple[jnp.ndarray, QuantizerOutput]:
        latents = self.encoder(images)
        quantized = self.quantizer(latents.astype(jnp.float32), train=train)
        return self.decoder(quantized.quantized), quantized

    def encode(self, images) -> jnp.ndarray:
        return self.quantizer(self.encoder(images).astype(jnp.float32)).indices

    def decode(self, indices) -> jnp.ndarray:
        return self.decoder(self.quantizer.embed(indices))


def build_tokenizer(
    *,
    architecture: str,
    image_size: int,
    latent_dim: int,
    encoder: dict,
    decoder: dict,
    quantizer: dict,
    dtype: str = "float32",
    seed: int = 0,
) -> Tokenizer:
    """Builds a tokenizer from plain keyword dicts (the job unpacks the config into these).

    quantizer: {'name': 'vq' | 'lfq' | 'bsq', **constructor kwargs of that quantizer}.
    encoder / decoder: constructor kwargs; `num_latents` = L > 0 in both gives 1-D latents.
    architecture 'dual' (FAMILIES) builds a tokenizers/dual_tokenizer.DualTokenizer instead.
    """
    if architecture in FAMILIES:
        return FAMILIES[architecture](
            image_size=image_size, latent_dim=latent_dim, encoder=encoder, decoder=decoder,
            quantizer=quantizer, dtype=_lookup(DTYPES, dtype, "model.dtype"), seed=seed,
            architectures=ARCHITECTURES,
        )  # fmt: skip
    encoder_cls, decoder_cls = _lookup(
        {**ARCHITECTURES, **FAMILIES}, architecture, "model.architecture"
    )
    latents = (encoder.get("num_latents", 0), decoder.get("num_latents", 0))
    if latents[0] != latents[1]:
        raise ConfigError(
            f"model.encoder.num_latents={latents[0]} and model.decoder.num_latents={latents[1]} "
            "differ; set both to the number of 1-D latent tokens (or both to 0 for a 2-D grid)"
        )
    quantizer = dict(quantizer)
    if quantizer.get("name") in FAMILIES:
        raise ConfigError(f"quantizer.name={quantizer['name']!r} needs model.architecture='dual'")
    quantizer_cls = _lookup(QUANTIZERS, quantizer.pop("name"), "quantizer.name")
    compute_dtype = _lookup(DTYPES, dtype, "model.dtype")
    rngs = nnx.Rngs(params=seed)
    return Tokenizer(
        encoder=encoder_cls(
            image_size=image_size, out_dim=latent_dim, dtype=compute_dtype, rngs=rngs, **encoder
        ),
        quantizer=quantizer_cls(latent_dim, rngs=rngs, seed=seed, **quantizer),
        decoder=decoder_cls(
            image_size=image_size, in_dim=latent_dim, dtype=compute_dtype, rngs=rngs, **decoder
        ),
    )
