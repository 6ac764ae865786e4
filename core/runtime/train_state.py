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

from visual_tokenizers.core.runtime import checkpoint
from visual_tokenizers.core.runtime import mesh as mesh_lib


@struct.dataclass
class DiscriminatorState:
    """A GAN discriminator trained beside the model (tokenizer recipe), with its own optimizer.

    lecam: {'real', 'fake'} EMAs of the mean real / fake logits (LeCam regularisation).
    """

    params: dict
    model_state: dict
    opt_state: Any
    lecam: dict


@struct.dataclass
class TrainState:
    """step, trained params, other model variables, optimizer state; optionally an EMA of the
    params (`ema_params`, same tree as `params`) and a `DiscriminatorState`."""

    step: jax.Array
    params: dict
    model_state: dict
    opt_state: Any
    ema_params: Any = None
    discriminator: Any = None


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of a split model: rebuild a module from arrays with `merge`."""

    graphdef: Any
    discriminator: ModelDef | None = None

    def merge(self, params: dict, model_state: dict):
        return nnx.merge(self.graphdef, params, model_state)


@dataclasses.dataclass(frozen=True)
class Discriminator:
    """How to build a discriminator and its optimizer (the second half of a GAN state)."""

    model_fn: Callable[[], nnx.Module]
    optimizer: optax.GradientTransformation


def split_model(model: nnx.Module) -> tuple[Any, dict, dict]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params.to_pure_dict(), rest.to_pure_dict()


def model_state_of(model: nnx.Module) -> dict:
    """The non-Param variables of a module after a forward pass that may have updated them."""
    return nnx.state(model, nnx.Not(nnx.Param)).to_pure_dict()


def _split_shardings(model_fn, optimizer, mesh: Mesh, rules):
    """(graphdef, abstract (params, rest, opt_state), their shardings) without allocating."""
    abstract_model = nnx.eval_shape(model_fn)
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    param_sh = mesh_lib.param_shardings(params, mesh, rules)
    rest_sh = mesh_lib.param_shardings(rest, mesh, rules)
    params, rest = params.to_pure_dict(), rest.to_pure_dict()
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_sh = mesh_lib.shardings_like(opt_state, param_sh, mesh)
    return graphdef, (params, rest, opt_state), (param_sh, rest_sh, opt_sh)


def state_shardings(
    model_fn: Callable[[], nnx.Module],
    optimizer,
    mesh: Mesh,
    rules,
    *,
    ema: bool = False,
    discriminator: Discriminator | None = None,
):
    """(ModelDef, abstract TrainState, TrainState of NamedShardings) without allocating.

    ema: keep `ema_params` (sharded like params). discriminator: add a DiscriminatorState.
    """
    graphdef, (params, rest, opt), (param_sh, rest_sh, opt_sh) = _split_shardings(
        model_fn, optimizer, mesh, rules
    )
    replicated = mesh_lib.replicated(mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(scalar, params, rest, opt, params if ema else None)
    shardings = TrainState(replicated, param_sh, rest_sh, opt_sh, param_sh if ema else None)
    disc_def = None
    if discriminator is not None:
        d_graphdef, d_abstract, d_sh = _split_shardings(
            discriminator.model_fn, discriminator.optimizer, mesh, rules
        )
        lecam = {"real": jax.ShapeDtypeStruct((), jnp.float32)}
        lecam["fake"] = lecam["real"]
        abstract = abstract.replace(discriminator=DiscriminatorState(*d_abstract, lecam))
        lecam_sh = {"real": replicated, "fake": replicated}
        shardings = shardings.replace(discriminator=DiscriminatorState(*d_sh, lecam_sh))
        disc_def = ModelDef(d_graphdef)
    return ModelDef(graphdef, disc_def), abstract, shardings


def init_state(
    model_fn, optimizer, shardings: TrainState, *, discriminator: Discriminator | None = None
) -> TrainState:
    """Builds the model and optimizer state directly on the mesh (no host-side copy).

    The EMA (when `shardings` has one) starts as a copy of the initial params.
    """

    def init():
        _, params, rest = split_model(model_fn())
        state = TrainState(jnp.zeros((), jnp.int32), params, rest, optimizer.init(params))
        if discriminator is not None:
            _, d_params, d_rest = split_model(discriminator.model_fn())
            lecam = {"real": jnp.zeros((), jnp.float32), "fake": jnp.zeros((), jnp.float32)}
            d_opt = discriminator.optimizer.init(d_params)
            state = state.replace(discriminator=DiscriminatorState(d_params, d_rest, d_opt, lecam))
        return state

    state = jax.jit(init, out_shardings=shardings.replace(ema_params=None))()
    if shardings.ema_params is not None:  # A real copy: params and EMA are donated separately.
        state = state.replace(ema_params=jax.tree.map(jnp.copy, state.params))
    return state


def restore_or_init(
    model_fn,
    optimizer,
    mesh: Mesh,
    rules,
    *,
    ckpt_manager,
    init_from: str | None = None,
    resume_step: int = -1,
    ema: bool = False,
    discriminator: Discriminator | None = None,
) -> tuple[ModelDef, TrainState, TrainState]:
    """Resume order: this workdir's latest checkpoint, then `init_from`, then a fresh init.

    `resume_step` >= 0 resumes from that step instead (it must exist) and moves the newer ones
    to WORKDIR/checkpoints_set_aside (`checkpoint.set_aside_newer`): the way past a damaged
    latest step, which is refused, naming the newest intact one. `init_from` (another run's
    workdir, checkpoints directory or one step's folder there) provides params and model
    state only (and the EMA, from its EMA when it kept one, else from its params); the
    optimizer, the discriminator and the step start fresh.
    """
    model_def, abstract, shardings = state_shardings(
        model_fn, optimizer, mesh, rules, ema=ema, discriminator=discriminator
    )
    target = checkpoint.abstract_with_shardings(abstract, shardings)
    step = resume_step if resume_step is not None and resume_step >= 0 else None
    restored = checkpoint.restore(ckpt_manager, target, step)
    if restored is not None:
        state, _ = restored
        if step is not None:
            checkpoint.set_aside_newer(ckpt_manager, step)
        logging.info("resumed from %s at step %d", ckpt_manager.directory, int(state.step))
        return model_def, state, shardings
    state = init_state(model_fn, optimizer, shardings, discriminator=discriminator)
    if init_from:
        state = _init_from(state, target, init_from)
    return model_def, state, shardings


def _init_from(state: TrainState, target: TrainState, init_from: str) -> TrainState:
    parts = {"params": target.params, "model_state": target.model_state}
    if target.ema_params is not None:
        parts["ema_params"] = target.ema_params
    where = os.path.normpath(init_from)  # the checkpoints folder, to name a step in it
    if os.path.basename(where).isdigit():
        where = os.path.dirname(where)
    elif os.path.isdir(os.path.join(where, "checkpoints")):
        where = os.path.join(where, "checkpoints")
    choice = "--config.init_from=" + os.path.join(where, "{step}")
    source = checkpoint.restore_parts(init_from, parts, choice=choice)
    if source is None:
        raise checkpoint.CheckpointError(
            f"config.init_from={init_from!r} holds no checkpoint; point it at a workdir "
            "(or its checkpoints/ folder) of a finished run, or set it to ''"
        )
    step = source.pop("step")
    if target.ema_params is not None:
        source.setdefault("ema_params", jax.tree.map(jnp.copy, source["params"]))
    logging.info("initialised params from %s (step %d)", init_from, step)
    return state.replace(**source)


def compile_train_step(
    step_fn, shardings: TrainState, batch_shardings, mesh: Mesh, extra_shardings=None
):
    """jit(step_fn) over (state, batch) with explicit shardings; the old state is donated.

    extra_shardings: shardings of a third argument (fixed networks' weights, e.g. LPIPS, passed
    in rather than compiled into the program as constants).
    """
    in_shardings = (shardings, batch_shardings)
    if extra_shardings is not None:
        in_shardings += (extra_shardings,)
    return jax.jit(
        step_fn,
        in_shardings=in_shardings,
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


def apply_gradients(optimizer: optax.GradientTransformation, state: TrainState, grads):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return params, opt_state


def restore_run(workdir: str, model_fn_from_config, *, mesh=None, step=None, choice=None):
    """Rebuilds a finished run from its saved config and restores its weights onto `mesh`.

    Returns (config, step, ModelDef, TrainState, shardings); mesh defaults to the run's own.
    Only params, model state and the EMA (when the run kept one) are read: no optimizer or
    discriminator state (`opt_state` is None). `choice`: how the caller picks a step, for the
    messages on a missing or damaged step (see `checkpoint.read`).
    """
    with checkpoint.finished_run(workdir) as mngr:
        return checkpoint.read(
            mngr,
            step,
            lambda at: _restore_run_at(mngr, at, model_fn_from_config, mesh),
            choice or checkpoint.ARGUMENT,
        )


def _restore_run_at(mngr, step: int, model_fn_from_config, mesh):
    config = ml_collections.ConfigDict(checkpoint.config_at(mngr, step))
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    model_fn = model_fn_from_config(config)
    graphdef, (params, rest, _), (param_sh, rest_sh, _) = _split_shardings(
        model_fn, optax.identity(), mesh, rules
    )
    abstract = checkpoint.abstract_with_shardings
    parts = {"params": abstract(params, param_sh), "model_state": abstract(rest, rest_sh)}
    parts["ema_params"] = parts["params"]
    restored = checkpoint.parts_at(mngr, parts, step)
    ema = restored.get("ema_params")
    state = TrainState(restored["step"], restored["params"], restored["model_state"], None, ema)
    shardings = TrainState(
        mesh_lib.replicated(mesh), param_sh, rest_sh, None, param_sh if ema is not None else None
    )
    return config, step, ModelDef(graphdef), state, shardings
