"""What a resumed training run may change about itself.

A rerun in a workdir that holds checkpoints resumes that run. Its config is compared with the
one saved beside the checkpoint it resumes from (the latest, or `config.resume_step`):
settings that change what is being trained (the model, quantizer, loss, data, batch size,
image size, seed, ...) refuse the resume with a list naming each changed key, because the
result would be neither run. Settings that only say how long, how often, where or how fast
(num_steps, cadences, evaluation and sampling during training, mesh, data location and
threads) and the optimizer's hyperparameters (lowering the learning rate or extending the
schedule is how a diverged run is rescued) may change; they are logged.
A key only one side has (a setting added or removed by a newer version of this code) is logged.
"""

from __future__ import annotations

import logging
import os

from visual_tokenizers.core import files
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.runtime import checkpoint

# Dotted keys (or prefixes ending in '.') a resumed run may change.
MAY_CHANGE = (
    "num_steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_every",
    "eval.",
    "sample.",  # MaskGIT's sample grids during training
    "init_from",  # read only at a fresh start
    "resume_step",
    "mesh.",
    "sharding_rules",
    "data.data_dir",
    "data.num_threads",
    "data.prefetch",
    "tokens.verify",
    "teacher.weights",  # read only at a fresh start
    "optimizer.",
    "discriminator_optimizer.",
)
# ...except these, which change the optimizer state's structure or the kind of optimizer.
MUST_MATCH = ("optimizer.name", "discriminator_optimizer.name")
# Keys a job adds to the config it saves (MaskGIT's resolved tokens, checked by the job itself).
WRITTEN_BY_THE_JOB = ("resolved",)


def _may_change(key: str) -> bool:
    if key in MUST_MATCH:
        return False
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def has_checkpoint(workdir: str) -> bool:
    """Whether a rerun in `workdir` resumes (it holds a checkpoint step)."""
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def check_config(config, workdir: str) -> None:
    """Refuses to resume `workdir` under `config` when settings that define the run changed
    (ConfigError naming each key, old and new value); logs the changes that are allowed."""
    if not has_checkpoint(workdir):
        return
    step = config.get("resume_step", -1)  # the step it resumes from: compare with that one
    step = step if step >= 0 else None
    choice = checkpoint.resume_choice(os.path.join(workdir, "checkpoints"))
    step, saved = checkpoint.read_config(workdir, step, choice)
    refused, allowed = [], []
    for key, was, now in files.changed_settings(saved, files.as_json(config.to_dict())):
        if key.split(".", 1)[0] in WRITTEN_BY_THE_JOB:
            continue
        one_sided = was is files.UNSET or now is files.UNSET
        (allowed if one_sided or _may_change(key) else refused).append(
            files.describe_change(key, was, now)
        )
    if allowed:
        logging.warning("resuming %s at step %d with: %s", workdir, step, "; ".join(allowed))
    if refused:
        raise ConfigError(
            files.other_settings_message(
                refused,
                what=f"{workdir} holds a run (checkpoint step {step}) made",
                fix=f"Resume it with its settings (saved in {workdir}/checkpoints/{step}/config), "
                f"use a fresh --workdir, or start a new run from its weights with "
                f"--config.init_from={workdir}.",
            )
        )
