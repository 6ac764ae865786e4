"""Training batches of tokenizer indices for generators (jobs/train_maskgit.py).

Two sources give the same stream:
  ExportedTokens   the rows of a finished token export (jobs/export_tokens.py: Parquet shards +
                   manifest.json), read once into memory, offset and delimiters undone;
  EncodeBatches    images of a random-access data source, preprocessed as the export does
                   (shorter side resized, centre crop; no augmentation), to be encoded on device.

Order: global batch s holds positions [s*GB, (s+1)*GB) of an endless stream of epochs, epoch e
being a permutation of the N examples seeded by (seed, e); process p takes rows
[p*LB, (p+1)*LB). The order is a pure function of (seed, epoch, position), so a run resumed at
step k sees exactly the batches it would have seen, whatever the process count. Export rows are
ordered by key (`<split>/<index>`), i.e. by source index, so an export of the first N examples
and on-the-fly encoding of the same N examples draw the same examples in the same order.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from visual_tokenizers.core.data import pipeline as data
from visual_tokenizers.core.tokens import manifest as manifest_lib
from visual_tokenizers.core.tokens import shards as shards_lib
from visual_tokenizers.core.tokens.layout import TokenRowLayout, Vocab

_TOKEN_PERM_TAG = 0x70CE  # permutation seeds of token batches (disjoint from core/data's)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([_TOKEN_PERM_TAG, int(seed) & (2**63 - 1), epoch]).permutation(n)


class IndexStream:
    """Example indices of this process's slice of global batch s (see the module docstring)."""

    def __init__(
        self, n: int, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1
    ):
        if n <= 0:
            raise data.DataError("no training examples: the token source is empty")
        if global_batch % process_count:
            raise data.DataError(
                f"global batch {global_batch} is not divisible by the {process_count} processes"
            )
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs (N >= batch)
                self._perms.pop(min(self._perms))
            self._perms[epoch] = epoch_permutation(self.seed, epoch, self.n)
        return self._perms[epoch]

    def position(self, q: int) -> int:
        """The example at stream position q."""
        epoch, i = divmod(int(q), self.n)
        return int(self._perm(epoch)[i])

    def batch(self, step: int) -> np.ndarray:
        start = step * self.global_batch + self.process_index * self.local_batch
        return np.array([self.position(q) for q in range(start, start + self.local_batch)])


# ----------------------------------------------------------------------------- exported rows


@dataclasses.dataclass
class ExportedTokens:
    """Every row of an export, sorted by key: indices [N, *index_shape] int32, labels [N]."""

    directory: str
    manifest: dict
    keys: list[str]
    indices: np.ndarray
    labels: np.ndarray
    vocab: Vocab
    index_shape: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["source"].get("num_classes") or 1)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["source"].get("class_names") or [])

    @property
    def tokenizer(self) -> dict:
        t = self.manifest["tokenizer"]
        return {"workdir": t["workdir"], "step": int(t["step"]), "weights": t["weights"]}

    def batches(
        self,
        global_batch: int,
        seed: int,
        start_step: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        """Endless host batches {'tokens', 'label'} of this process from `start_step`."""
        stream = IndexStream(len(self.keys), global_batch, seed, process_index, process_count)
        step = start_step
        while True:
            rows = stream.batch(step)
            yield {"tokens": self.indices[rows], "label": self.labels[rows]}
            step += 1


def load_export(directory: str, verify: bool = True) -> ExportedTokens:
    """Reads a finished export; checks its shards (sha256), vocabulary and token values.

    The stored rows become the tokenizer's raw indices again: vocab_offset subtracted,
    begin/end-of-image ids removed, reshaped to the tokenizer's per-image index shape.
    """
    manifest = manifest_lib.verify(directory) if verify else manifest_lib.read_manifest(directory)
    layout = TokenRowLayout.from_dict(manifest["tokens"]["layout"])
    vocab = Vocab.from_dict(manifest["quantizer"]["vocab"])
    _check_layout(directory, layout, vocab)
    keys, labels, rows = [], [], []
    for entry in manifest["shards"]:
        k, lab, t = shards_lib.read_shard(os.path.join(directory, entry["path"]))
        if not k:
            continue
        keys += k
        labels.append(lab if lab is not None else np.zeros(len(k), np.int32))
        rows.append(t)
    if not keys:
        raise data.DataError(f"the export {directory} holds no rows; export a non-empty split")
    tokens = np.concatenate(rows)
    if tokens.shape[1] != layout.length:
        raise manifest_lib.ExportError(
            f"{directory}: rows of {tokens.shape[1]} tokens, the manifest says {layout.length}"
        )
    raw = layout.raw(tokens)  # offset and delimiters undone (checks the delimiters)
    if raw.min() < 0 or raw.max() >= layout.value_vocab:
        raise manifest_lib.ExportError(
            f"{directory}: token values span [{raw.min()}, {raw.max()}] after removing the "
            f"offset {layout.offset}, outside the vocabulary [0, {layout.value_vocab}); the "
            "shards do not match the manifest"
        )
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    indices = raw.reshape(len(raw), *layout.indices_shape).astype(np.int32)[order]
    labels = np.concatenate(labels).astype(np.int32)[order]
    keys = [keys[i] for i in order]
    logging.info(
        "tokens: %d rows of %s indices from %s (vocab %d%s)",
        len(keys),
        list(layout.indices_shape),
        directory,
        vocab.size,
        f", {vocab.bits} bits" if vocab.bits else "",
    )
    return ExportedTokens(directory, manifest, keys, indices, labels, vocab, layout.indices_shape)


def _check_layout(directory: str, layout: TokenRowLayout, vocab: Vocab) -> None:
    if not layout.matches(vocab):
        raise manifest_lib.ExportError(
            f"{directory}/manifest.json: quantizer vocab {vocab} does not match the token layout "
            f"(value_vocab {layout.value_vocab}, grouped {layout.grouped}); the manifest is "
            "inconsistent: re-export"
        )


# ----------------------------------------------------------------------------- encode on the fly


class _EpochView:
    """A random-access source seen as the endless stream of epochs: item q is example
    IndexStream.position(q) of the first `n` examples (what the export path draws)."""

    def __init__(self, source, n: int, seed: int, steps: int, global_batch: int):
        self.source, self.n = source, n
        self.stream = IndexStream(n, global_batch, seed)
        self.name = f"{source.name} (first {n}, shuffled per epoch)"
        self.num_classes = source.num_classes
        self.class_names = getattr(source, "class_names", None)
        self._len = (steps + 1) * global_batch  # positions any run of `steps` steps reads

    @property
    def num_skipped(self) -> int:
        return self.source.num_skipped

    def __len__(self) -> int:
        return self._len

    def load(self, q: int, draft=None):
        return self.source.load(self.stream.position(q), draft)


class EncodeBatches:
    """Host batches {'image' uint8, 'label'} in the export path's order, from `start_step`.

    Images are preprocessed as for evaluation and export (core/data: shorter side resized,
    centre crop), decoded by core/data's threads; unreadable images are replaced by readable
    ones of the same batch.
    """

    def __init__(
        self,
        spec: str,
        *,
        split: str,
        image_size: int,
        max_examples: int,
        global_batch_size: int,
        seed: int,
        num_steps: int,
        start_step: int,
        data_dir: str | None = None,
        num_threads: int | None = None,
        prefetch: int = 2,
        process_index: int = 0,
        process_count: int = 1,
    ):
        source = data.make_source(spec, split, image_size=image_size, data_dir=data_dir)
        if getattr(source, "streaming", False):
            raise data.DataError(
                f"{spec}: a TFRecord TFDS dataset is read as a stream, but encoding tokens on "
                "the fly needs random access. Prepare it with --file_format=array_record, or "
                "export its tokens first (jobs/export_tokens.py) and pass "
                "--config.tokens.export_dir"
            )
        n = len(source) if not max_examples else min(len(source), max_examples)
        self.source, self.num_examples = source, n
        view = _EpochView(source, n, seed, max(num_steps, start_step), global_batch_size)
        self._batches = data.BatchIterator(
            view,
            image_size=image_size,
            global_batch_size=global_batch_size,
            process_index=process_index,
            process_count=process_count,
            train=False,
            seed=seed,
            start_step=start_step,
            num_threads=num_threads,
            prefetch=prefetch,
        )

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._batches)
        valid = batch.pop("mask").astype(bool)
        if not valid.all():
            good = np.flatnonzero(valid)
            if not len(good):
                raise data.DataError(f"{self.source.name}: every image of a batch was unreadable")
            fill = good[np.arange(len(valid)) % len(good)]
            swap = np.where(valid, np.arange(len(valid)), fill)
            batch = {k: v[swap] for k, v in batch.items()}
        return batch

    def close(self):
        self._batches.close()
