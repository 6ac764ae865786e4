"""50,000 class-conditional samples of the released MaskGIT with its official settings, in ADM
format for gFID / IS (jobs/sample.py). README "Reproducing MaskGIT" gives the three commands:

  python run.py --config=configs/import_maskgit.py:256 --workdir=runs/maskgit_official_256 \
      --config.tokenizer_path=... --config.maskgit_path=...
  python run.py --config=configs/maskgit_official.py:256 --workdir=runs/maskgit_official_256/samples
  python run.py --config=configs/evaluate.py:samples --workdir=runs/maskgit_official_256/eval \
      --config.samples.path=runs/maskgit_official_256/samples/samples.npz \
      --config.reference.path=VIRTUAL_imagenet256_labeled.npz

Official settings (PyPI `maskgit`: maskgit_class_cond_config, inference.py, parallel_decode):
T = 8 steps at 256 and 12 at 512 (paper Table 1 / the released results), cosine mask schedule,
choice temperature 4.5 (`sample_choice_temperature`), categorical sampling at temperature 1 on
the conditional logits only (no top-k, no classifier-free guidance: the model was trained
without class dropout), 50 samples per class (`eval_num` 50,000).
"""

from visual_tokenizers.configs import sample

OFFICIAL = dict(
    temperature=1.0,
    top_k=0,
    choice_temperature=4.5,  # sample_choice_temperature
    mask_schedule="cosine",  # mask_scheduling_method
    guidance_scale=1.0,  # none
    guidance_schedule="constant",
    # Random numbers drawn as parallel_decode.decode draws them (models/maskgit_decode.py): the
    # tokens generate_samples gives for the same key (tests/test_maskgit_official.py).
    rng="official",
)
STEPS = {"256": 8, "512": 12}  # MaskGIT paper, Table 1 (ImageNet 256 / 512)


def get_config(arg="256"):
    config = sample.get_config()
    config.update(OFFICIAL)
    if arg in STEPS:
        config.steps = STEPS[arg]
        config.maskgit.workdir = f"runs/maskgit_official_{arg}/maskgit"  # import_maskgit's OUT
        config.batch_size = 256 if arg == "256" else 64  # 32x32 tokens and 512^2 decodes at 512
    elif arg == "tiny":
        # configs/import_maskgit.py:tiny's run (random weights in the tests): 8x8 tokens.
        config.steps = 8
        config.maskgit.workdir = "runs/maskgit_official_tiny/maskgit"
        config.update(num_samples=16, batch_size=8)
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/maskgit_official.py; 256, 512, tiny")
    return config
