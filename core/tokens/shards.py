"""Parquet shards of exported tokens: which examples each holds, names, atomic writes, a
background writer and read-back (how indices become a row: core/tokens/layout.py).

A shard is one Parquet file with columns `key` (string), optional `label` (int32) and `tokens`
(list<int32>), the layout pandas, pyarrow and Hugging Face `datasets` read without our code.
It is written under a hidden temporary name, flushed to disk and renamed, so a file with the
final name is always complete; a kill (even kill -9) leaves at most a temporary file, which
the next run deletes and redoes.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import os
import queue
import re
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from visual_tokenizers.core import files
from visual_tokenizers.core.tokens.layout import INT32_MAX

DATA_DIR = "data"  # Shards live in OUTPUT/data/, so `data/*.parquet` globs exactly them.


def split_tag(split: str) -> str:
    """A file-name-safe form of a split name ('train[:10%]' -> 'train_10pct')."""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", split.replace("%", "pct")).strip("_")
    return tag or "split"


def shard_name(split: str, process: int, shard: int) -> str:
    """Final shard path relative to the output directory; includes the writing process."""
    return os.path.join(DATA_DIR, f"{split_tag(split)}-p{process:05d}-{shard:05d}.parquet")


def remove_partial(output_dir: str, split: str, process: int) -> list[str]:
    """Deletes temporary files a killed run of this process left behind; returns them."""
    pattern = files.temp_pattern(f"{split_tag(split)}-p{process:05d}-*")
    stale = glob.glob(os.path.join(output_dir, DATA_DIR, pattern))
    for path in stale:
        os.remove(path)
    return stale


def make_table(keys: list[str], labels: np.ndarray | None, tokens: np.ndarray) -> pa.Table:
    """Table of one shard; tokens [N, L] become a list<int32> column without a Python loop."""
    tokens = np.ascontiguousarray(tokens, np.int32)
    n, length = tokens.shape
    if n * length > INT32_MAX:  # list<int32> offsets are int32
        raise ValueError(
            f"a shard of {n} rows x {length} tokens is too large; lower rows_per_shard"
        )
    offsets = pa.array(np.arange(0, (n + 1) * length, length, dtype=np.int32))
    columns = {"key": pa.array(keys, pa.string())}
    if labels is not None:
        columns["label"] = pa.array(np.asarray(labels, np.int32))
    columns["tokens"] = pa.ListArray.from_arrays(offsets, pa.array(tokens.reshape(-1)))
    return pa.table(columns)


def write_atomic(output_dir: str, relpath: str, table: pa.Table, before_rename=None) -> str:
    """Writes table to OUTPUT/relpath via a hidden temporary file, fsync and rename.

    `before_rename(tmp_path)` is a test hook: it runs while only the temporary file exists.
    """
    final = os.path.join(output_dir, relpath)
    with files.atomic_write(final, before_rename=before_rename) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return final


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_shard(path: str) -> tuple[list[str], np.ndarray | None, np.ndarray]:
    """(keys, labels or None, tokens [N, L] int32) of one shard."""
    table = pq.read_table(path)
    keys = table.column("key").to_pylist()
    labels = table.column("label").to_numpy() if "label" in table.column_names else None
    column = table.column("tokens").combine_chunks()
    values = column.values.to_numpy()
    length = len(values) // max(len(column), 1) if len(column) else 0
    return keys, labels, values.reshape(len(column), length)


def count_rows(output_dir: str, relpaths: list[str]) -> int:
    """Rows in the shards that exist among `relpaths` (Parquet footers only: cheap)."""
    paths = [os.path.join(output_dir, rel) for rel in relpaths]
    return sum(pq.read_metadata(p).num_rows for p in paths if os.path.exists(p))


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which examples go into which shard; the same on every process and every rerun.

    Global batch b of the source's eval order (core.data.pipeline.batches) holds examples
    [b*GB, (b+1)*GB); process p encodes rows [p*LB, (p+1)*LB) of it, and its shard s holds
    batches [s*k, (s+1)*k) with k = batches_per_shard. Streams (TFRecord TFDS) are split
    between processes first: there row j of batch b of process p is position b*LB + j of
    that process's slice.
    """

    split: str
    num_examples: int  # examples to export (before unreadable ones are dropped)
    global_batch: int
    process_index: int
    process_count: int
    batches_per_shard: int
    streaming: bool = False

    @classmethod
    def create(
        cls,
        *,
        split: str,
        num_examples: int,
        global_batch: int,
        rows_per_shard: int,
        streaming: bool = False,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Plan:
        local = global_batch // process_count
        k = max(1, math.ceil(rows_per_shard / local))
        return cls(split, num_examples, global_batch, process_index, process_count, k, streaming)

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    @property
    def num_batches(self) -> int:
        if self.streaming:
            return math.ceil(self.position_limit / self.local_batch)
        return math.ceil(self.num_examples / self.global_batch)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_batches / self.batches_per_shard)

    @property
    def position_limit(self) -> int:
        """Rows at positions >= this are beyond num_examples (or padding)."""
        if self.streaming:
            return math.ceil(self.num_examples / self.process_count)
        return self.num_examples

    def shard_batches(self, shard: int) -> range:
        start = shard * self.batches_per_shard
        return range(start, min(start + self.batches_per_shard, self.num_batches))

    def positions(self, batch: int) -> np.ndarray:
        """Per row of this process's slice of `batch`: example index (streams: position)."""
        lb = self.local_batch
        if self.streaming:
            return batch * lb + np.arange(lb)
        return batch * self.global_batch + self.process_index * lb + np.arange(lb)

    def shard_names(self, process: int | None = None) -> list[str]:
        """This process's shard paths, or (process=None) every process's, in name order."""
        processes = range(self.process_count) if process is None else [process]
        return [shard_name(self.split, p, s) for p in processes for s in range(self.num_shards)]


def key_function(source, plan: Plan):
    """(example index -> key, description): a folder's relative file path, else
    '<split>/<index>'. TFRecord streams have no global index: their keys name the process
    slice they came from, so they depend on the process count."""
    files = getattr(source, "files", None)
    if files is not None:
        return (lambda i: files[i].replace(os.sep, "/")), "image path relative to the folder"
    if plan.streaming:
        p, n = plan.process_index, plan.process_count
        key = lambda i: f"{plan.split}/process{p:05d}-of-{n:05d}/{i:08d}"
        return key, "<split>/process<p>-of-<n>/<position in that process's TFDS slice>"
    return (lambda i: f"{plan.split}/{i:08d}"), "<split>/<index in the source, 8 digits>"


class ShardWriter:
    """Writes shards on a background thread so host I/O overlaps device work.

    `submit(relpath, keys, labels, tokens)` returns at once unless `max_pending` shards are
    already waiting (back-pressure keeps memory bounded). Errors surface on the next submit or
    on close(). `before_rename` is passed to `write_atomic` (a test hook).
    """

    def __init__(self, output_dir: str, max_pending: int = 2, before_rename=None):
        self.output_dir = output_dir
        self.before_rename = before_rename
        self.written: list[str] = []
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="shard-writer", daemon=True)
        self._thread.start()

    def _work(self):
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # Drain after a failure; close() reports it.
            relpath, keys, labels, tokens = item
            try:
                table = make_table(keys, labels, tokens)
                path = write_atomic(self.output_dir, relpath, table, self.before_rename)
                self.written.append(path)
            except BaseException as e:  # Re-raised on the main thread.
                self._error = e

    def _raise(self):
        if self._error is not None:
            raise RuntimeError(f"writing token shards failed: {self._error}") from self._error

    def submit(self, relpath: str, keys: list[str], labels, tokens: np.ndarray) -> None:
        self._raise()
        self._queue.put((relpath, keys, labels, tokens))

    def close(self) -> None:
        """Waits for every submitted shard to be written; raises the first write error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()
