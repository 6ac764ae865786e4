"""VQ tokenizer: ViT-B/16 encoder and decoder, 16x16 tokens from 256x256 images, 16384 codes of
8 l2-normalised dimensions behind linear projections (LlamaGen / ViT-VQGAN recipe).

  python run.py --config=configs/vq_b16.py --workdir=DIR            # ImageNet (TFDS)
  python run.py --config=configs/vq_b16.py:tiny --workdir=DIR       # CPU-sized, built-in data
"""

from ml_collections import ConfigDict

from visual_tokenizers.configs import common


def get_config(arg=None):
    config = common.tokenizer_base()
    config.model = ConfigDict(
        dict(
            architecture="vit",
            latent_dim=256,  # LlamaGen's z_channels; the quantizer projects 256 -> 8 -> 256
            dtype="bfloat16",
            encoder=dict(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072),
            decoder=dict(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072),
        )
    )
    config.quantizer = common.vq_quantizer(codebook_size=16384, code_dim=8, l2_normalize=True)
    # LlamaGen VQ tokenizer recipe (tokenizer/tokenizer_image/vq_train.py and vq_loss.py).
    config.loss.update(
        l2_weight=1.0,  # --reconstruction-loss l2, --reconstruction-weight 1.0
        perceptual_weight=1.0,  # --perceptual-weight
        adversarial_weight=0.5,  # --disc-weight (generator side)
        gan_loss="hinge",  # --gen-loss hinge, --disc-loss hinge
        discriminator_start=20_000,  # --disc-start
        discriminator_loss_scale=0.25,  # hinge_d_loss's 0.5 * (real + fake) times disc-weight 0.5
        adaptive_weight=False,  # disc_adaptive_weight=False
    )
    config.discriminator.name = "patchgan"  # --disc-type patchgan: ndf 64, 3 layers, BatchNorm
    config.ema_decay = 0.9999  # update_ema's decay (LlamaGen keeps it off unless --ema)
    if arg == "tiny":
        common.shrink_to_tiny(config)
        config.model.update(latent_dim=32, dtype="float32")
        vit = dict(patch_size=4, width=64, depth=2, heads=4, mlp_dim=128)
        config.model.encoder.update(vit)
        config.model.decoder.update(vit)
        # k-means init and dead-code restarts keep a small codebook in use from the start.
        config.quantizer.update(
            codebook_size=256, code_dim=8, kmeans_init=True, restart_dead_codes=True
        )
        # Pixel and quantizer losses only: the quick demo. The GAN recipe at CPU size is
        # configs/vqgan_f16.py:tiny.
        config.loss.update(perceptual_weight=0.0, adversarial_weight=0.0)
        config.ema_decay = 0.0
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/vq_b16.py; use '' or 'tiny'")
    return config
