"""Image sources picked by a string spec.

`make_source(spec, split, image_size=..)` returns a source with `__len__`, `name`,
`num_classes`, `num_skipped` and random access `load(index)`: `folder:` sources live here,
`tfds:` ones in tfds.py, the built-in ones in builtin.py; decoding and preprocessing in
decoding.py.
"""

from __future__ import annotations

import logging
import os
import re

from PIL import Image

from visual_tokenizers.core.data import builtin as builtin_data
from visual_tokenizers.core.data import tfds as data_tfds
from visual_tokenizers.core.data.decoding import IMAGE_EXTENSIONS, DataError, _DecodingSource

log = logging.getLogger(__name__)


# Split names and the folder names that hold them, in the order they are looked for.
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid"),
    "test": ("test", "testing"),
}
_SPLIT_OF = {name: split for split, names in SPLIT_FOLDERS.items() for name in names}


class FolderSource(_DecodingSource):
    """Image files under a directory, found recursively and sorted for determinism.

    Splits: PATH/<split> is read when it exists; else the subfolder named like the split
    (SPLIT_FOLDERS, case-insensitive: split 'validation' reads val/, 'val' reads validation/).
    A folder with split-like subfolders (train/, val/, test/, ...) but none for the split is
    refused rather than read whole (which would take 'train' and 'val' for classes). A folder
    without them is the data for every split; split 'all' reads any folder whole.
    """

    def __init__(self, path: str, split: str):
        super().__init__()
        if not os.path.isdir(path):
            raise DataError(f"folder:{path}: no such directory. Pass an existing image folder.")
        self.root = os.path.abspath(_split_root(path, split))
        self.files = _list_images(self.root)
        if not self.files:
            raise DataError(
                f"folder:{path}: no {'/'.join(IMAGE_EXTENSIONS)} files found under "
                f"{self.root}. Point the spec at a folder of images (class subfolders optional)."
            )
        self.class_names, self.labels = _folder_labels(self.files)
        self.num_classes = len(self.class_names)
        self.name = f"folder:{self.root}"

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, draft: int | None = None) -> tuple[Image.Image, int]:
        path = os.path.join(self.root, self.files[index])
        return self._decode(path, path, draft), self.labels[index]


def _split_root(path: str, split: str) -> str:
    """The folder read for `split` (see FolderSource)."""
    if os.path.isdir(os.path.join(path, split)):
        return os.path.join(path, split)
    if split == "all":
        return path
    subfolders = sorted(e.name for e in os.scandir(path) if e.is_dir())
    split_like = [d for d in subfolders if d.lower() in _SPLIT_OF]
    if not split_like:
        return path  # No split layout: the folder itself is the data (class subfolders or flat).
    wanted = SPLIT_FOLDERS.get(_SPLIT_OF.get(split.lower(), ""), (split.lower(),))
    matches = [d for d in split_like if d.lower() in wanted]
    if len(matches) == 1:
        return os.path.join(path, matches[0])
    why = f"{' and '.join(matches)} all match" if matches else "none is for"
    raise DataError(
        f"folder:{path} has split subfolders {', '.join(split_like)} but {why} split {split!r}. "
        "Set data.split (eval.split for evaluation) to one of them, or to 'all' to read the "
        "whole folder with its subfolders as classes."
    )


def _list_images(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(found)


def _folder_labels(files: list[str]) -> tuple[list[str], list[int]]:
    """Class = top-level subfolder (sorted names), unless some images sit in the root."""
    tops = [f.split(os.sep, 1)[0] if os.sep in f else None for f in files]
    if None in tops:
        return ["all"], [0] * len(files)
    names = sorted(set(tops))
    index = {n: i for i, n in enumerate(names)}
    return names, [index[t] for t in tops]


def make_source(spec: str, split: str, *, image_size: int, data_dir: str | None = None):
    """The source named by `spec` (see the module docstring); a split in the spec wins."""
    scheme, sep, rest = spec.partition(":")
    if scheme == "builtin" and sep:
        if rest not in builtin_data.BUILTINS:
            raise DataError(
                f"Unknown builtin dataset {rest!r}; valid: "
                + ", ".join(f"builtin:{n}" for n in builtin_data.BUILTINS)
            )
        return builtin_data.BUILTINS[rest](split, image_size)
    if scheme == "folder" and rest:
        return FolderSource(rest, split)
    if scheme == "tfds" and rest:
        name, spec_split = _parse_tfds(rest)
        return open_tfds(name, spec_split or split, data_dir)
    raise DataError(
        f"Unknown data spec {spec!r}; valid forms: tfds:NAME[:SPLIT], folder:PATH, "
        "builtin:shapes, builtin:shapes_plain, builtin:photos."
    )


def _parse_tfds(rest: str) -> tuple[str, str | None]:
    """'NAME[/CONFIG][:X.Y.Z][:SPLIT]'; splits may contain ':' inside slices."""
    match = re.fullmatch(r"([^:\[]+(?::\d+\.\d+\.\d+)?)(?::(.+))?", rest)
    if not match:
        raise DataError(f"Bad TFDS spec 'tfds:{rest}'; expected tfds:NAME[:SPLIT].")
    return match.group(1), match.group(2)


def open_tfds(name: str, split: str, data_dir: str | None):
    """A random-access TfdsSource when stored as ArrayRecord/Parquet, else a TfdsStream."""
    return data_tfds.open_tfds(name, split, data_dir)
