r"""TokenFlow-style dual tokenizer: pixel + semantic encoders, one shared index, two decoders.

    images -> pixel encoder    -> z_pix -\                        /-> q_pix -> pixel decoder
                                         > DualCodebookQuantizer <             -> images
    images -> semantic encoder -> z_sem -/  (tokenizers/dual.py)  \-> q_sem -> semantic decoder
                                                                               -> features
    images -> frozen teacher (models/teacher.py) -> target features

The semantic decoder (a small ViT, 3 layers in TokenFlow) regresses the teacher's token
features with `semantic_cosine_weight * (1 - mean cos)` and `semantic_mse_weight * MSE`. Those
terms go into the returned QuantizerOutput.losses ('semantic_cosine', 'semantic_mse') beside the
codebook terms, so the tokenizer trainer, which sums reconstruction losses and
`quantized.losses`, trains the whole model unchanged; the reconstruction is the pixel decoder's
output, so the trainer's perceptual / adversarial / EMA recipe applies to the pixel branch.

The pixel encoder and decoder are the attributes `encoder` and `decoder` (params keys too), as in
the plain Tokenizer, so the trainer's GAN recipe (adaptive weight on the decoder's output layer)
applies unchanged. The teacher has the semantic encoder's architecture (TokenFlow starts the
semantic encoder from the teacher); its weights are put in after init by models/teacher.py.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.models.teacher import Teacher
from visual_tokenizers.models.vit import ViTDecoder, ViTEncoder
from visual_tokenizers.tokenizers.base import QuantizerOutput
from visual_tokenizers.tokenizers.dual import DualCodebookQuantizer

PIXEL_DECODER_INPUTS = ("pixel", "both")
_TRUNK_KEYS = ("patch_size", "width", "depth", "heads", "mlp_dim")


class DualTokenizer(nnx.Module):
    """Images [B, H, W, 3] in [-1, 1] <-> shared code indices [B, h, w] (or [B, L])."""

    def __init__(
        self,
        *,
        encoder: nnx.Module,
        semantic_encoder: nnx.Module,
        quantizer: DualCodebookQuantizer,
        decoder: nnx.Module,
        semantic_decoder: nnx.Module,
        teacher: Teacher,
        semantic_cosine_weight: float = 1.0,
        semantic_mse_weight: float = 0.0,
        pixel_decoder_input: str = "pixel",
    ):
        if pixel_decoder_input not in PIXEL_DECODER_INPUTS:
            raise ConfigError(
                f"model.decoder.pixel_input={pixel_decoder_input!r}; choose one of "
                f"{PIXEL_DECODER_INPUTS} (pixel codes only, or semantic and pixel concatenated)"
            )
        # The pixel branch keeps the plain Tokenizer's names (`encoder`, `decoder`), so code that
        # finds the decoder's output layer (the GAN recipe's adaptive weight) works unchanged.
        self.encoder, self.semantic_encoder = encoder, semantic_encoder
        self.quantizer = quantizer
        self.decoder, self.semantic_decoder = decoder, semantic_decoder
        self.teacher = teacher
        self.semantic_cosine_weight = semantic_cosine_weight
        self.semantic_mse_weight = semantic_mse_weight
        self.pixel_decoder_input = pixel_decoder_input

    @property
    def vocab(self):
        return self.quantizer.vocab

    def _quantize(self, images, train: bool) -> QuantizerOutput:
        z_sem = self.semantic_encoder(images).astype(jnp.float32)
        z_pix = self.encoder(images).astype(jnp.float32)
        return self.quantizer(z_sem, z_pix, train=train)

    def _decode_pixels(self, quantized):
        q_sem, q_pix = self.quantizer.split(quantized)
        x = q_pix if self.pixel_decoder_input == "pixel" else jnp.concatenate([q_sem, q_pix], -1)
        return self.decoder(x)

    def __call__(self, images, *, train: bool = False) -> tuple[jnp.ndarray, QuantizerOutput]:
        out = self._quantize(images, train)
        reconstruction = self._decode_pixels(out.quantized)
        predicted = self.semantic_decoder(self.quantizer.split(out.quantized)[0])
        losses, stats = self._semantic_terms(predicted, self.teacher(images))
        return reconstruction, out.replace(
            losses={**out.losses, **losses}, stats={**out.stats, **stats}
        )

    def _semantic_terms(self, predicted, target) -> tuple[dict, dict]:
        """Regression of the (stop-gradient) teacher features; weighted losses and stats."""
        predicted = predicted.astype(jnp.float32)
        dot = jnp.sum(predicted * target, -1)
        norms = jnp.linalg.norm(predicted, axis=-1) * jnp.linalg.norm(target, axis=-1)
        cosine = jnp.mean(dot / jnp.maximum(norms, 1e-6))
        losses = {}
        if self.semantic_cosine_weight:
            losses["semantic_cosine"] = self.semantic_cosine_weight * (1.0 - cosine)
        if self.semantic_mse_weight:
            mse = jnp.mean(jnp.square(predicted - target))
            losses["semantic_mse"] = self.semantic_mse_weight * mse
        stats = {
            "semantic_cosine_similarity": cosine,
            "teacher_loaded": self.teacher.loaded[...].astype(jnp.float32),
        }
        return losses, stats

    def encode(self, images) -> jnp.ndarray:
        return self._quantize(images, False).indices

    def decode(self, indices) -> jnp.ndarray:
        return self._decode_pixels(self.quantizer.embed(indices))

    def decode_semantic(self, indices) -> jnp.ndarray:
        """The semantic decoder's teacher-feature estimate for code indices."""
        return self.semantic_decoder(self.quantizer.split(self.quantizer.embed(indices))[0])


def build_dual_tokenizer(
    *,
    image_size: int,
    latent_dim: int,
    encoder: dict,
    decoder: dict,
    quantizer: dict,
    dtype,
    seed: int,
    architectures: dict,
) -> DualTokenizer:
    """Builds a DualTokenizer from plain dicts (called by tokenizers/tokenizer.build_tokenizer).

    encoder: {'pixel': kwargs, 'semantic': ViT kwargs}; the pixel dicts may name
      'architecture' ('vit' default, or 'conv'). The teacher is built with the semantic
      encoder's patch_size / width / depth / heads / mlp_dim.
    decoder: {'pixel': kwargs, 'semantic': ViT kwargs (width, depth, heads, mlp_dim),
      'pixel_input': 'pixel' | 'both', 'semantic_cosine_weight', 'semantic_mse_weight'}.
    quantizer: {'name': 'dual', **DualCodebookQuantizer kwargs}.
    Both encoders output latent_dim per token; 1-D latents: the same num_latents everywhere.
    architectures: name -> (encoder class, decoder class) for the pixel branch.
    """
    pix_enc, sem_enc, pix_dec, sem_dec, quantizer, options = _branch_kwargs(
        encoder, decoder, quantizer
    )
    num_latents, pix_arch = _pixel_branch_layout(pix_enc, sem_enc, pix_dec, architectures)
    encoder_cls, decoder_cls = architectures[pix_arch]
    rngs = nnx.Rngs(params=seed)
    common = dict(image_size=image_size, dtype=dtype, rngs=rngs)
    grid = image_size // sem_enc["patch_size"]
    pixel_in = latent_dim * (2 if options["pixel_decoder_input"] == "both" else 1)
    return DualTokenizer(
        encoder=encoder_cls(out_dim=latent_dim, **common, **pix_enc),
        semantic_encoder=ViTEncoder(out_dim=latent_dim, **common, **sem_enc),
        quantizer=DualCodebookQuantizer(
            latent_dim, latent_dim, dtype=dtype, rngs=rngs, **quantizer
        ),
        decoder=decoder_cls(in_dim=pixel_in, **common, **pix_dec),
        semantic_decoder=ViTDecoder(
            image_size=grid,
            patch_size=1,
            in_dim=latent_dim,
            out_channels=sem_enc["width"],
            num_latents=num_latents,
            dtype=dtype,
            rngs=rngs,
            **sem_dec,
        ),  # fmt: skip
        teacher=Teacher(**{k: sem_enc[k] for k in _TRUNK_KEYS}, **common),
        **options,
    )


def _branch_kwargs(encoder: dict, decoder: dict, quantizer: dict):
    """Splits the config dicts into (pixel encoder, semantic encoder, pixel decoder, semantic
    decoder, quantizer kwargs, DualTokenizer options); unknown or missing keys raise."""
    encoder, decoder, quantizer = dict(encoder), dict(decoder), dict(quantizer)
    _require(encoder, ("pixel", "semantic"), "model.encoder")
    _require(decoder, ("pixel", "semantic"), "model.decoder")
    if quantizer.pop("name", "dual") != "dual":
        raise ConfigError("model.architecture='dual' needs quantizer.name='dual'")
    pix_enc, sem_enc = dict(encoder.pop("pixel")), dict(encoder.pop("semantic"))
    pix_dec, sem_dec = dict(decoder.pop("pixel")), dict(decoder.pop("semantic"))
    options = dict(
        semantic_cosine_weight=decoder.pop("semantic_cosine_weight", 1.0),
        semantic_mse_weight=decoder.pop("semantic_mse_weight", 0.0),
        pixel_decoder_input=decoder.pop("pixel_input", "pixel"),
    )
    for name, rest in (("model.encoder", encoder), ("model.decoder", decoder)):
        if rest:
            raise ConfigError(
                f"{name} has unknown keys {sorted(rest)} for model.architecture='dual'"
            )
    return pix_enc, sem_enc, pix_dec, sem_dec, quantizer, options


def _pixel_branch_layout(pix_enc: dict, sem_enc: dict, pix_dec: dict, architectures: dict):
    """(num_latents, pixel architecture name), checked against the semantic branch; takes
    'architecture' out of the pixel encoder / decoder kwargs."""
    latents = {
        "model.encoder.pixel": pix_enc.get("num_latents", 0),
        "model.encoder.semantic": sem_enc.get("num_latents", 0),
        "model.decoder.pixel": pix_dec.get("num_latents", 0),
    }
    if len(set(latents.values())) != 1:
        raise ConfigError(f"num_latents must agree across {latents} (0 for a 2-D grid)")
    num_latents = latents["model.encoder.pixel"]
    pix_arch = pix_enc.pop("architecture", "vit")
    if pix_dec.pop("architecture", pix_arch) != pix_arch or pix_arch not in architectures:
        raise ConfigError(
            f"model.encoder.pixel.architecture={pix_arch!r} must be one of "
            f"{sorted(architectures)} and the same for model.decoder.pixel"
        )
    if pix_arch == "vit" and pix_enc["patch_size"] != sem_enc["patch_size"] and not num_latents:
        raise ConfigError(
            f"pixel patch_size {pix_enc['patch_size']} != semantic patch_size "
            f"{sem_enc['patch_size']}: both encoders must give the same token grid"
        )
    return num_latents, pix_arch


def _require(d: dict, keys: tuple, name: str):
    missing = [k for k in keys if k not in d]
    if missing:
        raise ConfigError(f"{name} needs the keys {list(keys)} for model.architecture='dual'")
