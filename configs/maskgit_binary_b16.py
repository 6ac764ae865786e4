"""Class-conditional MaskGIT on the 18-bit binary tokens of configs/binary_b16.py (LFQ / BSQ).

2**18 codes per token do not fit one softmax: the bits are split into two groups of 9, each with
its own 512-way head and embedding table (MAGVIT-v2 / Open-MAGVIT2 factorisation; see
models/maskgit.py). Everything else is configs/maskgit_b16.py (official MaskGIT values).

  python run.py --config=configs/maskgit_binary_b16.py --workdir=DIR \
      --config.tokens.export_dir=TOKENS        # jobs/export_tokens.py of a binary_b16 run
  python run.py --config=configs/maskgit_binary_b16.py:tiny --workdir=DIR \
      --config.tokenizer.workdir=runs/binary_tiny   # CPU: configs/binary_b16.py:tiny's run
"""

from visual_tokenizers.configs import maskgit_b16


def get_config(arg=None):
    config = maskgit_b16.maskgit_base()
    # 18 bits = 2 heads of 2**9 (MAGVIT-v2 factorised heads); what head_group_bits=0 now
    # chooses too, written out for the record.
    config.model.head_group_bits = 9
    if arg == "tiny":
        maskgit_b16.shrink_to_tiny(config)
        config.tokenizer.workdir = "runs/binary_tiny"  # a configs/binary_b16.py:tiny run
    elif arg:
        raise ValueError(
            f"unknown variant {arg!r} of configs/maskgit_binary_b16.py; use '' or 'tiny'"
        )
    return config
