"""TokenFlow-style dual-codebook tokenizer (Qu et al. 2024, arXiv:2412.03069): ViT-B/16 pixel and
semantic encoders, 16x16 tokens from 256x256 images, 32768 shared indices into a 32-d semantic and
an 8-d pixel codebook, a 3-layer ViT semantic decoder regressing a frozen SigLIP B/16 teacher.

  python run.py --config=configs/dual_b16.py --workdir=DIR \\
      --config.teacher.weights=/path/to/webli_en_b16_256_60500360.npz   # ImageNet (TFDS)
  python run.py --config=configs/dual_b16.py:tiny --workdir=DIR        # CPU-sized, random teacher

The teacher file is big_vision's SigLIP B/16 256 checkpoint
(gs://big_vision/siglip/webli_en_b16_256_60500360.npz; its image tower 'params/img/' is found
automatically); any big_vision ViT .npz with the semantic encoder's shape works (layout in
models/teacher.py). TokenFlow itself uses CLIP ViT-B/14 (ablations) and SigLIP So400m/14 at 384
(released models) teachers and multi-scale VQ; this config is the single-scale B/16 variant.
"""

from ml_collections import ConfigDict

from visual_tokenizers.configs import common

VIT_B16 = dict(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072)  # ViT-B/16


def get_config(arg=None):
    config = common.tokenizer_base()
    config.model = ConfigDict(
        dict(
            architecture="dual",
            latent_dim=256,  # per-token encoder output; each branch projects it to its code dim
            dtype="bfloat16",
            encoder=dict(
                pixel=dict(VIT_B16),
                # Also the teacher's architecture: the semantic encoder starts from the teacher.
                semantic=dict(VIT_B16),
            ),
            decoder=dict(
                pixel=dict(VIT_B16),
                # TokenFlow (Qu et al. 2024): a 3-layer ViT semantic decoder; ViT-B width.
                semantic=dict(width=768, depth=3, heads=12, mlp_dim=3072),
                # 'pixel': the pixel decoder reads the pixel codes only (this codebase's default);
                # 'both': semantic and pixel codes concatenated.
                pixel_input="pixel",
                # Cosine regression of teacher features, the VQ-KD (BEiT v2) objective TokenFlow's
                # semantic branch follows; MSE on the raw features is available as well.
                semantic_cosine_weight=1.0,
                semantic_mse_weight=0.0,
            ),
        )
    )
    config.quantizer = ConfigDict(
        dict(
            name="dual",
            codebook_size=32768,  # TokenFlow: 32768 shared indices
            semantic_code_dim=32,  # TokenFlow: 32-d semantic codes
            pixel_code_dim=8,  # TokenFlow: 8-d pixel codes
            pixel_weight=1.0,  # TokenFlow's w_dis (distance balance weight), 1.0 by default
            beta=0.25,  # commitment weight (VQ-VAE, LlamaGen)
            codebook_weight=1.0,
            usage_decay=0.99,
            search_chunk_size=8192,
        )
    )
    config.teacher = ConfigDict(
        dict(
            weights="",  # big_vision ViT .npz (required unless random_init)
            prefix="auto",  # key prefix in the file; 'auto' finds the one ViT in it
            random_init=False,  # True: keep a random teacher (smoke tests only; warns)
            init_semantic_encoder=True,  # TokenFlow: the semantic encoder starts from the teacher
        )
    )
    # Pixel branch: VQGAN losses, L2 + LPIPS + GAN (TokenFlow, Qu et al. 2024). The weights are
    # LlamaGen's VQ recipe, as configs/vq_b16.py (whose comments cite LlamaGen's flags).
    config.loss.update(
        l2_weight=1.0,
        perceptual_weight=1.0,
        adversarial_weight=0.5,
        gan_loss="hinge",
        discriminator_start=20_000,
        discriminator_loss_scale=0.25,
        adaptive_weight=False,
    )
    config.discriminator.name = "patchgan"
    config.ema_decay = 0.9999
    if arg == "tiny":
        common.shrink_to_tiny(config)
        # Pixel and quantizer losses only, as configs/vq_b16.py:tiny (LPIPS needs a download).
        config.loss.update(perceptual_weight=0.0, adversarial_weight=0.0)
        config.ema_decay = 0.0
        config.model.update(latent_dim=32, dtype="float32")
        vit = dict(patch_size=4, width=64, depth=2, heads=4, mlp_dim=128)
        config.model.encoder.pixel.update(vit)
        config.model.encoder.semantic.update(vit)
        config.model.decoder.pixel.update(vit)
        config.model.decoder.semantic.update(width=64, depth=1, heads=4, mlp_dim=128)
        config.quantizer.update(codebook_size=256)
        config.teacher.random_init = True
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/dual_b16.py; use '' or 'tiny'")
    return config
