"""Train a tokenizer (encoder -> quantizer -> decoder) on reconstruction + quantizer losses.

run(config, workdir) builds the model from the config, resumes or initialises it on the mesh,
runs the shared loop (core/runtime/loop.py) and ends with a held-out evaluation: PSNR, SSIM and
codebook usage, plus a PNG grid of originals over reconstructions under WORKDIR/images.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
from flax import nnx

from visual_tokenizers.core.data import pipeline as data
from visual_tokenizers.core.data.images import save_grid
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.runtime import resume
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.core.runtime.job import TrainingJob
from visual_tokenizers.models import lpips, teacher
from visual_tokenizers.tokenizers import training
from visual_tokenizers.trained import builders, evaluation
from visual_tokenizers.trained.restored import choose_weights

make_train_step = training.make_train_step  # the step every tokenizer family trains with


def perceptual_network(config):
    """(LPIPS graphdef, its weights) when loss.perceptual_weight > 0, else (None, None)."""
    if not config.loss.perceptual_weight:
        return None, None
    # Default matmul precision: a training loss, unlike the LPIPS metric.
    model, files = lpips.load_lpips(
        config.loss.lpips_vgg16 or None,
        config.loss.lpips_weights or None,
        precision=jax.lax.Precision.DEFAULT,
    )
    logging.info("perceptual loss: LPIPS from %s", files)
    graphdef, weights = nnx.split(model)
    return graphdef, weights.to_pure_dict()


def check_inputs(config, mesh, *, fresh: bool):
    """Everything a run reads besides its own checkpoints, checked before any model is built:
    the data sources, the teacher weights (read at a fresh start only), the FID Inception (loaded
    now, kept for the rFID evaluations); returns `perceptual_network(config)` (LPIPS loaded)."""
    data.check_sources(config)
    if fresh and "teacher" in config:
        teacher.check_weights(config.teacher, warn=False)
    if config.eval.get("fid_every", 0):
        evaluation.feature_spaces(
            evaluation.fid_pipelines(config),
            mesh,
            inception_path=config.eval.get("fid_inception_weights", ""),
        )
    return perceptual_network(config)


def compile_step(config, model_fn, model_def, optimizer, disc, shardings, mesh, perceptual):
    """(jitted step(state, batch, frozen), frozen weights on the mesh) for this config;
    `perceptual` = perceptual_network(config)."""
    lpips_def, lpips_weights = perceptual
    adaptive_path = None
    if config.loss.adaptive_weight:
        adaptive_path = training.output_kernel_path(nnx.eval_shape(model_fn))
    step_fn = make_train_step(
        model_def,
        optimizer,
        config.loss.to_dict(),
        discriminator_optimizer=disc.optimizer if disc else None,
        ema_decay=config.ema_decay,
        ema_warmup=config.ema_warmup,
        lpips_def=lpips_def,
        adaptive_path=adaptive_path,
    )
    replicated = mesh_lib.replicated(mesh)
    frozen = jax.device_put({"lpips": lpips_weights} if lpips_weights else {}, replicated)
    batch_sh = {"image": mesh_lib.batch_sharding(mesh, 4)}
    jitted = ts.compile_train_step(step_fn, shardings, batch_sh, mesh, extra_shardings=replicated)
    return jitted, frozen


def evaluate(config, state, eval_step, mesh, workdir, step, *, vocab):
    """Reconstructs up to config.eval.num_examples held-out images; returns mean metrics."""
    params, _ = choose_weights(state)  # the EMA when the run keeps one

    def reconstruct(batch):
        return eval_step(params, state.model_state, batch)

    out = evaluation.reconstruction_pass(
        reconstruct,
        data.held_out_batches(config),
        config.eval.num_examples,
        mesh,
        vocab,
        keep_first=True,
        empty=f"evaluation split {config.eval.split!r} gave no images",
    )
    if jax.process_index() == 0:
        path = os.path.join(workdir, "images", f"reconstructions_{step:07d}.png")
        save_grid(path, [out["first_originals"], out["first_reconstructions"]])
    result = {"psnr": float(out["psnr"].mean()), "ssim": float(out["ssim"].mean())}
    result.update(out["codebook"])
    result["num_examples"] = len(out["psnr"])
    result.update(_maybe_rfid(config, reconstruct, mesh, step))
    logging.info(
        "eval at step %d on %d images: PSNR %.2f dB, SSIM %.4f, codebook usage %.3f, "
        "perplexity %.1f",
        step,
        result["num_examples"],
        result["psnr"],
        result["ssim"],
        result["codebook_usage"],
        result["codebook_perplexity"],
    )
    return result


def _maybe_rfid(config, reconstruct, mesh, step) -> dict:
    """{'rfid_<pipeline>': ...} when config.eval.fid_every asks for it at this step, else {}."""
    every = config.eval.get("fid_every", 0)
    if not every or (step % every and step < config.num_steps):
        return {}
    rfid = evaluation.training_rfid(config, reconstruct, mesh)
    num = config.eval.fid_num_examples
    shown = ", ".join(f"{k.removeprefix('rfid_')} {v:.3f}" for k, v in rfid.items())
    logging.info("eval at step %d: rFID (per pipeline) %s on %d images", step, shown, num)
    return rfid


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
    fresh = not resume.has_checkpoint(workdir) and not config.init_from
    perceptual = check_inputs(config, mesh, fresh=fresh)
    model_fn = builders.model_fn_from_config(config)
    optimizer = builders.optimizer_from_config(config)
    disc = builders.discriminator_from_config(config)
    load_teacher = None
    if "teacher" in config:  # dual tokenizer: load the frozen teacher once
        load_teacher = functools.partial(teacher.init_train_state, teacher_cfg=config.teacher)
    model_def, state, shardings = job.restore_or_init(
        model_fn,
        optimizer,
        ema=config.ema_decay > 0,
        discriminator=disc,
        on_fresh_init=load_teacher,
    )
    batch_sh = {"image": mesh_lib.batch_sharding(mesh, 4)}
    train_step, frozen = compile_step(
        config, model_fn, model_def, optimizer, disc, shardings, mesh, perceptual
    )
    eval_step = jax.jit(
        evaluation.make_eval_step(model_def),
        in_shardings=(shardings.params, shardings.model_state, batch_sh),
    )
    eval_fn = functools.partial(
        evaluate,
        config,
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
        checkpoint_meta=functools.partial(training.ema_record, config.ema_decay, config.ema_warmup),
    )
    step = int(outcome.state.step)
    if outcome.stopped_early:
        return {"step": step, "stopped_early": True, **outcome.metrics}
    return {"step": step, **outcome.metrics, **{f"eval/{k}": v for k, v in outcome.final.items()}}
