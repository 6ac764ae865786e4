"""Finished runs as a library: what jobs, tests, benchmarks and users need of a trained run.

  from visual_tokenizers.trained import TrainedTokenizer, TrainedMaskGIT

Each trained thing has one class built by `from_workdir(path, step=None, use_ema=None,
mesh=None)`, which makes the EMA choice in one place (trained/restored.py) and records it in
`.weights` ('ema' or 'params').
"""

from visual_tokenizers.trained.classifier import TrainedClassifier
from visual_tokenizers.trained.inputs import InputError
from visual_tokenizers.trained.maskgit import TrainedMaskGIT
from visual_tokenizers.trained.tokenizer import TrainedTokenizer

__all__ = ["InputError", "TrainedClassifier", "TrainedMaskGIT", "TrainedTokenizer"]
