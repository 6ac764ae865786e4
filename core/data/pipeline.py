"""Image data for every job: the batch iterator over sources (core/data/sources.py picks them).

Specs:
  tfds:NAME[:SPLIT]   a prepared TFDS image dataset ('image', optional 'label'); never downloads.
  folder:PATH         JPEG/PNG/WebP files under PATH; class = top-level subfolder (else 0).
                      PATH/<split> (or val/ for validation, ...) is read for that split;
                      see core/data/sources.py FolderSource.
  builtin:shapes      procedurally drawn labelled shapes (core/data/builtin.py).
  builtin:shapes_plain  the same classes, larger, upright, flat backgrounds (the demo's data).
  builtin:photos      random crops of the photographs bundled with scikit-image.

`batches(...)` yields {'image': uint8 [B, H, W, 3], 'label': int32 [B]} (+ 'mask' in eval)
for this process. Train order is a pure function of (seed, epoch); augmentation of
(seed, epoch, index); so global batches do not depend on the process count and
`start_step=k` resumes exactly without reading skipped data. TFDS datasets stored as
TFRecord (no random access) are the one exception; see `TfdsStream` in core/data/tfds.py.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import math
import os

import numpy as np

from visual_tokenizers.core.data.decoding import (  # noqa: F401  (re-exported: callers use pipeline.*)
    _AUG_TAG,
    _PERM_TAG,
    IMAGE_EXTENSIONS,
    DataError,
    UnreadableImage,
    decode,
    preprocess,
    resize_shorter,
    to_pil,
)
from visual_tokenizers.core.data.sources import (  # noqa: F401, E402  (re-exported)
    FolderSource,
    _parse_tfds,
    make_source,
    open_tfds,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- batches


class BatchIterator:
    """Iterator of this process's batches; see `batches` for the contract.

    Sources give random access (load), or, with a true `streaming` attribute, a sequential
    stream (examples/load_encoded; see core.data_tfds.TfdsStream).
    """

    def __init__(
        self,
        source,
        *,
        image_size,
        global_batch_size,
        process_index,
        process_count,
        train,
        seed,
        start_step=0,
        num_threads=None,
        prefetch=2,
        max_upscale=1.0,
    ):
        self.source, self.image_size, self.train = source, image_size, train
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.seed = int(seed) & (2**64 - 1)  # SeedSequence wants non-negative entropy.
        self.step, self._planned, self.prefetch = start_step, start_step, prefetch
        self.max_upscale = max_upscale if train else 1.0
        self._draft = math.ceil(image_size * self.max_upscale) if train else None
        self._streaming = getattr(source, "streaming", False)
        self._stream, self._perms = None, {}
        self.num_batches = None if train else self._eval_batches()
        self._pending = collections.deque()
        self._threads = threads = num_threads or min(32, os.cpu_count() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="data")
        log.info(
            "data: %s, %d examples, %d classes, %s, global batch %d (local %d, process %d/%d), "
            "start step %d, %d threads, %d unreadable so far",
            source.name,
            len(source),
            source.num_classes,
            "train" if train else "eval",
            global_batch_size,
            self.local_batch_size,
            process_index,
            process_count,
            start_step,
            threads,
            self.num_skipped,
        )

    @property
    def num_skipped(self) -> int:
        return self.source.num_skipped

    def _eval_batches(self) -> int:
        n = len(self.source)
        if not self._streaming:
            return math.ceil(n / self.global_batch_size)
        # Every process must run the same number of steps; even splits differ by <= 1.
        return math.ceil(math.ceil(n / self.process_count) / self.local_batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self.step >= self.num_batches:
            self._finish()
            raise StopIteration
        self._fill()
        results = [r for future in self._pending.popleft() for r in future.result()]
        self.step += 1
        self._fill()
        return self._collate(results)

    def _fill(self) -> None:
        """Keep up to `prefetch` batches beyond the current one decoding in the pool."""
        while len(self._pending) <= self.prefetch and (
            self.num_batches is None or self._planned < self.num_batches
        ):
            jobs = self._stream_jobs() if self._streaming else self._random_jobs(self._planned)
            # A few chunks per thread: one future per image costs more than a 32x32 render.
            k = max(1, len(jobs) // (4 * self._threads))
            chunks = [jobs[i : i + k] for i in range(0, len(jobs), k)]
            self._pending.append([self._pool.submit(_run_all, chunk) for chunk in chunks])
            self._planned += 1

    def _random_jobs(self, step: int) -> list:
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        positions = range(start, start + self.local_batch_size)
        n = len(self.source)
        if not self.train:
            return [functools.partial(self._item, q if q < n else None, None) for q in positions]
        jobs = []
        for q in positions:
            epoch, index = divmod(q, n)
            index = int(self._perm(epoch)[index])
            jobs.append(functools.partial(self._item, index, (self.seed, epoch, index)))
        return jobs

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # A batch spans at most two epochs.
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([_PERM_TAG, self.seed, epoch])
            self._perms[epoch] = rng.permutation(len(self.source))
            log.info(
                "data: %s epoch %d (%d unreadable so far)",
                self.source.name,
                epoch,
                self.num_skipped,
            )
        return self._perms[epoch]

    def _item(self, index: int | None, aug_key: tuple | None):
        """(uint8 image, label), or None for padding and unreadable examples."""
        if index is None:
            return None
        try:
            image, label = self.source.load(index, self._draft)
        except UnreadableImage:
            return None  # Already counted and logged by the source.
        rng = None if aug_key is None else np.random.default_rng([_AUG_TAG, *aug_key])
        return preprocess(image, self.image_size, rng, self.max_upscale), label

    def _stream_jobs(self) -> list:
        if self._stream is None:
            self._stream = self.source.examples(
                process_index=self.process_index,
                process_count=self.process_count,
                seed=self.seed,
                train=self.train,
                start=self._planned * self.local_batch_size,
            )
        jobs = []
        for _ in range(self.local_batch_size):
            example = next(self._stream, None)
            jobs.append(functools.partial(self._stream_item, example))
        return jobs

    def _stream_item(self, example):
        if example is None:
            return None
        epoch, position, image, label = example
        what = f"{self.source.name} process {self.process_index} position {position}"
        try:
            image, label = self.source.load_encoded(image, label, what, self._draft)
        except UnreadableImage:
            return None
        key = (self.seed, epoch, self.process_index, position)
        rng = np.random.default_rng([_AUG_TAG, *key]) if self.train else None
        return preprocess(image, self.image_size, rng, self.max_upscale), label

    def _collate(self, results: list) -> dict[str, np.ndarray]:
        valid = np.array([r is not None for r in results])
        if self.train and not valid.all():
            # Replace unreadable examples by readable ones of the same batch (deterministic).
            good = np.flatnonzero(valid)
            if not len(good):
                raise DataError(f"{self.source.name}: every image of a batch was unreadable.")
            results = [r or results[good[i % len(good)]] for i, r in enumerate(results)]
        blank = (np.zeros((self.image_size,) * 2 + (3,), np.uint8), 0)
        results = [r or blank for r in results]
        batch = {
            "image": np.stack([image for image, _ in results]),
            "label": np.array([label for _, label in results], np.int32),
        }
        if not self.train:
            batch["mask"] = valid
        return batch

    def _finish(self) -> None:
        if self._pool is not None:
            log.info(
                "data: finished %s: %d batches, %d unreadable skipped",
                self.source.name,
                self.step,
                self.num_skipped,
            )
        self.close()

    def close(self) -> None:
        if getattr(self, "_pool", None) is not None:  # Also safe if __init__ failed.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def _run_all(jobs: list) -> list:
    return [job() for job in jobs]


def batches(
    spec: str,
    *,
    split: str,
    image_size: int,
    global_batch_size: int,
    train: bool,
    seed: int,
    data_dir: str | None = None,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
    prefetch: int = 2,
    max_upscale: float = 1.0,
) -> BatchIterator:
    """This process's batches of `spec`.

    train=True: endless. Global batch s holds positions [s*GB, (s+1)*GB) of the stream of
    epochs (epoch e = permutation of all indices seeded by (seed, e)); process p gets
    [p*LB, (p+1)*LB) of it. `start_step=k` yields what a fresh iterator's k-th batch would.
    train=False: one ordered pass, the last batch padded; 'mask' is False on padding (and on
    unreadable images); batch b, row j of process p is example b*GB + p*LB + j.
    num_threads: decode threads (default: CPU count, at most 32); prefetch: batches decoded
    ahead; max_upscale > 1 resizes the shorter side to size*U(1, max_upscale) before the crop.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise DataError(
            f"global_batch_size={global_batch_size} is not divisible by the "
            f"{process_count} processes; pick a multiple of {process_count}."
        )
    source = make_source(spec, split, image_size=image_size, data_dir=data_dir)
    return BatchIterator(
        source,
        image_size=image_size,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        train=train,
        seed=seed,
        start_step=start_step,
        num_threads=num_threads,
        prefetch=prefetch,
        max_upscale=max_upscale,
    )


def check_sources(config) -> None:
    """Opens a training job's train and evaluation sources (listing files or finding the
    prepared TFDS dataset; nothing is decoded), so missing or misnamed data is reported before
    any model is built or weights are loaded."""
    d = config.data
    data_dir = d.data_dir or None
    make_source(d.source, d.split, image_size=d.image_size, data_dir=data_dir)
    if "eval" in config and config.eval.get("source"):
        make_source(
            config.eval.source, config.eval.split, image_size=d.image_size, data_dir=data_dir
        )


def training_batches(config, *, start_step: int) -> BatchIterator:
    """A training job's train stream: config.data.{source, split, image_size, batch_size,
    data_dir} and config.seed, resumed at `start_step`."""
    d = config.data
    return batches(
        d.source,
        split=d.split,
        image_size=d.image_size,
        global_batch_size=d.batch_size,
        train=True,
        seed=config.seed,
        data_dir=d.data_dir or None,
        start_step=start_step,
    )


def held_out_batches(config) -> BatchIterator:
    """A training job's evaluation pass: config.eval.{source, split, batch_size} at
    config.data.{image_size, data_dir} (one pass, 'mask' marks padding)."""
    d = config.data
    return batches(
        config.eval.source,
        split=config.eval.split,
        image_size=d.image_size,
        global_batch_size=config.eval.batch_size,
        train=False,
        seed=config.seed,
        data_dir=d.data_dir or None,
    )
