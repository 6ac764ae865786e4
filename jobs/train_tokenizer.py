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

from core import checkpoint, data, loop, metrics, optim
from core import mesh as mesh_lib
from core import train_state as ts
from core.images import save_grid, to_model
from tokenizers import losses
from tokenizers.tokenizer import build_tokenizer


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


def make_train_step(model_def: ts.ModelDef, optimizer, loss_config: dict):
    """The pure step: forward with quantizer state updates, losses, one optimizer update."""

    def loss_fn(params, model_state, images):
        model = model_def.merge(params, model_state)
        reconstructions, quantized = model(images, train=True)
        terms = losses.reconstruction_losses(images, reconstructions, **loss_config)
        terms.update(quantized.losses)
        total = sum(terms.values())
        logged = {f"loss/{k}": v for k, v in terms.items()}
        logged.update({f"quantizer/{k}": v for k, v in quantized.stats.items()})
        return total, (logged, ts.model_state_of(model))

    def train_step(state: ts.TrainState, batch):
        images = to_model(batch["image"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logged, model_state)), grads = grad_fn(state.params, state.model_state, images)
        params, opt_state = ts.apply_gradients(optimizer, state, grads)
        logged.update(loss=loss, grad_norm=_global_norm(grads))
        new_state = state.replace(
            step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
        )
        return new_state, logged

    return train_step


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


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
        out = eval_step(state.params, state.model_state, _to_global(host_batch, mesh))
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
        raise data.DataError(f"evaluation split {config.data.eval_split!r} gave no images")
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
    from jobs import evaluate as evaluate_job  # Lazy: only runs that ask for rFID load Inception.

    rfid = evaluate_job.training_rfid(
        config, lambda batch: eval_step(state.params, state.model_state, batch), mesh
    )
    num = config.eval.fid_num_examples
    logging.info("eval at step %d: rFID %.3f on %d images", step, rfid, num)
    return {"rfid": rfid}


def _to_global(host_batch, mesh):
    return mesh_lib.host_batch_to_global({"image": host_batch["image"]}, mesh)


def run(config, workdir: str) -> dict:
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    mesh_lib.check_batch_sizes(
        mesh,
        {
            "data.global_batch_size": config.data.global_batch_size,
            "eval.batch_size": config.eval.batch_size,
        },
    )
    model_fn = model_fn_from_config(config)
    optimizer = optimizer_from_config(config)
    ckpt = checkpoint.manager(workdir, keep=config.keep_checkpoints)
    model_def, state, shardings = ts.restore_or_init(
        model_fn, optimizer, mesh, rules, ckpt_manager=ckpt, init_from=config.init_from
    )
    batch_sh = {"image": mesh_lib.batch_sharding(mesh, 4)}
    train_step = ts.compile_train_step(
        make_train_step(model_def, optimizer, config.loss.to_dict()), shardings, batch_sh, mesh
    )
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
    batches = data.training_batches(config, start_step=int(state.step))
    writer = loop.MetricWriter(workdir)
    try:
        state, train_metrics, stopped = loop.train(
            state=state,
            step_fn=lambda s, b: train_step(s, {"image": b["image"]}),
            batches=batches,
            mesh=mesh,
            num_steps=config.num_steps,
            writer=writer,
            ckpt_manager=ckpt,
            config_dict=config.to_dict(),
            log_every=config.log_every,
            checkpoint_every=config.checkpoint_every,
            eval_every=config.eval_every,
            evaluate=lambda s, step: eval_fn(state=s, step=step),
        )
        if stopped:
            return {"step": int(state.step), "stopped_early": True, **train_metrics}
        final = eval_fn(state=state, step=int(state.step))
        writer.write(int(state.step), final, prefix="final/")
    finally:
        writer.close()
        ckpt.close()
    return {"step": int(state.step), **train_metrics, **{f"eval/{k}": v for k, v in final.items()}}


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

    def model(self):
        return self.model_def.merge(self.params, self.model_state)


def load_tokenizer(workdir: str, mesh=None, step: int | None = None) -> TrainedTokenizer:
    """Restores the tokenizer of a training run (its saved config rebuilds the model)."""
    config, step, model_def, state, shardings = ts.restore_run(
        workdir, model_fn_from_config, optimizer_from_config, mesh=mesh, step=step
    )
    return TrainedTokenizer(config, step, model_def, state.params, state.model_state, shardings)
