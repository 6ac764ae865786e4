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

from configs import common

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
    if tiny:
        shrink_binary_to_tiny(config)
    return config


def shrink_binary_to_tiny(config: ConfigDict) -> None:
    """The CPU variant: tiny ViT on 32x32 built-in images, as configs/vq_b16.py:tiny."""
    common.shrink_to_tiny(config)
    config.model.dtype = "float32"
    vit = dict(patch_size=4, width=64, depth=2, heads=4, mlp_dim=128)
    config.model.encoder.update(vit)
    config.model.decoder.update(vit)
