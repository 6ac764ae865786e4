"""Writes an ADM-format reference batch from any data source (configs/reference_batch.py).

The file is what openai/guided-diffusion's evaluator reads from its VIRTUAL_*.npz reference
batches: `arr_0` uint8 [N, H, W, 3] (the first N images of the split, in order), `arr_1` int64
labels (config.labels), and `mu`, `sigma`, `mu_s`, `sigma_s` of the pool and spatial features
computed with the `adm` Inception pipeline (models/inception.py); plus `pipeline` ('adm') and
`image_size`, which jobs/evaluate.py checks. Evaluating against it with the `pytorch_fid`
pipeline recomputes that pipeline's statistics from arr_0.

Robust: the data source is opened (and refused with the data layer's message) before any
network is loaded; images are staged in a memory-mapped temporary file, and the npz is written
to a temporary name and renamed, so an interrupted run leaves no partial reference. A rerun
with the same settings finds the finished file and returns its record; other settings are
refused (use another --workdir or --config.output).
"""

from __future__ import annotations

import json
import logging
import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils

from visual_tokenizers.core import files
from visual_tokenizers.core.data import pipeline as data
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.evaluation import metrics
from visual_tokenizers.core.evaluation.reference import global_mask, progress
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.trained import evaluation

RECORD = "reference_batch.json"
PIPELINE = "adm"  # what the ADM evaluator's statistics are


def output_path(config, workdir: str) -> str:
    if config.output:
        return config.output
    d = config.data
    name = re.sub(r"[^A-Za-z0-9]+", "_", d.source.partition(":")[2] or d.source).strip("_")
    return os.path.join(workdir, f"VIRTUAL_{name}_{d.split}{d.image_size}.npz")


def validate(config, mesh=None) -> None:
    d = config.data
    if not d.source:
        raise ConfigError("set --config.data.source (builtin:..., folder:DIR or tfds:NAME)")
    if d.num_examples < 2 or d.image_size < 1:
        raise ConfigError(
            f"config.data.num_examples={d.num_examples} must be at least 2 (FID needs a "
            f"covariance) and image_size={d.image_size} positive"
        )
    if mesh is not None and d.batch_size % mesh_lib.batch_parallelism(mesh):
        raise ConfigError(
            f"config.data.batch_size={d.batch_size} must be a multiple of the data x fsdp mesh "
            f"size {mesh_lib.batch_parallelism(mesh)}"
        )


def run(config, workdir: str) -> dict:
    mesh = mesh_lib.make_mesh(config.mesh)
    validate(config, mesh)
    d = config.data
    source = data.make_source(d.source, d.split, image_size=d.image_size, data_dir=d.data_dir)
    path, record = output_path(config, workdir), os.path.join(workdir, RECORD)
    settings = files.as_json(config.to_dict())
    if os.path.isfile(record):
        with open(record) as f:
            old = json.load(f)
        files.refuse_other_settings(
            old["settings"],
            settings,
            what=f"the reference batch of {workdir}",
            fix="Use a fresh --workdir (or --config.output) for other settings.",
        )
        if os.path.isfile(old["result"]["path"]):
            logging.info("reference_batch: %s already written", old["result"]["path"])
            return old["result"]
    num = min(d.num_examples, len(source))
    space = evaluation.feature_spaces((PIPELINE,), mesh, inception_path=config.weights.inception)
    stage = files.temp_path(path + ".images.npy")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        result = _write(config, path, space[0], num, stage)
    finally:
        if os.path.exists(stage):
            os.remove(stage)
    if jax.process_index() == 0:
        files.write_json(record, {"settings": settings, "result": result})
    logging.info("reference_batch: %d images and adm statistics in %s", result["images"], path)
    return result


def _write(config, path: str, space, num: int, stage: str) -> dict:
    """Streams the source once: images into `stage`, adm features kept; then the npz."""
    d = config.data
    batches = data.batches(
        d.source,
        split=d.split,
        image_size=d.image_size,
        global_batch_size=d.batch_size,
        train=False,
        seed=config.seed,
        data_dir=d.data_dir or None,
    )
    main = jax.process_index() == 0
    shape = (num, d.image_size, d.image_size, 3)
    images = np.lib.format.open_memmap(stage, "w+", np.uint8, shape) if main else None
    features, labels, seen = {"pool": [], "spatial": []}, [], 0
    for batch in progress(batches, f"{d.source}:{d.split}"):
        mask = global_mask(batch["mask"], num - seen)
        out = space.apply(batch["image"])
        for kind in features:
            features[kind].append(out[kind][mask])
        gathered = multihost_utils.process_allgather(
            {"image": batch["image"], "label": batch["label"]}, tiled=True
        )
        count = int(mask.sum())
        if main:
            images[seen : seen + count] = np.asarray(gathered["image"])[mask]
        labels.append(np.asarray(gathered["label"])[mask])
        seen += count
        if seen >= num:
            break
    batches.close()
    if seen < 2:
        raise data.DataError(
            f"{d.source}:{d.split} gave {seen} readable image(s); a reference batch needs at "
            "least 2 (check data.source, data.split and data.data_dir)"
        )
    pool, spatial = (np.concatenate(features[k]) for k in ("pool", "spatial"))
    mu, sigma = metrics.gaussian_stats(pool)
    mu_s, sigma_s = metrics.gaussian_stats(spatial)
    extra = {"arr_1": np.concatenate(labels).astype(np.int64)} if config.labels else {}
    if main:
        images.flush()
        metrics.save_stats(
            path,
            pipeline=PIPELINE,
            image_size=d.image_size,
            arr_0=images[:seen],
            mu=mu,
            sigma=sigma,
            mu_s=mu_s,
            sigma_s=sigma_s,
            **extra,
        )
    return {"path": os.path.abspath(path), "images": seen, "pipeline": PIPELINE}
