"""The torch-free .pth reader (both torch formats, refusal of code-running pickles) and the
weights cache: sha256 checks, package copies, offline errors, downloads."""

import collections
import hashlib
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from visual_tokenizers.core import weights
from visual_tokenizers.core.errors import UserError


def _tensors():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return collections.OrderedDict(
        plain=torch.randn(2, 3, 5),
        transposed=torch.randn(4, 3).t(),  # Non-contiguous strides.
        view=base[1],  # Shares a storage with `base`, at an offset.
        base=base,
        long=torch.tensor([1, -2, 3], dtype=torch.int64),
        half=torch.randn(4, dtype=torch.float16),
        bf16=torch.randn(4, dtype=torch.bfloat16),
        flags=torch.tensor([True, False]),
        scalar=torch.tensor(2.5),
        param=torch.nn.Parameter(torch.randn(2, 2)),
        nested={"inner": torch.ones(3, dtype=torch.uint8)},
    )


def _flat_torch(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat_torch(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value.detach().float().numpy()
    return out


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_load_pth_matches_torch(tmp_path, zip_format):
    path = str(tmp_path / "w.pth")
    tensors = _tensors()
    torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
    loaded = weights.flatten_state_dict(weights.load_pth(path))
    expected = _flat_torch(tensors)
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(np.asarray(loaded[key], np.float32), value, err_msg=key)
    assert loaded["long"].dtype == np.int64 and loaded["flags"].dtype == np.bool_


def test_reads_the_lpips_wheel_file_like_torch():
    """A real published file (legacy format, 2018) reads exactly as torch reads it."""
    path = weights.fetch(weights.LPIPS_VGG)  # The lpips package's copy: no download.
    ours = weights.load_pth(path)
    theirs = torch.load(path, map_location="cpu")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value.numpy())


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps({"weight": _RunsCode(marker)}))
    with pytest.raises(weights.UnsafePickleError, match="system"):
        weights.load_pth(str(raw))
    zipped = str(tmp_path / "zipped.pth")
    torch.save({"weight": torch.ones(2), "payload": _RunsCode(marker)}, zipped)
    with pytest.raises(weights.UnsafePickleError, match="refusing to load global"):
        weights.load_pth(zipped)
    evil = str(tmp_path / "eval.pth")
    with zipfile.ZipFile(evil, "w") as archive:
        payload = b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode()
        archive.writestr("archive/data.pkl", payload + b"')\ntR.")
    with pytest.raises(weights.UnsafePickleError, match="builtins.eval"):
        weights.load_pth(evil)
    assert not marker.exists()


def test_refuses_a_tensor_that_reads_outside_its_storage(tmp_path):
    path = str(tmp_path / "w.pth")
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    pkl = next(name for name in files if name.endswith("data.pkl"))
    # The pickled size tuple (4,) becomes (4000,): a 16 KB read from a 16-byte storage.
    assert files[pkl].count(b"K\x04\x85") == 1
    files[pkl] = files[pkl].replace(b"K\x04\x85", b"M\xa0\x0f\x85")
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    with pytest.raises(weights.UnsafePickleError, match="does not fit its storage"):
        weights.load_pth(path)


def _weight_file(tmp_path, content: bytes, digest=None):
    source = tmp_path / "published.bin"
    source.write_bytes(content)
    sha = digest or hashlib.sha256(content).hexdigest()
    return weights.WeightFile("published.bin", source.as_uri(), sha)


def test_download_is_checked_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(weights.OFFLINE_ENV, raising=False)
    good = _weight_file(tmp_path, b"weights")
    path = weights.fetch(good)
    assert path == str(tmp_path / "cache" / "published.bin")
    assert open(path, "rb").read() == b"weights"
    bad = weights.WeightFile("other.bin", good.url, "0" * 64)
    with pytest.raises(weights.WeightsUnavailable, match="expected 0000"):
        weights.fetch(bad)
    assert os.listdir(tmp_path / "cache") == ["published.bin"]  # Nothing half-written left.
    (tmp_path / "cache" / "published.bin").write_bytes(b"corrupted")
    with pytest.raises(weights.WeightsUnavailable, match="corrupt"):
        weights.fetch(good)


def test_offline_error_names_url_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    with pytest.raises(weights.WeightsUnavailable) as err:
        weights.fetch(weights.FID_INCEPTION)
    assert weights.FID_INCEPTION.url in str(err.value)
    assert str(tmp_path / weights.FID_INCEPTION.name) in str(err.value)
    monkeypatch.delenv(weights.OFFLINE_ENV)
    unreachable = weights.WeightFile("x.pth", (tmp_path / "missing").as_uri(), "0" * 64)
    with pytest.raises(weights.WeightsUnavailable, match="could not download"):
        weights.fetch(unreachable)


def test_explicit_path_must_exist(tmp_path):
    with pytest.raises(weights.WeightsUnavailable, match="no file"):
        weights.fetch(weights.VGG16, str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_weights_file_is_named_as_damaged(tmp_path, legacy, damage):
    path = str(tmp_path / "w.pth")
    torch.save(_tensors(), path, _use_new_zipfile_serialization=not legacy)
    data = open(path, "rb").read()
    garbage = b"this is not a torch checkpoint\n" * 64  # fixed: random bytes may parse
    damaged = {"truncated": data[: len(data) // 2], "garbage": garbage, "empty": b""}
    open(path, "wb").write(damaged[damage])
    with pytest.raises(weights.WrongWeights, match="damaged .*fetch it again") as err:
        weights.load_pth(path)
    assert isinstance(err.value, UserError) and str(err.value).startswith(path)
