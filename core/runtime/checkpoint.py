"""Orbax checkpoints under WORKDIR/checkpoints: train state plus the config that made it, and a
small JSON record of what the arrays do not show (`meta`, e.g. the tokenizer's effective EMA
decay: tokenizers/training.py `ema_record`; read it back with `read_meta`).

Resume order (see `restore_or_init` in core/runtime/train_state.py): the workdir's latest
checkpoint (or `config.resume_step`), then `config.init_from`, then a fresh init. Restoring
takes an abstract target whose leaves carry the current run's shardings, so a checkpoint
written on one mesh loads onto another.

A damaged step (a missing or truncated file) is refused, never skipped silently: every read
goes through `read`, which turns orbax's and TensorStore's errors into a `CheckpointError` of
two lines naming the step, what is missing or unreadable, the newest intact step and the
setting that uses it (`choice`). A step is "intact" when the same read succeeds on it, so the
older steps are each read in full as the caller would, newest first, stopping at the first that
works; this costs one more read per damaged step and happens only after a failure.
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp

from visual_tokenizers.core import files
from visual_tokenizers.core.errors import UserError
from visual_tokenizers.core.runtime import unreadable

ASIDE = "checkpoints_set_aside"  # WORKDIR/checkpoints_set_aside/<step>: see `set_aside_newer`
ARGUMENT = "step={step}"  # how a caller picks a step, by default: the Python argument


class CheckpointError(UserError, RuntimeError):
    """A checkpoint exists but cannot be used with this run."""


class Damaged(Exception):
    """A step's files are missing or unreadable; `read` reports it as a CheckpointError."""


def manager(workdir: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())


def _handlers(partial: bool = False):
    # The pytree handler reads what StandardCheckpointHandler wrote and allows a partial read.
    state = ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler()
    return {
        "state": state,
        "config": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def _read_only(directory: str, partial: bool = False) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers=_handlers(partial),
    )


def save(
    mngr: ocp.CheckpointManager, step: int, state, config_dict: dict, *, meta=None, force=False
):
    """Saves asynchronously; returns at once. Call `mngr.wait_until_finished()` before exiting.

    meta: a JSON-able dict saved beside the state (`read_meta`); {} when None."""
    saved = mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(files.as_json(config_dict, default=str)),  # NaN as null
            meta=ocp.args.JsonSave(files.as_json(meta or {}, default=str)),
        ),
        force=force,
    )
    if saved:
        logging.info("checkpoint: saving step %d to %s", step, mngr.directory)
    return saved


# ----------------------------------------------------------------------------- reading a step


def read(mngr: ocp.CheckpointManager, step: int | None, attempt, choice: str = ARGUMENT):
    """attempt(step) on `step` (None: the latest) of `mngr`'s checkpoints; None if it has none.

    A step that does not exist is a CheckpointError listing those that do; `attempt` raising
    `Damaged` is one naming the newest older step that `attempt` reads. `choice` says how the
    user picks a step: a template with '{step}', e.g. '--config.resume_step={step}'.
    """
    steps = sorted(mngr.all_steps())
    if step is None and not steps:
        return None
    step = steps[-1] if step is None else step
    if step not in steps:
        available = ", ".join(str(s) for s in steps) or "none"
        raise CheckpointError(
            f"there is no checkpoint step {step} in {mngr.directory} (available steps: "
            f"{available}); pick one with {choice.format(step='N')}"
        )
    try:
        return attempt(step)
    except Damaged as err:
        intact = _newest_intact(steps, step, attempt)
        if intact is None:
            fix = "No older step is intact: copy its files back, or train in a fresh --workdir."
        else:
            fix = f"The newest intact step is {intact}; use it with {choice.format(step=intact)}."
        message = f"checkpoint step {step} in {mngr.directory} is damaged: {err}.\n{fix}"
        raise CheckpointError(message) from err


def _newest_intact(steps: list[int], damaged: int, attempt) -> int | None:
    """The newest step older than `damaged` that `attempt` reads in full (see the module doc)."""
    for step in sorted((s for s in steps if s < damaged), reverse=True):
        try:
            attempt(step)
        except Exception:  # any failure: this step is not usable either
            continue
        return step
    return None


def _config_at(mngr, step: int) -> dict:
    try:
        return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    except Exception as err:
        raise Damaged(_file_problem(mngr, step, "config/metadata", err)) from err


def _meta_at(mngr, step: int) -> dict:
    if not os.path.isdir(os.path.join(os.fspath(mngr.directory), str(step), "meta")):
        return {}  # written before checkpoints kept a meta record
    try:
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as err:
        raise Damaged(_file_problem(mngr, step, "meta/metadata", err)) from err


def _metadata_at(mngr, step: int):
    """The saved state's tree metadata (orbax's state/_METADATA)."""
    try:
        metadata = mngr.item_metadata(step).state
    except Exception as err:
        raise Damaged(_file_problem(mngr, step, "state/_METADATA", err)) from err
    if metadata is None:  # orbax answers None when the file is gone
        raise Damaged(_file_problem(mngr, step, "state/_METADATA", None))
    return metadata


def _file_problem(mngr, step: int, relative: str, err) -> str:
    unreadable.quiet_leftovers()
    return unreadable.file_problem(
        os.path.join(os.fspath(mngr.directory), str(step)), relative, err
    )


def _restore_arrays(mngr, step: int, restore, fix: str):
    """restore(): orbax reading the arrays of `step`. Unreadable data raises `Damaged`; a
    target of another structure or shape is a CheckpointError ending with `fix`."""
    try:
        return restore()
    except Exception as err:
        problem = unreadable.array_problem(err)
        if problem is not None:
            unreadable.quiet_leftovers()
            raise Damaged(problem) from err
        if isinstance(err, ValueError | KeyError | TypeError):
            raise CheckpointError(
                f"checkpoint step {step} in {mngr.directory} does not match this model "
                f"({type(err).__name__}: {unreadable.summary(err)}). {fix}"
            ) from err
        raise


# ----------------------------------------------------------------------------- the train state


def resume_choice(directory: str) -> str:
    """How a training run picks the step it resumes from (`config.resume_step`), for `read`'s
    messages on the checkpoints `directory` (WORKDIR/checkpoints)."""
    aside = os.path.join(os.path.dirname(os.path.abspath(directory)), ASIDE)
    return f"--config.resume_step={{step}} (the newer steps are then moved to {aside})"


def restore(mngr_or_dir, abstract_state, step: int | None = None, choice: str | None = None):
    """Restores the train state at `step` (default: latest) onto the shardings of the target.

    `mngr_or_dir` is a CheckpointManager or a checkpoints directory. Returns (state,
    saved_config_dict) or None when there is no checkpoint. `choice`: see `read` (default:
    `config.resume_step`).
    """
    mngr = mngr_or_dir
    if isinstance(mngr_or_dir, str):
        path = mngr_or_dir
        if os.path.isdir(os.path.join(path, "checkpoints")):
            path = os.path.join(path, "checkpoints")
        mngr = _read_only(path)

    def attempt(at: int):
        config = _config_at(mngr, at)
        _metadata_at(mngr, at)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        restored = _restore_arrays(
            mngr,
            at,
            lambda: mngr.restore(at, args=args),
            "Use a fresh --workdir, or the config that wrote it (saved beside the checkpoint "
            "as config).",
        )
        return restored.state, config

    return read(mngr, step, attempt, choice or resume_choice(os.fspath(mngr.directory)))


def set_aside_newer(mngr: ocp.CheckpointManager, step: int) -> list[int]:
    """Moves the checkpoints newer than `step` to WORKDIR/checkpoints_set_aside/<step> (kept,
    not deleted); returns their steps. A run resumed from an older step must not keep them:
    orbax refuses to save a step that exists, and the next restart would resume from them."""
    newer = sorted(s for s in mngr.all_steps() if s > step)
    if not newer:
        return []
    directory = os.fspath(mngr.directory)
    aside = os.path.join(os.path.dirname(directory), ASIDE)
    if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        for s in newer:
            target, n = os.path.join(aside, str(s)), 1
            while os.path.exists(target):  # set aside before: keep both
                target, n = os.path.join(aside, f"{s}.{n}"), n + 1
            shutil.move(os.path.join(directory, str(s)), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("checkpoints set aside")
    mngr.reload()
    logging.warning(
        "config.resume_step=%d: moved the newer checkpoints (steps %s) to %s; delete them "
        "there once they are not needed, and drop resume_step from the command before the "
        "next restart, or it resumes from step %d again",
        step,
        ", ".join(map(str, newer)),
        aside,
        step,
    )
    return newer


def restore_parts(
    directory: str, parts: dict, step: int | None = None, optional=("ema_params",), choice=None
):
    """Reads some top-level entries of a saved train state (e.g. params without optimizer).

    `directory` is a workdir, its checkpoints folder or one step's folder in it (that step);
    `parts` maps entry names to abstract targets carrying shardings. Entries named in
    `optional` are skipped when the checkpoint lacks them. Returns {'step': step, **restored
    parts}, or None when there is no checkpoint. `choice`: see `read` (default: `step=`).
    """
    name = os.path.basename(os.path.normpath(directory))
    if step is None and name.isdigit() and os.path.isdir(os.path.join(directory, "state")):
        directory, step = os.path.dirname(os.path.normpath(directory)), int(name)
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")
    with _read_only(directory, partial=True) as mngr:
        return read(mngr, step, lambda at: parts_at(mngr, parts, at, optional), choice or ARGUMENT)


def parts_at(mngr, parts: dict, step: int, optional=("ema_params",)) -> dict:
    """`restore_parts` of one step of a read-only manager opened by `finished_run`."""
    saved = _metadata_at(mngr, step)
    present = {k: v for k, v in parts.items() if saved.get(k) is not None}
    missing = [
        k for k in parts if k not in present and k not in optional and jax.tree.leaves(parts[k])
    ]
    if missing:
        raise CheckpointError(
            f"checkpoint step {step} in {mngr.directory} has no {missing}; it was not written "
            "by a training run of this codebase"
        )
    present = {k: v for k, v in present.items() if jax.tree.leaves(v)}
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape), present
    )
    args = ocp.args.PyTreeRestore(present, restore_args=restore_args, partial_restore=True)
    restored = _restore_arrays(
        mngr,
        step,
        lambda: mngr.restore(step, args=ocp.args.Composite(state=args)).state,
        "Use the config that wrote it.",
    )
    result = {k: v for k, v in parts.items() if k not in optional and not jax.tree.leaves(v)}
    result.update(restored)
    return {"step": step, **result}


def abstract_with_shardings(state, shardings):
    """ShapeDtypeStructs carrying the target shardings, for orbax restore."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def load_raw(workdir: str, step: int | None = None, choice: str = ARGUMENT):
    """(step, state tree) from a workdir as saved, without a target model (inspection, tests)."""
    with _read_only(os.path.join(workdir, "checkpoints")) as mngr:

        def attempt(at: int):
            # Onto this process's first device, whatever mesh or host count wrote it.
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                _metadata_at(mngr, at),
            )
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
            restored = _restore_arrays(mngr, at, lambda: mngr.restore(at, args=args), "")
            return at, restored.state

        found = read(mngr, step, attempt, choice)
    if found is None:
        raise CheckpointError(f"no checkpoint under {workdir}/checkpoints")
    return found


# ----------------------------------------------------------------------------- finished runs


def finished_run(workdir: str) -> ocp.CheckpointManager:
    """A read-only manager on WORKDIR/checkpoints for `read`, `config_at` and `parts_at`."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"{workdir} holds no checkpoints/ folder; pass the workdir of a training run"
        )
    mngr = _read_only(directory, partial=True)
    if not mngr.all_steps():
        mngr.close()
        raise CheckpointError(f"no checkpoint under {directory}; train first or fix the path")
    return mngr


def config_at(mngr, step: int) -> dict:
    """The config saved with `step` (for `read`: a damaged file raises `Damaged`)."""
    return _config_at(mngr, step)


def read_config(workdir: str, step: int | None = None, choice: str = ARGUMENT):
    """(step, config dict) saved with a checkpoint of `workdir` (default: the latest)."""
    with finished_run(workdir) as mngr:
        return read(mngr, step, lambda at: (at, _config_at(mngr, at)), choice)


def read_meta(workdir: str, step: int | None = None, choice: str = ARGUMENT):
    """(step, meta dict) saved with a checkpoint of `workdir` (default: the latest), e.g.
    {'ema': {'decay', 'warmup', 'updates', 'effective_decay'}}; {} for a checkpoint written
    before checkpoints kept one."""
    with finished_run(workdir) as mngr:
        return read(mngr, step, lambda at: (at, _meta_at(mngr, at)), choice)
