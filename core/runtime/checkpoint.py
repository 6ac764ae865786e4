"""Orbax checkpoints under WORKDIR/checkpoints: train state plus the config that made it.

Resume order (see `restore_or_init` in core/runtime/train_state.py): the workdir's latest
checkpoint, then `config.init_from`, then a fresh init. Restoring takes an abstract target whose
leaves carry the current run's shardings, so a checkpoint written on one mesh loads onto another.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from visual_tokenizers.core import files
from visual_tokenizers.core.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint exists but cannot be used with this run."""


def manager(workdir: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())


def _handlers():
    return {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}


def _read_only(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers=_handlers(),
    )


def save(mngr: ocp.CheckpointManager, step: int, state, config_dict: dict, *, force=False):
    """Saves asynchronously; returns at once. Call `mngr.wait_until_finished()` before exiting."""
    saved = mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(files.as_json(config_dict, default=str)),  # NaN as null
        ),
        force=force,
    )
    if saved:
        logging.info("checkpoint: saving step %d to %s", step, mngr.directory)
    return saved


def restore(mngr_or_dir, abstract_state, step: int | None = None):
    """Restores the train state at `step` (default: latest) onto the shardings of the target.

    `mngr_or_dir` is a CheckpointManager or a checkpoints directory (for `config.init_from`).
    Returns (state, saved_config_dict) or None when there is no checkpoint.
    """
    mngr = mngr_or_dir
    if isinstance(mngr_or_dir, str):
        path = mngr_or_dir
        if os.path.isdir(os.path.join(path, "checkpoints")):
            path = os.path.join(path, "checkpoints")
        mngr = _read_only(path)
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    try:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                config=ocp.args.JsonRestore(),
            ),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint step {step} in {mngr.directory} does not match this model "
            f"({type(err).__name__}: {err}). Use a fresh --workdir, or the config that wrote it "
            "(saved beside the checkpoint as config)."
        ) from err
    return restored.state, restored.config


def restore_parts(directory: str, parts: dict, step: int | None = None, optional=("ema_params",)):
    """Reads some top-level entries of a saved train state (e.g. params without optimizer).

    `directory` is a workdir or its checkpoints folder; `parts` maps entry names to abstract
    targets carrying shardings. Entries named in `optional` are skipped when the checkpoint
    lacks them. Returns {'step': step, **restored parts}, or None when there is no checkpoint.
    """
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")
    # The pytree handler reads what StandardCheckpointHandler wrote and allows a partial read.
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=handlers
    ) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            return None
        saved = mngr.item_metadata(step).state
        present = {k: v for k, v in parts.items() if saved.get(k) is not None}
        missing = [
            k for k in parts if k not in present and k not in optional and jax.tree.leaves(parts[k])
        ]
        if missing:
            raise CheckpointError(
                f"checkpoint step {step} in {directory} has no {missing}; it was not written by "
                "a training run of this codebase"
            )
        present = {k: v for k, v in present.items() if jax.tree.leaves(v)}
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape), present
        )
        args = ocp.args.PyTreeRestore(present, restore_args=restore_args, partial_restore=True)
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(state=args)).state
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"checkpoint step {step} in {directory} does not match this model "
                f"({type(err).__name__}: {err}). Use the config that wrote it."
            ) from err
    result = {k: v for k, v in parts.items() if k not in optional and not jax.tree.leaves(v)}
    result.update(restored)
    return {"step": step, **result}


def abstract_with_shardings(state, shardings):
    """ShapeDtypeStructs carrying the target shardings, for orbax restore."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def load_raw(workdir: str, step: int | None = None):
    """(step, state tree) from a workdir as saved, without a target model (inspection, tests)."""
    mngr = _read_only(os.path.join(workdir, "checkpoints"))
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint under {workdir}/checkpoints")
    # Restore onto this process's first device, whatever mesh or host count wrote it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = mngr.item_metadata(step).state
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
    )
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    mngr.close()
    return step, restored.state


def read_config(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, config dict) saved with a checkpoint of `workdir` (default: the latest)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"{workdir} holds no checkpoints/ folder; pass the workdir of a training run"
        )
    mngr = _read_only(directory)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint under {directory}; train first or fix the path")
    restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    mngr.close()
    return step, restored.config
