"""Token export: shards read back with plain pyarrow/pandas equal tokenizer.encode, a kill -9
mid-export resumes to every key exactly once, decode mode equals tokenizer.decode, EMA weights
and the vocabulary offset are honoured, and the statistics recover known distributions."""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visual_tokenizers.configs import export_tokens as export_config
from visual_tokenizers.configs import vq_b16
from visual_tokenizers.core.data import builtin as builtin_data
from visual_tokenizers.core.data.images import to_model, to_uint8
from visual_tokenizers.core.runtime import checkpoint
from visual_tokenizers.core.tokens import manifest as token_manifest
from visual_tokenizers.core.tokens import shards as token_shards
from visual_tokenizers.core.tokens import stats as token_stats
from visual_tokenizers.core.tokens.layout import TokenRowLayout, Vocab
from visual_tokenizers.jobs import export_tokens
from visual_tokenizers.trained import builders
from visual_tokenizers.trained.tokenizer import TrainedTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = 200  # examples exported: 13 batches of 16, 7 shards of <= 32 rows
EXPORT = {"data.max_examples": NUM, "data.batch_size": 16, "rows_per_shard": 32}


def _set(config, overrides):
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def export_cfg(tokenizer_workdir, **extra):
    config = export_config.get_config("tiny")
    return _set(config, {"tokenizer.workdir": tokenizer_workdir, **EXPORT, **extra})


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny tokenizer checkpoint, written as a training run writes it (a freshly initialised
    state at step 0: training it first would only make the tests slower)."""
    workdir = str(tmp_path_factory.mktemp("tokenizer"))
    builders.save_untrained(vq_b16.get_config("tiny"), workdir)
    return workdir


@pytest.fixture(scope="module")
def exported(tokenizer_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export"))
    result = export_tokens.run(export_cfg(tokenizer_dir), out)
    return out, result


def source_images(indices):
    source = builtin_data.ShapesSource("test", 32)
    items = [source.read(i) for i in indices]
    return np.stack([im for im, _ in items]), np.array([label for _, label in items])


@pytest.fixture(scope="module")
def loaded(tokenizer_dir):
    return TrainedTokenizer.from_workdir(tokenizer_dir)


def reference_tokens(loaded, images, params=None):
    """tokenizer.encode, jitted whole (op-by-op dispatch of a ViT is slow on 2 cores)."""

    def encode(params, model_state, images):
        return loaded.model_def.merge(params, model_state).encode(to_model(images))

    indices = jax.jit(encode)(params or loaded.params, loaded.model_state, images)
    return np.asarray(indices).reshape(len(images), -1)


def test_export_reads_back_with_pyarrow_and_equals_encode(loaded, exported):
    out, result = exported
    files = sorted(glob.glob(os.path.join(out, "data", "*.parquet")))
    assert len(files) == 7 and result["rows"] == NUM == result["examples_encoded"]
    table = pq.read_table(os.path.join(out, "data"))  # plain pyarrow, the whole directory
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == NUM
    order = np.argsort(keys)
    index = np.array([int(k.split("/")[1]) for k in keys])[order]
    np.testing.assert_array_equal(index, np.arange(NUM))
    tokens = np.array(table.column("tokens").to_pylist(), np.int64)[order]
    images, labels = source_images(range(NUM))
    np.testing.assert_array_equal(tokens, reference_tokens(loaded, images))
    np.testing.assert_array_equal(table.column("label").to_numpy()[order], labels)
    assert str(table.schema.field("tokens").type) == "list<element: int32>"
    frame = pd.read_parquet(files[0])  # pandas, as an LM pipeline would
    assert list(frame.columns) == ["key", "label", "tokens"] and len(frame.tokens[0]) == 64


def test_manifest_describes_the_export(loaded, exported):
    out, _ = exported
    manifest = token_manifest.verify(out)  # every sha256 and file present
    assert manifest["total_rows"] == NUM == sum(s["rows"] for s in manifest["shards"])
    assert manifest["quantizer"]["vocab"]["size"] == 256
    assert manifest["tokens"]["grid_shape"] == [8, 8] and manifest["tokens"]["length"] == 64
    assert manifest["tokenizer"]["step"] == 0 and manifest["tokenizer"]["weights"] == "params"
    assert manifest["preprocessing"]["image_size"] == 32
    model = loaded.model()
    codebook = np.load(os.path.join(out, manifest["codebooks"]["codebook"]["path"]))
    np.testing.assert_allclose(codebook, model.quantizer.embed(np.arange(256)), atol=1e-6)
    path = os.path.join(out, "data", "test-p00000-00003.parquet")
    original = open(path, "rb").read()
    try:
        with open(path, "r+b") as f:  # flip one byte: the manifest must notice
            f.seek(100)
            f.write(bytes([original[100] ^ 0xFF]))
        with pytest.raises(token_manifest.ExportError, match="sha256"):
            token_manifest.verify(out)
    finally:
        with open(path, "wb") as f:
            f.write(original)


def test_stats_json_matches_the_exported_tokens(exported):
    out, result = exported
    stats = json.load(open(os.path.join(out, "stats.json")))
    tokens = np.concatenate([t for _, _, t in map(token_shards.read_shard, _shards(out))])
    counts = np.bincount(tokens.reshape(-1), minlength=256)
    p = counts[counts > 0] / counts.sum()
    assert stats["entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum())
    assert stats["vocab_used"] == (counts > 0).sum() and stats["log2_vocab"] == 8.0
    assert stats["top_tokens"][0]["token"] == counts.argmax()
    assert 0 < stats["conditional_entropy_bits"] <= stats["entropy_bits"]
    assert result["stats/entropy_bits"] == stats["entropy_bits"]
    assert Image.open(os.path.join(out, "rank_frequency.png")).size[0] > 100


def _shards(out):
    return sorted(glob.glob(os.path.join(out, "data", "*.parquet")))


def test_kill_9_then_rerun_gives_every_key_exactly_once(tokenizer_dir, exported, tmp_path):
    out = str(tmp_path)
    args = [sys.executable, "run.py", "--config=configs/export_tokens.py:tiny"]
    args += [f"--workdir={out}", f"--config.tokenizer.workdir={tokenizer_dir}"]
    args += [f"--config.{k}={v}" for k, v in {**EXPORT, "debug_write_delay_s": 1.0}.items()]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    # Kill while one shard is complete and the next exists only under its temporary name.
    while not (_shards(out) and glob.glob(os.path.join(out, "data", ".*.tmp*"))):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(proc.stdout.read().decode()[-3000:])
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = {p: os.stat(p) for p in _shards(out)}
    assert 1 <= len(complete) < 7 and not os.path.exists(os.path.join(out, "manifest.json"))
    assert glob.glob(os.path.join(out, "data", ".*.tmp*"))  # a partial shard was left

    result = export_tokens.run(export_cfg(tokenizer_dir), out)
    assert result["shards_skipped"] == len(complete)
    assert result["examples_encoded"] == NUM - 32 * len(complete)
    assert not glob.glob(os.path.join(out, "data", ".*"))  # the partial one was redone
    for path, before in complete.items():  # complete shards were not rewritten
        after = os.stat(path)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    manifest = token_manifest.verify(out)
    assert manifest["total_rows"] == NUM and len(manifest["shards"]) == 7
    got = _rows_by_key(out)
    want = _rows_by_key(exported[0])
    assert sorted(got) == sorted(want) == [f"test/{i:08d}" for i in range(NUM)]
    assert all(got[k] == want[k] for k in want)


def _rows_by_key(out):
    table = pq.read_table(os.path.join(out, "data"))
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "duplicate keys"
    return dict(zip(keys, table.column("tokens").to_pylist(), strict=True))


def test_two_processes_export_like_one(tokenizer_dir, exported, tmp_path):
    """Two processes of 4 CPU devices form one 8-device mesh; each writes its own shards and
    process 0's manifest covers both: the same rows as the one-process export."""
    out, port = str(tmp_path), 20000 + (os.getpid() + 7) % 20000
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = []
    for i in range(2):
        args = [sys.executable, "run.py", "--config=configs/export_tokens.py:tiny"]
        args += [f"--workdir={out}", f"--config.tokenizer.workdir={tokenizer_dir}"]
        args += [f"--config.{k}={v}" for k, v in EXPORT.items()]
        args += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
        args += [f"--process_id={i}"]
        procs.append(
            subprocess.Popen(
                args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-3000:]
    names = [os.path.basename(p) for p in _shards(out)]
    assert {n.split("-")[1] for n in names} == {"p00000", "p00001"}
    manifest = token_manifest.verify(out)
    assert manifest["total_rows"] == NUM and manifest["sharding"]["process_count"] == 2
    assert _rows_by_key(out) == _rows_by_key(exported[0])
    with open(os.path.join(out, "config.json")) as f:  # process 0's resolved config
        written = json.load(f)
    assert written["tokenizer"]["workdir"] == tokenizer_dir and written["data"]["batch_size"] == 16


def test_folder_source_keys_are_relative_paths(tokenizer_dir, tmp_path):
    """Keys of folder: sources are file paths; an unreadable file is listed, not exported."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    names = [f"{c}/{i}.png" for c in ("cats", "dogs") for i in range(3)]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / name)
    (root / "dogs" / "broken.png").write_bytes(b"not a png")
    config = export_cfg(tokenizer_dir, rows_per_shard=8, **{"data.max_examples": 0})
    config.data.update(source=f"folder:{root}", split="train")
    result = export_tokens.run(config, str(tmp_path / "out"))
    manifest = token_manifest.verify(str(tmp_path / "out"))
    assert result["rows"] == 6 and manifest["unreadable_keys"] == ["dogs/broken.png"]
    table = pq.read_table(str(tmp_path / "out" / "data"))
    keys, labels = table.column("key").to_pylist(), table.column("label").to_pylist()
    labels = dict(zip(keys, labels, strict=True))
    assert labels == {n: int(n.startswith("dogs")) for n in names}


def test_changed_settings_on_an_existing_export_are_refused(exported):
    out, _ = exported
    spec = json.load(open(os.path.join(out, token_manifest.SPEC)))
    with pytest.raises(token_manifest.ExportError, match="num_examples"):
        token_manifest.check_spec(out, {**spec, "num_examples": NUM + 1}, write=True)


def test_decode_mode_equals_tokenizer_decode(tokenizer_dir, loaded, exported):
    out, _ = exported
    config = export_cfg(tokenizer_dir, mode="decode", **{"decode.max_images": 20})
    result = export_tokens.run(config, out)  # 20 rows: a full batch and a padded one
    assert result["decoded_images"] == 20
    keys, tokens = token_manifest.read_rows(out, token_manifest.read_manifest(out), 20)
    decode = jax.jit(lambda p, s, i: loaded.model_def.merge(p, s).decode(i))
    want = to_uint8(decode(loaded.params, loaded.model_state, tokens.reshape(-1, 8, 8)))
    got = np.stack([np.asarray(Image.open(f"{out}/decoded/{k}.png")) for k in keys])
    assert got.shape == want.shape == (20, 32, 32, 3)
    # Same float32 graph, jitted and sharded vs eager: rounding may move a pixel by one level.
    assert np.abs(got.astype(int) - want).max() <= 1 and (got == want).mean() > 0.99


def _with_ema(tokenizer_dir: str, workdir: str, ema_of) -> None:
    """A copy of the tokenizer checkpoint whose train state also holds EMA weights
    ema_of(params), as a run with ema_decay > 0 writes them."""
    step, raw = checkpoint.load_raw(tokenizer_dir)
    _, config = checkpoint.read_config(tokenizer_dir)
    ema = jax.tree.map(lambda x: ema_of(np.asarray(x)), raw["params"])
    mngr = checkpoint.manager(workdir, keep=1, async_save=False)
    checkpoint.save(mngr, step, {**raw, "ema_params": ema}, config)
    mngr.wait_until_finished()
    mngr.close()


def test_ema_weights_offset_and_delimiters(tokenizer_dir, loaded, tmp_path):
    """Given EMA weights, the export uses them; offset and begin/end ids wrap every row."""
    ema_params = jax.tree.map(lambda x: x * 0.5 + 0.01, loaded.params)  # encode differently
    with_ema = str(tmp_path / "tokenizer")
    _with_ema(tokenizer_dir, with_ema, lambda x: x * 0.5 + 0.01)
    extra = {"data.max_examples": 24, "vocab_offset": 1000, "image_delimiters": True}
    out = str(tmp_path / "export")
    result = export_tokens.run(export_cfg(with_ema, **extra), out)
    manifest = token_manifest.verify(out)
    assert manifest["tokenizer"]["weights"] == "ema" and result["rows"] == 24
    boi, eoi = manifest["tokens"]["begin_of_image_id"], manifest["tokens"]["end_of_image_id"]
    assert (boi, eoi) == (1256, 1257) and manifest["tokens"]["total_vocab_size"] == 1258
    rows = _rows_by_key(out)
    tokens = np.array([rows[f"test/{i:08d}"] for i in range(24)])
    assert (tokens[:, 0] == boi).all() and (tokens[:, -1] == eoi).all()
    images, _ = source_images(range(24))
    ema_tokens = reference_tokens(loaded, images, ema_params)
    np.testing.assert_array_equal(tokens[:, 1:-1] - 1000, ema_tokens)
    assert (ema_tokens != reference_tokens(loaded, images)).any()


def test_ema_params_are_read_from_a_checkpoint_that_has_them(tokenizer_dir, loaded, tmp_path):
    assert loaded.weights == "params"  # this run keeps no EMA
    with pytest.raises(checkpoint.CheckpointError, match="keeps no EMA"):
        TrainedTokenizer.from_workdir(tokenizer_dir, use_ema=True, mesh=loaded.mesh)
    _with_ema(tokenizer_dir, str(tmp_path), lambda x: x + 1.0)
    _, raw = checkpoint.load_raw(tokenizer_dir)
    ema = jax.tree.map(lambda x: np.asarray(x) + 1.0, raw["params"])
    with_ema = TrainedTokenizer.from_workdir(str(tmp_path), mesh=loaded.mesh)
    assert with_ema.weights == "ema"  # the default: the EMA when the run kept one
    restored = with_ema.params
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(ema), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(loaded.params), strict=True):
        assert a.sharding == b.sharding  # placed on the mesh like the params


def test_token_layout_round_trip_and_limits():
    layout = TokenRowLayout.create((4, 4), Vocab(size=512), offset=7, delimiters=True)
    indices = np.random.default_rng(0).integers(0, 512, (3, 4, 4))
    stored = layout.to_stored(indices)
    assert stored.shape == (3, 18) and stored.dtype == np.int32
    assert stored[0, 0] == 7 + 512 and stored[0, -1] == 7 + 513
    np.testing.assert_array_equal(layout.from_stored(stored), indices)
    again = TokenRowLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout
    grouped = TokenRowLayout.create((4, 4, 2), Vocab(size=2**36, bits=36, groups=(18, 18)))
    assert grouped.grouped and grouped.value_vocab == 2**18 and grouped.length == 32
    with pytest.raises(ValueError, match="int32"):
        TokenRowLayout.create((4,), Vocab(size=2**31 - 10), offset=100)


def _zipf_probs(k, s):
    p = np.arange(1, k + 1, dtype=np.float64) ** -s
    return p / p.sum()


def test_stats_recover_a_known_zipf_distribution(monkeypatch):
    rng = np.random.default_rng(0)
    k, s = 512, 1.2
    p = _zipf_probs(k, s)
    perm = rng.permutation(k)  # token ids are not ranks
    stats = token_stats.TokenStats(k)
    monkeypatch.setattr(token_stats, "_DENSE_CELLS", 0)
    sparse = token_stats.TokenStats(k)  # the bigram table large vocabularies use
    for _ in range(4):  # several shards
        tokens = perm[rng.choice(k, size=(500, 100), p=p)]
        stats.update(tokens)
        sparse.update(tokens)
    result = stats.result(top_k=3)
    true_h = -(p * np.log2(p)).sum()
    assert result["entropy_bits"] == pytest.approx(true_h, abs=0.02)
    assert result["zipf_exponent"] == pytest.approx(s, abs=0.05)
    assert result["log2_vocab"] == 9.0 and result["num_tokens"] == 200_000
    assert result["top_tokens"][0]["token"] == perm[0]
    assert result["top_tokens"][0]["frequency"] == pytest.approx(p[0], abs=0.005)
    assert sparse.conditional_entropy() == pytest.approx(result["conditional_entropy_bits"])
    assert sparse.result()["entropy_bits"] == result["entropy_bits"]


def test_stats_recover_the_entropy_of_a_markov_chain():
    """x_t = x_{t-1} + 1 (mod K) with probability 1/2, else uniform: H(x_t | x_{t-1}) known."""
    rng = np.random.default_rng(1)
    k, n, length = 16, 4000, 64
    tokens = np.zeros((n, length), np.int64)
    tokens[:, 0] = rng.integers(0, k, n)
    for t in range(1, length):
        step = rng.random(n) < 0.5
        tokens[:, t] = np.where(step, (tokens[:, t - 1] + 1) % k, rng.integers(0, k, n))
    stats = token_stats.TokenStats(k)
    stats.update(tokens)
    result = stats.result()
    q = np.full(k, 0.5 / k)
    q[1] += 0.5  # next-token distribution given any predecessor
    assert result["conditional_entropy_bits"] == pytest.approx(-(q * np.log2(q)).sum(), abs=0.01)
    assert result["entropy_bits"] == pytest.approx(math.log2(k), abs=0.01)  # uniform marginal
    assert result["vocab_used_fraction"] == 1.0
