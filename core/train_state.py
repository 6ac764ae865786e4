"""The train state every job carries, and how it is created, sharded and resumed.

A model is kept as `nnx.split` parts: the graph definition (static, outside jit) plus two pure
dicts of arrays, `params` (nnx.Param: trained by gradient) and `model_state` (every other
nnx.Variable: EMA codebooks, usage counters, ...). Pure dicts keep the state a plain pytree that
optax, orbax and jit shardings all understand.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from core import checkpoint
from core import mesh as mesh_lib


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    model_state: dict
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of a split model: rebuild a module from arrays with `merge`."""

    graphdef: Any

    def merge(self, params: dict, model_state: dict):
        return nnx.merge(self.graphdef, params, model_state)


def split_model(model: nnx.Module) -> tuple[Any, dict, dict]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params.to_pure_dict(), rest.to_pure_dict()


def model_state_of(model: nnx.Module) -> dict:
    """The non-Param variables of a module after a forward pass that may have updated them."""
    return nnx.state(model, nnx.Not(nnx.Param)).to_pure_dict()


def state_shardings(model_fn: Callable[[], nnx.Module], optimizer, mesh: Mesh, rules):
    """(ModelDef, abstract TrainState, TrainState of NamedShardings) without allocating."""
    abstract_model = nnx.eval_shape(model_fn)
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    param_sh = mesh_lib.param_shardings(params, mesh, rules)
    rest_sh = mesh_lib.param_shardings(rest, mesh, rules)

    def init_abstract():
        p, r = params.to_pure_dict(), rest.to_pure_dict()
        return TrainState(jnp.zeros((), jnp.int32), p, r, optimizer.init(p))

    abstract = jax.eval_shape(init_abstract)
    shardings = TrainState(
        step=mesh_lib.replicated(mesh),
        params=param_sh,
        model_state=rest_sh,
        opt_state=mesh_lib.shardings_like(abstract.opt_state, param_sh, mesh),
    )
    return ModelDef(graphdef), abstract, shardings


def init_state(model_fn, optimizer, shardings: TrainState) -> TrainState:
    """Builds the model and optimizer state directly on the mesh (no host-side copy)."""

    def init():
        _, params, rest = split_model(model_fn())
        return TrainState(jnp.zeros((), jnp.int32), params, rest, optimizer.init(params))

    return jax.jit(init, out_shardings=shardings)()


def restore_or_init(
    model_fn, optimizer, mesh: Mesh, rules, *, ckpt_manager, init_from: str | None = None
) -> tuple[ModelDef, TrainState, TrainState]:
    """Resume order: this workdir's latest checkpoint, then `init_from`, then a fresh init.

    `init_from` (another run's workdir or checkpoints directory) provides params and model
    state only; the optimizer and step start fresh.
    """
    model_def, abstract, shardings = state_shardings(model_fn, optimizer, mesh, rules)
    target = checkpoint.abstract_with_shardings(abstract, shardings)
    restored = checkpoint.restore(ckpt_manager, target)
    if restored is not None:
        state, _ = restored
        logging.info("resumed from %s at step %d", ckpt_manager.directory, int(state.step))
        return model_def, state, shardings
    state = init_state(model_fn, optimizer, shardings)
    if init_from:
        restored = checkpoint.restore(init_from, target)
        if restored is None:
            raise checkpoint.CheckpointError(
                f"config.init_from={init_from!r} holds no checkpoint; point it at a workdir "
                "(or its checkpoints/ folder) of a finished run, or set it to ''"
            )
        source, _ = restored
        state = state.replace(params=source.params, model_state=source.model_state)
        logging.info("initialised params from %s (step %d)", init_from, int(source.step))
    return model_def, state, shardings


def compile_train_step(step_fn, shardings: TrainState, batch_shardings, mesh: Mesh):
    """jit(step_fn) over (state, batch) with explicit shardings; the old state is donated."""
    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


def apply_gradients(optimizer: optax.GradientTransformation, state: TrainState, grads):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return params, opt_state


def restore_run(workdir: str, model_fn_from_config, optimizer_from_config, *, mesh=None, step=None):
    """Rebuilds a finished run from its saved config and restores its state onto `mesh`.

    Returns (config, step, ModelDef, TrainState, shardings); mesh defaults to the run's own.
    """
    step, saved = checkpoint.read_config(workdir, step)
    config = ml_collections.ConfigDict(saved)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    model_def, abstract, shardings = state_shardings(
        model_fn_from_config(config), optimizer_from_config(config), mesh, rules
    )
    target = checkpoint.abstract_with_shardings(abstract, shardings)
    state, _ = checkpoint.restore(os.path.join(workdir, "checkpoints"), target, step=step)
    return config, step, model_def, state, shardings
