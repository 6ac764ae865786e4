"""Binary-latent tokenizer: ViT-B encoder and decoder, tokens of 18 bits (2**18 implicit codes)
from 256x256 images. LFQ (MAGVIT-v2): ViT-B/16, 16x16 tokens, Open-MAGVIT2's training recipe.
BSQ (BSQ-ViT) with `bsq`: its 256x256 recipe, ViT-B/8, 32x32 tokens (bsq-vit's `b18g18`
config; `bsq_b18g2` its `b18g2`).

The encoder head emits the 18 bits' pre-activations directly (latent_dim = bits: no projection,
no activation before the quantizer, as MAGVIT-v2 recommends; BSQ's quant_embed is this head).

  python run.py --config=configs/binary_b16.py --workdir=DIR              # LFQ, ImageNet (TFDS)
  python run.py --config=configs/binary_b16.py:bsq --workdir=DIR          # BSQ, b18g18
  python run.py --config=configs/binary_b16.py:bsq_b18g2 --workdir=DIR    # BSQ, b18g2
  python run.py --config=configs/binary_b16.py:tiny --workdir=DIR         # LFQ, CPU-sized
  python run.py --config=configs/binary_b16.py:bsq_tiny --workdir=DIR     # BSQ, CPU-sized

The argument is a set of variant words joined by '_' or ',': 'lfq' or 'bsq', 'tiny', and for
BSQ one of bsq-vit's 18-bit groupings 'b18g18' (default) or 'b18g2' (either implies 'bsq').
"""

from ml_collections import ConfigDict

from visual_tokenizers.configs import common

BITS = 18


# bsq-vit's 256x256 18-bit configs by name: their embed_group_size (configs/tokenizer/
# imagenet_256x256_bsqvit_b18g18_stylegan_f8_fp16.yaml: 1; ..._b18g2_...: 9).
BSQ_GROUPINGS = {"b18g18": 1, "b18g2": 9}


def _words(arg) -> list[str]:
    return [w for w in (arg or "").replace(",", "_").split("_") if w]


def parse_variants(arg, path: str, groupings: tuple[str, ...] = ()) -> tuple[str, bool]:
    """(quantizer name, tiny) from an argument such as 'bsq_tiny'; unknown words are errors.
    `groupings`: the BSQ grouping words this config also takes (each implies 'bsq')."""
    words = _words(arg)
    grouping = [w for w in words if w in groupings]
    unknown = [w for w in words if w not in ("lfq", "bsq", "tiny", *groupings)]
    if unknown or ("lfq" in words and ("bsq" in words or grouping)) or len(grouping) > 1:
        extra = f", one of {' | '.join(groupings)}" if groupings else ""
        raise ValueError(
            f"unknown variant {arg!r} of {path}; use '', 'bsq', 'tiny' or 'bsq_tiny' "
            f"(words: lfq | bsq, tiny{extra})"
        )
    return ("bsq" if "bsq" in words or grouping else "lfq"), "tiny" in words


def get_config(arg=None):
    name, tiny = parse_variants(arg, "configs/binary_b16.py", tuple(BSQ_GROUPINGS))
    config = common.tokenizer_base()
    vit = dict(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072)
    config.model = ConfigDict(
        dict(architecture="vit", latent_dim=BITS, dtype="bfloat16", encoder=vit, decoder=vit)
    )
    config.quantizer = common.binary_quantizer(name, BITS)
    apply_recipe(config, name)
    if name == "bsq":
        bsq_256(config, next((w for w in _words(arg) if w in BSQ_GROUPINGS), "b18g18"))
    if tiny:
        shrink_binary_to_tiny(config)
    return config


def apply_recipe(config: ConfigDict, name: str) -> None:
    """The published training recipe of the quantizer family (LFQ or BSQ)."""
    (bsq_recipe if name == "bsq" else lfq_recipe)(config)


def lfq_recipe(config: ConfigDict) -> None:
    """Open-MAGVIT2's 256x256 LFQ recipe (Luo et al. 2024, TencentARC/SEED-Voken, formerly
    TencentARC/Open-MAGVIT2), each value from: [yaml] configs/Open-MAGVIT2/gpu/
    imagenet_lfqgan_256_L.yaml, [loss] src/Open_MAGVIT2/modules/losses/vqperceptual.py,
    [model] src/Open_MAGVIT2/models/lfqgan.py, [lfq] taming/modules/vqvae/
    lookup_free_quantize.py, [ema] taming/modules/ema.py. (MAGVIT-v2's own code is unreleased.)

    Departures: the architecture stays ViT-B/16 (Open-MAGVIT2: a conv encoder/decoder); the
    learning rate is constant (theirs also drops 10x after epochs 200 and 250 of 270, which
    core/runtime/optim.py's schedules cannot express); our LeCam penalty uses the logit EMAs
    before this step's update (theirs after, a 0.1 % difference in the anchors).
    """
    config.loss.update(
        l1_weight=1.0,  # [loss] rec_loss = |x - x_rec|, no L2 (pixelloss_weight is unused)
        l2_weight=0.0,
        perceptual_weight=1.0,  # [loss] default 1.0, not overridden by [yaml]
        adversarial_weight=0.1,  # [yaml] gen_loss_weight 0.1: a fixed generator weight ...
        adaptive_weight=False,  # ... instead of the adaptive one ([yaml] disc_weight unused)
        gan_loss="hinge",  # [loss] disc_loss default 'hinge' for the discriminator ...
        discriminator_loss_scale=0.5,  # ... hinge_d_loss = 0.5 (real term + fake term)
        generator_gan_loss="non_saturating",  # [loss] non_saturate_gen_loss for the generator,
        generator_image_mean=True,  # on each image's mean patch logit
        discriminator_start=0,  # [yaml] disc_start 0
        r1_cost=0.0,  # no R1 in [loss]
        lecam_weight=0.05,  # [yaml] lecam_loss_weight 0.05
        lecam_decay=0.999,  # [loss] LeCAM_EMA(decay=0.999)
    )
    # [loss] NLayerDiscriminator: 3 layers, ndf 64, BatchNorm (use_actnorm False), taming's.
    config.discriminator.name = "patchgan"
    config.discriminator.patchgan.update(base_channels=64, n_layers=3, norm="batch")
    # [model] torch.optim.Adam(lr, betas=(0.5, 0.9)) for both; [yaml] learning_rate 1e-4,
    # scheduler_type "None" (constant); no weight decay, no gradient clipping.
    adam = dict(name="adam", lr=1e-4, b1=0.5, b2=0.9, weight_decay=0.0, grad_clip_norm=0.0)
    adam.update(schedule="constant", warmup_steps=0)
    config.optimizer.update(adam)
    config.discriminator_optimizer.update(adam)
    config.ema_decay = 0.999  # [yaml] use_ema True; [ema] LitEma default decay 0.999
    config.data.batch_size = 256  # [yaml] batch_size 8 per GPU x 8 GPUs x 4 nodes
    config.num_steps = 270 * 5005  # [yaml] max_epochs 270 of ImageNet at batch 256
    config.quantizer.update(
        commitment_weight=0.25,  # [yaml] commit_weight
        entropy_weight=0.1,  # [yaml] codebook_weight (it scales the entropy loss)
        diversity_gamma=1.0,  # [yaml] batch_maximization_weight (sample_minimization 1.0)
        inverse_temperature=100.0,  # [lfq] entropy_loss temperature 0.01
        codebook_entropy="exact",  # [lfq] softmax over all 2**18 codes, not groups
        codebook_entropy_eps=1e-5,  # [lfq] avg_entropy = -sum p log(p + 1e-5)
    )


# bsq-vit's per-GPU batch (the yaml's data.batch_size) x its launcher's default 8 GPUs on one
# node (scripts/run_with_submitit_image_tokenizer.py --ngpus 8 --nodes 1). [?] The GPU count of
# the published runs is not in the release; the defaults are assumed.
BSQ_GLOBAL_BATCH = 32 * 8


def bsq_recipe(config: ConfigDict) -> None:
    """BSQ-ViT's training recipe (Zhao et al. 2024) as released in zhaoyue-zephyrus/bsq-vit.
    Files named below are in that repository: the yaml is configs/tokenizer/
    imagenet_256x256_bsqvit_b18g18_stylegan_f8_fp16.yaml (the b18g2 yaml has the same values but
    embed_group_size), bsqvit.py is transcoder/models/bsqvit.py, bsq.py transcoder/models/
    quantizer/bsq.py, vqperceptual.py transcoder/losses/vqperceptual.py, main.py
    scripts/main_image_tokenizer.py. The loss on the quantizer is w(step) (beta commit +
    zeta (gamma0 H_sample - gamma H_codebook) / t): tokenizers/bsq.py.

    Departures (not available here): the warm-up starts at 0, not at 0.1 x lr (the yaml's
    LambdaWarmUpCosineScheduler lr_start); R1 runs on steps k * 16, not k * 16 - 1; the
    discriminator is MaskGIT's StyleGAN, not bsq-vit's StyleGAN2 (channel_base 32768,
    minibatch-std group 4); reconstructions are not clamped to [-1, 1] before the losses."""
    config.quantizer.update(
        inverse_temperature=1.0,  # bsqvit.py VITBSQModel(inv_temperature=1.); the yaml keeps it
        commitment_weight=0.0,  # the yaml's beta: 0.
        # the yaml's codebook_weight 0.1 x zeta 1.0 x gamma0 1.0 / inv_temperature 1.0 (zeta,
        # gamma0: bsqvit.py defaults; bsq.py divides the entropy penalty by t)
        entropy_weight=0.1,
        diversity_gamma=1.0,  # gamma / gamma0 = 1.0 / 1.0 (bsqvit.py defaults)
        # the yaml's persample_entropy_compute 'analytical': bsq.py then takes the codebook
        # entropy of the per-bit probabilities, whatever embed_group_size is
        entropy_group_bits=1,
        scaled_straight_through=True,  # the yaml's post_q_l2_norm: bsq.py scales the STE by s
        hard_entropy=False,  # bsq.py soft_entropy=True (bsqvit.py does not pass it)
        codebook_rampup_multiplier=3.0,  # the yaml's codebook_rampup_multiplier
        codebook_rampup_steps=2_000,  # the yaml's codebook_rampup_steps
        codebook_entropy="grouped",  # bsq.py: per-bit (1-bit group) probabilities, see above
        bit_order="msb",  # bsq.py's index basis 2**(d-1) ... 1: most significant bit first
        group_norm_groups=0,  # bsqvit.py l2-normalises the encoder output, no GroupNorm
    )
    config.loss.update(
        l1_weight=1.0,  # vqperceptual.py rec_loss = |x - x_rec|, reconstruct_weight 1.0
        l2_weight=0.0,
        perceptual_weight=0.1,  # the yaml
        adversarial_weight=0.1,  # the yaml's disc_weight
        adaptive_weight=False,  # the yaml's use_adaptive_disc_weight
        gan_loss="non_saturating",  # the yaml's disc_loss 'vanilla' (softplus)
        discriminator_loss_scale=0.5,  # vqperceptual.py vanilla_d_loss = 0.5 (real + fake)
        discriminator_start=0,  # the yaml's disc_start
        r1_cost=5.0,  # vqperceptual.py disc_reg_r1 10 (its default) / 2
        r1_every=16,  # the yaml's disc_reg_freq
        lecam_weight=0.0,  # none in vqperceptual.py
    )
    adamw = dict(
        name="adamw",  # the yaml: torch.optim.AdamW, betas [0.9, 0.99], weight_decay 1e-4
        b1=0.9,
        b2=0.99,
        weight_decay=1e-4,
        lr=4e-7 * BSQ_GLOBAL_BATCH,  # main.py: the yaml's base_lr 4e-7 x global batch
        grad_clip_norm=0.0,  # main.py clips nothing
        schedule="cosine",  # the yaml's LambdaWarmUpCosineScheduler: warm_up_steps 5_000,
        warmup_steps=5_000,  # lr_max 1.0, then cosine to lr_min 0.5 at max_decay_steps
        end_lr_fraction=0.5,  # 1_000_000 = max_iter
    )
    config.optimizer.update(adamw)
    config.discriminator_optimizer.update(adamw)  # main.py builds both from config.optimizer
    config.data.batch_size = BSQ_GLOBAL_BATCH
    config.num_steps = 1_000_000  # the yaml's max_iter
    config.ema_decay = 0.999  # main.py --ema-decay (README: the EMA rows of its results)


def bsq_256(config: ConfigDict, grouping: str) -> None:
    """bsq-vit's 256x256 18-bit grid: ViT-B/8 (32x32 tokens), and b18g2's group indices."""
    # the yaml's vitconfig patch_size 8, for the encoder and the decoder
    config.model.encoder.patch_size = config.model.decoder.patch_size = 8
    # embed_group_size changes no loss under 'analytical' (see bsq_recipe), only bsq.py's group
    # indices (codes_to_group_indexes): 2 groups of 9 bits for b18g2; 1-bit groups (b18g18)
    # are the bits themselves, so that one keeps the plain index.
    if BSQ_GROUPINGS[grouping] > 1:
        config.quantizer.index_group_bits = BSQ_GROUPINGS[grouping]


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
