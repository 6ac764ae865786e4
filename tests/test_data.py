"""Tests for core/data/ (pipeline, sources, tfds, builtin): order, resume, sharding, sources."""

import logging
import os
import socket
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from visual_tokenizers.core.data import builtin as builtin_data
from visual_tokenizers.core.data import pipeline as data
from visual_tokenizers.core.data import tfds as data_tfds


class IndexSource:
    """In-memory source whose image and label both encode the example index."""

    name, num_classes, num_skipped = "index", 256, 0

    def __init__(self, n: int, size: int = 8):
        self.n, self.size, self.loaded = n, size, []

    def __len__(self):
        return self.n

    def load(self, index, draft=None):
        self.loaded.append(index)
        return np.full((self.size, self.size, 3), index, np.uint8), index


def _iterate(source, steps, **kw):
    kw = {
        "image_size": 8,
        "global_batch_size": 4,
        "process_index": 0,
        "process_count": 1,
        "train": True,
        "seed": 0,
        **kw,
    }
    it = data.BatchIterator(source, **kw)
    out = [next(it) for _ in range(steps)] if steps else list(it)
    it.close()
    return out


def _labels(batches):
    return np.concatenate([b["label"] for b in batches])


def test_train_order_is_deterministic_and_changes_with_seed_and_epoch():
    first = _iterate(IndexSource(20), 10)
    again = _iterate(IndexSource(20), 10, num_threads=1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    labels = _labels(first)
    epoch0, epoch1 = labels[:20], labels[20:]
    assert sorted(epoch0) == list(range(20)) and sorted(epoch1) == list(range(20))
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, np.arange(20))
    other_seed = _labels(_iterate(IndexSource(20), 5, seed=1))
    assert not np.array_equal(other_seed, epoch0)
    # The image really is the example named by the label.
    assert all((b["image"][:, 0, 0, 0] == b["label"]).all() for b in first)


def test_start_step_resumes_exactly_without_reading_skipped_data():
    fresh = _iterate(IndexSource(30), 12, global_batch_size=6)
    source = IndexSource(30)
    resumed = _iterate(source, 3, global_batch_size=6, start_step=9, prefetch=1)
    np.testing.assert_array_equal(_labels(resumed), _labels(fresh[9:12]))
    # Only the 3 consumed batches plus at most 2 prefetched ones were decoded.
    assert len(source.loaded) <= 5 * 6


def test_processes_split_each_global_batch_disjointly():
    single = _iterate(IndexSource(37), 8, global_batch_size=8)
    parts = [
        _iterate(IndexSource(37), 8, global_batch_size=8, process_index=p, process_count=2)
        for p in range(2)
    ]
    for step, whole in enumerate(single):
        p0, p1 = parts[0][step], parts[1][step]
        assert p0["image"].shape == (4, 8, 8, 3)
        np.testing.assert_array_equal(np.concatenate([p0["label"], p1["label"]]), whole["label"])
        np.testing.assert_array_equal(np.concatenate([p0["image"], p1["image"]]), whole["image"])
        assert not set(p0["label"]) & set(p1["label"])


def test_eval_covers_every_example_once_with_mask():
    seen = []
    for p in range(2):
        batches = _iterate(
            IndexSource(21), 0, global_batch_size=8, train=False, process_index=p, process_count=2
        )
        assert len(batches) == 3  # ceil(21 / 8), the same on every process.
        for b in batches:
            assert b["mask"].dtype == bool and b["image"].shape == (4, 8, 8, 3)
            seen.extend(b["label"][b["mask"]])
            assert (b["image"][~b["mask"]] == 0).all()
        assert sum((~b["mask"]).sum() for b in batches) == (0 if p == 0 else 3)
    assert sorted(seen) == list(range(21))


def test_batches_rejects_indivisible_global_batch():
    with pytest.raises(data.DataError, match="not divisible"):
        data.batches(
            "builtin:shapes",
            split="train",
            image_size=8,
            global_batch_size=6,
            train=True,
            seed=0,
            process_index=0,
            process_count=4,
        )


def test_builtin_batches_via_spec_are_deterministic():
    kw = {"split": "train", "image_size": 16, "global_batch_size": 8, "train": True, "seed": 3}
    a = next(data.batches("builtin:shapes", **kw))
    b = next(data.batches("builtin:shapes", **kw, num_threads=1))
    c = next(data.batches("builtin:shapes", **{**kw, "seed": 4}))
    assert a["image"].shape == (8, 16, 16, 3) and a["image"].dtype == np.uint8
    assert a["label"].dtype == np.int32
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])


# ----------------------------------------------------------------------------- preprocessing


def test_eval_preprocess_resizes_shorter_side_and_centre_crops():
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    out = data.preprocess(array, 10)
    assert out.shape == (10, 10, 3)
    assert tuple(out[5, 1]) == (255, 0, 0) and tuple(out[5, 8]) == (0, 0, 255)
    gray = data.preprocess(np.full((30, 30), 7, np.uint8), 12)
    assert gray.shape == (12, 12, 3) and (gray == 7).all()


def test_train_preprocess_crops_and_flips_by_rng():
    array = np.random.default_rng(0).integers(0, 255, (16, 48, 3), dtype=np.uint8)
    views = {data.preprocess(array, 16, np.random.default_rng(s)).tobytes() for s in range(20)}
    assert len(views) > 5  # Different crop offsets and flips.
    again = data.preprocess(array, 16, np.random.default_rng(3))
    np.testing.assert_array_equal(again, data.preprocess(array, 16, np.random.default_rng(3)))
    big = data.preprocess(array, 16, np.random.default_rng(0), max_upscale=1.5)
    assert big.shape == (16, 16, 3)


# ----------------------------------------------------------------------------- folders


def _write_folder(root):
    rng = np.random.default_rng(0)
    os.makedirs(root / "cat" / "nested")
    os.makedirs(root / "dog")
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), np.uint8)).save(root / "cat" / "a.png")
    Image.fromarray(rng.integers(0, 255, (24, 24), np.uint8)).save(
        root / "cat" / "nested" / "b.jpg"
    )
    Image.fromarray(rng.integers(0, 255, (18, 18, 4), np.uint8)).save(root / "dog" / "c.webp")
    Image.fromarray(rng.integers(0, 255, (32, 16, 3), np.uint8)).save(root / "dog" / "d.JPEG")
    (root / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "dog" / "notes.txt").write_text("ignored")


def test_folder_skips_and_counts_corrupt_files(tmp_path, caplog):
    _write_folder(tmp_path)
    source = data.make_source(f"folder:{tmp_path}", "train", image_size=16)
    assert len(source) == 5 and source.num_classes == 2
    assert source.class_names == ["cat", "dog"]
    assert sorted(source.labels) == [0, 0, 1, 1, 1]
    image, label = source.read(source.files.index(os.path.join("dog", "c.webp")))
    assert image.shape == (18, 18, 3) and label == 1
    with caplog.at_level(logging.WARNING, logger="visual_tokenizers.core.data"):
        it = data.batches(
            f"folder:{tmp_path}",
            split="train",
            image_size=16,
            global_batch_size=4,
            train=False,
            seed=0,
        )
        batches = list(it)
    assert sum(b["mask"].sum() for b in batches) == 4
    assert it.num_skipped == 1
    assert any("broken.jpg" in r.getMessage() for r in caplog.records)
    train = data.batches(
        f"folder:{tmp_path}", split="train", image_size=16, global_batch_size=4, train=True, seed=0
    )
    labels = _labels([next(train) for _ in range(5)])
    assert train.num_skipped == 1 and set(labels) == {0, 1}


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(data.DataError, match=str(tmp_path)):
        data.make_source(f"folder:{tmp_path}", "train", image_size=8)
    missing = tmp_path / "nope"
    with pytest.raises(data.DataError, match="nope"):
        data.make_source(f"folder:{missing}", "train", image_size=8)


def test_unknown_specs_list_the_valid_ones():
    with pytest.raises(data.DataError, match="folder:PATH"):
        data.make_source("s3:bucket", "train", image_size=8)
    with pytest.raises(data.DataError, match="builtin:shapes"):
        data.make_source("builtin:cifar", "train", image_size=8)
    with pytest.raises(data.DataError, match="train, test"):
        data.make_source("builtin:shapes", "holdout", image_size=8)


# ----------------------------------------------------------------------------- builtins


def test_shapes_dataset():
    train = data.make_source("builtin:shapes", "train", image_size=24)
    test = data.make_source("builtin:shapes", "test", image_size=24)
    assert train.num_classes == 10 and len(train) == 50_000 and len(test) == 10_000
    image, label = train.read(7)
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    again, label_again = train.read(7)
    np.testing.assert_array_equal(image, again)
    assert label == label_again
    assert not np.array_equal(image, test.read(7)[0])
    assert image.std() > 10  # Textured, not a flat fill.
    labels = [train.read(i)[1] for i in range(300)]
    assert set(labels) == set(range(10))
    assert data.make_source("builtin:shapes", "train", image_size=64).read(0)[0].shape == (
        64,
        64,
        3,
    )


def test_plain_shapes_dataset():
    """builtin:shapes_plain: same classes and splits, flat palette backgrounds, palette shapes."""
    plain = data.make_source("builtin:shapes_plain", "train", image_size=32)
    assert plain.num_classes == 10 and len(plain) == 50_000 and plain.name.endswith(":train")
    images, labels = zip(*[plain.read(i) for i in range(200)], strict=True)
    assert set(labels) == set(range(10))
    for image in images[:50]:
        corner = tuple(int(c) for c in image[0, 0])
        assert corner in builtin_data.PLAIN_BACKGROUNDS  # Flat: every corner is one colour.
        colours = {tuple(int(c) for c in p) for p in image.reshape(-1, 3)}
        assert colours & set(builtin_data.PLAIN_COLOURS)  # The shape in a palette colour.
    np.testing.assert_array_equal(plain.read(3)[0], plain.read(3)[0])
    test = data.make_source("builtin:shapes_plain", "test", image_size=32)
    assert not np.array_equal(plain.read(3)[0], test.read(3)[0])


def test_shape_classes_differ_in_coverage():
    """Filled shapes cover more of the mask than their outlines (the label means something)."""
    rng = np.random.default_rng(0)
    for kind in builtin_data.SHAPE_KINDS:
        filled = np.asarray(builtin_data._shape_mask(rng, kind, True, 64)).mean()
        rng = np.random.default_rng(0)
        outline = np.asarray(builtin_data._shape_mask(rng, kind, False, 64)).mean()
        assert filled > 1.3 * outline > 0, kind


def test_photos_hold_out_test_photos_and_load_offline():
    assert not set(builtin_data.TRAIN_PHOTOS) & set(builtin_data.TEST_PHOTOS)
    builtin_data.load_photo.cache_clear()

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    with mock.patch.object(socket.socket, "connect", no_network):
        train = data.make_source("builtin:photos", "train", image_size=32)
        test = data.make_source("builtin:photos", "test", image_size=32)
        names = {test.photo_name(i) for i in range(60)}
        assert names == set(builtin_data.TEST_PHOTOS)
        assert {train.photo_name(i) for i in range(200)} == set(builtin_data.TRAIN_PHOTOS)
        for i in range(3):
            image, label = test.read(i)
            assert image.shape == (32, 32, 3)
            assert builtin_data.ALL_PHOTOS[label] == test.photo_name(i)
        for name in builtin_data.ALL_PHOTOS:
            assert builtin_data.load_photo(name).mode == "RGB"
    np.testing.assert_array_equal(train.read(5)[0], train.read(5)[0])
    assert not np.array_equal(train.read(5)[0], train.read(6)[0])


# ----------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tfds():
    return data_tfds._import_tfds()[1]


@pytest.fixture(scope="module")
def tf():
    return data_tfds._import_tfds()[0]


def test_tfds_random_access_with_mock_data(tfds, tf):
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        source = data.make_source("tfds:imagenet2012", "validation", image_size=16)
        assert isinstance(source, data_tfds.TfdsSource) and len(source) == 10
        assert source.num_classes == 1000
        skip = {"image": tfds.decode.SkipDecoding()}
        reference = tfds.data_source("imagenet2012", split="validation", decoders=skip)
        for i in (0, 7):
            image, label = source.read(i)
            expected = tf.io.decode_image(reference[i]["image"], channels=3).numpy()
            assert image.shape == expected.shape  # JPEG decoders may differ by rounding.
            assert np.abs(image.astype(int) - expected).mean() < 2
            assert label == reference[i]["label"]
        kw = {"split": "validation", "image_size": 16, "global_batch_size": 4, "seed": 0}
        batches = list(data.batches("tfds:imagenet2012", train=False, **kw))
        assert len(batches) == 3 and batches[0]["image"].shape == (4, 16, 16, 3)
        labels = [int(reference[i]["label"]) for i in range(10)]
        assert list(_labels(batches)[:10]) == labels
        assert sum(b["mask"].sum() for b in batches) == 10
        train = next(data.batches("tfds:imagenet2012:train", train=True, **kw))
        assert train["image"].shape == (4, 16, 16, 3) and train["label"].max() < 1000


def test_tfds_streaming_with_mock_data(tfds):
    def no_random_access(*args, **kwargs):
        raise NotImplementedError("stored as tfrecord")

    with (
        tfds.testing.mock_data(num_examples=9, policy=tfds.testing.MockPolicy.USE_CODE),
        mock.patch.object(tfds.core.DatasetBuilder, "as_data_source", no_random_access),
    ):
        source = data.make_source("tfds:mnist", "test", image_size=8)
        assert isinstance(source, data_tfds.TfdsStream) and len(source) == 9
        kw = {"split": "test", "image_size": 8, "global_batch_size": 4, "seed": 1}
        batches = list(data.batches("tfds:mnist", train=False, **kw))
        assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 9
        assert batches[0]["image"].shape == (4, 8, 8, 3)
        fresh = data.batches("tfds:mnist", train=True, **kw)
        fresh = [next(fresh) for _ in range(5)]
        assert sorted(_labels(fresh)[:9]) == sorted(_labels(batches)[:9])  # One epoch.
        resumed = next(data.batches("tfds:mnist", train=True, start_step=3, **kw))
        np.testing.assert_array_equal(resumed["image"], fresh[3]["image"])


def test_tfds_spec_parsing_keeps_versions_and_slices():
    assert data._parse_tfds("imagenet2012") == ("imagenet2012", None)
    assert data._parse_tfds("celeb_a_hq/256:2.0.0:train[:10%]") == (
        "celeb_a_hq/256:2.0.0",
        "train[:10%]",
    )
    assert data._parse_tfds("mnist:test") == ("mnist", "test")


def test_unprepared_tfds_dataset_explains_the_fix(tfds, tmp_path):
    with pytest.raises(data.DataError) as error:
        data.make_source("tfds:imagenet2012", "train", image_size=16, data_dir=str(tmp_path))
    message = str(error.value)
    for needed in (
        "imagenet2012",
        str(tmp_path),
        "downloads/manual",
        "tfds build",
        "--config.data.data_dir",
    ):
        assert needed in message
    with pytest.raises(data.DataError, match="tfds build mnist"):
        data.make_source("tfds:mnist:test", "train", image_size=16, data_dir=str(tmp_path))
    with pytest.raises(data.DataError, match="no dataset"):
        data.make_source("tfds:no_such_dataset_xyz", "train", image_size=16)
