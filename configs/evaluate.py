"""Evaluation: a trained tokenizer (rFID, PSNR, SSIM, LPIPS, codebook usage) or an ADM-format npz
of generated samples (gFID, IS, precision, recall). See README "Evaluation protocol".

  python run.py --config=configs/evaluate.py:tokenizer --workdir=OUT \
      --config.tokenizer.workdir=runs/vq_b16
  python run.py --config=configs/evaluate.py:samples --workdir=OUT \
      --config.samples.path=samples.npz --config.reference.path=VIRTUAL_imagenet256_labeled.npz
  python run.py --config=configs/evaluate.py:tiny --workdir=OUT \
      --config.tokenizer.workdir=runs/vq_tiny   # builtin:shapes, no downloads (shapes_* signals)
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from visual_tokenizers.core.runtime.rules import DEFAULT_RULES

TOKENIZER_METRICS = ("fid", "psnr", "ssim", "lpips", "usage", "shapes")
SAMPLE_METRICS = ("fid", "is", "pr", "shapes")


def get_config(arg=None):
    config = ConfigDict(
        dict(
            job="evaluate",
            mode="tokenizer",  # 'tokenizer' or 'samples'
            seed=0,
            metrics=("fid", "psnr", "ssim", "lpips", "usage"),
            # (a) A tokenizer training run (configs/common.py: which run).
            tokenizer=dict(workdir="", step=-1, use_ema=placeholder(bool)),
            # Images to reconstruct; '' / 0 take the tokenizer run's eval data, split and size.
            data=dict(source="", split="", data_dir="", image_size=0, batch_size=64),
            num_examples=50_000,  # ImageNet val has 50,000 images: the usual rFID set.
            # (b) Samples: ADM npz, arr_0 uint8 NHWC (arr_1 labels, optional).
            samples=dict(path="", batch_size=64),
            # What FID is measured against. path: npz with mu/sigma and/or arr_0 images (an ADM
            # reference batch). Otherwise statistics of a data source (source, split) are computed
            # once and cached in $TOKENIZERS_CACHE/fid_stats. For rFID the default reference is
            # the originals of the evaluated images themselves.
            reference=dict(
                path="", source="", split="", data_dir="", image_size=256, num_examples=0
            ),
            pr_k=3,  # precision/recall neighbourhood (ADM)
            is_split_size=5000,  # Inception Score split size (ADM)
            # Explicit weight files ('' = cache / checked download, see core/weights.py).
            weights=dict(inception="", vgg16="", lpips=""),
            # Shapes classifier workdir ('' = WORKDIR/shapes_classifier), trained there on first
            # use with configs/shapes_classifier.py:<classifier_variant>; samples' shapes_fd is
            # measured against the test split of `reference` (builtin:shapes or shapes_plain).
            shapes=dict(classifier_workdir="", classifier_variant="", reference="builtin:shapes"),
            mesh=dict(data=-1, fsdp=1, model=1),
            sharding_rules=tuple(DEFAULT_RULES),
        )
    )
    if arg in (None, "", "tokenizer"):
        pass
    elif arg == "samples":
        config.mode = "samples"
        config.metrics = SAMPLE_METRICS[:3]
    elif arg == "tiny":
        # CPU-sized and offline: the tiny tokenizer's builtin:shapes data, no Inception or VGG.
        config.metrics = ("psnr", "ssim", "usage", "shapes")
        config.num_examples = 512
        config.shapes.classifier_variant = "tiny"
    else:
        raise ValueError(
            f"unknown variant {arg!r} of configs/evaluate.py; use 'tokenizer', 'samples' or 'tiny'"
        )
    return config
