"""1-D binary-latent tokenizer (TiTok / Instella-T2I style): a ViT-B/16 encoder reads the 16x16
patches of a 256x256 image together with 128 learned latent queries; only the 128 latents are
quantized, to 16 bits each (LFQ; BSQ with `bsq`), and a ViT-B/16 decoder rebuilds the patches
from mask tokens and those latents. Tokens are [B, 128] int32 in [0, 2**16).

  python run.py --config=configs/binary_1d.py --workdir=DIR            # LFQ, ImageNet (TFDS)
  python run.py --config=configs/binary_1d.py:bsq --workdir=DIR        # BSQ
  python run.py --config=configs/binary_1d.py:tiny --workdir=DIR       # 32 latents, CPU-sized
  python run.py --config=configs/binary_1d.py:bsq_tiny --workdir=DIR   # BSQ, CPU-sized

Any quantizer works with 1-D latents: e.g. `--config.quantizer=...` from configs/vq_b16.py.
"""

from ml_collections import ConfigDict

from visual_tokenizers.configs import binary_b16, common

BITS = 16
NUM_LATENTS = 128  # TiTok-B-128 sequence length
TINY_LATENTS = 32  # half the 8x8 patches of the tiny 32x32 images


def get_config(arg=None):
    name, tiny = binary_b16.parse_variants(arg, "configs/binary_1d.py")
    config = common.tokenizer_base()
    vit = dict(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072, num_latents=NUM_LATENTS)
    config.model = ConfigDict(
        dict(architecture="vit", latent_dim=BITS, dtype="bfloat16", encoder=vit, decoder=vit)
    )
    config.quantizer = common.binary_quantizer(name, BITS, entropy_group_bits=8)
    binary_b16.apply_recipe(config, name)
    if tiny:
        binary_b16.shrink_binary_to_tiny(config)
        config.model.encoder.num_latents = TINY_LATENTS
        config.model.decoder.num_latents = TINY_LATENTS
    return config
