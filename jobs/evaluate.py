"""Evaluate a tokenizer checkpoint or a set of generated samples; see README "Evaluation protocol".

config.mode = 'tokenizer': reconstruct a data split with a train_tokenizer run's checkpoint ->
  rfid, psnr, ssim, lpips, codebook_usage/perplexity (+ shapes_accuracy, shapes_fd).
config.mode = 'samples': an ADM-format npz (arr_0 uint8 NHWC, arr_1 labels) -> gfid,
  inception_score, precision, recall (+ shapes_accuracy, shapes_fd) against a reference npz (mu,
  sigma and/or arr_0 images) or the cached statistics of a data source.
Results go to WORKDIR/metrics.json and the console. The networks (FID Inception, LPIPS, shapes
classifier) run jitted with the batch sharded over the mesh (core.evaluation.metrics.ShardedApply).
"""

from __future__ import annotations

import collections
import json
import logging
import os

import jax
import numpy as np

from visual_tokenizers.configs import shapes_classifier
from visual_tokenizers.configs.evaluate import SAMPLE_METRICS, TOKENIZER_METRICS
from visual_tokenizers.core.data import pipeline as data
from visual_tokenizers.core.evaluation import metrics
from visual_tokenizers.core.evaluation.reference import (
    FidReference,
    progress,
    source_outputs,
)
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.trained import evaluation
from visual_tokenizers.trained.classifier import TrainedClassifier
from visual_tokenizers.trained.restored import ema_choice
from visual_tokenizers.trained.tokenizer import TrainedTokenizer


def validate(config) -> None:
    """Raises a ValueError naming the bad setting."""
    allowed = {"tokenizer": TOKENIZER_METRICS, "samples": SAMPLE_METRICS}.get(config.mode)
    if allowed is None:
        raise ValueError(f"config.mode={config.mode!r}; use 'tokenizer' or 'samples'")
    unknown = [m for m in config.metrics if m not in allowed]
    if unknown:
        raise ValueError(
            f"config.metrics {unknown} not available in mode {config.mode!r}: {allowed}"
        )
    if config.mode == "tokenizer" and not config.tokenizer.workdir:
        raise ValueError("mode 'tokenizer' needs --config.tokenizer.workdir=<train_tokenizer run>")
    if config.mode == "samples" and not config.samples.path:
        raise ValueError("mode 'samples' needs --config.samples.path=<npz with arr_0>")


def run(config, workdir: str) -> dict:
    validate(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    for name, size in (("data", config.data.batch_size), ("samples", config.samples.batch_size)):
        if size % mesh_lib.batch_parallelism(mesh):
            raise ValueError(
                f"config.{name}.batch_size={size} must be a multiple of the data x fsdp mesh "
                f"size {mesh_lib.batch_parallelism(mesh)}"
            )
    if config.mode == "tokenizer":
        results = evaluate_tokenizer(config, workdir, mesh)
    else:
        results = evaluate_samples(config, workdir, mesh)
    report(results, workdir)
    return results


# ----------------------------------------------------------------------------- networks


def shapes_apply(config, workdir: str, mesh) -> metrics.ShardedApply:
    """The shapes classifier cached in its workdir (trained there on first use)."""
    where = config.shapes.classifier_workdir or os.path.join(workdir, "shapes_classifier")
    recipe = shapes_classifier.get_config(config.shapes.classifier_variant or None)
    recipe.mesh = config.mesh
    model = TrainedClassifier.ensure(where, recipe, mesh=mesh).model()
    return metrics.ShardedApply(model, lambda m, x: m.features_and_logits(x), mesh)


# ----------------------------------------------------------------------------- tokenizer mode


def evaluate_tokenizer(config, workdir: str, mesh) -> dict:
    """Reconstructs config.num_examples images with a trained tokenizer and measures them."""
    step = None if config.tokenizer.step < 0 else config.tokenizer.step
    use_ema = ema_choice(config.tokenizer.use_ema)
    tok = TrainedTokenizer.from_workdir(config.tokenizer.workdir, step, use_ema, mesh)
    d, held_out = tok.config.data, tok.config.eval
    spec, split = config.data.source or held_out.source, config.data.split or held_out.split
    size, data_dir = config.data.image_size or d.image_size, config.data.data_dir or d.data_dir
    wanted = set(config.metrics)
    eval_step = jax.jit(
        evaluation.make_eval_step(tok.model_def),
        in_shardings=(tok.shardings.params, tok.shardings.model_state, None),
    )
    reconstruct = lambda batch: eval_step(tok.params, tok.model_state, batch)  # noqa: E731
    fid = None
    if "fid" in wanted:
        fid = FidReference(
            inception=evaluation.inception_apply(config.weights.inception, mesh),
            source=(spec, split, size, config.num_examples, data_dir),
            reference=config.reference.to_dict(),
            batch_size=config.data.batch_size,
            seed=config.seed,
            need_pool=False,
        )
        if fid.stats is None and not fid.from_originals:
            fid.compute_from_source()
    nets = dict(
        inception=fid.inception if fid else None,
        originals=fid is not None and fid.stats is None,
        lpips=evaluation.lpips_apply(config.weights.vgg16, config.weights.lpips, mesh)
        if "lpips" in wanted
        else None,
        shapes=shapes_apply(config, workdir, mesh) if "shapes" in wanted else None,
    )
    batches = data.batches(
        spec,
        split=split,
        image_size=size,
        global_batch_size=config.data.batch_size,
        train=False,
        seed=config.seed,
        data_dir=data_dir or None,
    )
    out = evaluation.reconstruction_pass(
        reconstruct, batches, config.num_examples, mesh, tok.vocab, **nets
    )
    results = {"tokenizer": os.path.abspath(config.tokenizer.workdir), "step": tok.step}
    results.update(data=f"{spec}:{split} at {size}px", num_examples=len(out["psnr"]))
    for key in ("psnr", "ssim", "lpips"):
        if key in out and (key in wanted):
            results[key] = float(np.mean(out[key]))
    if "usage" in wanted:
        results.update(out["codebook"])
    if fid is not None:
        results.update(fid.result(out, "rfid"))
    if nets["shapes"] is not None:
        results["shapes_accuracy"] = float(np.mean(out["shapes_correct"]))
        results["shapes_fd"] = metrics.frechet_distance_of(
            out["shapes_features"], out["shapes_reference"]
        )
    return results


# ----------------------------------------------------------------------------- samples mode


def evaluate_samples(config, workdir: str, mesh) -> dict:
    """gFID, IS, precision/recall and shapes signals of an ADM-format sample file."""
    wanted = set(config.metrics)
    reader = metrics.NpzImages(config.samples.path)
    inception = fid = None
    if wanted & {"fid", "is", "pr"}:
        inception, sha = evaluation.inception_apply(config.weights.inception, mesh)
    if wanted & {"fid", "pr"}:
        fid = FidReference(
            inception=(inception, sha),
            source=None,
            reference=config.reference.to_dict(),
            batch_size=config.samples.batch_size,
            seed=config.seed,
            need_pool="pr" in wanted,
        )
        if fid.stats is None:
            fid.compute_from_source()
    shapes = shapes_apply(config, workdir, mesh) if "shapes" in wanted else None
    out = collections.defaultdict(list)
    size = config.samples.batch_size
    for images, count in progress(reader.batches(size), "samples", reader.num_batches(size)):
        if inception is not None:
            for key, value in inception.replicated(images).items():
                out[key].append(value[:count])
        if shapes is not None:
            for key, value in shapes.replicated(images).items():
                out[f"shapes_{key}"].append(value[:count])
    out = {k: np.concatenate(v) for k, v in out.items()}
    results = {"samples": os.path.abspath(config.samples.path), "num_samples": reader.num_images}
    if inception is not None:
        results["inception_sha256"] = sha
    if "is" in wanted:
        results["inception_score"] = metrics.inception_score(out["logits"], config.is_split_size)
    if "fid" in wanted:
        results.update(fid.result(out, "gfid"))
    if "pr" in wanted:
        precision, recall = metrics.precision_recall(fid.pool, out["pool"], k=config.pr_k)
        results.update(precision=precision, recall=recall)
    if shapes is not None:
        results.update(shapes_of_samples(config, out, reader, shapes))
    return results


def shapes_of_samples(config, out: dict, reader, shapes) -> dict:
    """shapes_accuracy (needs arr_1 labels) and shapes_fd against the test images of
    config.shapes.reference (builtin:shapes or builtin:shapes_plain)."""
    results = {}
    if reader.labels is not None:
        predicted = out["shapes_logits"].argmax(-1)
        results["shapes_accuracy"] = float((predicted == reader.labels[: len(predicted)]).mean())
    reference = source_outputs(
        config.shapes.reference,
        "test",
        reader.image_size,
        len(out["shapes_features"]),
        batch_size=config.samples.batch_size,
        seed=config.seed,
        data_dir="",
        fn=lambda images: shapes(images)["features"],
    )
    results["shapes_fd"] = metrics.frechet_distance_of(out["shapes_features"], reference)
    return results


def report(results: dict, workdir: str) -> None:
    """WORKDIR/metrics.json plus one console line per number."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    for key, value in results.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        logging.info("evaluate: %-20s %s", key, shown)
