"""Train the small `builtin:shapes` classifier behind `shapes_accuracy` and `shapes_fd`.

run(config, workdir) trains with the shared loop (checkpoints, resume, logging), then reports
the held-out test accuracy. The training itself lives in trained/classifier.py: evaluation
trains the classifier on first use, and jobs never import jobs.
"""

from __future__ import annotations

from visual_tokenizers.trained import classifier


def run(config, workdir: str) -> dict:
    return classifier.train(config, workdir)
