"""TokenFlow dual-codebook tokenizer (Qu et al. 2024, arXiv:2412.03069), single-scale, with ViT-B/16
pixel and semantic encoders: 16x16 tokens from 256x256 images, 32768 shared indices into a 32-d
semantic and an 8-d pixel codebook, a 3-layer ViT semantic decoder regressing a frozen SigLIP B/16
teacher's penultimate hidden state.

  python run.py --config=configs/dual_b16.py --workdir=DIR \\
      --config.teacher.weights=/path/to/webli_en_b16_256_60500360.npz   # ImageNet (TFDS)
  python run.py --config=configs/dual_b16.py:tiny --workdir=DIR        # CPU-sized, random teacher

The teacher file is big_vision's SigLIP B/16 256 checkpoint
(gs://big_vision/siglip/webli_en_b16_256_60500360.npz; its image tower 'params/img/' is found
automatically); any big_vision ViT .npz with the semantic encoder's shape works (layout in
models/teacher.py).

Sources, ByteFlow-AI/TokenFlow: tokenflow/tokenizer/vq_model.py (model, quantizer, losses; cited
below as vq_model.py) and tokenflow/scripts/train_vq.sh (its training command; train_vq.sh).
TokenFlow's training loop and loss file (tokenflow/tokenizer/vq_train.py, vq_loss.py) are not in
the public code index we could read; where a value comes from them it is taken from LlamaGen's
tokenizer/tokenizer_image/vq_train.py / vq_loss.py, which they modify (vq_model.py's header), and
checked against two public copies of TokenFlow's: VisionXLab/EvoTok
(evotok/tokenizer/modules/vq_loss.py) and mims-harvard/MedTok (its vq_train.py flags).

Departures, on purpose: TokenFlow's teachers are CLIP ViT-B/16 at 224 (`clipb_224`), ViTamin-XL
at 256 and SigLIP So400m/14 at 384 (`siglip_384`, its released models); here a SigLIP B/16 at 256
(the same hidden-state target as `siglip_384`, the closest size to `vitamin_xlarge_256`).
TokenFlow quantizes residually over scales (1, 2, 4, ..., 16 for 256) with a random scale drop;
this config quantizes once at 16x16. Its pixel branch is LlamaGen's convolutional VQGAN; here a
ViT-B/16 (`model.encoder.pixel.architecture='conv'` gives MaskGIT's conv VQGAN instead).
Its semantic decoder's ViT has a class token; ours has none.
"""

from ml_collections import ConfigDict

from visual_tokenizers.configs import common

VIT_B16 = dict(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072)  # ViT-B/16
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k train (TFDS imagenet2012)


def get_config(arg=None):
    config = common.tokenizer_base()
    config.model = ConfigDict(
        dict(
            architecture="dual",
            # The pixel encoder's output width: vq_model.py ModelArgs.z_channels = 256, projected
            # to the 8-d pixel code (quant_conv) and back (post_quant_conv).
            latent_dim=256,
            dtype="bfloat16",
            encoder=dict(
                pixel=dict(VIT_B16),
                # Also the teacher's architecture: the semantic encoder starts from the teacher
                # (vq_model.py: `encoder_vqkd` is the pretrained teacher model, trained on).
                semantic=dict(VIT_B16),
                # vq_model.py `encode_task_layer`: Linear(width, width), Tanh, Linear(width, 32).
                semantic_task_layer="tanh",
                # vq_model.py encode(), 'siglip_384': hidden_states[-2], the penultimate block's
                # output without SigLIP's final LayerNorm (its last block and post_layernorm are
                # frozen there because unused).
                semantic_layer=-2,
            ),
            decoder=dict(
                pixel=dict(VIT_B16),
                # vq_model.py: decoder_config depth 3, the encoder's embed_dim, 12 heads
                # (get_model_default_params num_heads), mlp_ratio 4; patch 1 over the code grid.
                semantic=dict(width=768, depth=3, heads=12, mlp_dim=3072),
                # vq_model.py decode(): the pixel decoder reads the pixel codes only.
                pixel_input="pixel",
                # vq_model.py `decode_task_layer`: Linear(width, width), Tanh, Linear(width,
                # teacher width) after the semantic decoder's trunk.
                semantic_task_layer="tanh",
                # The regression target: SigLIP's hidden_states[-2] (EvoTok's copy of TokenFlow's
                # vq_loss.py, get_regress_target for 'siglip_384'; vq_model.py's decoder_out_dim
                # 1152 = SigLIP So400m's width, i.e. a hidden state, not the pooled head).
                teacher_layer=-2,
                # 1 - cosine per token, averaged (VQ-KD, BEiT v2; the copies' --vqkd-loss cosine,
                # --vqkd-weight 1.0); MSE on the raw features is available as well.
                semantic_cosine_weight=1.0,
                semantic_mse_weight=0.0,
            ),
        )
    )
    config.quantizer = ConfigDict(
        dict(
            name="dual",
            codebook_size=32768,  # train_vq.sh --codebook-size 32768 (all three teachers)
            semantic_code_dim=32,  # vq_model.py ModelArgs.semantic_code_dim
            pixel_code_dim=8,  # vq_model.py ModelArgs.codebook_embed_dim
            pixel_weight=1.0,  # vq_model.py VectorQuantizer.forward: d = d_vqkd + 1.0 * d_vqgan
            # vq_model.py ModelArgs.commit_loss_beta is 1.0, but the training script passes
            # --commit-loss-beta (LlamaGen's vq_train.py, default 0.25; so does MedTok's copy of
            # TokenFlow's), and train_vq.sh does not set it: 0.25.
            beta=0.25,
            # LlamaGen's VQLoss adds the codebook term unweighted (so does EvoTok's copy).
            codebook_weight=1.0,
            # vq_model.py VectorQuantizer.forward: torch.mean over the concatenated 40-d code.
            loss_average="concatenated",
            usage_decay=0.99,
            search_chunk_size=8192,
        )
    )
    config.teacher = ConfigDict(
        dict(
            weights="",  # big_vision ViT .npz (required unless random_init)
            prefix="auto",  # key prefix in the file; 'auto' finds the one ViT in it
            random_init=False,  # True: keep a random teacher (smoke tests only; warns)
            init_semantic_encoder=True,  # vq_model.py: the semantic encoder IS the teacher model
        )
    )
    # Pixel branch: LlamaGen's VQ recipe (configs/vq_b16.py cites its flags); train_vq.sh sets
    # none of these, so LlamaGen's defaults hold: L2 + LPIPS + 0.5 hinge GAN from step 20,000.
    config.loss.update(
        l2_weight=1.0,  # --reconstruction-loss l2, --reconstruction-weight 1.0
        perceptual_weight=1.0,  # --perceptual-weight 1.0
        adversarial_weight=0.5,  # --disc-weight 0.5
        gan_loss="hinge",  # --gen-loss hinge, --disc-loss hinge
        discriminator_start=20_000,  # --disc-start 20000
        discriminator_loss_scale=0.25,  # hinge_d_loss's 0.5 * (real + fake) times disc-weight 0.5
        adaptive_weight=False,  # VQLoss disc_adaptive_weight=False
    )
    config.discriminator.name = "patchgan"  # --disc-type patchgan
    config.data.batch_size = 32  # train_vq.sh --global-batch-size 32
    config.num_steps = 100 * (IMAGENET_TRAIN // 32)  # train_vq.sh --epochs 100 (drop_last)
    config.ema_decay = 0.0  # train_vq.sh passes no --ema (LlamaGen: off unless --ema)
    if arg == "tiny":
        common.shrink_to_tiny(config)
        # Pixel and quantizer losses only, as configs/vq_b16.py:tiny (LPIPS needs a download).
        config.loss.update(perceptual_weight=0.0, adversarial_weight=0.0)
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
