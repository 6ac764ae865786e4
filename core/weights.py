"""Pretrained weight files: a cache directory, a checked download, and a torch-free .pth reader.

Files are looked up in this order: an explicit local path (config), the cache directory
(`$TOKENIZERS_CACHE`, default `~/.cache/visual-tokenizers`), files that an installed reference
package ships (the LPIPS calibration weights inside the `lpips` wheel), and finally a download
from the canonical URL, only when the network is reachable and `TOKENIZERS_OFFLINE` is unset.
Cached and downloaded files must match their published sha256; offline, the error names the URL
and the path to put the file at.

`.pth` files are read without importing torch: a restricted unpickler admits only the globals a
tensor state dict needs (tensor rebuild, storage types, OrderedDict); anything else, which is
how a malicious pickle runs code, is refused with `UnsafePickleError`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.util
import logging
import os
import pickle
import shutil
import struct
import urllib.error
import urllib.request
import zipfile

import ml_dtypes
import numpy as np

from visual_tokenizers.core import files
from visual_tokenizers.core.errors import UserError

CACHE_ENV = "TOKENIZERS_CACHE"
OFFLINE_ENV = "TOKENIZERS_OFFLINE"
DEFAULT_CACHE = os.path.join("~", ".cache", "visual-tokenizers")


class WeightsUnavailable(UserError, FileNotFoundError):
    """A weights file is missing and could not be downloaded; the message says where to put it."""


class WrongWeights(UserError, KeyError, ValueError):
    """A weights file that is damaged, or holds another network's weights."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """A .pth file asked for a global that a plain tensor state dict never needs."""


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """A published weights file: cache file name, canonical URL and sha256 of its bytes.

    sha256 "" = none is published: the file is used unchecked (its loader checks every tensor's
    name and shape) and its digest is logged, so a run's weights can still be identified."""

    name: str
    url: str
    sha256: str
    package_copy: tuple[str, str] | None = None  # (package, path inside it) shipping this file.


# pytorch-fid's port of the 2015 TF Inception (the FID network); 95,628,359 bytes.
FID_INCEPTION = WeightFile(
    "pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth",
    "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
)
# torchvision's ImageNet VGG16, the LPIPS trunk.
VGG16 = WeightFile(
    "vgg16-397923af.pth",
    "https://download.pytorch.org/models/vgg16-397923af.pth",
    "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
)
# LPIPS v0.1 calibration (1x1 conv) weights for the VGG trunk, as shipped in the lpips wheel.
LPIPS_VGG = WeightFile(
    "lpips-v0.1-vgg.pth",
    "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
    "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
    package_copy=("lpips", os.path.join("weights", "v0.1", "vgg.pth")),
)

# DINOv2 ViT-L/14 without registers (facebookresearch/dinov2 `dinov2_vitl14`), the FD-DINOv2
# network; about 1.2 GB. Meta publishes no checksum (torch.hub loads it unchecked).
DINOV2_VITL14 = WeightFile(
    "dinov2_vitl14_pretrain.pth",
    "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
    "",
)


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(weights: WeightFile, path: str | None = None) -> str:
    """Local path of `weights`: `path` if given, else cache, package copy or a checked download.

    An explicit `path` is trusted (so tests and custom nets can use their own files); its sha256
    is logged and a warning says when it is not the published file.
    """
    if path:
        if not os.path.isfile(path):
            raise WeightsUnavailable(f"{weights.name}: no file at the configured path {path!r}")
        digest = sha256_of(path)
        if not weights.sha256:
            logging.info("%s: %s has sha256 %s (none is published)", weights.name, path, digest)
        elif digest != weights.sha256:
            logging.warning(
                "%s has sha256 %s, not the published %s (%s): results will not be comparable "
                "to numbers measured with the standard weights",
                path,
                digest,
                weights.sha256,
                weights.name,
            )
        return path
    cached = os.path.join(cache_dir(), weights.name)
    if os.path.isfile(cached):
        _check(cached, weights)
        return cached
    shipped = _package_copy(weights)
    if shipped:
        return shipped
    return _download(weights, cached)


def _check(path: str, weights: WeightFile) -> None:
    digest = sha256_of(path)
    if not weights.sha256:
        logging.info("%s: %s has sha256 %s (none is published)", weights.name, path, digest)
    elif digest != weights.sha256:
        raise WeightsUnavailable(
            f"{path} has sha256 {digest}, expected {weights.sha256}: the file is corrupt or not "
            f"{weights.name}. Delete it and download it again from {weights.url}"
        )


def _package_copy(weights: WeightFile) -> str | None:
    """The same file inside an installed package (found without importing the package)."""
    if weights.package_copy is None:
        return None
    package, inner = weights.package_copy
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = os.path.join(list(spec.submodule_search_locations)[0], inner)
    if os.path.isfile(candidate) and sha256_of(candidate) == weights.sha256:
        return candidate
    return None


def _download(weights: WeightFile, target: str) -> str:
    where = (
        f"Download {weights.url} by hand and put it at {target} (or set ${CACHE_ENV} to a "
        "folder holding it, or pass the file's path in the config)."
    )
    if os.environ.get(OFFLINE_ENV):
        raise WeightsUnavailable(f"{weights.name} is not cached and ${OFFLINE_ENV} is set. {where}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    logging.info("downloading %s to %s", weights.url, target)
    try:  # Atomic: a half-written or unchecked file never looks cached.
        with files.atomic_write(target) as partial, open(partial, "wb") as out:
            with urllib.request.urlopen(weights.url, timeout=30) as r:
                shutil.copyfileobj(r, out, 1 << 20)
            out.flush()
            _check(partial, weights)
    except (urllib.error.URLError, OSError) as err:
        raise WeightsUnavailable(f"could not download {weights.name} ({err}). {where}") from err
    return target


# ----------------------------------------------------------------------------- .pth reading

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclasses.dataclass
class _Storage:
    dtype: np.dtype
    key: str
    data: np.ndarray | None = None  # Flat; filled after the pickle is read (legacy format).


@dataclasses.dataclass
class _View:
    root: _Storage
    start: int

    @property
    def data(self):
        return None if self.root.data is None else self.root.data[self.start :]


@dataclasses.dataclass
class _LazyTensor:
    storage: _Storage | _View
    offset: int
    shape: tuple
    stride: tuple

    def materialize(self) -> np.ndarray:
        if not isinstance(self.storage, _Storage | _View):
            raise UnsafePickleError(f"a tensor was rebuilt from {type(self.storage).__name__}")
        flat = self.storage.data  # A _Storage, or a legacy _View into one.
        if flat is None:
            raise pickle.UnpicklingError("a tensor's storage was never read")
        # as_strided does not check bounds: a crafted file must not read outside its storage.
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        if (
            self.offset < 0
            or min(self.stride, default=0) < 0
            or (min(self.shape, default=1) > 0 and last >= len(flat))
        ):
            raise UnsafePickleError(
                f"a tensor of shape {self.shape}, stride {self.stride} at offset {self.offset} "
                f"does not fit its storage of {len(flat)} elements"
            )
        if not self.shape:
            return flat[self.offset].copy()
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], self.shape, [s * itemsize for s in self.stride]
        )
        return np.array(view)  # A copy: views of one storage must not alias each other.


def _rebuild_tensor(storage, offset, shape, stride, *unused):
    return _LazyTensor(storage, offset, tuple(shape), tuple(stride))


def _rebuild_parameter(data, *unused):
    return data  # requires_grad, hooks and state mean nothing outside torch.


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
_SAFE_GLOBALS.update({("torch", name): np.dtype(d) for name, d in _STORAGE_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a tensor state dict needs, to our own harmless stand-ins."""

    def __init__(self, file, storages: dict, what: str):
        super().__init__(file)
        self.storages, self.what = storages, what

    def find_class(self, module, name):
        found = _SAFE_GLOBALS.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self.what}: refusing to load global {module}.{name}. A weights file holds only "
                "tensors; this one would run code or is not a state dict. Do not use it."
            )
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"{self.what}: unexpected persistent id {pid!r}")
        dtype, key = pid[1], str(pid[2])
        if not isinstance(dtype, np.dtype):
            raise UnsafePickleError(f"{self.what}: storage {key} has no known dtype ({dtype!r})")
        if len(pid) > 5 and pid[5] is not None:  # Legacy view: (view key, offset, size).
            root = self.storages.setdefault(key, _Storage(dtype, key))
            return _View(root, pid[5][1])
        return self.storages.setdefault(key, _Storage(dtype, key))


def load_pth(path: str) -> dict:
    """A torch-saved state dict (zip or legacy format) as nested dicts of numpy arrays.

    Raises UnsafePickleError for a file that asks to run code, WrongWeights for one that is
    truncated or not a torch checkpoint at all."""
    try:
        if zipfile.is_zipfile(path):
            return _materialize(_load_zip(path))
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip whose end (its directory) is missing
                raise zipfile.BadZipFile("the zip archive is cut short")
        return _materialize(_load_legacy(path))
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error) as err:
        raise _damaged(path, err) from err
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as err:
        raise _damaged(path, err) from err


def _damaged(path: str, err: Exception) -> WrongWeights:
    return WrongWeights(
        f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err}); the file "
        "is damaged (e.g. a partial download) or not a weights file: delete it and fetch it again"
    )


def _load_zip(path: str):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise pickle.UnpicklingError(f"{path}: not a torch checkpoint (no single data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        order = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else ""
        if order and order.strip() != "little":
            raise pickle.UnpicklingError(f"{path}: big-endian checkpoints are not supported")
        storages: dict = {}
        with archive.open(pickles[0]) as f:
            result = _RestrictedUnpickler(f, storages, path).load()
        for key, storage in storages.items():
            raw = archive.read(f"{prefix}data/{key}")
            storage.data = np.frombuffer(raw, storage.dtype)
    return result


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_legacy(path: str):
    """torch < 1.6 format: magic, version, sys info, the object, storage keys, raw storages."""
    storages: dict = {}
    with open(path, "rb") as f:
        header = [_RestrictedUnpickler(f, storages, path).load() for _ in range(3)]
        if header[0] != _LEGACY_MAGIC:
            raise pickle.UnpicklingError(f"{path}: not a torch checkpoint (bad magic number)")
        if not header[2].get("little_endian", True):
            raise pickle.UnpicklingError(f"{path}: big-endian checkpoints are not supported")
        result = _RestrictedUnpickler(f, storages, path).load()
        keys = _RestrictedUnpickler(f, storages, path).load()
        for key in keys:
            storage = storages[str(key)]
            (count,) = struct.unpack("<q", f.read(8))
            raw = f.read(count * storage.dtype.itemsize)
            storage.data = np.frombuffer(raw, storage.dtype)
    return result


def _materialize(obj):
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def flatten_state_dict(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{'a': {'b': x}} -> {'a.b': x}; a state dict that is already flat is returned as is."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_state_dict(value, name + "."))
        else:
            flat[name] = value
    return flat


def require(state: dict, key: str, shape: tuple, what: str) -> np.ndarray:
    """state[key] with the expected shape, or an error naming the file's problem."""
    if key not in state:
        raise WrongWeights(f"{what}: the weights file has no entry {key!r}; is it the right file?")
    value = np.asarray(state[key])
    if value.shape != tuple(shape):
        raise WrongWeights(f"{what}: {key} has shape {value.shape}, expected {tuple(shape)}")
    return value
