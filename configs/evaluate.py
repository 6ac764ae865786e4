"""Evaluation: a trained tokenizer (rFID, sFID, KID, PSNR, SSIM, LPIPS, codebook usage) or an
ADM-format npz of generated samples (gFID, sFID, IS, precision, recall, KID; FD-DINOv2 on
request). FID, sFID and KID are reported for each Inception pipeline in `pipelines`; IS and
precision/recall on `adm` features (as ADM tables). One report: WORKDIR/report.md and
metrics.json. See README "Evaluation protocol".

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

TOKENIZER_METRICS = ("fid", "sfid", "kid", "fd_dinov2", "psnr", "ssim", "lpips", "usage", "shapes")
SAMPLE_METRICS = ("fid", "sfid", "is", "pr", "kid", "fd_dinov2", "shapes")
# Inception input pipelines (models/inception.py): 'adm' = the ADM evaluator / TF FID (quote it
# next to ADM tables), 'pytorch_fid' = pytorch-fid (quote it next to pytorch-fid numbers).
PIPELINES = ("adm", "pytorch_fid")


def get_config(arg=None):
    config = ConfigDict(
        dict(
            job="evaluate",
            mode="tokenizer",  # 'tokenizer' or 'samples'
            seed=0,
            metrics=("fid", "sfid", "psnr", "ssim", "lpips", "usage"),
            pipelines=PIPELINES,  # FID/sFID/KID per pipeline, computed in one pass
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
            # KID (torch-fidelity's defaults): the mean and std of the unbiased polynomial-kernel
            # MMD over `subsets` random subsets of `subset_size` images of each side. Fewer
            # images than subset_size on either side is refused (as torch-fidelity does).
            kid=dict(subsets=100, subset_size=1000),
            # Explicit weight files ('' = cache / checked download, see core/weights.py);
            # dinov2 only for metric 'fd_dinov2' (DINOv2 ViT-L/14).
            weights=dict(inception="", vgg16="", lpips="", dinov2=""),
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
        config.metrics = ("fid", "sfid", "is", "pr", "kid")
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
