"""The one training loop shared by every training job.

A job supplies a jitted `step(state, batch) -> (state, metrics)`, a host batch iterator and an
optional `evaluate(state, step) -> dict`. The loop owns step timing, logging (console,
TensorBoard, metrics.jsonl), checkpoint cadence, SIGTERM handling and the NaN guard (losses,
gradient norm and the updated state are checked before any save: a non-finite state is never
written).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from visual_tokenizers.core import files
from visual_tokenizers.core.errors import Diverged
from visual_tokenizers.core.runtime import checkpoint
from visual_tokenizers.core.runtime import mesh as mesh_lib


class NonFiniteLossError(Diverged, FloatingPointError):
    """A loss, the gradient norm or the updated weights became NaN or inf; the run stops
    without saving that state (run.py exits with EXIT_NON_FINITE)."""


class MetricWriter:
    """Console lines, TensorBoard events and WORKDIR/metrics.jsonl (process 0 writes)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.tb = None
        self.jsonl = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, metrics: dict, *, prefix: str = ""):
        if not self.enabled:
            return
        scalars = {prefix + k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, step)
        self.jsonl.write(files.json_text({"step": step, **scalars}) + "\n")  # NaN as null
        self.jsonl.flush()

    def close(self):
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so the run can checkpoint and exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def format_line(step: int, total: int, metrics: dict, steps_per_s: float) -> str:
    eta = (total - step) / steps_per_s if steps_per_s > 0 else float("nan")
    parts = [f"step {step}/{total}"]
    for key in sorted(metrics):
        parts.append(f"{key} {float(metrics[key]):.4g}")
    parts.append(f"{steps_per_s:.2f} steps/s")
    parts.append(f"ETA {_duration(eta)}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


@jax.jit
def _non_finite_arrays(state) -> jax.Array:
    """Per floating-point array of `state` (weights, EMA, optimizer moments, ...): True where
    it holds a NaN or inf. One fused pass over the state, dispatched after every step."""
    flags = [~jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state) if _is_float(x)]
    return jnp.stack(flags) if flags else jnp.zeros((0,), bool)


def _float_array_names(state) -> list[str]:
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return [jax.tree_util.keystr(path) for path, x in leaves if _is_float(x)]


def _step_problem(metrics: dict, non_finite, names: list[str]) -> str | None:
    """What went non-finite at one step (its losses, gradient norm or updated state), or None."""
    watched = [k for k in metrics if k.startswith("loss") or k == "grad_norm"]
    bad = [f"{k} = {float(metrics[k])}" for k in watched if not np.isfinite(metrics[k])]
    count = int(np.sum(non_finite))
    if count:
        first = names[int(np.argmax(non_finite))] if names else "?"
        bad.append(f"{count} of {len(non_finite)} state arrays non-finite after the update")
        bad[-1] += f" (first: {first})"
    return "; ".join(bad) or None


def check_finite(history: list[tuple], last_saved: int | None, ckpt_dir: str, state) -> None:
    """Raises NonFiniteLossError at the first step of `history` ((step, metrics, non-finite
    flags) fetched to the host) whose loss, gradient norm or updated state is not finite.

    Runs before every save, so a checkpoint is only written when every step since the last
    one was finite: the last checkpoint is always a finite one."""
    names = None
    for step, metrics, non_finite in history:
        names = names if names is not None else _float_array_names(state)
        problem = _step_problem(metrics, non_finite, names)
        if problem is None:
            continue
        if last_saved is not None:
            kept = f"The last checkpoint, step {last_saved} in {ckpt_dir}, is finite and kept"
            kept += "; rerunning the command resumes from it."
        else:
            kept = "No checkpoint was written yet; rerunning the command starts from scratch."
        raise NonFiniteLossError(
            f"training diverged at step {step}: {problem}. The weights after step {step - 1} "
            f"were the last finite ones. {kept} Lower optimizer.lr, enable "
            "optimizer.grad_clip_norm or check the input data."
        )


def cadence(config) -> dict:
    """The `train` arguments every job reads from its config the same way."""
    return dict(
        num_steps=config.num_steps,
        config_dict=config.to_dict(),
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
    )


def train(
    *,
    state,
    step_fn: Callable,
    batches: Iterator[dict],
    mesh,
    num_steps: int,
    writer: MetricWriter,
    ckpt_manager,
    config_dict: dict,
    log_every: int,
    checkpoint_every: int,
    eval_every: int = 0,
    evaluate: Callable | None = None,
    checkpoint_meta: Callable[[int], dict] | None = None,
):
    """Runs steps until `num_steps`; returns (state, last logged metrics, stopped_early).

    checkpoint_meta(step) -> dict: saved with each checkpoint (checkpoint.read_meta)."""
    step = int(state.step)
    history: list[tuple] = []  # (step, metrics, non-finite flags), on device
    last_metrics: dict = {}
    last_saved = ckpt_manager.latest_step()
    timer_step, timer_start = step, time.perf_counter()
    if step >= num_steps:
        logging.info("already at step %d of %d: nothing to train", step, num_steps)
    with _Preemption() as preemption:
        while step < num_steps:
            batch = mesh_lib.host_batch_to_global(next(batches), mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            history.append((step, metrics, _non_finite_arrays(state)))
            stop = preemption.requested or ckpt_manager.reached_preemption(step)
            save = step % checkpoint_every == 0 or step == num_steps or stop
            if step % log_every == 0 or save:
                fetched = jax.device_get(history)
                history.clear()
                check_finite(fetched, last_saved, str(ckpt_manager.directory), state)
                last_metrics = _mean_metrics(fetched)
                rate = (step - timer_step) / (time.perf_counter() - timer_start)
                timer_step, timer_start = step, time.perf_counter()
                logging.info(format_line(step, num_steps, last_metrics, rate))
                writer.write(step, {**last_metrics, "steps_per_s": rate})
            if save:
                meta = checkpoint_meta(step) if checkpoint_meta is not None else None
                checkpoint.save(ckpt_manager, step, state, config_dict, meta=meta, force=stop)
                last_saved = step
            # The final evaluation is the job's: skip the periodic one at the last step.
            if evaluate is not None and eval_every and step % eval_every == 0 and step < num_steps:
                writer.write(step, evaluate(state, step), prefix="eval/")
            if stop:
                break
    ckpt_manager.wait_until_finished()
    return state, last_metrics, step < num_steps


def _mean_metrics(history: list[tuple[int, dict]]) -> dict:
    keys = history[-1][1].keys()
    return {k: float(np.mean([m[k] for _, m, _ in history])) for k in keys}
