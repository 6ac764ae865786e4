"""What every training job does around its own step: mesh, batch-size checks, checkpoints,
resume or init, compile, the shared loop with its metric writer, then closing it all.

A job reads as

    job = TrainingJob.start(config, workdir, {"data.batch_size": ...})
    model_def, state, shardings = job.restore_or_init(model_fn, optimizer)
    train_step = job.compile(step_fn, shardings, batch_shardings)
    outcome = job.train(state, train_step, batches, finish=final_evaluation)

and keeps only what is its own: the model, the step, the batches, evaluation and its result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from jax.sharding import Mesh

from visual_tokenizers.core.runtime import checkpoint, loop, resume
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.runtime import train_state as ts


class Outcome(NamedTuple):
    """How `TrainingJob.train` ended."""

    state: ts.TrainState
    metrics: dict  # the last logged training metrics (means over the last log period)
    stopped_early: bool  # SIGTERM or a preemption: `finish` did not run
    final: dict | None  # what `finish` returned (None when stopped early or no `finish`)


@dataclasses.dataclass
class TrainingJob:
    """One training run's mesh and checkpoints; `train` closes them."""

    config: Any
    workdir: str
    mesh: Mesh
    rules: tuple
    ckpt: Any = None  # the orbax CheckpointManager, opened by `restore_or_init`

    @classmethod
    def start(cls, config, workdir: str, batch_sizes: dict[str, int]) -> TrainingJob:
        """The mesh of `config.mesh`; refuses batch sizes ({config key: size}) it cannot split,
        and a resume under settings that define another run (core/runtime/resume.py)."""
        resume.check_config(config, workdir)
        mesh = mesh_lib.make_mesh(config.mesh)
        rules = tuple(tuple(r) for r in config.sharding_rules)
        mesh_lib.check_batch_sizes(mesh, batch_sizes)
        return cls(config, workdir, mesh, rules)

    def restore_or_init(
        self,
        model_fn: Callable,
        optimizer,
        *,
        ema: bool = False,
        discriminator: ts.Discriminator | None = None,
        on_fresh_init: Callable[[ts.TrainState], ts.TrainState] | None = None,
    ) -> tuple[ts.ModelDef, ts.TrainState, ts.TrainState]:
        """Opens WORKDIR/checkpoints and resumes from it (its latest step, or
        `config.resume_step`), else from `config.init_from`, else initialises; returns
        (ModelDef, state, shardings) as `train_state.restore_or_init`.

        on_fresh_init: applied to a state made from scratch (no checkpoint, no init_from), e.g.
        to load frozen pretrained parts once; a resumed state already holds them.
        """
        config = self.config
        self.ckpt = checkpoint.manager(self.workdir, keep=config.keep_checkpoints)
        fresh = self.ckpt.latest_step() is None and not config.init_from
        model_def, state, shardings = ts.restore_or_init(
            model_fn,
            optimizer,
            self.mesh,
            self.rules,
            ckpt_manager=self.ckpt,
            init_from=config.init_from,
            resume_step=config.get("resume_step", -1),
            ema=ema,
            discriminator=discriminator,
        )
        if fresh and on_fresh_init is not None:
            state = on_fresh_init(state)
        return model_def, state, shardings

    def compile(self, step_fn: Callable, shardings, batch_shardings, extra_shardings=None):
        """`train_state.compile_train_step` on this job's mesh."""
        return ts.compile_train_step(
            step_fn, shardings, batch_shardings, self.mesh, extra_shardings
        )

    def train(
        self,
        state: ts.TrainState,
        step_fn: Callable,
        batches: Iterator[dict],
        *,
        eval_every: int = 0,
        evaluate: Callable | None = None,
        finish: Callable[[ts.TrainState], dict | None] | None = None,
        checkpoint_meta: Callable[[int], dict] | None = None,
    ) -> Outcome:
        """Runs the shared loop to config.num_steps (see `loop.train`), then `finish(state)`
        unless the run stopped early; a dict it returns is logged under 'final/'. Closes the
        batches (when they can be closed), the metric writer and the checkpoint manager.
        checkpoint_meta(step) -> dict is saved with each checkpoint (checkpoint.read_meta)."""
        writer = loop.MetricWriter(self.workdir)
        final = None
        try:
            state, metrics, stopped = loop.train(
                state=state,
                step_fn=step_fn,
                batches=batches,
                mesh=self.mesh,
                writer=writer,
                ckpt_manager=self.ckpt,
                **loop.cadence(self.config),
                eval_every=eval_every,
                evaluate=evaluate,
                checkpoint_meta=checkpoint_meta,
            )
            if not stopped and finish is not None:
                final = finish(state)
                if final is not None:
                    writer.write(int(state.step), final, prefix="final/")
        finally:
            if hasattr(batches, "close"):
                batches.close()
            writer.close()
            self.ckpt.close()
        return Outcome(state, metrics, stopped, final)
