"""Evaluate a tokenizer checkpoint or a set of generated samples; see README "Evaluation protocol".

config.mode = 'tokenizer': reconstruct a data split with a train_tokenizer run's checkpoint ->
  rfid_<pipeline>, sfid_<pipeline>, kid_<pipeline>, psnr, ssim, lpips, codebook_usage/perplexity
  (+ fd_dinov2, shapes_accuracy, shapes_fd).
config.mode = 'samples': an ADM-format npz (arr_0 uint8 NHWC, arr_1 labels) -> gfid_<pipeline>,
  sfid_<pipeline>, kid_<pipeline>, inception_score, precision, recall (+ fd_dinov2, shapes_*)
  against a reference npz (statistics and/or arr_0 images: an ADM reference batch, or one from
  jobs/reference_batch.py) or the cached statistics of a data source.
Each image batch is decoded once and goes through both Inception pipelines (config.pipelines);
rFID and gFID are the same code (core/evaluation/scores.py). IS and precision/recall use the
`adm` features (ADM tables). A reference is only compared in the pipeline its statistics were
made with, and one of another image size is refused (core/evaluation/reference.py).
Results go to WORKDIR/metrics.json (strict JSON: a number that is not finite is null; the
`pipeline_of` entry names the features behind every number), WORKDIR/report.md (one table,
both pipelines side by side, with the sample count and the reference) and the console. The
networks run jitted with the batch sharded over the mesh (core.evaluation.metrics.ShardedApply).

The shapes signals (`shapes_accuracy`, `shapes_fd`; metric 'shapes') come from a classifier of
the 10 classes of builtin:shapes and builtin:shapes_plain, so they mean nothing on other images
(a photograph scores shapes_accuracy 0). They are computed only where they apply:
  tokenizer mode: when the evaluated data source is builtin:shapes or builtin:shapes_plain;
  samples mode: unless the file says it shows other classes: jobs/sample.py's samples.json next
    to a samples.npz lists class names other than the shape classes, or arr_1 holds labels
    outside the shape classes 0..9. When nothing tells (a bare npz, no or in-range labels) they
    are computed as asked, and metrics.json says so in `shapes_unverified`.
Where they do not apply they are skipped, not computed: a logged warning and `shapes_skipped` in
metrics.json say why.

Degenerate inputs are refused with a DataError naming the file or data and the fix: an empty or
malformed samples file (core/evaluation/npz_images.py), labels that do not match the images, and
fewer images than a statistic needs (FID, sFID, FD-DINOv2 and shapes_fd: 2, precision/recall:
more than pr_k, KID: kid.subset_size on each side).
"""

from __future__ import annotations

import collections
import json
import logging
import os

import jax
import numpy as np

from visual_tokenizers.configs import shapes_classifier
from visual_tokenizers.configs.evaluate import PIPELINES, SAMPLE_METRICS, TOKENIZER_METRICS
from visual_tokenizers.core import files
from visual_tokenizers.core.data import pipeline as data
from visual_tokenizers.core.data.builtin import SHAPE_CLASSES
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.evaluation import metrics, scores
from visual_tokenizers.core.evaluation import report as report_lib
from visual_tokenizers.core.evaluation.reference import Reference, progress, source_outputs
from visual_tokenizers.core.runtime import checkpoint
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.trained import evaluation
from visual_tokenizers.trained.classifier import TrainedClassifier
from visual_tokenizers.trained.restored import ema_choice, step_choice
from visual_tokenizers.trained.tokenizer import STEP_KEY, TrainedTokenizer


def validate(config) -> None:
    """Raises a ValueError naming the bad setting."""
    allowed = {"tokenizer": TOKENIZER_METRICS, "samples": SAMPLE_METRICS}.get(config.mode)
    if allowed is None:
        raise ConfigError(f"config.mode={config.mode!r}; use 'tokenizer' or 'samples'")
    unknown = [m for m in config.metrics if m not in allowed]
    if unknown:
        raise ConfigError(
            f"config.metrics {unknown} not available in mode {config.mode!r}: {allowed}"
        )
    if config.mode == "tokenizer" and not config.tokenizer.workdir:
        raise ConfigError("mode 'tokenizer' needs --config.tokenizer.workdir=<train_tokenizer run>")
    if config.mode == "samples" and not config.samples.path:
        raise ConfigError("mode 'samples' needs --config.samples.path=<npz with arr_0>")
    for key in ("num_examples", "pr_k", "is_split_size"):
        if config[key] < 1:
            raise ConfigError(f"config.{key}={config[key]} must be at least 1")
    pipelines = tuple(config.pipelines)
    if not pipelines or len(set(pipelines)) < len(pipelines) or set(pipelines) - set(PIPELINES):
        raise ConfigError(
            f"config.pipelines={pipelines!r}: give one or both of {PIPELINES}, once each"
        )
    if config.kid.subset_size < 2 or config.kid.subsets < 1:
        raise ConfigError(
            f"config.kid: subset_size={config.kid.subset_size} must be at least 2 (an unbiased "
            f"MMD needs two images per side) and subsets={config.kid.subsets} at least 1"
        )


def run(config, workdir: str) -> dict:
    validate(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    for name, size in (("data", config.data.batch_size), ("samples", config.samples.batch_size)):
        if size % mesh_lib.batch_parallelism(mesh):
            raise ConfigError(
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


# ----------------------------------------------------------------------------- degenerate inputs

SHAPES_SOURCES = ("builtin:shapes", "builtin:shapes_plain")  # the shapes classifier's images
SAMPLES_RECORD = "samples.json"  # what jobs/sample.py writes next to its samples.npz
REPORT = "report.md"


def check_count(n: int, wanted: set, config, what: str) -> None:
    """Raises a DataError when `n` images are too few for a statistic in `wanted`."""
    need = scores.minimum_counts(pr_k=config.pr_k, kid_subset_size=config.kid.subset_size)
    need["shapes"] = ("shapes_fd", 2)
    short = [f"{name} needs at least {least}" for m, (name, least) in need.items()
             if m in wanted and n < least]  # fmt: skip
    if short:
        raise data.DataError(
            f"{what} gives {n} image(s): {'; '.join(short)}. Evaluate more images, or leave "
            "those metrics out of config.metrics"
        )


def shapes_skip_for_source(spec: str) -> str | None:
    """Why the shapes signals do not apply to reconstructions of `spec`, or None."""
    if spec in SHAPES_SOURCES:
        return None
    return (
        f"the evaluated data {spec} is not builtin:shapes or builtin:shapes_plain, whose 10 "
        "classes are all the shapes classifier knows"
    )


def shapes_skip_for_samples(reader) -> tuple[str | None, str | None]:
    """(why the shapes signals do not apply to the samples, or None; if they may: a note when
    nothing confirms the samples show the shape classes)."""
    folder, name = os.path.split(os.path.abspath(reader.path))
    record = os.path.join(folder, SAMPLES_RECORD)
    names = None
    if name == "samples.npz" and os.path.isfile(record):
        with open(record) as f:
            names = json.load(f).get("class_names") or None
    if names is not None:
        if [str(n) for n in names] == list(SHAPE_CLASSES[: len(names)]):  # a model may use fewer
            return None, None
        shown = ", ".join(map(str, names[:3])) + (", ..." if len(names) > 3 else "")
        return f"{record} says the samples show the classes {shown}, not builtin shapes", None
    labels, classes = reader.labels, len(SHAPE_CLASSES)
    if labels is not None and (labels.min() < 0 or labels.max() >= classes):
        return (
            f"arr_1 of {reader.path} holds labels {labels.min()}..{labels.max()}, not the "
            f"{classes} shape classes 0..{classes - 1}: these are not samples of builtin:shapes",
            None,
        )
    return None, (
        f"nothing says what {reader.path} shows; shapes_* assume samples of the builtin:shapes "
        "classes (arr_1 = class id, as jobs/sample.py writes)"
    )


def _skip_shapes(results: dict, reason: str) -> None:
    logging.warning("evaluate: shapes_accuracy and shapes_fd skipped: %s", reason)
    results["shapes_skipped"] = reason


# ----------------------------------------------------------------------------- tokenizer mode


def _tokenizer_data(config) -> tuple[str, str, int, str]:
    """(source, split, image size, data_dir) to evaluate on: config.data's, else those of the
    run's own held-out pass (read from its saved config, without restoring its weights)."""
    step = None if config.tokenizer.step < 0 else config.tokenizer.step
    choice = step_choice(STEP_KEY)
    _, saved = checkpoint.read_config(config.tokenizer.workdir, step, choice)
    d, held_out = saved["data"], saved["eval"]
    spec, split = config.data.source or held_out["source"], config.data.split or held_out["split"]
    size = config.data.image_size or d["image_size"]
    return spec, split, size, config.data.data_dir or d.get("data_dir", "")


def evaluate_tokenizer(config, workdir: str, mesh) -> dict:
    """Reconstructs config.num_examples images with a trained tokenizer and measures them.
    The data and the metric networks are found before the tokenizer is restored."""
    spec, split, size, data_dir = _tokenizer_data(config)
    data.make_source(spec, split, image_size=size, data_dir=data_dir or None)
    wanted, results = set(config.metrics), {"tokenizer": os.path.abspath(config.tokenizer.workdir)}
    skip = shapes_skip_for_source(spec) if "shapes" in wanted else None
    if skip:
        _skip_shapes(results, skip)
        wanted.discard("shapes")
    check_count(config.num_examples, wanted, config, "config.num_examples")
    spaces, reference = _features_and_reference(
        config, mesh, wanted, source=(spec, split, size, config.num_examples, data_dir), size=size
    )
    from_originals = reference is not None and reference.from_originals
    nets = dict(
        spaces=spaces,
        originals=from_originals and bool(reference.missing()),
        lpips=evaluation.lpips_apply(config.weights.vgg16, config.weights.lpips, mesh)
        if "lpips" in wanted
        else None,
        shapes=shapes_apply(config, workdir, mesh) if "shapes" in wanted else None,
    )
    if reference is not None and reference.missing() and not from_originals:
        reference.compute_from_source()
    step = None if config.tokenizer.step < 0 else config.tokenizer.step
    use_ema = ema_choice(config.tokenizer.use_ema)
    tok = TrainedTokenizer.from_workdir(config.tokenizer.workdir, step, use_ema, mesh)
    results["step"] = tok.step
    eval_step = jax.jit(
        evaluation.make_eval_step(tok.model_def),
        in_shardings=(tok.shardings.params, tok.shardings.model_state, None),
    )
    reconstruct = lambda batch: eval_step(tok.params, tok.model_state, batch)  # noqa: E731
    batches = data.batches(
        spec,
        split=split,
        image_size=size,
        global_batch_size=config.data.batch_size,
        train=False,
        seed=config.seed,
        data_dir=data_dir or None,
    )
    where = f"{spec}:{split}"
    empty = f"{where} gave no image to evaluate (empty, or every image unreadable); check data.*"
    out = evaluation.reconstruction_pass(
        reconstruct, batches, config.num_examples, mesh, tok.vocab, empty=empty, **nets
    )
    check_count(len(out["psnr"]), wanted, config, where)
    results.update(data=f"{where} at {size}px", num_examples=len(out["psnr"]))
    if reference is not None and reference.missing():
        reference.set_from_outputs(out["reference_features"])
    return {**results, **_measured(config, out, wanted, reference, spaces, nets["shapes"])}


def _features_and_reference(config, mesh, wanted: set, *, source, size):
    """(the feature spaces the metrics in `wanted` use, their Reference or None)."""
    pipelines = tuple(config.pipelines)
    names = scores.spaces_used(wanted, pipelines)
    spaces = evaluation.feature_spaces(
        names,
        mesh,
        inception_path=config.weights.inception,
        dinov2_path=config.weights.dinov2,
    )
    needs = scores.needs(wanted, pipelines)
    if not needs:
        return spaces, None
    reference = Reference(
        spaces,
        needs,
        source=source,
        reference=config.reference.to_dict(),
        image_size=size,
        batch_size=config.data.batch_size
        if config.mode == "tokenizer"
        else config.samples.batch_size,
        seed=config.seed,
    )
    return spaces, reference


def _distribution_metrics(config, features: dict, wanted: set, reference, spaces, name) -> dict:
    """FID/sFID/KID per pipeline, IS, precision/recall, FD-DINOv2 (scores.compare), with the
    pipelines, the reference and the weights they came from."""
    settings = dict(
        fid_name=name,
        pr_k=config.pr_k,
        is_split_size=config.is_split_size,
        kid_subsets=config.kid.subsets,
        kid_subset_size=config.kid.subset_size,
    )
    pipelines = tuple(config.pipelines)
    results = scores.compare(reference, features, wanted, pipelines, settings)
    if reference is not None:
        results["reference"] = reference.describe()
    for space in spaces:
        key = "dinov2_sha256" if space.name == scores.DINOV2 else "inception_sha256"
        results[key] = space.sha
    results["pipelines"] = [p for p in pipelines if any(s.name == p for s in spaces)]
    return results


def _measured(config, out: dict, wanted: set, reference, spaces, shapes) -> dict:
    """The tokenizer-mode numbers from the reconstruction pass's outputs."""
    results = {key: float(np.mean(out[key])) for key in ("psnr", "ssim", "lpips") if key in out}
    results = {key: value for key, value in results.items() if key in wanted}
    if "usage" in wanted:
        results.update(out["codebook"])
    if spaces:
        features = out["features"]
        results.update(_distribution_metrics(config, features, wanted, reference, spaces, "rfid"))
    if shapes is not None:
        results["shapes_accuracy"] = float(np.mean(out["shapes_correct"]))
        results["shapes_fd"] = metrics.frechet_distance_of(
            out["shapes_features"], out["shapes_reference"]
        )
    return results


# ----------------------------------------------------------------------------- samples mode


def evaluate_samples(config, workdir: str, mesh) -> dict:
    """gFID, IS, precision/recall and shapes signals of an ADM-format sample file."""
    wanted = set(config.metrics)
    reader = metrics.NpzImages(config.samples.path, "samples file")
    results = {"samples": os.path.abspath(config.samples.path), "num_samples": reader.num_images}
    skip, unverified = shapes_skip_for_samples(reader) if "shapes" in wanted else (None, None)
    if skip:
        _skip_shapes(results, skip)
        wanted.discard("shapes")
    elif unverified:
        logging.warning("evaluate: shapes_accuracy and shapes_fd unverified: %s", unverified)
        results["shapes_unverified"] = unverified
    check_count(reader.num_images, wanted, config, f"samples file {config.samples.path}")
    spaces, reference = _features_and_reference(
        config, mesh, wanted, source=None, size=reader.image_size
    )
    if reference is not None and reference.missing():
        reference.compute_from_source()
    shapes = shapes_apply(config, workdir, mesh) if "shapes" in wanted else None
    out = collections.defaultdict(list)
    size = config.samples.batch_size
    for images, count in progress(reader.batches(size), "samples", reader.num_batches(size)):
        for space in spaces:  # one read of each batch, every feature space
            for key, value in space.apply.replicated(images).items():
                out[f"{space.name}/{key}"].append(value[:count])
        if shapes is not None:
            for key, value in shapes.replicated(images).items():
                out[f"shapes_{key}"].append(value[:count])
    out = {k: np.concatenate(v) for k, v in out.items()}
    if spaces:
        features = {}
        for key in [k for k in out if "/" in k]:
            name, kind = key.split("/")
            features.setdefault(name, {})[kind] = out.pop(key)
        results.update(_distribution_metrics(config, features, wanted, reference, spaces, "gfid"))
    if shapes is not None:
        results.update(shapes_of_samples(config, out, reader, shapes))
    return results


def shapes_of_samples(config, out: dict, reader, shapes) -> dict:
    """shapes_accuracy (needs arr_1 labels) and shapes_fd against the test images of
    config.shapes.reference (builtin:shapes or builtin:shapes_plain)."""
    results = {}
    if reader.labels is not None:  # NpzImages checked: one label per image
        predicted = out["shapes_logits"].argmax(-1)
        results["shapes_accuracy"] = float((predicted == reader.labels).mean())
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
    """WORKDIR/metrics.json (strict JSON, written atomically), WORKDIR/report.md (the table of
    both pipelines, the sample count and the reference) and the same report on the console."""
    if jax.process_index() != 0:
        return
    files.write_json(os.path.join(workdir, "metrics.json"), results, default=float, indent=2)
    text = "\n".join(report_lib.lines(results))
    with files.atomic_write(os.path.join(workdir, REPORT)) as tmp, open(tmp, "w") as f:
        f.write(text)
    for line in text.splitlines():
        if line:
            logging.info("evaluate: %s", line)
