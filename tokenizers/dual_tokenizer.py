r"""TokenFlow-style dual tokenizer: pixel + semantic encoders, one shared index, two decoders.

    images -> pixel encoder    -> z_pix -\                        /-> q_pix -> pixel decoder
                                         > DualCodebookQuantizer <             -> images
    images -> semantic encoder -> z_sem -/  (tokenizers/dual.py)  \-> q_sem -> semantic decoder
                                                                               -> features
    images -> frozen teacher (models/teacher.py) -> target features

Task layers. TokenFlow (ByteFlow-AI/TokenFlow, tokenflow/tokenizer/vq_model.py,
`encode_task_layer` / `decode_task_layer`) puts a Linear-Tanh-Linear MLP on each side of the
semantic codebook: encoder features -> Linear(width, width) -> Tanh -> Linear(width, 32) ->
codebook, and semantic decoder trunk -> Linear(width, width) -> Tanh -> Linear(width, teacher
width). `semantic_task_layer='tanh'` builds exactly that: the first Linear of each MLP is the
ViT's own output projection (the semantic encoder's `head`, the semantic decoder's `to_pixels`),
the Tanh and second Linear are `encode_task` / `decode_task` (TanhLinear); all four Linears start
N(0, 0.02) with zero bias (TokenFlow's `_init_weights`). The semantic code then enters the
quantizer and the decoder at its own width (TokenFlow's decoder embeds the 32-d code directly),
so the quantizer has no projections around the semantic codebook. `semantic_task_layer=
'linear'` (this codebase's earlier layout) keeps one linear head to `latent_dim` and the
quantizer's linear in / out projections around the semantic codes.

Hidden states (models/teacher.py `hidden_state`): `teacher_layer` picks the teacher's target
features and `semantic_layer` the semantic encoder's; 0 = after the final LayerNorm, -k = Hugging
Face's hidden_states[-k] (TokenFlow, SigLIP teacher: -2, the penultimate block's output without
the final LayerNorm, for both).

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
from visual_tokenizers.models.teacher import Teacher, check_layer, hidden_state
from visual_tokenizers.models.vit import ViTDecoder, ViTEncoder
from visual_tokenizers.tokenizers.base import QuantizerOutput
from visual_tokenizers.tokenizers.dual import DualCodebookQuantizer

PIXEL_DECODER_INPUTS = ("pixel", "both")
TASK_LAYERS = ("tanh", "linear")
_TRUNK_KEYS = ("patch_size", "width", "depth", "heads", "mlp_dim")
# TokenFlow's _init_weights: timm trunc_normal_(std=0.02) with its default absolute bounds +-2,
# i.e. +-100 std: a plain N(0, 0.02).
_TASK_INIT = nnx.initializers.normal(stddev=0.02)


class TanhLinear(nnx.Module):
    """x -> Linear(tanh(x)): the Tanh and second Linear of a TokenFlow task layer."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
        part = nnx.with_partitioning
        self.linear = nnx.Linear(
            din, dout, kernel_init=part(_TASK_INIT, ("embed", None)),
            bias_init=part(nnx.initializers.zeros_init(), (None,)), rngs=rngs,
        )  # fmt: skip

    def __call__(self, x):
        return self.linear(jnp.tanh(x.astype(jnp.float32)))


def _task_init(linear: nnx.Linear, rngs: nnx.Rngs) -> None:
    """Re-initialises a ViT's output projection as a task layer's first Linear."""
    linear.kernel[...] = _TASK_INIT(rngs.params(), linear.kernel.shape, linear.kernel.dtype)
    linear.bias[...] = jnp.zeros_like(linear.bias[...])


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
        encode_task: TanhLinear | None = None,
        decode_task: TanhLinear | None = None,
        semantic_layer: int = 0,
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
        # None: the semantic encoder's head / decoder's output layer is the whole mapping.
        self.encode_task, self.decode_task = encode_task, decode_task
        self.semantic_layer = semantic_layer

    @property
    def vocab(self):
        return self.quantizer.vocab

    def _quantize(self, images, train: bool) -> QuantizerOutput:
        z_sem = hidden_state(self.semantic_encoder, images, self.semantic_layer)
        z_sem = z_sem.astype(jnp.float32)
        if self.encode_task is not None:
            z_sem = self.encode_task(z_sem)
        z_pix = self.encoder(images).astype(jnp.float32)
        return self.quantizer(z_sem, z_pix, train=train)

    def _decode_pixels(self, quantized):
        q_sem, q_pix = self.quantizer.split(quantized)
        x = q_pix if self.pixel_decoder_input == "pixel" else jnp.concatenate([q_sem, q_pix], -1)
        return self.decoder(x)

    def __call__(self, images, *, train: bool = False) -> tuple[jnp.ndarray, QuantizerOutput]:
        out = self._quantize(images, train)
        reconstruction = self._decode_pixels(out.quantized)
        predicted = self._decode_semantic(out.quantized)
        losses, stats = self._semantic_terms(predicted, self.teacher(images))
        return reconstruction, out.replace(
            losses={**out.losses, **losses}, stats={**out.stats, **stats}
        )

    def _decode_semantic(self, quantized):
        predicted = self.semantic_decoder(self.quantizer.split(quantized)[0])
        return predicted if self.decode_task is None else self.decode_task(predicted)

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
        return self._decode_semantic(self.quantizer.embed(indices))


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

    encoder: {'pixel': kwargs, 'semantic': ViT kwargs, 'semantic_task_layer': 'tanh' |
      'linear', 'semantic_layer': int}; the pixel dicts may name 'architecture' ('vit' default,
      or 'conv'). The teacher is built with the semantic encoder's patch_size / width / depth /
      heads / mlp_dim.
    decoder: {'pixel': kwargs, 'semantic': ViT kwargs (width, depth, heads, mlp_dim),
      'pixel_input': 'pixel' | 'both', 'semantic_cosine_weight', 'semantic_mse_weight',
      'semantic_task_layer': 'tanh' | 'linear', 'teacher_layer': int}.
    Left out, the task layers are 'linear' and the layers 0 (this codebase's earlier model, so
    the configs saved with earlier runs rebuild it).
    quantizer: {'name': 'dual', **DualCodebookQuantizer kwargs}.
    The pixel encoder outputs latent_dim per token; 1-D latents: the same num_latents everywhere.
    architectures: name -> (encoder class, decoder class) for the pixel branch.
    """
    pix_enc, sem_enc, pix_dec, sem_dec, quantizer, options, task = _branch_kwargs(
        encoder, decoder, quantizer
    )
    num_latents, pix_arch = _pixel_branch_layout(pix_enc, sem_enc, pix_dec, architectures)
    encoder_cls, decoder_cls = architectures[pix_arch]
    rngs = nnx.Rngs(params=seed)
    common = dict(image_size=image_size, dtype=dtype, rngs=rngs)
    width = sem_enc["width"]
    tanh_in, tanh_out = (task[k] == "tanh" for k in ("encoder", "decoder"))
    # Width of the semantic code at the quantizer's input and output: TokenFlow's task layer
    # outputs the code itself (no projection in the quantizer); else latent_dim, projected.
    sem_dim = quantizer.get("semantic_code_dim", 32) if tanh_in else latent_dim
    pixel_in = latent_dim + (sem_dim if options["pixel_decoder_input"] == "both" else 0)
    # Built in this order so that the 'linear' layout draws the same initial values as before.
    pixel_encoder = encoder_cls(out_dim=latent_dim, **common, **pix_enc)
    semantic_encoder = ViTEncoder(out_dim=width if tanh_in else latent_dim, **common, **sem_enc)
    dual = DualCodebookQuantizer(sem_dim, latent_dim, dtype=dtype, rngs=rngs, **quantizer)
    pixel_decoder = decoder_cls(in_dim=pixel_in, **common, **pix_dec)
    semantic_decoder = ViTDecoder(
        image_size=image_size // sem_enc["patch_size"], patch_size=1, in_dim=sem_dim,
        out_channels=sem_dec["width"] if tanh_out else width, num_latents=num_latents,
        dtype=dtype, rngs=rngs, **sem_dec,
    )  # fmt: skip
    if tanh_in:
        _task_init(semantic_encoder.head, rngs)
        options["encode_task"] = TanhLinear(width, sem_dim, rngs=rngs)
    if tanh_out:
        _task_init(semantic_decoder.to_pixels, rngs)
        options["decode_task"] = TanhLinear(sem_dec["width"], width, rngs=rngs)
    trunk = {k: sem_enc[k] for k in _TRUNK_KEYS}
    return DualTokenizer(
        encoder=pixel_encoder,
        semantic_encoder=semantic_encoder,
        quantizer=dual,
        decoder=pixel_decoder,
        semantic_decoder=semantic_decoder,
        teacher=Teacher(**trunk, **common, layer=task["teacher_layer"]),
        semantic_layer=check_layer(
            task["semantic_layer"], sem_enc["depth"], "model.encoder.semantic_layer"
        ),
        **options,
    )


def _branch_kwargs(encoder: dict, decoder: dict, quantizer: dict):
    """Splits the config dicts into (pixel encoder, semantic encoder, pixel decoder, semantic
    decoder, quantizer kwargs, DualTokenizer options, semantic-side layout: task layers and
    hidden-state layers); unknown or missing keys raise."""
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
    task = dict(
        encoder=encoder.pop("semantic_task_layer", "linear"),
        decoder=decoder.pop("semantic_task_layer", "linear"),
        semantic_layer=encoder.pop("semantic_layer", 0),
        teacher_layer=decoder.pop("teacher_layer", 0),
    )
    for side in ("encoder", "decoder"):
        if task[side] not in TASK_LAYERS:
            raise ConfigError(
                f"model.{side}.semantic_task_layer={task[side]!r}; choose one of {TASK_LAYERS} "
                "(TokenFlow's Linear-Tanh-Linear, or one linear projection)"
            )
    for name, rest in (("model.encoder", encoder), ("model.decoder", decoder)):
        if rest:
            raise ConfigError(
                f"{name} has unknown keys {sorted(rest)} for model.architecture='dual'"
            )
    return pix_enc, sem_enc, pix_dec, sem_dec, quantizer, options, task


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
