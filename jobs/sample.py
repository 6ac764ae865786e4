"""Class-conditional samples from a trained MaskGIT, decoded by its tokenizer, in ADM format.

  python run.py --config=configs/sample.py --workdir=OUT --config.maskgit.workdir=RUN

Writes OUT/samples.npz (`arr_0` uint8 NHWC, `arr_1` int labels: what jobs/evaluate.py samples
mode and the ADM evaluator read), OUT/samples.png (one row per class), optionally
OUT/grids/class_<c>.png, and OUT/samples.json (the settings, checkpoints and timings).
Sample i has class `classes[i % len(classes)]` (all classes when the list is empty); batch b is
generated from key(seed) folded with b, with the batch sharded over the mesh ('data', 'fsdp').

Resume: every finished batch is saved under OUT/.parts/ (written to a temporary name, then
renamed), so a rerun after a crash generates only the missing batches; samples.npz is written
to a temporary name and renamed last-but-one, samples.json last: its presence means done.
Rerunning with other settings on the same OUT is an error naming them.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
import time
import zipfile

import jax
import numpy as np
from jax.experimental import multihost_utils

from visual_tokenizers.core import files
from visual_tokenizers.core.data.images import save_grid
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.trained.maskgit import (
    Generator,
    TrainedMaskGIT,
    class_grid,
    labels_for,
    sample_options,
    token_ndim,
)
from visual_tokenizers.trained.restored import ema_choice
from visual_tokenizers.trained.tokenizer import TrainedTokenizer

PARTS = ".parts"
RESULT = "samples.json"


# ----------------------------------------------------------------------------- the job


def validate(config) -> None:
    if not config.maskgit.workdir:
        raise ConfigError("config.maskgit.workdir is empty: pass a jobs/train_maskgit.py workdir")
    if config.num_samples <= 0 or config.batch_size <= 0:
        raise ConfigError("config.num_samples and config.batch_size must be positive")


def run(config, workdir: str) -> dict:
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch_sizes(mesh, {"batch_size": config.batch_size})
    step = config.maskgit.step if config.maskgit.step >= 0 else None
    use_ema = ema_choice(config.maskgit.use_ema)  # its EMA weights when the run kept them
    maskgit = TrainedMaskGIT.from_workdir(config.maskgit.workdir, step, use_ema, mesh=mesh)
    r = maskgit.resolved
    classes = [int(c) for c in config.classes] or list(range(r["num_classes"]))
    bad = [c for c in classes if not 0 <= c < r["num_classes"]]
    if bad:
        raise ConfigError(f"config.classes {bad} outside the model's [0, {r['num_classes']})")
    spec = _spec(config, maskgit, classes)
    done = _finished(workdir, spec)
    if done is not None:
        logging.info("sample: %s already holds these samples; nothing to do", workdir)
        return done
    # The run the MaskGIT's tokens came from; config.tokenizer.workdir if it has moved since.
    tokenizer = TrainedTokenizer.from_record(
        r["tokenizer"], mesh, config.tokenizer.workdir, "--config.tokenizer.workdir"
    )
    options = sample_options(config)
    generator = Generator.create(maskgit.model_def, tokenizer, mesh, options, token_ndim(r))
    labels = labels_for(classes, config.num_samples)
    parts = _parts_dir(workdir, spec)
    start = time.perf_counter()
    made = _generate(config, generator, maskgit, labels, parts)
    seconds = time.perf_counter() - start
    result = {}
    if jax.process_index() == 0:
        result = _assemble(config, workdir, parts, spec, r, classes, tokenizer)
        result.update(seconds=seconds, images_per_s=made / seconds if made else float("nan"))
        _write_json(os.path.join(workdir, RESULT), result)
        shutil.rmtree(parts, ignore_errors=True)
    multihost_utils.sync_global_devices("sample: written")
    return _scalars(result)


def _scalars(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, int | float | str)}


def _spec(config, maskgit, classes) -> dict:
    """Every setting that decides the samples (a rerun with others must not mix them)."""
    return {
        "maskgit_workdir": os.path.abspath(config.maskgit.workdir),
        "maskgit_step": int(maskgit.step),
        "maskgit_weights": maskgit.weights,  # 'ema' or 'params'
        "num_samples": int(config.num_samples),
        "classes": classes,
        "batch_size": int(config.batch_size),
        "seed": int(config.seed),
        # As JSON stores them (tuples as lists), so that a rerun compares equal.
        **json.loads(json.dumps(sample_options(config))),
    }


def _finished(workdir: str, spec: dict) -> dict | None:
    path = os.path.join(workdir, RESULT)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    files.refuse_other_settings(
        done.get("spec") or {},
        spec,
        what=f"{workdir} already holds samples ({path}) made",
        fix="Rerun with the same settings, or pass a fresh --workdir (or delete it).",
    )
    return _scalars(done)


def _parts_dir(workdir: str, spec: dict) -> str:
    parts = os.path.join(workdir, PARTS)
    files.check_or_record_settings(
        os.path.join(parts, "spec.json"),
        spec,
        what=f"{parts} holds unfinished samples made",
        fix="Rerun with the original settings to finish them, or pass a fresh --workdir.",
        write=jax.process_index() == 0,
    )
    return parts


def _part(parts: str, b: int) -> str:
    return os.path.join(parts, f"batch_{b:06d}.npz")


def _generate(config, generator, maskgit, labels: np.ndarray, parts: str) -> int:
    """Generates the batches without a part file; returns the number of images made."""
    size, n = config.batch_size, len(labels)
    num_batches = math.ceil(n / size)
    todo = [b for b in range(num_batches) if not os.path.exists(_part(parts, b))]
    if len(todo) < num_batches:
        logging.info("sample: %d of %d batches already done", num_batches - len(todo), num_batches)
    key, made, start = jax.random.key(config.seed), 0, time.perf_counter()
    for i, b in enumerate(todo):
        batch = labels[b * size : (b + 1) * size]
        count = len(batch)
        padded = np.concatenate([batch, np.full(size - count, batch[0], np.int32)])
        images = generator(maskgit.params, maskgit.model_state, padded, jax.random.fold_in(key, b))
        if jax.process_index() == 0:
            _save_part(_part(parts, b), images[:count], batch)
        made += count
        rate = made / (time.perf_counter() - start)
        left = sum(len(labels[t * size : (t + 1) * size]) for t in todo[i + 1 :])
        logging.info(
            "sample: batch %d/%d (%d images), %.1f images/s, ETA %.0fs",
            b + 1,
            num_batches,
            min((b + 1) * size, n),
            rate,
            left / rate,
        )
    return made


def _save_part(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    files.save_npz(path, images=images, labels=labels)  # the temporary name is never globbed


def _assemble(config, workdir, parts, spec, resolved, classes, tokenizer) -> dict:
    """samples.npz (streamed from the parts), the PNG grids; returns the samples.json record."""
    files = sorted(glob.glob(os.path.join(parts, "batch_*.npz")))
    labels = np.concatenate([np.load(f)["labels"] for f in files])
    path = os.path.join(workdir, "samples.npz")
    shape = _write_npz(path, files, labels)
    shown = classes[: config.grid.max_classes]
    images, image_labels = _first_of_each(
        files, shown, max(config.grid.columns, config.grid.per_class)
    )
    png = save_grid(
        os.path.join(workdir, "samples.png"),
        class_grid(images, image_labels, shown, config.grid.columns),
        max_columns=config.grid.columns,
    )
    names = resolved.get("class_names") or []
    grids = {}
    for c in shown if config.grid.per_class > 0 else []:
        mine = images[image_labels == c][: config.grid.per_class]
        if not len(mine):
            continue  # fewer samples than classes
        rows = [mine[i : i + 8] for i in range(0, len(mine), 8)]
        name = f"class_{c:04d}" + (f"_{names[c]}" if c < len(names) else "")
        grids[str(c)] = save_grid(os.path.join(workdir, "grids", f"{name}.png"), rows)
    counts = np.bincount(labels, minlength=resolved["num_classes"])
    return {
        "spec": spec,
        "num_samples": int(len(labels)),
        "image_size": int(shape[1]),
        "samples": path,
        "grid": png,
        "class_grids": grids,
        "class_names": names,
        "samples_per_class": {str(c): int(counts[c]) for c in classes},
        "maskgit": {"workdir": spec["maskgit_workdir"], "step": spec["maskgit_step"]},
        "tokenizer": tokenizer.record(),
        **{k: v for k, v in spec.items() if k not in ("maskgit_workdir", "classes")},
    }


def _write_npz(path: str, part_files: list[str], labels: np.ndarray) -> tuple[int, ...]:
    """ADM npz from the part files without holding all images: arr_0 streamed into the zip."""
    with np.load(part_files[0]) as z:
        shape = (len(labels), *z["images"].shape[1:])
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
    with (
        files.atomic_write(path) as tmp,
        zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive,
    ):
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {**header, "shape": shape})
            for part in part_files:
                with np.load(part) as z:
                    f.write(np.ascontiguousarray(z["images"], np.uint8).tobytes())
        with archive.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, labels.astype(np.int64))
    return shape


def _first_of_each(files: list[str], classes, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` samples of each of `classes` (bounded memory for 1000 classes)."""
    kept, kept_labels, have = [], [], dict.fromkeys(classes, 0)
    for part in files:
        with np.load(part) as z:
            images, labels = z["images"], z["labels"]
        for c in classes:
            take = np.flatnonzero(labels == c)[: count - have[c]]
            kept.append(images[take])
            kept_labels.append(labels[take])
            have[c] += len(take)
        if all(v >= count for v in have.values()):
            break
    return np.concatenate(kept), np.concatenate(kept_labels)


def _write_json(path: str, obj) -> None:
    files.write_json(path, obj, default=float)
