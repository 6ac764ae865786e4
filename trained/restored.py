"""Restoring a finished training run onto a mesh, with the choice of its weights made once.

A run that kept an exponential moving average of its weights (`ema_params`, a train-state field
mirroring `params`) is used through that EMA by default: it is what evaluation, export and
sampling report. `use_ema=None` takes the EMA when the checkpoint has it, else the trained
`params`; True insists on the EMA; False takes `params`.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from visual_tokenizers.core.runtime import checkpoint
from visual_tokenizers.core.runtime import train_state as ts

EMA, PARAMS = "ema", "params"


def choose_weights(state: ts.TrainState, use_ema: bool | None = None, where: str = "this run"):
    """(weights, 'ema' or 'params') of a train state: the one place the EMA choice is made."""
    has_ema = state.ema_params is not None
    if use_ema is None:
        use_ema = has_ema
    if use_ema and not has_ema:
        raise checkpoint.CheckpointError(
            f"{where} keeps no EMA weights (its run had ema_decay=0): pass use_ema=None or "
            "False to use its trained params"
        )
    return (state.ema_params, EMA) if use_ema else (state.params, PARAMS)


def ema_choice(use_ema_setting: bool | None) -> bool | None:
    """A config's `use_ema` key: unset (None) or true = the EMA weights when the run kept them,
    false = the trained params."""
    return False if use_ema_setting is False else None


@dataclasses.dataclass
class Restored:
    """A finished run on a mesh: its saved config, step, model and the weights it uses.

    `params` are the chosen weights (`weights` says which); jitted code takes `params` and
    `model_state` as arguments with `shardings` and calls `model_def.merge` inside.
    """

    config: object  # ml_collections.ConfigDict: the run's saved config
    step: int
    model_def: ts.ModelDef
    params: dict
    model_state: dict
    shardings: ts.TrainState
    weights: str  # 'ema' or 'params'
    workdir: str  # absolute

    @property
    def mesh(self):
        return self.shardings.step.mesh

    def model(self):
        """The model as an nnx module with the chosen weights (for eager use)."""
        return self.model_def.merge(self.params, self.model_state)


def step_choice(step_key: str | None) -> str:
    """How a user picks a step of a finished run, for `checkpoint.read`'s messages: the jobs'
    config key (e.g. 'tokenizer.step') and the Python argument."""
    if not step_key:
        return checkpoint.ARGUMENT
    return f"--config.{step_key}={{step}} (from Python: step={{step}})"


def restore(
    workdir: str, model_fn_from_config, *, step=None, use_ema=None, mesh=None, step_key=None
) -> dict:
    """Keyword arguments of a `Restored` for the run in `workdir` (mesh: the run's own if None).
    step_key: the jobs' config key choosing this run's step, named by the error on a missing or
    damaged step."""
    config, step, model_def, state, shardings = ts.restore_run(
        workdir, model_fn_from_config, mesh=mesh, step=step, choice=step_choice(step_key)
    )
    params, weights = choose_weights(state, use_ema, workdir)
    logging.info("restored %s step %d with its %s weights", workdir, step, weights)
    return dict(
        config=config,
        step=int(step),
        model_def=model_def,
        params=params,
        model_state=state.model_state,
        shardings=shardings,
        weights=weights,
        workdir=os.path.abspath(workdir),
    )
