"""Export codebook indices of a dataset for language models; decode them back; their statistics.

  python run.py --config=configs/export_tokens.py --workdir=OUT \\
      --config.tokenizer.workdir=TOKENIZER_RUN --config.data.source=tfds:imagenet2012

`config.mode`:
  export  encodes `config.data.source`/`split` (the first `max_examples`; 0 = all) with the
          tokenizer trained in `tokenizer.workdir` (its EMA weights when the checkpoint has
          them, unless `tokenizer.use_ema` is False) into Parquet shards OUT/data/*.parquet,
          then writes the codebook .npy files, stats.json, rank_frequency.png and, last,
          OUT/manifest.json.
  decode  turns exported rows back into PNGs under OUT/decoded/ with the tokenizer's decoder.
  stats   recomputes stats.json and the plot from the shards.

Scale: batches are sharded over the mesh ('data', 'fsdp'); every process encodes its slice of
each global batch and writes its own shards (`<split>-p<process>-<shard>.parquet`). While the
device encodes batch b, core/data's threads decode the next images, the host turns batch b-1
into rows and a writer thread writes finished shards. Process 0 writes the manifest after a
sync; it reads every shard, so the output directory must be shared by all hosts.

Degenerate data: unreadable images are skipped, counted and listed in the manifest
(`unreadable_keys`); when no image at all is readable (every file tried is unreadable, or the
source is empty) the export fails with an ExportError naming the source and the counts, and
writes no manifest. stats.json and the manifest are strict JSON (a NaN statistic is null).

Resume: shard s of process p always holds the same examples (core.token_shards.Plan) and is
renamed into place only when complete, so rerunning the same command skips complete shards,
redoes partial ones and ends with every example exactly once. Rerunning on an existing OUT
with settings that change shard contents is an error naming the differing setting.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from visual_tokenizers.core.data import pipeline as data
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.runtime import checkpoint
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.tokens import manifest as manifest_lib
from visual_tokenizers.core.tokens import shards as shards_lib
from visual_tokenizers.core.tokens.layout import TokenRowLayout
from visual_tokenizers.trained.restored import ema_choice, step_choice
from visual_tokenizers.trained.tokenizer import STEP_KEY, TrainedTokenizer

MODES = ("export", "decode", "stats")


def run(config, workdir: str) -> dict:
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    if config.mode == "export":
        return export(config, workdir)
    if config.mode == "decode":
        return decode(config, workdir)
    return manifest_lib.recompute_stats(workdir, top_k=config.stats_top_k)


def validate_config(config, require_tokenizer: bool = True) -> None:
    """Raises ValueError naming the key and the fix for settings that cannot work."""
    if config.mode not in MODES:
        raise ConfigError(f"config.mode={config.mode!r} is unknown; choose one of {MODES}")
    if require_tokenizer and config.mode == "export" and not config.tokenizer.workdir:
        raise ConfigError(
            "config.tokenizer.workdir is empty: pass the workdir of a tokenizer training run, "
            "e.g. --config.tokenizer.workdir=runs/vq_tiny"
        )
    for key, value in (("data.batch_size", config.data.batch_size),
                       ("rows_per_shard", config.rows_per_shard)):  # fmt: skip
        if value <= 0:
            raise ConfigError(f"config.{key}={value} must be positive")
    if config.data.max_examples < 0 or config.vocab_offset < 0:
        raise ConfigError("config.data.max_examples and config.vocab_offset must be >= 0")


def make_plan(config, source, mesh) -> shards_lib.Plan:
    parallel = mesh_lib.batch_parallelism(mesh)
    processes = jax.process_count()
    batch_size, most = config.data.batch_size, config.data.max_examples
    if batch_size % parallel or batch_size % processes:
        raise ConfigError(
            f"config.data.batch_size={batch_size} must be a multiple of the data x fsdp mesh "
            f"size {parallel} and of the {processes} processes"
        )
    n = len(source) if not most else min(len(source), most)
    return shards_lib.Plan.create(
        split=effective_split(config),
        num_examples=n,
        global_batch=batch_size,
        rows_per_shard=config.rows_per_shard,
        streaming=bool(getattr(source, "streaming", False)),
        process_index=jax.process_index(),
        process_count=processes,
    )


def effective_split(config) -> str:
    """The split actually read: a split inside a tfds: spec wins over config.data.split."""
    scheme, _, rest = config.data.source.partition(":")
    if scheme == "tfds":
        return data._parse_tfds(rest)[1] or config.data.split
    return config.data.split


# ----------------------------------------------------------------------------- export


@dataclasses.dataclass
class _Export:
    """What the encode loop needs, and what it has done."""

    plan: shards_lib.Plan
    layout: TokenRowLayout
    key_of: object
    writer: shards_lib.ShardWriter
    have: set  # shards this process already has complete
    labels: bool
    rows: int = 0


def _naming_the_setting(read):
    """read(), with a CheckpointError prefixed by the config key to fix."""
    try:
        return read()
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(f"config.tokenizer.workdir: {e}") from e


def export(config, workdir: str) -> dict:
    """mode=export: every example of the source once in OUT/data, then the manifest."""
    mesh = mesh_lib.make_mesh(config.mesh)
    ref = config.tokenizer
    step = ref.step if ref.step >= 0 else None
    # The run's settings first, then the data, then the weights: a missing dataset is reported
    # before a large tokenizer is restored.
    choice = step_choice(STEP_KEY)
    _, saved = _naming_the_setting(lambda: checkpoint.read_config(ref.workdir, step, choice))
    image_size = config.data.image_size or saved["data"]["image_size"]
    source = data.make_source(
        config.data.source,
        config.data.split,
        image_size=image_size,
        data_dir=config.data.data_dir or None,
    )
    tok = _naming_the_setting(
        lambda: TrainedTokenizer.from_workdir(ref.workdir, step, ema_choice(ref.use_ema), mesh)
    )
    plan = make_plan(config, source, mesh)
    encode, indices_shape = tok.compile_encode(plan.global_batch, image_size)
    layout = TokenRowLayout.create(
        indices_shape, tok.vocab, offset=config.vocab_offset, delimiters=config.image_delimiters
    )
    key_of, key_text = shards_lib.key_function(source, plan)
    spec, info = describe(config, tok, source, plan, layout, image_size, key_text)
    manifest_lib.check_spec(workdir, spec, write=jax.process_index() == 0)
    todo, have = _shards_to_run(workdir, plan)
    logging.info(
        "export: %s -> %s: %d examples, %d shards per process (%d to do), %d tokens per image",
        source.name, workdir, plan.num_examples, plan.num_shards, len(todo), layout.length,
    )  # fmt: skip
    delay = config.debug_write_delay_s
    writer = shards_lib.ShardWriter(
        workdir, before_rename=(lambda _: time.sleep(delay)) if delay > 0 else None
    )
    job = _Export(plan, layout, key_of, writer, have, labels=source.num_classes > 1)
    start = time.perf_counter()
    try:
        for first, last in _runs(todo):
            batches = range(plan.shard_batches(first).start, plan.shard_batches(last).stop)
            with _iterator(config, source, image_size, plan, batches.start) as iterator:
                _encode_batches(job, iterator, batches, encode, tok, mesh)
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    codebooks = tok.codebook_arrays()
    multihost_utils.sync_global_devices("export_tokens: shards written")
    manifest_lib.refuse_empty(workdir, plan, source)
    # images_per_s: the encode pipeline (data, device, shard writes); restore and compilation
    # are one-off costs, the manifest's pass over every shard is timed as finalize_seconds.
    result = {"examples_encoded": job.rows, "seconds": seconds, "shards_skipped": len(have)}
    result["images_per_s"] = job.rows / seconds if seconds > 0 else float("nan")
    if jax.process_index() == 0:
        start = time.perf_counter()
        expected = None if plan.streaming else map(key_of, range(plan.num_examples))
        summary = manifest_lib.finalize(
            workdir, spec, info, plan.shard_names(), layout,
            expected_keys=expected, codebooks=codebooks, top_k=config.stats_top_k,
        )  # fmt: skip
        result.update(summary, finalize_seconds=time.perf_counter() - start)
    multihost_utils.sync_global_devices("export_tokens: manifest written")
    return result


def _iterator(config, source, image_size: int, plan, start_step: int) -> data.BatchIterator:
    """This process's eval-order batches from `start_step` (core/data's decode threads)."""
    return data.BatchIterator(
        source,
        image_size=image_size,
        global_batch_size=plan.global_batch,
        process_index=plan.process_index,
        process_count=plan.process_count,
        train=False,
        seed=config.seed,
        start_step=start_step,
        num_threads=config.data.num_threads or None,
        prefetch=config.data.prefetch,
    )


def _shards_to_run(workdir: str, plan: shards_lib.Plan) -> tuple[list[int], set[int]]:
    """(shards some process still lacks, shards this process has complete).

    Every process runs the device steps of a shard that any process lacks: the encode is one
    collective program over the global batch.
    """
    removed = shards_lib.remove_partial(workdir, plan.split, plan.process_index)
    if removed:
        logging.info("export: removed %d partial shard(s) of a killed run", len(removed))
    names = plan.shard_names(plan.process_index)
    have = np.array([os.path.exists(os.path.join(workdir, n)) for n in names], np.int32)
    everywhere = have
    if plan.process_count > 1:
        everywhere = multihost_utils.process_allgather(have).min(0)
    todo = [s for s in range(plan.num_shards) if not everywhere[s]]
    return todo, {s for s in range(plan.num_shards) if have[s]}


def _runs(shards: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs (first, last) of shard numbers."""
    runs = []
    for s in shards:
        if runs and runs[-1][1] == s - 1:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    return runs


def _encode_batches(job: _Export, iterator, batches: range, encode, tok, mesh) -> None:
    """Dispatches batch b before collecting b - 1, so the device always has queued work while
    the host turns results into rows (jit dispatch is asynchronous)."""
    rows = _ShardRows()
    pending = None
    for b in batches:
        host = next(iterator)
        images = mesh_lib.host_batch_to_global({"image": host["image"]}, mesh)["image"]
        out = encode(tok.params, tok.model_state, images)
        if pending is not None:
            _collect(job, rows, *pending)
        pending = (b, host, out)
    if pending is not None:
        _collect(job, rows, *pending)


class _ShardRows:
    """Rows of the shard being filled."""

    def __init__(self):
        self.clear()

    def clear(self):
        self.keys, self.labels, self.tokens = [], [], []


def _collect(job: _Export, rows: _ShardRows, b: int, host: dict, out) -> None:
    """Adds batch b's valid rows; hands a finished shard to the writer thread."""
    plan = job.plan
    positions = plan.positions(b)
    valid = host["mask"].astype(bool) & (positions < plan.position_limit)
    tokens = job.layout.to_stored(mesh_lib.local_rows(out))
    rows.keys += [job.key_of(int(i)) for i in positions[valid]]
    rows.labels.append(host["label"][valid])
    rows.tokens.append(tokens[valid])
    s = b // plan.batches_per_shard
    if b != plan.shard_batches(s).stop - 1:
        return
    if s not in job.have:  # Else complete here already: the steps ran for other processes.
        labels = np.concatenate(rows.labels) if job.labels else None
        path = shards_lib.shard_name(plan.split, plan.process_index, s)
        job.writer.submit(path, rows.keys, labels, np.concatenate(rows.tokens))
        job.rows += len(rows.keys)
    rows.clear()


def describe(config, tok, source, plan, layout, image_size: int, key_text: str):
    """(spec: the settings that decide shard contents, info: the rest of the manifest)."""
    record = tok.record()
    spec = {
        "tokenizer_workdir": record["workdir"],
        "tokenizer_step": record["step"],
        "weights": record["weights"],
        "source": config.data.source,
        "split": plan.split,
        "image_size": image_size,
        "num_examples": plan.num_examples,
        "global_batch_size": plan.global_batch,
        "process_count": plan.process_count,
        "batches_per_shard": plan.batches_per_shard,
        "layout": layout.to_dict(),
    }
    with_label = source.num_classes > 1
    info = {
        "tokenizer": {**record, "config": tok.config.to_dict()},
        "quantizer": {"family": tok.config.quantizer.name, "vocab": tok.vocab.to_dict()},
        "tokens": {
            "column": "tokens",
            "dtype": "int32",
            "grid_shape": list(layout.indices_shape[: -1 if layout.grouped else None]),
            "order": layout.order,
            "length": layout.length,
            "vocab_offset": layout.offset,
            "begin_of_image_id": layout.boi,
            "end_of_image_id": layout.eoi,
            "total_vocab_size": layout.offset + layout.value_vocab + 2 * layout.delimited,
            "layout": layout.to_dict(),
        },
        "preprocessing": {
            "image_size": image_size,
            "resize": "shorter side to image_size (BOX halving while >= 2x, then BICUBIC), "
            "centre crop (core.data.decoding.preprocess, eval mode)",
            "model_input": "RGB uint8 -> float32 x / 127.5 - 1",
        },
        "source": {
            "spec": config.data.source,
            "split": plan.split,
            "name": source.name,
            "size": len(source),
            "max_examples": config.data.max_examples,
            "num_classes": source.num_classes,
            "class_names": list(getattr(source, "class_names", None) or []),
            "key": key_text,
            "columns": ["key", "label", "tokens"] if with_label else ["key", "tokens"],
        },
        "sharding": {
            "process_count": plan.process_count,
            "global_batch_size": plan.global_batch,
            "max_rows_per_shard": plan.batches_per_shard * plan.local_batch,
            "shard_name": "data/<split>-p<process>-<shard>.parquet",
        },
    }
    return spec, info


# ----------------------------------------------------------------------------- decode


def decode(config, workdir: str) -> dict:
    """Exported rows -> PNGs under OUT/decoded/<key without extension>.png.

    The tokenizer is the run recorded in the manifest (same step and weights); when that
    directory has moved, config.tokenizer.workdir names its new place. Every process reads
    the same rows and decodes and saves its slice of each global batch.
    """
    from PIL import Image

    manifest = manifest_lib.read_manifest(workdir)
    layout = TokenRowLayout.from_dict(manifest["tokens"]["layout"])
    keys, tokens = manifest_lib.read_rows(workdir, manifest, config.decode.max_images)
    indices = layout.from_stored(tokens)
    mesh = mesh_lib.make_mesh(config.mesh)
    # The run that encoded the shards; config.tokenizer.workdir only if it has moved since.
    tok = TrainedTokenizer.from_record(
        manifest["tokenizer"], mesh, config.tokenizer.workdir, "--config.tokenizer.workdir"
    )
    decode_fn = tok.compile_decode(indices.ndim)
    gb, p = config.data.batch_size, jax.process_index()
    local = gb // jax.process_count()
    out_dir = os.path.join(workdir, "decoded")
    written = 0
    for start in range(0, len(keys), gb):
        batch = np.zeros((gb, *layout.indices_shape), np.int32)  # the last one padded
        batch[: len(indices[start : start + gb])] = indices[start : start + gb]
        mine = batch[p * local : (p + 1) * local]
        arrays = mesh_lib.host_batch_to_global({"indices": mine}, mesh)
        images = mesh_lib.local_rows(decode_fn(tok.params, tok.model_state, arrays["indices"]))
        for j, image in enumerate(images):
            row = start + p * local + j
            if row < len(keys):
                path = os.path.join(out_dir, png_name(keys[row]))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(image).save(path)
                written += 1
    logging.info("decode: wrote %d PNGs under %s", written, out_dir)
    return {"decoded_images": written, "decoded_dir": out_dir}


def png_name(key: str) -> str:
    """decoded/ relative path for a key: its extension replaced by .png, never leaving decoded/."""
    parts = [p for p in key.split("/") if p not in ("", ".", "..")]
    return os.path.join(*parts[:-1], os.path.splitext(parts[-1])[0] + ".png")
