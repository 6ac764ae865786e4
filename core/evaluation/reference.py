"""FID reference statistics and the helpers that stream a source through a network.

Used by jobs/evaluate.py (rFID, gFID, precision/recall) and by the tokenizer trainer's rFID.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from visual_tokenizers.core.data import pipeline as data
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.evaluation import metrics

PR_REFERENCE_MAX = 10_000  # Pool features kept for precision/recall (ADM: a 10k batch).


def progress(iterable, what: str, total=None):
    total = total if total is not None else getattr(iterable, "num_batches", None)
    return tqdm.tqdm(iterable, desc=what, total=total, disable=jax.process_index() != 0)


def global_mask(local_mask, remaining: int) -> np.ndarray:
    mask = np.asarray(multihost_utils.process_allgather(local_mask, tiled=True), bool)
    return mask & (np.arange(len(mask)) < remaining)


def source_outputs(spec, split, size, num, *, batch_size, seed, data_dir, fn) -> np.ndarray:
    """fn(this process's uint8 batch) -> global outputs, over the first `num` images of a source."""
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
        outputs.append(fn(batch["image"])[mask])
        seen += int(mask.sum())
        if seen >= num:
            break
    batches.close()
    return np.concatenate(outputs)


class FidReference:
    """The statistics FID is measured against, and the Inception that measures both sides.

    `reference` (config.reference) may name an npz (`path`: mu/sigma, else arr_0 images; ADM
    reference batches have both) or a data source (`source`); otherwise `source` = (spec, split,
    size, num, data_dir) is used: for rFID, the originals of the evaluated images. Data-source
    statistics are cached in $TOKENIZERS_CACHE/fid_stats, keyed by source, split, size, count
    and the weights' sha256, and hold up to 10k pool features for precision/recall.
    """

    def __init__(self, *, inception, source, reference, batch_size, seed, need_pool):
        self.inception, self.sha = inception  # (ShardedApply, weights sha256)
        self.batch_size, self.seed = batch_size, seed
        self.stats = self.pool = None
        ref = reference or {}
        self.from_originals = not ref.get("path") and not ref.get("source")
        if ref.get("path"):
            self._from_file(ref["path"], need_pool)
            return
        if ref.get("source"):
            num = ref.get("num_examples") or (source[3] if source else 50_000)
            source = (ref["source"], ref.get("split") or "train", ref["image_size"], num)
            source += (ref.get("data_dir", ""),)
        if source is None:
            raise ConfigError(
                "set --config.reference.path (npz with mu/sigma or arr_0, e.g. ADM's "
                "VIRTUAL_imagenet256_labeled.npz) or --config.reference.source (a data source)"
            )
        self.source = source
        spec, split, size, num, _ = source
        self.name = f"{spec}:{split} at {size}px, {num} images"
        self.cache = metrics.stats_cache_path(spec, split, size, num, self.sha)
        if os.path.isfile(self.cache):
            found = metrics.load_reference(self.cache)
            if not need_pool or "pool" in found:
                self.stats, self.pool = (found["mu"], found["sigma"]), found.get("pool")

    def _from_file(self, path: str, need_pool: bool) -> None:
        found = metrics.load_reference(path)
        self.name = os.path.abspath(path)
        if found["has_images"] and (need_pool or "mu" not in found):
            reader, pools = metrics.NpzImages(path, "reference file", labels=False), []
            for images, count in progress(reader.batches(self.batch_size), "reference images"):
                pools.append(self.inception.replicated(images)["pool"][:count])
            self.pool = np.concatenate(pools)
        if need_pool and self.pool is None:
            raise data.DataError(
                f"precision/recall need reference images (arr_0); {path} has none: use an ADM "
                "reference batch or --config.reference.source"
            )
        if "mu" in found:
            self.stats = (found["mu"], found["sigma"])
        else:
            self.stats = metrics.gaussian_stats(self.pool)

    def compute_from_source(self) -> None:
        """Statistics of the source's first `num` images, computed once and cached."""
        data_dir = self.source[4]
        pool = source_outputs(
            *self.source[:4],
            batch_size=self.batch_size,
            seed=self.seed,
            data_dir=data_dir,
            fn=lambda images: self.inception(images)["pool"],
        )
        self.set_from_pool(pool)

    def set_from_pool(self, pool: np.ndarray) -> None:
        self.stats, self.pool = metrics.gaussian_stats(pool), pool[:PR_REFERENCE_MAX]
        if jax.process_index() == 0:
            metrics.save_stats(self.cache, mu=self.stats[0], sigma=self.stats[1], pool=self.pool)
        logging.info("FID reference statistics cached at %s", self.cache)

    def result(self, out: dict, name: str) -> dict:
        """{name: FID of out['pool']} (from out['reference_pool'] when stats were missing)."""
        if self.stats is None:
            self.set_from_pool(out["reference_pool"])
        value = metrics.frechet_distance(*metrics.gaussian_stats(out["pool"]), *self.stats)
        return {name: value, "fid_reference": self.name, "inception_sha256": self.sha}
