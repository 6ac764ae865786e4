"""TFDS sources for `tfds:NAME[:SPLIT]` specs (core/data/sources.py opens them).

A prepared split stored as ArrayRecord/Parquet becomes a random-access `TfdsSource` that
follows core/data's exact, process-count-independent order; one stored as TFRecord becomes
a sequential `TfdsStream`. TensorFlow and TFDS are imported only when a tfds: spec is opened,
and nothing is ever downloaded. Built on decoding.py; sources.py opens it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from visual_tokenizers.core.data.decoding import _PERM_TAG, DataError, _DecodingSource

SHUFFLE_BUFFER = 4096  # TFDS streaming only: encoded examples held for the buffer shuffle.


def _import_tfds():
    """Imported only for tfds: specs. TF must never claim the GPUs that JAX uses."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices elsewhere; too late to hide.
        pass
    import tensorflow_datasets as tfds

    return tf, tfds


_ARRAY_RECORD = (
    "array_record gives random access, exact resume and process-count-independent batches; "
    "TFRecord data is streamed (see core.data_tfds.TfdsStream)."
)


def _not_prepared(name: str, data_dir: str | None, searched: str) -> DataError:
    base = name.split(":")[0]
    how = f"Prepare it once with `tfds build {base} --data_dir=DIR --file_format=array_record`"
    if base.startswith("imagenet2012"):
        how = (
            "ImageNet cannot be fetched automatically: download ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar manually into DIR/downloads/manual/, then run "
            f"`tfds build {base} --data_dir=DIR --file_format=array_record`"
        )
    return DataError(
        f"TFDS dataset {name!r} is not prepared under data_dir={data_dir!r} (searched "
        f"{searched}); nothing is downloaded at run time. {how} (or in Python: "
        f"tfds.builder('{base}', data_dir=DIR, file_format='array_record')"
        f".download_and_prepare()), then pass --config.data.data_dir=DIR. {_ARRAY_RECORD}"
    )


def open_tfds(name: str, split: str, data_dir: str | None):
    """A random-access TfdsSource when stored as ArrayRecord/Parquet, else a TfdsStream."""
    _, tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"TFDS has no dataset {name!r}: {str(e).splitlines()[0]}") from e
    features = builder.info.features
    if "image" not in features:
        raise DataError(f"TFDS dataset {name!r} has no 'image' feature: {list(features)}")
    label = features["label"] if "label" in features else None
    num_classes = int(getattr(label, "num_classes", None) or 1)
    decoders = {"image": tfds.decode.SkipDecoding()}  # We decode with PIL in our threads.
    try:
        try:
            data = builder.as_data_source(split, decoders=decoders)
        except NotImplementedError:  # Stored as TFRecord: no random access, so stream.
            return TfdsStream(builder, split, num_classes, tfds)
    except Exception as e:  # Whatever tfds raises, say what is missing if it is missing.
        if builder.is_prepared():
            raise
        raise _not_prepared(name, data_dir, builder.data_dir) from e
    return TfdsSource(f"tfds:{name}:{split}", data, num_classes)


class TfdsSource(_DecodingSource):
    """Random access into a prepared ArrayRecord/Parquet TFDS split."""

    def __init__(self, name: str, data, num_classes: int):
        super().__init__()
        self.name, self.num_classes, self._data = name, num_classes, data

    def __len__(self) -> int:
        return len(self._data)

    def load(self, index: int, draft: int | None = None) -> tuple[Image.Image, int]:
        example = self._data[index]
        image = self._decode(example["image"], f"{self.name}[{index}]", draft)
        return image, int(example.get("label", 0))


class TfdsStream(_DecodingSource):
    """A TFRecord TFDS split read sequentially with tf.data (no random access).

    Differences from the random-access scheme: each process streams its own
    `tfds.split_for_jax_process` slice, so batch content depends on the process count;
    the order is a file shuffle plus a SHUFFLE_BUFFER shuffle, both seeded by (seed, epoch);
    resuming at step k skips k * local_batch examples of this process's stream (the current
    epoch's part is read, though not decoded). Rebuild with `--file_format=array_record` for
    the exact, process-count-independent scheme.
    """

    streaming = True  # Tells core.data.pipeline.BatchIterator to call examples(), not load().

    def __init__(self, builder, split: str, num_classes: int, tfds):
        super().__init__()
        self._builder, self._split, self._tfds = builder, split, tfds
        self.name = f"tfds:{builder.name}:{split}"
        self.num_classes = num_classes
        self._has_label = "label" in builder.info.features
        self._len = self._size(split)

    def __len__(self) -> int:
        return self._len

    def _dataset(self, split, shuffle_seed: int | None):
        read_config = self._tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
        ds = self._builder.as_dataset(
            split=split,
            shuffle_files=shuffle_seed is not None,
            decoders={"image": self._tfds.decode.SkipDecoding()},
            read_config=read_config,
        )
        has_label = self._has_label
        ds = ds.map(lambda ex: (ex["image"], ex["label"] if has_label else 0))
        if shuffle_seed is not None:
            ds = ds.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed)
        return ds

    def _size(self, split) -> int:
        size = int(self._dataset(split, None).cardinality())
        if size < 0:  # Unknown cardinality: fall back on the recorded split size.
            size = self._builder.info.splits[split].num_examples
        return size

    def local_split(self, process_index: int, process_count: int):
        if process_count == 1:
            return self._split
        return self._tfds.split_for_jax_process(
            self._split, process_index=process_index, process_count=process_count
        )

    def examples(self, *, process_index, process_count, seed, train, start):
        """(epoch, position, encoded image, label) from position `start` of this stream."""
        split = self.local_split(process_index, process_count)
        if not train:
            yield from ((0, *ex) for ex in self._epoch(split, None, start))
            return
        size = self._size(split)
        if size == 0:
            raise DataError(f"{self.name}: process {process_index} has no examples.")
        epoch, offset = divmod(start, size)
        while True:
            tf_seed = int(np.random.SeedSequence([_PERM_TAG, seed, epoch]).generate_state(1)[0])
            yield from ((epoch, *ex) for ex in self._epoch(split, tf_seed, offset))
            epoch, offset = epoch + 1, 0

    def _epoch(self, split, tf_seed, offset):
        ds = self._dataset(split, tf_seed).skip(offset).prefetch(2)
        for position, (image, label) in enumerate(ds.as_numpy_iterator(), offset):
            yield position, image, int(label)

    def load_encoded(self, image: bytes, label: int, what: str, draft: int | None):
        return self._decode(image, what, draft), label

    def load(self, index: int, draft: int | None = None):
        raise DataError(f"{self.name} is stored as TFRecord: no random access. {_ARRAY_RECORD}")
