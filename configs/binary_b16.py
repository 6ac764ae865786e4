"""Binary-latent tokenizer: ViT-B/16 encoder and decoder, 16x16 tokens of 18 bits (2**18 implicit
codes) from 256x256 images; LFQ (MAGVIT-v2) by default, BSQ (BSQ-ViT) with `bsq`.

The encoder head emits the 18 bits' pre-activations directly (latent_dim = bits: no projection,
no activation before the quantizer, as MAGVIT-v2 recommends).

  python run.py --config=configs/binary_b16.py --workdir=DIR            # LFQ, ImageNet (TFDS)
  python run.py --config=configs/binary_b16.py:bsq --workdir=DIR        # BSQ
  python run.py --config=configs/binary_b16.py:tiny --workdir=DIR       # LFQ, CPU-sized
  python run.py --config=configs/binary_b16.py:bsq_tiny --workdir=DIR   # BSQ, CPU-sized

The argument is a set of variant words joined by '_' or ',': 'lfq' or 'bsq', and 'tiny'.
"""

from ml_collections import ConfigDict

from visual_tokenizers.configs import common

BITS = 18


def parse_variants(arg, path: str) -> tuple[str, bool]:
    """(quantizer name, tiny) from an argument such as 'bsq_tiny'; unknown words are errors."""
    words = [w for w in (arg or "").replace(",", "_").split("_") if w]
    unknown = [w for w in words if w not in ("lfq", "bsq", "tiny")]
    if unknown or ("lfq" in words and "bsq" in words):
        raise ValueError(
            f"unknown variant {arg!r} of {path}; use '', 'bsq', 'tiny' or 'bsq_tiny' "
            "(words: lfq | bsq, tiny)"
        )
    return ("bsq" if "bsq" in words else "lfq"), "tiny" in words


def get_config(arg=None):
    name, tiny = parse_variants(arg, "configs/binary_b16.py")
    config = common.tokenizer_base()
    vit = dict(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072)
    config.model = ConfigDict(
        dict(architecture="vit", latent_dim=BITS, dtype="bfloat16", encoder=vit, decoder=vit)
    )
    config.quantizer = common.binary_quantizer(name, BITS)
    apply_recipe(config, name)
    if tiny:
        shrink_binary_to_tiny(config)
    return config


def apply_recipe(config: ConfigDict, name: str) -> None:
    """The published training recipe of the quantizer family (LFQ or BSQ)."""
    (bsq_recipe if name == "bsq" else lfq_recipe)(config)


def lfq_recipe(config: ConfigDict) -> None:
    """MAGVIT-v2 trains LFQ with MAGVIT's VQGAN recipe (itself MaskGIT's plus LeCam and EMA):
    L2 + 0.1 LPIPS + 0.1 non-saturating GAN (StyleGAN discriminator), R1 10, LeCam 0.001,
    Adam(0, 0.99) lr 1e-4, EMA 0.999. [?] The MAGVIT-v2 training code is unreleased; these
    are MAGVIT v1's published config values."""
    config.loss.update(
        perceptual_weight=0.1, adversarial_weight=0.1, r1_cost=10.0, lecam_weight=0.001
    )
    adam = dict(name="adam", lr=1e-4, b1=0.0, b2=0.99, weight_decay=0.0, grad_clip_norm=0.0)
    config.optimizer.update(adam)
    config.discriminator_optimizer.update(adam)
    config.ema_decay = 0.999


def bsq_recipe(config: ConfigDict) -> None:
    """BSQ-ViT's 18-bit recipe (Zhao et al. 2024; zhaoyue-zephyrus/bsq-vit): 0.1 LPIPS, 0.1
    StyleGAN adversarial loss, R1 every 16 steps, AdamW(0.9, 0.99) with weight decay 1e-4. [?]
    BSQ does not state its R1 cost here: MaskGIT's 10 is used."""
    config.loss.update(perceptual_weight=0.1, adversarial_weight=0.1, r1_cost=10.0, r1_every=16)
    adamw = dict(name="adamw", b1=0.9, b2=0.99, weight_decay=1e-4)
    config.optimizer.update(adamw)
    config.discriminator_optimizer.update(adamw)


def shrink_binary_to_tiny(config: ConfigDict) -> None:
    """The CPU variant: tiny ViT on 32x32 built-in images, as configs/vq_b16.py:tiny (pixel,
    quantizer and entropy losses only; the GAN recipe at CPU size is configs/vqgan_f16.py:tiny)."""
    common.shrink_to_tiny(config)
    config.loss.update(perceptual_weight=0.0, adversarial_weight=0.0, r1_cost=0.0)
    config.loss.update(lecam_weight=0.0)
    config.optimizer.update(b1=0.9, b2=0.95, weight_decay=0.0, grad_clip_norm=1.0)
    config.ema_decay = 0.0
    config.model.dtype = "float32"
    vit = dict(patch_size=4, width=64, depth=2, heads=4, mlp_dim=128)
    config.model.encoder.update(vit)
    config.model.decoder.update(vit)
