"""MaskGIT's VQGAN tokenizer (official `vqgan_config`): conv encoder/decoder with filters 128,
channel multipliers (1, 1, 2, 2, 4), 2 residual blocks, f16 (256x256 -> 16x16 tokens), VQ with
1024 codes of 256 dimensions, commitment 0.25, softmax entropy penalty 0.1 at temperature 0.01.

Only the pixel loss of the shared tokenizer recipe is used so far; the perceptual and adversarial
terms and MaskGIT's Adam(0, 0.99) GAN optimizer arrive with the GAN trainer (issue 3).

  python run.py --config=configs/vqgan_f16.py --workdir=DIR            # ImageNet (TFDS)
  python run.py --config=configs/vqgan_f16.py:tiny --workdir=DIR       # CPU-sized, built-in data
"""

from ml_collections import ConfigDict

from configs import common


def get_config(arg=None):
    config = common.tokenizer_base()
    conv = dict(filters=128, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2)  # MaskGIT
    config.model = ConfigDict(
        dict(
            architecture="conv",
            latent_dim=256,  # MaskGIT embedding_dim
            dtype="bfloat16",
            encoder=dict(conv),
            decoder=dict(conv),
        )
    )
    # MaskGIT vqvae: codebook_size 1024, commitment_cost 0.25, entropy_loss_ratio 0.1,
    # entropy_temperature 0.01 (softmax entropy); codes live in the latent space itself.
    config.quantizer = common.vq_quantizer(
        codebook_size=1024, beta=0.25, entropy_weight=0.1, entropy_temperature=0.01
    )
    if arg == "tiny":
        common.shrink_to_tiny(config)
        config.model.update(latent_dim=32, dtype="float32")
        # 32 groups in every GroupNorm: widths must be multiples of 32. f4: 32x32 -> 8x8 tokens.
        tiny = dict(filters=32, channel_multipliers=(1, 1, 2), num_res_blocks=1)
        config.model.encoder.update(tiny)
        config.model.decoder.update(tiny)
        config.quantizer.update(codebook_size=256, kmeans_init=True, restart_dead_codes=True)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/vqgan_f16.py; use '' or 'tiny'")
    return config
