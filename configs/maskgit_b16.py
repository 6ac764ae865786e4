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
    """MaskGIT.sample options; also the settings of configs/sample.py. Defaults are the official
    decode's (maskgit/libml/parallel_decode.py); every rule, with its source, is described in
    models/maskgit_sampling.py. t = 0..T-1 is the step, r = (t+1)/T."""
    options = dict(
        steps=8,  # T = 8 at 256x256 (MaskGIT paper, Table 1)
        # Sampling temperature: categorical(logits / temperature); 0 = greedy (argmax). With
        # temperature_end set it anneals as temperature + (temperature_end - temperature) * r
        # (TiTok, bytedance/1d-tokenizer ImageBert.generate softmax_temperature_annealing:
        # temperature=1.3, temperature_end=0.5). Official: 1, no annealing.
        temperature=1.0,
        temperature_end=placeholder(float),
        top_k=0,  # per head: only the k best logits (0: all; the official has no top-k)
        top_p=1.0,  # per head: nucleus sampling, Holtzman et al. 2020 (1: all tokens)
        choice_temperature=4.5,  # sample_choice_temperature: Gumbel noise on the confidence
        # mask_scheduling_method: cosine (official default), linear (official 'uniform'),
        # square, arccos (MUSE), or the official log, exp, pow<p> (maskgit/libml/mask_schedule.py)
        mask_schedule="cosine",
        # Confidence of a sampled token: 'logprob' (official: log p of the sampled token) or
        # 'logit' (TiTok: its raw logit).
        confidence="logprob",
        # Random draws: 'ours' (one Gumbel draw per step) or 'official' (parallel_decode.decode's
        # key splitting and jax.random.categorical: the same tokens as the official decoder
        # for the same key and logits; see tests/test_maskgit_official_decode.py).
        rng="ours",
        # Classifier-free guidance. guidance_form 'ours': uncond + s (cond - uncond) (MUSE,
        # lucidrains muse-maskgit-pytorch); 'titok': cond + g (cond - uncond) (TiTok); s = 1 + g.
        # No guidance: guidance_scale 1 in our form, 0 in TiTok's (the original has none).
        guidance_scale=1.0,
        guidance_form="ours",
        # 'constant', or 'linear': TiTok's guidance_decay ramp g_t = g t/T, conditional at the
        # first step (until this version 'linear' was s (t+1)/T in our form, below conditional
        # early: s = 3, T = 8 started at 0.375).
        guidance_schedule="constant",
        # Guidance only at steps with lo <= t/T < hi, conditional elsewhere (Kynkaanniemi et al.
        # 2024, guidance in a limited interval); (0, 1): every step.
        guidance_interval=(0.0, 1.0),
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
                # Binary codes only: bits per factorised head. 0: the tokenizer's groups, split
                # into heads of at most 14 bits when larger (18 bits -> 9 + 9), so no vocabulary
                # builds a 2**18-way head by accident (models/maskgit_heads.py).
                head_group_bits=0,
                num_classes=0,  # 0: from the tokens' source (num_class = 1000 for ImageNet)
                dtype="bfloat16",  # compute dtype; parameters stay float32
            ),
            loss=dict(
                mask_schedule="cosine",  # mask_scheduling_method
                label_smoothing=0.1,  # label_smoothing
                class_dropout=0.1,  # CFG null-class rate (MUSE / TiTok practice; not official)
                # 'sample': mean over each sample's masked tokens, then over samples (the
                # official weighted_sequence_cross_entropy_loss, maskgit/libml/losses.py);
                # 'token': pooled over the batch's masked tokens (this trainer until now).
                normalize="sample",
            ),
            # EMA of the generator's weights (base_config polyak_decay = 0.999), with the
            # tokenizer trainer's warm-up min(decay, (1+t)/(10+t)) (configs/common.py); sampling
            # uses it. 0 = none.
            ema_decay=0.999,
            ema_warmup=True,
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
    # Constant guidance s = 2 in our form (TiTok's g = 1): the same samples before and after
    # the linear-ramp fix, which only changed guidance_schedule='linear'.
    config.sample.update(every=0, guidance_scale=2.0)
    # 600 steps: the EMA's warm-up keeps its decay at (1+t)/(10+t) <= 0.985 here, so it
    # averages about the last 70 steps rather than 1000.


def get_config(arg=None):
    config = maskgit_base()
    if arg == "tiny":
        shrink_to_tiny(config)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/maskgit_b16.py; use '' or 'tiny'")
    return config
