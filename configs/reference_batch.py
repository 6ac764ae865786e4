"""An ADM-format reference batch (jobs/reference_batch.py) from any data source: arr_0 uint8
images, arr_1 labels, and mu, sigma, mu_s, sigma_s of the `adm` Inception pipeline, which is
what the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py) reads from its
VIRTUAL_imagenet256_labeled.npz, so the file serves both that evaluator and jobs/evaluate.py.

  python run.py --config=configs/reference_batch.py --workdir=OUT \
      --config.data.source=folder:/data/my_images --config.data.image_size=256
  python run.py --config=configs/reference_batch.py:tiny --workdir=OUT   # builtin:shapes, CPU
"""

from ml_collections import ConfigDict


def get_config(arg=None):
    config = ConfigDict(
        dict(
            job="reference_batch",
            seed=0,
            # The images: the first num_examples of the split, in order (ADM's batches: 10,000).
            data=dict(
                source="tfds:imagenet2012",
                split="train",
                data_dir="",
                image_size=256,
                num_examples=10_000,
                batch_size=64,  # global; a multiple of the data x fsdp mesh size
            ),
            labels=True,  # arr_1: the source's class labels (as VIRTUAL_*_labeled.npz)
            # '' = WORKDIR/VIRTUAL_<source name>_<split><image_size>.npz
            output="",
            weights=dict(inception=""),  # '' = cache / checked download (core/weights.py)
            mesh=dict(data=-1, fsdp=1, model=1),
        )
    )
    if arg in (None, ""):
        pass
    elif arg == "tiny":
        config.data.update(source="builtin:shapes", split="test", image_size=32)
        config.data.update(num_examples=64, batch_size=32)
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/reference_batch.py; use '' or 'tiny'")
    return config
