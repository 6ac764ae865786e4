"""Tests for folder: splits in core/data/sources.py: train/ val/ test/ subfolders are splits,
never classes; a missing split is refused with the subfolders that exist."""

import os

import numpy as np
import pytest
from PIL import Image

from visual_tokenizers.core.data import sources
from visual_tokenizers.core.data.decoding import DataError


def _images(root, *relative):
    for i, rel in enumerate(relative):
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / rel)


def _source(root, split):
    return sources.make_source(f"folder:{root}", split, image_size=8)


def test_split_subfolders_are_splits_with_common_names(tmp_path):
    _images(tmp_path, "train/cat/a.png", "train/dog/b.png", "Val/cat/c.png", "Val/dog/d.png")
    train = _source(tmp_path, "train")
    assert train.root == str(tmp_path / "train") and train.class_names == ["cat", "dog"]
    for split in ("validation", "val", "Val", "valid"):
        held_out = _source(tmp_path, split)
        assert held_out.root == str(tmp_path / "Val") and held_out.files == [
            "cat/c.png",
            "dog/d.png",
        ]
    # 'all' reads the whole tree, the split subfolders as classes (what the default used to do).
    assert _source(tmp_path, "all").class_names == ["Val", "train"]


def test_validation_subfolder_serves_split_val(tmp_path):
    _images(tmp_path, "training/a.png", "validation/b.png")
    assert _source(tmp_path, "val").files == ["b.png"]
    assert _source(tmp_path, "train").files == ["a.png"]


def test_missing_split_is_refused_with_the_subfolders_and_the_fix(tmp_path):
    _images(tmp_path, "train/cat/a.png", "val/cat/b.png", "cat/c.png")
    for split in ("test", "train[:50%]"):
        with pytest.raises(DataError) as raised:
            _source(tmp_path, split)
        message = str(raised.value)
        assert "train, val" in message and repr(split) in message
        assert "data.split" in message and "eval.split" in message and "'all'" in message


def test_two_subfolders_for_one_split_are_refused(tmp_path):
    _images(tmp_path, "train/a.png", "val/b.png", "valid/c.png")
    with pytest.raises(DataError, match="val and valid all match split 'validation'"):
        _source(tmp_path, "validation")


def test_folder_without_split_subfolders_is_the_data_for_every_split(tmp_path):
    _images(tmp_path, "cat/a.png", "dog/b.png")
    for split in ("train", "validation", "test"):
        source = _source(tmp_path, split)
        assert source.root == str(tmp_path) and source.class_names == ["cat", "dog"]
    flat = tmp_path / "flat"
    _images(flat, "a.png", "b.png")
    assert _source(flat, "validation").class_names == ["all"]
