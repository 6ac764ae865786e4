"""Class-conditional samples of a MaskGIT run in ADM format (jobs/sample.py), for gFID.

  python run.py --config=configs/sample.py --workdir=OUT --config.maskgit.workdir=RUN
  python run.py --config=configs/evaluate.py:samples --workdir=OUT/eval \
      --config.samples.path=OUT/samples.npz --config.reference.path=VIRTUAL_imagenet256_labeled.npz
  python run.py --config=configs/sample.py:tiny --workdir=OUT --config.maskgit.workdir=RUN  # CPU

Sampling defaults are the official MaskGIT's (configs/maskgit_b16.py `sampling`): T = 8,
choice temperature 4.5, cosine schedule, no guidance (guidance_scale 1). Every option and its
source (models/maskgit_sampling.py):
  temperature / temperature_end  0 = greedy; annealed t0 + (t1 - t0) (t+1)/T (TiTok)
  top_k / top_p                  per head; top-p = nucleus (Holtzman et al. 2020)
  choice_temperature             Gumbel noise on the confidence (official)
  mask_schedule                  cosine, linear (= official uniform), square, arccos (MUSE),
                                 official log, exp, pow<p> (maskgit/libml/mask_schedule.py)
  confidence                     logprob (official) or logit (TiTok)
  rng                            ours, or official (parallel_decode.decode's random draws)
  guidance_scale / guidance_form ours: uncond + s (cond - uncond) (MUSE); titok: cond + g
                                 (cond - uncond) (TiTok); s = 1 + g
  guidance_schedule              constant, or linear: TiTok's ramp g t/T (conditional first)
  guidance_interval              (lo, hi): guidance only where lo <= t/T < hi (Kynkaanniemi
                                 et al. 2024)
The MaskGIT's EMA weights are used when its run kept them (maskgit.use_ema unset); False
samples with the trained weights.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from visual_tokenizers.configs.maskgit_b16 import sampling


def get_config(arg=None):
    config = ConfigDict(
        dict(
            job="sample",
            seed=0,
            # Which run (configs/common.py): a jobs/train_maskgit.py run (required; use_ema as
            # for every run: unset = its EMA weights when it kept them). Its tokens' tokenizer
            # decodes, at the step and weights that made
            # them; tokenizer.workdir names where that run lives now if it has moved.
            maskgit=dict(workdir="", step=-1, use_ema=placeholder(bool)),
            tokenizer=dict(workdir=""),
            num_samples=50_000,  # ADM / MaskGIT gFID protocol: 50 per ImageNet class
            classes=(),  # class ids to sample; empty = all, sample i has class i % count
            batch_size=256,  # global; a multiple of the data x fsdp mesh size
            **sampling(),
            # samples.png: the first `columns` samples of the first `max_classes` classes;
            # per_class > 0 also writes grids/class_<c>.png with that many samples each.
            grid=dict(columns=8, max_classes=10, per_class=0),
            mesh=dict(data=-1, fsdp=1, model=1),
        )
    )
    if arg == "tiny":
        config.maskgit.workdir = "runs/maskgit_tiny"  # configs/maskgit_b16.py:tiny's run
        # 8 per class; constant guidance s = 2 (TiTok's g = 1), unchanged by the linear-ramp fix.
        config.update(num_samples=80, batch_size=40, guidance_scale=2.0)
        config.grid.per_class = 16
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/sample.py; use '' or 'tiny'")
    return config
