"""The manifest of a token export: what its shards hold, and checks that they are all there.

OUTPUT/manifest.json is written last by process 0, after every process has written its
shards: its presence means the export is complete. It describes the tokenizer, vocabulary,
token layout, preprocessing and source, and lists every shard with its row count and sha256.
OUTPUT/export_spec.json pins the settings that decide what each shard holds, so a rerun on the
same directory with other settings fails instead of mixing two exports.
"""

from __future__ import annotations

import datetime
import json
import logging
import os

import numpy as np
from jax.experimental import multihost_utils

from visual_tokenizers.core import files
from visual_tokenizers.core.errors import UserError
from visual_tokenizers.core.tokens import shards as shards_lib
from visual_tokenizers.core.tokens import stats as token_stats
from visual_tokenizers.core.tokens.layout import TokenRowLayout

MANIFEST = "manifest.json"
SPEC = "export_spec.json"
STATS = "stats.json"
PLOT = "rank_frequency.png"
FORMAT = "visual-tokens/1"


class ExportError(UserError, RuntimeError):
    """An export directory that cannot be resumed, or shards that do not add up."""


def check_spec(output_dir: str, spec: dict, *, write: bool) -> None:
    """Fails if OUTPUT was started with other settings; records `spec` when `write`."""
    files.check_or_record_settings(
        os.path.join(output_dir, SPEC),
        spec,
        what=f"{output_dir} holds an export made",
        fix="Rerun with the original settings to resume it, or pass a fresh --workdir.",
        error=ExportError,
        write=write,
    )


def scan_shards(output_dir: str, relpaths: list[str], layout, stats: token_stats.TokenStats):
    """Reads every shard once: entries (path, rows, bytes, sha256), all keys, token statistics.

    Raises ExportError for a missing shard or a key seen twice.
    """
    entries, seen = [], set()
    for rel in relpaths:
        path = os.path.join(output_dir, rel)
        if not os.path.exists(path):
            raise ExportError(f"shard {rel} is missing from {output_dir}; rerun the export")
        keys, _, tokens = shards_lib.read_shard(path)
        duplicates = seen.intersection(keys)
        if duplicates or len(set(keys)) != len(keys):
            some = sorted(duplicates)[:3] or keys[:3]
            raise ExportError(f"{rel}: keys exported twice, e.g. {some}")
        seen.update(keys)
        if len(tokens):
            stats.update(layout.raw(tokens))
        entries.append(
            {
                "path": rel.replace(os.sep, "/"),
                "rows": len(keys),
                "bytes": os.path.getsize(path),
                "sha256": shards_lib.sha256_file(path),
            }
        )
    return entries, seen


def refuse_empty(workdir: str, plan: shards_lib.Plan, source) -> None:
    """An ExportError on every process when the shards hold no row at all: a source whose every
    image is unreadable (or an empty one) must not pass for a finished export. Some unreadable
    images are fine: they are skipped, counted and listed in the manifest."""
    mine = shards_lib.count_rows(workdir, plan.shard_names(plan.process_index))
    counts = np.array([mine, source.num_skipped], np.int64)
    if plan.process_count > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
    rows, skipped = (int(c) for c in counts)
    if rows:
        return
    reasons = list(getattr(source, "skipped", {}).values())[:1]
    example = f" (e.g. {reasons[0]})" if reasons else ""
    raise ExportError(
        f"{source.name}: no readable image to export: {plan.num_examples} example(s) tried, "
        f"{skipped} unreadable in this run{example}, 0 rows written. Fix or replace the files "
        "(or point config.data.source at the right data), then rerun with a fresh --workdir "
        "(this one holds only empty shards)"
    )


def finalize(output_dir, spec, info, relpaths, layout, *, expected_keys, codebooks, top_k=20):
    """Writes codebooks, stats.json, the plot and (last) manifest.json; returns a summary.

    expected_keys: every key the export should hold (None for streams, where it is unknown);
    keys missing from the shards are the source's unreadable examples and are listed.
    codebooks: name -> (array, meaning), saved as OUTPUT/<name>.npy.
    """
    stats = token_stats.TokenStats(layout.value_vocab)
    entries, seen = scan_shards(output_dir, relpaths, layout, stats)
    missing = sorted(set(expected_keys) - seen) if expected_keys is not None else []
    result = _write_stats(output_dir, stats, layout, top_k)
    saved = {}
    for name, (array, meaning) in codebooks.items():
        np.save(os.path.join(output_dir, f"{name}.npy"), array)
        saved[name] = {"path": f"{name}.npy", "shape": list(array.shape), "meaning": meaning}
    manifest = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **info,
        "spec": spec,
        "codebooks": saved,
        "shards": entries,
        "total_rows": sum(e["rows"] for e in entries),
        "unreadable_keys": missing,
        "stats": {"path": STATS, "plot": PLOT},
    }
    files.write_json(os.path.join(output_dir, MANIFEST), manifest)
    logging.info(
        "export: %d rows in %d shards, %d unreadable; manifest %s",
        manifest["total_rows"],
        len(entries),
        len(missing),
        os.path.join(output_dir, MANIFEST),
    )
    return {
        "rows": manifest["total_rows"],
        "shards": len(entries),
        "unreadable": len(missing),
        **{f"stats/{k}": v for k, v in result.items() if np.ndim(v) == 0},
    }


def read_manifest(output_dir: str) -> dict:
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.exists(path):
        raise ExportError(
            f"{path} does not exist: the export in {output_dir} is missing or unfinished. "
            "Run (or rerun) the export with mode=export first."
        )
    with open(path) as f:
        return json.load(f)


def verify(output_dir: str) -> dict:
    """Checks every shard's row count and sha256 against the manifest; returns the manifest."""
    manifest = read_manifest(output_dir)
    for entry in manifest["shards"]:
        path = os.path.join(output_dir, entry["path"])
        if not os.path.exists(path) or shards_lib.sha256_file(path) != entry["sha256"]:
            raise ExportError(f"{path} is missing or differs from its manifest sha256")
    return manifest


def read_rows(output_dir: str, manifest: dict, max_rows: int = 0):
    """(keys, stored token rows [N, L]) of the first `max_rows` rows (0 = all), manifest order."""
    keys, tokens = [], []
    for entry in manifest["shards"]:
        if max_rows and len(keys) >= max_rows:
            break
        k, _, t = shards_lib.read_shard(os.path.join(output_dir, entry["path"]))
        if k:  # an empty shard's tokens have no row length
            keys += k
            tokens.append(t)
    length = manifest["tokens"]["length"]
    stacked = np.concatenate(tokens) if tokens else np.zeros((0, length), np.int32)
    if max_rows:
        keys, stacked = keys[:max_rows], stacked[:max_rows]
    return keys, stacked


def recompute_stats(output_dir: str, top_k: int = 20) -> dict:
    """mode=stats: stats.json and the plot again from the shards of a finished export."""
    manifest = read_manifest(output_dir)
    layout = TokenRowLayout.from_dict(manifest["tokens"]["layout"])
    stats = token_stats.TokenStats(layout.value_vocab)
    relpaths = [e["path"] for e in manifest["shards"]]
    scan_shards(output_dir, relpaths, layout, stats)
    result = _write_stats(output_dir, stats, layout, top_k)
    return {k: v for k, v in result.items() if np.ndim(v) == 0}


def _write_stats(output_dir: str, stats: token_stats.TokenStats, layout, top_k: int) -> dict:
    """stats.json, the rank-frequency plot and the printed summary."""
    result = stats.result(top_k)
    result["unit"] = "group index" if layout.grouped else "token"
    files.write_json(os.path.join(output_dir, STATS), result)
    token_stats.plot_rank_frequency(stats.unigram, result, os.path.join(output_dir, PLOT))
    print(token_stats.summary(result), flush=True)
    return result
