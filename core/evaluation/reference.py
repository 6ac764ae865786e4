"""Reference statistics, per feature space, and the helpers that stream a source through a network.

Used by jobs/evaluate.py (rFID, gFID, sFID, KID, precision/recall, FD-DINOv2), the reference
batch job and the tokenizer trainer's rFID. A feature space (`Space`) is a network with its
input pipeline: 'adm' or 'pytorch_fid' (FID Inception, models/inception.py) or 'dinov2'.
Statistics are only compared within one space (reference_files.py says how a file's space is
known); a reference of another image size than the evaluated images is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from visual_tokenizers.core.data import pipeline as data
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.evaluation import metrics
from visual_tokenizers.core.evaluation import reference_files as ref_files

PR_REFERENCE_MAX = 10_000  # Features kept for precision/recall and KID (ADM: a 10k batch).


def progress(iterable, what: str, total=None):
    total = total if total is not None else getattr(iterable, "num_batches", None)
    return tqdm.tqdm(iterable, desc=what, total=total, disable=jax.process_index() != 0)


def global_mask(local_mask, remaining: int) -> np.ndarray:
    mask = np.asarray(multihost_utils.process_allgather(local_mask, tiled=True), bool)
    return mask & (np.arange(len(mask)) < remaining)


def source_outputs(spec, split, size, num, *, batch_size, seed, data_dir, fn):
    """fn(this process's uint8 batch) -> global outputs (an array or a dict of arrays), over the
    first `num` images of a source; concatenated in the same structure."""
    batches = data.batches(
        spec,
        split=split,
        image_size=size,
        global_batch_size=batch_size,
        train=False,
        seed=seed,
        data_dir=data_dir or None,
    )
    outputs, seen = [], 0
    for batch in progress(batches, f"{spec}:{split}"):
        mask = global_mask(batch["mask"], num - seen)
        outputs.append(jax.tree.map(lambda x, m=mask: x[m], fn(batch["image"])))
        seen += int(mask.sum())
        if seen >= num:
            break
    batches.close()
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


@dataclasses.dataclass(frozen=True)
class Space:
    """A feature space: `apply(uint8 images) -> {kind: features}` (a ShardedApply), the sha256
    of its weights, and the kind Fréchet distances and precision/recall/KID use."""

    name: str  # 'adm', 'pytorch_fid' (Inception pipelines) or 'dinov2'
    apply: Callable
    sha: str
    primary: str = "pool"  # 'pool' for the Inception, 'cls' for DINOv2


def space_stats(space: Space, outputs: dict, needs: set) -> dict:
    """The reference entries `needs` ({'stats', 'spatial', 'features'}) asks for, from features."""
    found = {}
    if "stats" in needs:
        found["mu"], found["sigma"] = metrics.gaussian_stats(outputs[space.primary])
    if "spatial" in needs:
        found["mu_s"], found["sigma_s"] = metrics.gaussian_stats(outputs["spatial"])
    if "features" in needs:
        found["features"] = outputs[space.primary][:PR_REFERENCE_MAX]
    return found


def _complete(found: dict, needs: set) -> bool:
    keys = {"stats": "mu", "spatial": "mu_s", "features": "features"}
    return all(found.get(keys[n]) is not None for n in needs)


def _mismatch(path: str, name: str, found: dict, needs: set) -> str:
    """Why file `path` (no images) cannot serve space `name`, and the fix."""
    fix = (
        "or use a reference with images (an ADM reference batch such as "
        "VIRTUAL_imagenet256_labeled.npz, or one written by jobs/reference_batch.py)"
    )
    if found["pipeline"] is None and found["stats"]:
        return (
            f"reference file {path} does not say which pipeline made its statistics (no "
            f"`pipeline` entry, not an ADM batch with mu_s/sigma_s) and holds no images; "
            f"re-save it with metrics.save_stats(..., pipeline=...), {fix}"
        )
    if found["pipeline"] != name:
        return (
            f"reference file {path} holds {found['pipeline']} statistics and no images, so "
            f"it cannot serve the {name} pipeline; evaluate with "
            f"--config.pipelines='(\"{found['pipeline']}\",)' (and without metrics of other "
            f"feature spaces), {fix}"
        )
    missing = sorted(needs - {"stats"} if "mu" in found["stats"] else needs)
    return (
        f"reference file {path} lacks {missing} for the {name} pipeline (precision/recall and "
        f"KID need reference images or features, sFID needs mu_s/sigma_s) and holds no "
        f"images; leave those metrics out of config.metrics, {fix}"
    )


class Reference:
    """The statistics one evaluation is measured against, in each feature space it uses.

    `needs`: {space name: subset of {'stats', 'spatial', 'features'}}. `reference`
    (config.reference) may name an npz (`path`) or a data source (`source`); otherwise `source`
    = (spec, split, size, num, data_dir) is used: for rFID, the originals of the evaluated
    images. Data-source statistics are cached in $TOKENIZERS_CACHE/fid_stats, one file per
    space, keyed by source, split, size, count, pipeline and the weights' sha256.
    `image_size`: of the evaluated images; a reference of another size is refused.
    """

    def __init__(self, spaces, needs, *, source, reference, image_size, batch_size, seed):
        self.spaces = {s.name: s for s in spaces if s.name in needs}
        self.needs, self.batch_size, self.seed = needs, batch_size, seed
        self.found, self.how, self.cache = {}, {}, {}
        ref = reference or {}
        self.from_originals = not ref.get("path") and not ref.get("source")
        if ref.get("path"):
            self._from_file(ref["path"], image_size)
            return
        if ref.get("source"):
            num = ref.get("num_examples") or (source[3] if source else 50_000)
            source = (ref["source"], ref.get("split") or "train", ref["image_size"], num)
            source += (ref.get("data_dir", ""),)
        if source is None:
            raise ConfigError(
                "set --config.reference.path (an npz with statistics and/or arr_0 images, e.g. "
                "ADM's VIRTUAL_imagenet256_labeled.npz) or --config.reference.source (a data "
                "source)"
            )
        self.source = source
        spec, split, size, num, _ = source
        ref_files.check_image_size(f"{spec}:{split}", size, image_size)
        self.name = f"{spec}:{split} at {size}px, {num} images"
        for name, space in self.spaces.items():
            self.cache[name] = ref_files.stats_cache_path(spec, split, size, num, space.sha, name)
            if os.path.isfile(self.cache[name]):
                found = ref_files.load_reference(self.cache[name])
                entries = {**found["stats"], "features": found["features"]}
                if found["pipeline"] == name and _complete(entries, needs[name]):
                    self.found[name], self.how[name] = entries, "cached statistics"

    def _from_file(self, path: str, image_size: int | None) -> None:
        found = ref_files.load_reference(path)
        self.name = os.path.abspath(path)
        ref_files.check_image_size(path, found["image_size"], image_size)
        entries = {**found["stats"], "features": found["features"]}
        own = found["pipeline"]
        missing = {}
        for name in self.spaces:
            if own == name and _complete(entries, self.needs[name]):
                self.found[name], self.how[name] = entries, f"{own} statistics of the file"
            elif not found["has_images"]:
                raise data.DataError(_mismatch(path, name, found, self.needs[name]))
            else:
                missing[name] = self.needs[name]
        if missing:
            reader = metrics.NpzImages(path, "reference file", labels=False)
            outputs = collections_of(
                (images[:count] for images, count in reader.batches(self.batch_size)),
                [self.spaces[n] for n in missing],
                replicated=True,
                total=reader.num_batches(self.batch_size),
            )
            for name, needs in missing.items():
                computed = space_stats(self.spaces[name], outputs[name], needs)
                if own == name:  # the file's own statistics, as the ADM evaluator uses them
                    computed.update({k: v for k, v in entries.items() if v is not None})
                self.found[name] = computed
                self.how[name] = f"computed with {name} from the file's images"

    def missing(self) -> list[str]:
        return [name for name in self.spaces if name not in self.found]

    def compute_from_source(self) -> None:
        """Statistics of the source's first `num` images in every missing space: one pass."""
        wanted = [self.spaces[n] for n in self.missing()]
        outputs = source_outputs(
            *self.source[:4],
            batch_size=self.batch_size,
            seed=self.seed,
            data_dir=self.source[4],
            fn=lambda images: {s.name: s.apply(images) for s in wanted},
        )
        self.set_from_outputs(outputs)

    def set_from_outputs(self, outputs: dict) -> None:
        """Statistics of missing spaces from {space: {kind: features}}, cached for next time."""
        for name in self.missing():
            # Everything the space gives, so that the cache serves any later metric set.
            full = {"stats", "features"} | ({"spatial"} if "spatial" in outputs[name] else set())
            self.found[name] = space_stats(self.spaces[name], outputs[name], full)
            self.how[name] = f"computed with {name} from the reference images"
            if jax.process_index() == 0 and name in self.cache:
                size = self.source[2]
                ref_files.save_stats(
                    self.cache[name], pipeline=name, image_size=size, **self.found[name]
                )
                logging.info("%s reference statistics cached at %s", name, self.cache[name])

    def describe(self) -> dict:
        """What the report says about the reference: its name and, per space, its statistics."""
        return {"name": self.name, "statistics": dict(self.how)}


def collections_of(batches, spaces, *, replicated: bool, total=None) -> dict:
    """{space: {kind: features}} of every image in `batches` (global uint8 batches)."""
    outputs = {s.name: {} for s in spaces}
    for images in progress(batches, "reference images", total):
        for space in spaces:
            fn = space.apply.replicated if replicated else space.apply
            for kind, value in fn(images).items():
                outputs[space.name].setdefault(kind, []).append(value[: len(images)])
    return {n: {k: np.concatenate(v) for k, v in out.items()} for n, out in outputs.items()}
