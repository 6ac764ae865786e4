"""Export a trained tokenizer's codebook indices for language models (jobs/export_tokens.py).

  python run.py --config=configs/export_tokens.py --workdir=OUT \
      --config.tokenizer.workdir=runs/vq_b16                        # ImageNet train (TFDS)
  python run.py --config=configs/export_tokens.py:tiny --workdir=runs/vq_tiny_tokens
      # the tiny tokenizer of `configs/vq_b16.py:tiny` (runs/vq_tiny) on builtin:shapes test

Add --config.mode=decode (PNGs back from the shards) or --config.mode=stats on the same OUT.
The tokenizer (model, image size) comes from its own workdir; this config only says what to
encode and how to write it.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def get_config(arg=None):
    config = ConfigDict(
        dict(
            job="export_tokens",
            mode="export",  # export | decode | stats
            seed=0,
            # The tokenizer training run (required; configs/common.py: which run).
            tokenizer=dict(workdir="", step=-1, use_ema=placeholder(bool)),
            data=dict(
                source="tfds:imagenet2012",  # tfds:NAME[:SPLIT] | folder:PATH | builtin:NAME
                split="train",
                data_dir="",  # TFDS data_dir ("" = default)
                image_size=0,  # 0: the tokenizer's training resolution
                max_examples=0,  # export the first N examples only; 0 = all
                batch_size=256,  # global; a multiple of the data x fsdp mesh size
                num_threads=0,  # image decoding threads; 0 = CPU count (at most 32)
                prefetch=4,  # batches decoded ahead of the device
            ),
            rows_per_shard=10_000,  # per Parquet file (rounded up to whole local batches)
            vocab_offset=0,  # added to every index, to sit after a text vocabulary
            image_delimiters=False,  # wrap rows in begin/end-of-image ids (after the codes)
            stats_top_k=20,  # most frequent tokens listed in stats.json
            decode=dict(max_images=64),  # mode=decode: first N rows; 0 = all
            debug_write_delay_s=0.0,  # tests: pause before each shard's rename
            mesh=dict(data=-1, fsdp=1, model=1),
        )
    )
    if arg == "tiny":
        config.tokenizer.workdir = "runs/vq_tiny"  # README: the tiny tokenizer run
        config.data.update(source="builtin:shapes", split="test", max_examples=1024, batch_size=64)
        config.rows_per_shard = 256
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/export_tokens.py; use '' or 'tiny'")
    return config
