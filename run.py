"""Entry point: python run.py --config=configs/vq_b16.py[:tiny] --workdir=DIR [--config.KEY=VALUE]

Parses flags, sets up logging and multi-host JAX, and runs the job named by `config.job`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow is only used for TFDS input

if __package__ != "visual_tokenizers":  # run as a script: use this checkout, installed or not
    import this_checkout

    this_checkout.use()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# config.job -> module under jobs/ exposing run(config, workdir) -> dict.
JOBS = {
    "train_tokenizer": "visual_tokenizers.jobs.train_tokenizer",
    "train_classifier": "visual_tokenizers.jobs.train_classifier",
    "evaluate": "visual_tokenizers.jobs.evaluate",
    "export_tokens": "visual_tokenizers.jobs.export_tokens",
    "train_maskgit": "visual_tokenizers.jobs.train_maskgit",
    "sample": "visual_tokenizers.jobs.sample",
    "demo": "visual_tokenizers.jobs.demo",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. configs/vq_b16.py or configs/vq_b16.py:tiny.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs started by hand."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (by hand).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (by hand).")


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Keeps orbax's and TensorFlow's per-save INFO chatter out of the console."""
    noisy = ("/orbax/", "/tensorflow/", "/tensorflow_datasets/")
    return record.levelno >= logging.WARNING or not any(n in record.pathname for n in noisy)


def job_module(name: str):
    if name not in JOBS:
        raise SystemExit(f"config.job={name!r} is unknown; choose one of {sorted(JOBS)}")
    return importlib.import_module(JOBS[name])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from visual_tokenizers.core.runtime import mesh as mesh_lib

    mesh_lib.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = _CONFIG.value
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    logging.getLogger().setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_libraries)
    import jax

    logging.info(
        "job %s on %d %s device(s), process %d/%d, workdir %s",
        config.job,
        jax.device_count(),
        jax.devices()[0].platform,
        jax.process_index(),
        jax.process_count(),
        workdir,
    )
    result = job_module(config.job).run(config, workdir)
    if jax.process_index() == 0:
        print(json.dumps(result, default=float), flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    sys.exit(app.run(main))
