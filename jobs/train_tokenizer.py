"""Train a tokenizer (encoder -> quantizer -> decoder) on reconstruction + quantizer losses.

run(config, workdir) builds the model from the config, resumes or initialises it on the mesh,
runs the shared loop (core/loop.py) and ends with a held-out evaluation: PSNR, SSIM and codebook
usage, plus a PNG grid of originals over reconstructions under WORKDIR/images.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from visual_tokenizers.core.data import pipeline as data
from visual_tokenizers.core.data.images import save_grid, to_model
from visual_tokenizers.core.evaluation import metrics
from visual_tokenizers.core.runtime import checkpoint, optim
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.core.runtime.job import TrainingJob
from visual_tokenizers.models.discriminator import DISCRIMINATORS, build_discriminator
from visual_tokenizers.tokenizers import training
from visual_tokenizers.tokenizers.tokenizer import DTYPES, build_tokenizer

make_train_step = training.make_train_step  # the step every tokenizer family trains with


def model_fn_from_config(config):
    m = config.model
    return functools.partial(
        build_tokenizer,
        architecture=m.architecture,
        image_size=config.data.image_size,
        latent_dim=m.latent_dim,
        encoder=m.encoder.to_dict(),
        decoder=m.decoder.to_dict(),
        quantizer=config.quantizer.to_dict(),
        dtype=m.dtype,
        seed=config.seed,
    )


def optimizer_from_config(config):
    return optim.make_optimizer(**config.optimizer.to_dict(), total_steps=config.num_steps)


def discriminator_from_config(config) -> ts.Discriminator | None:
    """The discriminator and its optimizer, or None when loss.adversarial_weight is 0."""
    if not config.loss.adversarial_weight:
        return None
    name = config.discriminator.name
    if name not in DISCRIMINATORS:
        raise ValueError(
            f"discriminator.name {name!r} is unknown; choose one of {sorted(DISCRIMINATORS)}"
        )
    model_fn = functools.partial(
        build_discriminator,
        name=name,
        image_size=config.data.image_size,
        seed=config.seed + 1,
        dtype=DTYPES[config.model.dtype],
        **config.discriminator[name].to_dict(),
    )
    optimizer = optim.make_optimizer(
        **config.discriminator_optimizer.to_dict(), total_steps=config.num_steps
    )
    return ts.Discriminator(model_fn, optimizer)


def perceptual_network(config):
    """(LPIPS graphdef, its weights) when loss.perceptual_weight > 0, else (None, None)."""
    if not config.loss.perceptual_weight:
        return None, None
    from visual_tokenizers.models import (
        lpips,  # Lazy: only runs with a perceptual loss read the VGG weights.
    )

    # Default matmul precision: a training loss, unlike the LPIPS metric.
    model, files = lpips.load_lpips(
        config.loss.lpips_vgg16 or None,
        config.loss.lpips_weights or None,
        precision=jax.lax.Precision.DEFAULT,
    )
    logging.info("perceptual loss: LPIPS from %s", files)
    graphdef, weights = nnx.split(model)
    return graphdef, weights.to_pure_dict()


def compile_step(config, model_fn, model_def, optimizer, disc, shardings, mesh):
    """(jitted step(state, batch, frozen), frozen weights on the mesh) for this config."""
    lpips_def, lpips_weights = perceptual_network(config)
    adaptive_path = None
    if config.loss.adaptive_weight:
        adaptive_path = training.output_kernel_path(nnx.eval_shape(model_fn))
    step_fn = make_train_step(
        model_def,
        optimizer,
        config.loss.to_dict(),
        discriminator_optimizer=disc.optimizer if disc else None,
        ema_decay=config.ema_decay,
        lpips_def=lpips_def,
        adaptive_path=adaptive_path,
    )
    replicated = mesh_lib.replicated(mesh)
    frozen = jax.device_put({"lpips": lpips_weights} if lpips_weights else {}, replicated)
    batch_sh = {"image": mesh_lib.batch_sharding(mesh, 4)}
    jitted = ts.compile_train_step(step_fn, shardings, batch_sh, mesh, extra_shardings=replicated)
    return jitted, frozen


def eval_params(state: ts.TrainState) -> dict:
    """The weights evaluation, grids and export use: the EMA when the run keeps one."""
    return state.ema_params if state.ema_params is not None else state.params


def make_eval_step(model_def: ts.ModelDef):
    def eval_step(params, model_state, batch):
        model = model_def.merge(params, model_state)
        reconstructions, quantized = model(to_model(batch["image"]), train=False)
        recon_uint8 = jnp.clip(jnp.round((reconstructions + 1.0) * 127.5), 0, 255)
        psnr, ssim = metrics.psnr_ssim(batch["image"], recon_uint8)
        return {
            "psnr": psnr,
            "ssim": ssim,
            "indices": quantized.indices,
            "reconstruction": recon_uint8.astype(jnp.uint8),
        }

    return eval_step


def evaluate(config, model_def, state, eval_step, mesh, workdir, step, *, vocab):
    """Reconstructs up to config.eval.num_examples held-out images; returns mean metrics."""
    psnrs, ssims = [], []
    stats = metrics.CodebookStats(vocab.size, vocab)
    batches = data.held_out_batches(config)
    seen = 0
    for host_batch in batches:
        if seen >= config.eval.num_examples:
            break
        out = eval_step(eval_params(state), state.model_state, _to_global(host_batch, mesh))
        out = multihost_utils.process_allgather(out, tiled=True)
        mask = multihost_utils.process_allgather(host_batch["mask"], tiled=True).astype(bool)
        mask &= np.arange(len(mask)) < config.eval.num_examples - seen
        if seen == 0:
            originals = multihost_utils.process_allgather(host_batch["image"], tiled=True)
            if jax.process_index() == 0:
                path = os.path.join(workdir, "images", f"reconstructions_{step:07d}.png")
                save_grid(path, [originals[mask], out["reconstruction"][mask]])
        psnrs.append(out["psnr"][mask])
        ssims.append(out["ssim"][mask])
        stats.update(out["indices"][mask])
        seen += int(mask.sum())
    if seen == 0:
        raise data.DataError(f"evaluation split {config.eval.split!r} gave no images")
    result = {
        "psnr": float(np.concatenate(psnrs).mean()),
        "ssim": float(np.concatenate(ssims).mean()),
    }
    result.update(stats.result())
    result["num_examples"] = seen
    result.update(_maybe_rfid(config, state, eval_step, mesh, step))
    logging.info(
        "eval at step %d on %d images: PSNR %.2f dB, SSIM %.4f, codebook usage %.3f, "
        "perplexity %.1f",
        step,
        seen,
        result["psnr"],
        result["ssim"],
        result["codebook_usage"],
        result["codebook_perplexity"],
    )
    return result


def _maybe_rfid(config, state, eval_step, mesh, step) -> dict:
    """{'rfid': ...} when config.eval.fid_every asks for it at this step, else {}."""
    every = config.eval.get("fid_every", 0)
    if not every or (step % every and step < config.num_steps):
        return {}
    from visual_tokenizers.jobs import (
        evaluate as evaluate_job,  # Lazy: only runs that ask for rFID load Inception.
    )

    rfid = evaluate_job.training_rfid(
        config, lambda batch: eval_step(eval_params(state), state.model_state, batch), mesh
    )
    num = config.eval.fid_num_examples
    logging.info("eval at step %d: rFID %.3f on %d images", step, rfid, num)
    return {"rfid": rfid}


def _to_global(host_batch, mesh):
    return mesh_lib.host_batch_to_global({"image": host_batch["image"]}, mesh)


def run(config, workdir: str) -> dict:
    job = TrainingJob.start(
        config,
        workdir,
        {
            "data.batch_size": config.data.batch_size,
            "eval.batch_size": config.eval.batch_size,
        },
    )
    mesh = job.mesh
    model_fn = model_fn_from_config(config)
    optimizer = optimizer_from_config(config)
    disc = discriminator_from_config(config)
    load_teacher = None
    if "teacher" in config:  # dual tokenizer: load the frozen teacher once
        from visual_tokenizers.models import teacher

        load_teacher = functools.partial(teacher.init_train_state, teacher_cfg=config.teacher)
    model_def, state, shardings = job.restore_or_init(
        model_fn,
        optimizer,
        ema=config.ema_decay > 0,
        discriminator=disc,
        on_fresh_init=load_teacher,
    )
    batch_sh = {"image": mesh_lib.batch_sharding(mesh, 4)}
    train_step, frozen = compile_step(config, model_fn, model_def, optimizer, disc, shardings, mesh)
    eval_step = jax.jit(
        make_eval_step(model_def),
        in_shardings=(shardings.params, shardings.model_state, batch_sh),
    )
    eval_fn = functools.partial(
        evaluate,
        config,
        model_def,
        eval_step=eval_step,
        mesh=mesh,
        workdir=workdir,
        vocab=nnx.eval_shape(model_fn).vocab,
    )
    outcome = job.train(
        state,
        lambda s, b: train_step(s, {"image": b["image"]}, frozen),
        data.training_batches(config, start_step=int(state.step)),
        eval_every=config.eval_every,
        evaluate=lambda s, step: eval_fn(state=s, step=step),
        finish=lambda s: eval_fn(state=s, step=int(s.step)),
    )
    step = int(outcome.state.step)
    if outcome.stopped_early:
        return {"step": step, "stopped_early": True, **outcome.metrics}
    return {"step": step, **outcome.metrics, **{f"eval/{k}": v for k, v in outcome.final.items()}}


@dataclasses.dataclass
class TrainedTokenizer:
    """A tokenizer restored from a training workdir, placed on a mesh.

    `model()` merges it into an nnx module (for eager use); jitted code should take `params` and
    `model_state` as arguments with `shardings` and call `model_def.merge` inside.
    """

    config: ml_collections.ConfigDict
    step: int
    model_def: ts.ModelDef
    params: dict
    model_state: dict
    shardings: ts.TrainState
    ema_params: dict | None = None  # the generator EMA, when the run kept one

    def model(self):
        return self.model_def.merge(self.params, self.model_state)


def load_tokenizer(workdir: str, mesh=None, step: int | None = None) -> TrainedTokenizer:
    """Restores the tokenizer of a training run (its saved config rebuilds the model)."""
    config, step, model_def, state, shardings = ts.restore_run(
        workdir, model_fn_from_config, mesh=mesh, step=step
    )
    return TrainedTokenizer(
        config, step, model_def, state.params, state.model_state, shardings, state.ema_params
    )


def save_untrained(config, workdir: str) -> None:
    """A step-0 checkpoint of `config`'s tokenizer, written as a training run writes it:
    what export, MaskGIT and sampling tests and benchmarks load without training first."""
    model_fn, optimizer = model_fn_from_config(config), optimizer_from_config(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    _, _, shardings = ts.state_shardings(model_fn, optimizer, mesh, rules)
    state = ts.init_state(model_fn, optimizer, shardings)
    manager = checkpoint.manager(workdir, keep=1, async_save=False)
    checkpoint.save(manager, 0, state, config.to_dict())
    manager.close()
