"""Class-conditional MaskGIT on the 16x16 tokens of configs/vq_b16.py (jobs/train_maskgit.py).

Values follow the official `maskgit_class_cond_config` (PyPI package `maskgit`,
maskgit/configs/maskgit_class_cond_config.py, and its base_config) and the MaskGIT paper
(Chang et al., CVPR 2022).

  # tokens exported by jobs/export_tokens.py from a configs/vq_b16.py run:
  python run.py --config=configs/maskgit_b16.py --workdir=DIR --config.tokens.export_dir=TOKENS
  # or encoded on the fly by the tokenizer run over ImageNet (TFDS, ArrayRecord):
  python run.py --config=configs/maskgit_b16.py --workdir=DIR \
      --config.tokenizer.workdir=runs/vq_b16 --config.data.data_dir=DATA_DIR
  python run.py --config=configs/maskgit_b16.py:tiny --workdir=runs/maskgit_tiny   # CPU
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from visual_tokenizers.configs import common
from visual_tokenizers.core.runtime.rules import DEFAULT_RULES


def sampling(**overrides) -> dict:
    """MaskGIT.sample options; also the settings of configs/sample.py."""
    options = dict(
        steps=8,  # T = 8 at 256x256 (MaskGIT paper, Table 1)
        temperature=1.0,  # categorical sampling at the model's logits (official decode)
        top_k=0,  # 0: all tokens (the official decode has no top-k)
        choice_temperature=4.5,  # sample_choice_temperature
        mask_schedule="cosine",  # mask_scheduling_method
        guidance_scale=1.0,  # 1 = no classifier-free guidance (the original has none)
        guidance_schedule="constant",  # or 'linear': scale * (t+1)/T (MUSE-style ramp)
    )
    options.update(overrides)
    return options


def maskgit_base() -> ConfigDict:
    return ConfigDict(
        dict(
            job="train_maskgit",
            seed=42,  # base_config.seed
            num_steps=2_000_000,  # maskgit_class_cond_config.num_train_steps
            init_from="",
            resume_step=common.RESUME_LATEST,  # -1: the latest checkpoint (configs/common.py)
            # A finished jobs/export_tokens.py output ('' = encode config.data on the fly).
            tokens=dict(export_dir="", verify=True),  # verify: check every shard's sha256
            # The tokenizer run for on-the-fly encoding (also checked against an export's vocab).
            tokenizer=dict(workdir="", step=-1, use_ema=placeholder(bool)),
            data=dict(
                source="tfds:imagenet2012",  # dataset = imagenet2012
                split="train",
                data_dir="",
                image_size=0,  # 0: the tokenizer's training resolution
                max_examples=0,  # train on the first N examples only; 0 = all
                batch_size=256,  # batch_size
                num_threads=0,
                prefetch=2,
            ),
            model=dict(
                # 'ours' (pre-norm) or 'official' (post-norm BERT as the released model:
                # models/maskgit_official.py); trained/maskgit.py ARCHITECTURES.
                architecture="ours",
                width=768,  # transformer.num_embeds
                depth=24,  # transformer.num_layers
                heads=16,  # transformer.num_heads
                mlp_dim=3072,  # transformer.intermediate_size
                dropout=0.1,  # transformer.dropout_rate
                head_group_bits=0,  # binary codes only: bits per factorised head (0: vocab's)
                num_classes=0,  # 0: from the tokens' source (num_class = 1000 for ImageNet)
                dtype="bfloat16",  # compute dtype; parameters stay float32
            ),
            loss=dict(
                mask_schedule="cosine",  # mask_scheduling_method
                label_smoothing=0.1,  # label_smoothing
                class_dropout=0.1,  # CFG null-class rate (MUSE / TiTok practice; not official)
            ),
            optimizer=dict(
                name="adamw",
                lr=1e-4,  # optimizer.lr
                b1=0.9,  # optimizer.beta1
                b2=0.96,  # optimizer.beta2
                eps=1e-8,  # optax default
                weight_decay=0.045,  # optimizer.weight_decay = 4.5e-2
                decay_matrices_only=True,  # no decay on biases and LayerNorm (BERT practice)
                grad_clip_norm=0.0,  # the official trainer does not clip
                schedule="constant",  # base_config lr_schedule
                warmup_steps=5000,  # optimizer.warmup_steps
                end_lr_fraction=0.0,
            ),
            # Sampling for the PNG grids during training (every N steps, 0 = off).
            sample=dict(every=10_000, **sampling()),  # eval_every_steps
            log_every=100,
            checkpoint_every=10_000,  # checkpoint_every_steps
            keep_checkpoints=3,
            mesh=dict(data=-1, fsdp=1, model=1),
            sharding_rules=tuple(DEFAULT_RULES),
        )
    )


def shrink_to_tiny(config: ConfigDict) -> None:
    """CPU-sized: builtin:shapes at 32x32 (8x8 tokens of configs/vq_b16.py:tiny), a small
    transformer, a few hundred steps. Tuned in the demo (configs/demo.py) for class-faithful
    samples within its time budget."""
    config.tokenizer.workdir = "runs/vq_tiny"  # README: the tiny tokenizer run
    config.data.update(source="builtin:shapes", image_size=32, batch_size=64)
    config.model.update(width=128, depth=4, heads=4, mlp_dim=256, dtype="float32")
    config.optimizer.update(lr=1e-3, warmup_steps=100, schedule="cosine", grad_clip_norm=1.0)
    config.update(num_steps=600, seed=0, log_every=50, checkpoint_every=300)
    config.sample.update(every=0, guidance_scale=2.0)


def get_config(arg=None):
    config = maskgit_base()
    if arg == "tiny":
        shrink_to_tiny(config)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/maskgit_b16.py; use '' or 'tiny'")
    return config
