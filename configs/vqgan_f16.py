"""MaskGIT's VQGAN tokenizer (official `vqgan_config`): conv encoder/decoder with filters 128,
channel multipliers (1, 1, 2, 2, 4), 2 residual blocks, f16 (256x256 -> 16x16 tokens), VQ with
1024 codes of 256 dimensions, commitment 0.25, softmax entropy penalty 0.1 at temperature 0.01.

Training recipe of MaskGIT's `vqgan_config` / `base_config` (PyPI package `maskgit`): L2 + 0.1 LPIPS
+ 0.1 non-saturating adversarial loss against a StyleGAN discriminator with blur resampling, R1
cost 10, Adam(0, 0.99) at lr 1e-4 for the generator and the discriminator, EMA 0.999 of the
generator (`polyak_decay`), batch 256, 1M steps. The perceptual term needs the VGG16 and LPIPS
weight files (core/weights.py).

  python run.py --config=configs/vqgan_f16.py --workdir=DIR            # ImageNet (TFDS)
  python run.py --config=configs/vqgan_f16.py:tiny --workdir=DIR       # CPU-sized, built-in data
"""

from ml_collections import ConfigDict

from visual_tokenizers.configs import common


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
    config.num_steps = 1_000_000  # MaskGIT num_train_steps
    config.data.batch_size = 256  # MaskGIT batch_size
    config.loss.update(
        l2_weight=1.0,
        perceptual_weight=0.1,  # perceptual_loss_weight
        adversarial_weight=0.1,  # vqgan.g_adversarial_loss_weight
        gan_loss="non_saturating",  # vqgan.loss_type
        r1_cost=10.0,  # vqgan.grad_penalty_cost, gradient_penalty 'r1'
        r1_every=1,
    )
    config.discriminator.name = "stylegan"  # discriminator.channel_multiplier 1, blur_resample
    # optimizer: adam, beta1 0, beta2 0.99, g_lr = d_lr = 1e-4, constant schedule with
    # lr_warmup_steps 2000 (base_config); MaskGIT does not clip gradients.
    maskgit_adam = dict(
        name="adam",
        lr=1e-4,
        b1=0.0,
        b2=0.99,
        weight_decay=0.0,
        grad_clip_norm=0.0,
        schedule="constant",
        warmup_steps=2000,
    )
    config.optimizer.update(maskgit_adam)
    config.discriminator_optimizer.update(maskgit_adam)
    config.ema_decay = 0.999  # base_config polyak_decay
    if arg == "tiny":
        common.shrink_to_tiny(config)
        config.model.update(latent_dim=32, dtype="float32")
        # 32 groups in every GroupNorm: widths must be multiples of 32. f4: 32x32 -> 8x8 tokens.
        tiny = dict(filters=32, channel_multipliers=(1, 1, 2), num_res_blocks=1)
        config.model.encoder.update(tiny)
        config.model.decoder.update(tiny)
        # Factorised, l2-normalised 8-d codes as configs/vq_b16.py:tiny, no entropy penalty:
        # MaskGIT's raw 32-d codes reached only 13.1 dB PSNR in the 600 CPU steps.
        config.quantizer.update(
            codebook_size=256,
            code_dim=8,
            l2_normalize=True,
            entropy_weight=0.0,
            kmeans_init=True,
            restart_dead_codes=True,
        )
        common.shrink_recipe_to_tiny(config)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/vqgan_f16.py; use '' or 'tiny'")
    return config
