"""Defaults shared by the experiment configs, and the key names every job uses.

Each default value says where it comes from. The same things have the same keys in every job:

  tokenizer=dict(workdir, step, use_ema), maskgit=dict(workdir, step, use_ema)
      Which finished run a job reads. step -1: the latest checkpoint. use_ema None (default):
      the EMA weights when the checkpoint has them (MaskGIT runs keep none), False: the
      trained weights.
  data=dict(source, split, data_dir, image_size, batch_size, max_examples, num_threads, ...)
      The images a job reads: source is `tfds:NAME[:SPLIT]`, `folder:PATH` or `builtin:NAME`;
      batch_size is global (all processes). Training jobs train on data.source / data.split.
  eval=dict(source, split, batch_size, num_examples, ...)
      A training job's held-out pass (at data.image_size, from data.data_dir).

Keys of the old vocabulary are refused with their new spelling (RENAMED, checked by run.py).
"""

from ml_collections import ConfigDict

from visual_tokenizers.core.runtime.rules import DEFAULT_RULES

# Old key -> new key. A key is matched at any depth (the demo nests whole job configs), and
# refused only when the config has the new key and not the old one ('batch_size' is still
# the sample job's own).
RENAMED = {
    "tokenizer_workdir": "tokenizer.workdir",
    "tokenizer_step": "tokenizer.step",
    "use_ema": "tokenizer.use_ema",
    "maskgit_workdir": "maskgit.workdir",
    "maskgit_step": "maskgit.step",
    "data.train": "data.source",
    "data.train_split": "data.split",
    "data.spec": "data.source",
    "data.eval": "eval.source",
    "data.eval_split": "eval.split",
    "data.global_batch_size": "data.batch_size",
    "reference.spec": "reference.source",
    "batch_size": "data.batch_size",
    "max_examples": "data.max_examples",
    "num_threads": "data.num_threads",
    "prefetch": "data.prefetch",
}


def _has_key(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return False
        node = node[part]
    return True


def renamed_key_message(config, key: str) -> str | None:
    """'config.KEY was renamed config.NEW' when `key` (dotted) is an old name of one of
    `config`'s keys; None otherwise (a key it has, or an unknown one)."""
    if _has_key(config, key):
        return None
    for old, new in RENAMED.items():
        if key == old or key.endswith("." + old):
            renamed = key[: len(key) - len(old)] + new
            if _has_key(config, renamed):
                return f"config.{key} was renamed config.{renamed}"
    return None


# LlamaGen VQ tokenizer (tokenizer/tokenizer_image/vq_train.py): torch Adam (0.9, 0.95), lr
# 1e-4, constant, grad-norm clip 1.0, the same for the discriminator; its --weight-decay 0.05
# is never passed to the optimizer, so no weight decay.
LLAMAGEN_ADAM = dict(
    name="adam",
    lr=1e-4,
    b1=0.9,
    b2=0.95,
    weight_decay=0.0,
    grad_clip_norm=1.0,
    schedule="constant",
    warmup_steps=0,
    end_lr_fraction=0.0,
)


# Every training config's `resume_step`: -1 resumes from the workdir's latest checkpoint; N >= 0
# from step N, moving the newer steps to WORKDIR/checkpoints_set_aside (core/runtime/
# checkpoint.py): the way past a damaged latest checkpoint, which is refused, not skipped.
RESUME_LATEST = -1


def tokenizer_base() -> ConfigDict:
    """Everything a tokenizer run needs apart from the model and quantizer."""
    return ConfigDict(
        dict(
            job="train_tokenizer",
            seed=0,
            num_steps=400_000,
            init_from="",  # another run's workdir: start from its params
            resume_step=RESUME_LATEST,
            data=dict(
                source="tfds:imagenet2012",
                split="train",
                data_dir="",  # TFDS data_dir holding the prepared imagenet2012 ("": default)
                image_size=256,
                batch_size=128,  # LlamaGen VQ tokenizer
            ),
            eval=dict(
                source="tfds:imagenet2012",
                split="validation",
                batch_size=64,
                num_examples=10_000,
                # rFID during training (jobs/evaluate.py): at evals whose step is a multiple of
                # fid_every, and at the end; 0 = off. Needs the FID Inception weights.
                fid_every=0,
                fid_num_examples=10_000,
                fid_inception_weights="",  # '' = $TOKENIZERS_CACHE (see core/weights.py)
                # Inception input pipelines (models/inception.py) of the rFID, each logged as
                # eval/rfid_<pipeline>: 'adm' (ADM tables), 'pytorch_fid' (pytorch-fid papers).
                fid_pipelines=("adm", "pytorch_fid"),
            ),
            # Pixel loss only; each config turns on its recipe (tokenizers/training.py LossConfig).
            loss=dict(
                l2_weight=1.0,
                l1_weight=0.0,
                perceptual_weight=0.0,  # LPIPS; needs the VGG16 + LPIPS weight files
                lpips_vgg16="",  # '' = $TOKENIZERS_CACHE (core/weights.py)
                lpips_weights="",
                adversarial_weight=0.0,  # > 0 trains a discriminator beside the tokenizer
                gan_loss="non_saturating",  # or 'hinge'
                generator_gan_loss="",  # '' = gan_loss; the generator's own kind otherwise
                generator_image_mean=False,  # generator loss on per-image mean logits
                discriminator_start=0,
                discriminator_loss_scale=1.0,
                adaptive_weight=False,
                adaptive_weight_max=1e4,
                r1_cost=0.0,
                r1_every=1,
                lecam_weight=0.0,
                lecam_decay=0.999,
            ),
            optimizer=dict(LLAMAGEN_ADAM),
            # Used when loss.adversarial_weight > 0; kwargs per kind, picked by `name`.
            discriminator=dict(
                name="stylegan",
                stylegan=dict(channel_multiplier=1, blur_resample=True),  # MaskGIT
                patchgan=dict(base_channels=64, n_layers=3, norm="batch"),  # taming / LlamaGen
            ),
            discriminator_optimizer=dict(LLAMAGEN_ADAM),
            ema_decay=0.0,  # > 0 keeps an EMA of the tokenizer's params (used for eval/export)
            # TensorFlow's ExponentialMovingAverage warm-up, decay min(ema_decay, (1+t)/(10+t))
            # at step t (tokenizers/training.py). On for every recipe, although their sources
            # use a constant decay (MaskGIT, LlamaGen, bsq-vit's timm ModelEmaV2, Open-MAGVIT2's
            # LitEma with use_num_upates=False: TencentARC/Open-MAGVIT2 src/IBQ/modules/ema.py):
            # without it the EMA keeps a share of the random init for ~1 / (1 - ema_decay)
            # steps. False = the sources' constant decay.
            ema_warmup=True,
            log_every=100,
            checkpoint_every=5_000,
            keep_checkpoints=3,
            eval_every=20_000,
            mesh=dict(data=-1, fsdp=1, model=1),
            sharding_rules=tuple(DEFAULT_RULES),
        )
    )


def vq_quantizer(**overrides) -> ConfigDict:
    """VectorQuantizer keyword arguments (tokenizers/vq.py) with LlamaGen-style defaults."""
    quantizer = dict(
        name="vq",
        codebook_size=16384,
        code_dim=0,  # 0: search in the latent space itself, no projections
        l2_normalize=False,
        beta=0.25,  # commitment weight (VQ-VAE, LlamaGen, MaskGIT)
        codebook_weight=1.0,
        use_ema=False,
        ema_decay=0.99,
        ema_epsilon=1e-5,
        kmeans_init=False,
        kmeans_iters=10,
        restart_dead_codes=False,
        dead_code_threshold=1e-3,  # 'share' rule: fraction of the uniform share
        dead_code_rule="share",  # or 'ema_count': vector-quantize-pytorch's absolute rule
        dead_code_min_count=2.0,  # 'ema_count': threshold_ema_dead_code (its Codebook default)
        dead_code_cooldown=0,  # > 0: steps a restarted code is spared (tokenizers/dead_codes.py)
        entropy_weight=0.0,
        entropy_temperature=0.01,
        usage_decay=0.99,
        search_chunk_size=8192,
    )
    quantizer.update(overrides)
    return ConfigDict(quantizer, type_safe=False)


def shrink_to_tiny(config: ConfigDict) -> None:
    """CPU-sized variant on built-in data: trains in a couple of minutes on 2 cores."""
    config.num_steps = 600
    config.data.update(source="builtin:shapes", split="train", image_size=32, batch_size=32)
    config.eval.update(source="builtin:shapes", split="test", batch_size=64, num_examples=512)
    config.optimizer.update(lr=2e-3, schedule="cosine", warmup_steps=50, weight_decay=0.0)
    config.discriminator_optimizer.update(lr=2e-3, schedule="cosine", warmup_steps=50)
    config.update(log_every=50, checkpoint_every=200, eval_every=0)


def shrink_recipe_to_tiny(config: ConfigDict) -> None:
    """The GAN recipe at CPU size: no LPIPS (its weights are a download), a small PatchGAN
    from step 300 with lazy R1, an EMA window of ~100 steps."""
    config.loss.update(perceptual_weight=0.0, discriminator_start=300, r1_every=4)
    config.discriminator.name = "patchgan"
    config.discriminator.patchgan.update(base_channels=16, n_layers=2)
    # Adam (0.9, 0.95) with clipping: at lr 2e-3, beta1 = 0 (MaskGIT) trains poorly here.
    adam = dict(b1=0.9, b2=0.95, grad_clip_norm=1.0)
    config.optimizer.update(adam)
    config.discriminator_optimizer.update(adam)
    config.ema_decay = 0.99


def binary_quantizer(name: str = "lfq", bits: int = 18, **overrides) -> ConfigDict:
    """LookupFreeQuantizer / BinarySphericalQuantizer kwargs (tokenizers/binary.py).

    name: 'lfq' or 'bsq'. codebook_size is 2**bits, kept beside `bits` so that every config
    states its vocabulary size; override the two together (the quantizer checks they agree).
    """
    quantizer = dict(
        name=name,
        bits=bits,
        codebook_size=2**bits,
        commitment_weight=0.25,  # MAGVIT-v2 / Open-MAGVIT2 (VQ-VAE style commitment)
        entropy_weight=0.1,  # MAGVIT-v2; BSQ-ViT's codebook-entropy weight is also 0.1
        diversity_gamma=1.0,  # vector-quantize-pytorch default
        inverse_temperature=100.0,  # tau = 0.01 (Open-MAGVIT2)
        # 'grouped': codebook entropy bounded over groups of entropy_group_bits (2 x 9 bits for
        # d = 18); 'exact': over all 2**d codes (Open-MAGVIT2, vector-quantize-pytorch), chunked.
        codebook_entropy="grouped",
        entropy_group_bits=9,
        codebook_entropy_eps=0.0,  # > 0: -sum p log(p + eps) (Open-MAGVIT2: 1e-5); 0: entropy
        bit_order="msb",  # index bit of dimension 0: 'msb' (top, ours) | 'lsb' (Open-MAGVIT2)
        group_norm_groups=0,  # > 0: GroupNorm without affine before the sign (MAGVIT-v2 [?])
        index_group_bits=0,  # 0: one int32 index for d <= 31, groups of <= 31 bits above
        usage_window=100,  # train calls in the 'window_distinct' / 'usage' statistics
        window_table_bits=20,  # usage table of 2**20 entries; hashed (estimate) above d = 20
    )
    quantizer.update(overrides)
    return ConfigDict(quantizer, type_safe=False)
