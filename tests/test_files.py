"""core/files.py: atomic writes and the check that refuses a rerun with other settings (used by
the export, sample, demo and MaskGIT training jobs)."""

import fnmatch
import glob
import json
import os

import numpy as np
import pytest

from visual_tokenizers.core import files
from visual_tokenizers.core.runtime import checkpoint
from visual_tokenizers.jobs import train_maskgit


def test_atomic_write_renames_only_a_complete_file(tmp_path):
    path = str(tmp_path / "sub" / "out.bin")
    seen = []

    def before_rename(tmp):  # only the hidden temporary file exists at this point
        seen.append((os.path.basename(tmp), os.path.exists(path)))

    with files.atomic_write(path, before_rename=before_rename) as tmp, open(tmp, "wb") as f:
        f.write(b"done")
    name = seen[0][0]
    assert seen == [(name, False)] and name.startswith(".")
    assert glob.glob(str(tmp_path / "sub" / files.temp_pattern("out.*"))) == []
    with open(path, "rb") as f:
        assert f.read() == b"done"


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / "out.json")
    files.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError, match="crash"):
        with files.atomic_write(path) as tmp, open(tmp, "w") as f:
            f.write("half")
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left
    with open(path) as f:
        assert json.load(f) == {"a": 1}


def test_temp_pattern_finds_what_a_killed_writer_left():
    tmp = files.temp_path(os.path.join("d", "train-p00000-00003.parquet"))
    pattern = files.temp_pattern("train-p00000-*")
    assert fnmatch.fnmatch(os.path.basename(tmp), pattern)
    assert not fnmatch.fnmatch("train-p00000-00003.parquet", pattern)


def test_save_npz_keeps_the_given_name(tmp_path):
    path = str(tmp_path / "stats.cache")
    files.save_npz(path, mu=np.arange(3))
    assert os.listdir(tmp_path) == ["stats.cache"]
    with np.load(path) as z:
        np.testing.assert_array_equal(z["mu"], [0, 1, 2])


def test_other_settings_are_refused_naming_each_change_and_the_fix():
    old = {"seed": 0, "model": {"width": 32, "depth": 2}, "classes": [1, 3]}
    files.refuse_other_settings(old, {**old, "classes": (1, 3)}, what="x", fix="y")  # same JSON
    new = {"seed": 1, "model": {"width": 64, "depth": 2}, "classes": [1, 3], "extra": True}
    with pytest.raises(KeyError) as info:
        files.refuse_other_settings(
            old, new, what="OUT holds samples made", fix="Use a fresh --workdir.", error=KeyError
        )
    message = str(info.value)
    assert "OUT holds samples made with other settings" in message
    assert "model.width: was 32, now 64" in message and "seed: was 0, now 1" in message
    assert "extra: was (not set), now True" in message
    assert "depth" not in message and message.rstrip("'\"").endswith("Use a fresh --workdir.")


def test_settings_are_recorded_once_then_checked(tmp_path):
    path = str(tmp_path / "spec.json")
    files.check_or_record_settings(path, {"n": 1}, what="w", fix="f", write=False)
    assert not os.path.exists(path)
    files.check_or_record_settings(path, {"n": 1}, what="w", fix="f")
    files.check_or_record_settings(path, {"n": 1}, what="w", fix="f")  # the same: accepted
    with pytest.raises(ValueError, match="n: was 1, now 2"):
        files.check_or_record_settings(path, {"n": 2}, what="w", fix="f")


def test_maskgit_resume_on_other_tokens_is_refused(monkeypatch, tmp_path):
    """A MaskGIT workdir trained on one vocabulary refuses to resume on another, naming it."""
    saved = {"vocab": {"size": 256, "bits": None, "groups": None}, "token_shape": [8, 8]}
    saved |= {"num_classes": 10, "tokens": "export:a", "num_examples": 100}
    monkeypatch.setattr(
        checkpoint, "read_config", lambda workdir, step=None: (7, {"resolved": saved})
    )
    train_maskgit._check_resume(str(tmp_path), dict(saved))  # the same tokens: resumes
    other = {**saved, "vocab": {"size": 1024, "bits": None, "groups": None}}
    with pytest.raises(checkpoint.CheckpointError, match=r"vocab.size: was 256, now 1024"):
        train_maskgit._check_resume(str(tmp_path), other)
