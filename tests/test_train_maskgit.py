"""MaskGIT training and sampling jobs: training on an export lowers the loss, checkpoints and
resumes to the parameters of an uninterrupted run; encoding on the fly gives the export's
tokens; the sample job writes ADM-format samples that are the model's own; a (4, 2)-sharded
train step equals the one-device step. Tiny models only (CPU, 2 cores)."""

import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from visual_tokenizers.configs import export_tokens as export_config
from visual_tokenizers.configs import maskgit_b16, vq_b16
from visual_tokenizers.configs import sample as sample_config
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.evaluation import metrics
from visual_tokenizers.core.runtime import checkpoint, train_state
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.tokens import batches as tb
from visual_tokenizers.core.tokens.layout import Vocab
from visual_tokenizers.jobs import export_tokens, sample, train_maskgit
from visual_tokenizers.trained import builders
from visual_tokenizers.trained import maskgit as maskgit_lib
from visual_tokenizers.trained.maskgit import TrainedMaskGIT
from visual_tokenizers.trained.tokenizer import TrainedTokenizer

NUM = 96  # exported training examples: 6 batches of 16


def _set(config, overrides: dict):
    """`config` with dotted-key overrides ('data.batch_size': 16) applied."""
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny tokenizer checkpoint as a training run writes it (fresh init, step 0)."""
    workdir = str(tmp_path_factory.mktemp("tokenizer"))
    builders.save_untrained(vq_b16.get_config("tiny"), workdir)
    return workdir


@pytest.fixture(scope="module")
def export_dir(tokenizer_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tokens"))
    config = export_config.get_config("tiny")
    _set(
        config,
        {
            "tokenizer.workdir": tokenizer_dir,
            "data.split": "train",
            "data.max_examples": NUM,
            "data.batch_size": 16,
            "rows_per_shard": 32,
            "vocab_offset": 7,
        },
    )
    export_tokens.run(config, out)
    return out


def mg_config(**extra):
    """Tiny and fast; a constant learning rate makes the trajectory independent of num_steps,
    so a run stopped at step 8 and resumed can be compared with an uninterrupted one."""
    config = maskgit_b16.get_config("tiny")
    overrides = {
        "tokenizer.workdir": "",
        "num_steps": 16,
        "data.batch_size": 16,
        "model.width": 32,
        "model.depth": 1,
        "model.heads": 2,
        "model.mlp_dim": 64,
        "optimizer.lr": 1e-2,
        "optimizer.schedule": "constant",
        "optimizer.warmup_steps": 0,
        "log_every": 2,
        "checkpoint_every": 8,
    }
    return _set(config, {**overrides, **extra})


def _params(workdir, step=None, part="params"):
    step, state = checkpoint.load_raw(workdir, step)
    return step, jax.tree.leaves(state[part])


@pytest.fixture(scope="module")
def reference_run(export_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("maskgit"))
    result = train_maskgit.run(mg_config(**{"tokens.export_dir": export_dir}), workdir)
    return workdir, result


def test_training_on_an_export_lowers_the_loss(reference_run, export_dir):
    workdir, result = reference_run
    assert result["step"] == 16
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 8 and {"accuracy", "mask_ratio", "lr"} <= set(lines[0])
    assert losses[-1] < losses[0] - 0.3, losses  # from ~log(256) = 5.5
    assert 0.0 < lines[-1]["mask_ratio"] < 1.0
    # The model was built from the tokens: vocab, grid and classes saved with the checkpoint.
    loaded = TrainedMaskGIT.from_workdir(workdir)
    assert loaded.step == 16
    assert loaded.resolved["vocab"]["size"] == 256 and loaded.resolved["token_shape"] == [8, 8]
    assert loaded.resolved["num_classes"] == 10 and loaded.model().num_classes == 10
    # The generator's EMA (configs/maskgit_b16.py ema_decay) is what a finished run samples with.
    assert loaded.weights == "ema"
    _, saved = _params(workdir, part="ema_params")
    for a, b in zip(jax.tree.leaves(loaded.params), saved, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_export_rows_undo_the_offset_and_sort_by_key(export_dir, tokenizer_dir):
    exported = tb.load_export(export_dir)
    assert exported.keys == [f"train/{i:08d}" for i in range(NUM)]
    assert exported.indices.shape == (NUM, 8, 8) and exported.indices.max() < 256
    tok = TrainedTokenizer.from_workdir(tokenizer_dir)
    from visual_tokenizers.core.data import builtin as builtin_data
    from visual_tokenizers.core.data.images import to_model

    source = builtin_data.ShapesSource("train", 32)
    images, labels = zip(*(source.read(i) for i in (0, 5, 90)), strict=True)
    encode = jax.jit(lambda p, s, x: tok.model_def.merge(p, s).encode(to_model(x)))
    want = encode(tok.params, tok.model_state, np.stack(images))
    np.testing.assert_array_equal(exported.indices[[0, 5, 90]], want)  # offset 7 removed
    np.testing.assert_array_equal(exported.labels[[0, 5, 90]], labels)


def test_checkpoint_resume_equals_an_uninterrupted_run(reference_run, export_dir, tmp_path):
    # A run killed after its step-8 checkpoint: the reference's workdir as it was then.
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_run[0], workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "16"))
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    result = train_maskgit.run(mg_config(**{"tokens.export_dir": export_dir}), workdir)
    assert result["step"] == 16
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines if "loss" in x] == [10, 12, 14, 16]  # resumed at 8
    for part in ("params", "ema_params"):  # the generator's EMA resumes too
        _, resumed = _params(workdir, part=part)
        _, reference = _params(reference_run[0], part=part)
        for a, b in zip(resumed, reference, strict=True):
            np.testing.assert_array_equal(a, b)
    reference_losses = [
        json.loads(x) for x in open(os.path.join(reference_run[0], "metrics.jsonl"))
    ]
    assert [x["loss"] for x in lines] == [x["loss"] for x in reference_losses[4:]]
    # Tokens of another kind are refused on this workdir (by the resume's config check, which
    # names the changed key, before the tokens' own check).
    other = mg_config(**{"tokens.export_dir": export_dir, "model.num_classes": 3})
    with pytest.raises(ConfigError, match=r"model\.num_classes: was \d+, now 3"):
        train_maskgit.run(other, workdir)


def test_encoding_on_the_fly_gives_the_export_tokens(
    reference_run, export_dir, tokenizer_dir, tmp_path
):
    # The batches themselves: images of the same examples, encoded, equal the exported rows.
    exported = tb.load_export(export_dir)
    from_export = exported.batches(16, seed=0, start_step=3)
    images = tb.EncodeBatches(
        "builtin:shapes",
        split="train",
        image_size=32,
        max_examples=NUM,
        global_batch_size=16,
        seed=0,
        num_steps=16,
        start_step=3,
    )
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    tok = TrainedTokenizer.from_workdir(tokenizer_dir, mesh=mesh)
    encode, _ = tok.compile_encode(16, 32)
    for _ in range(2):  # steps 3 and 4 (crossing into the second epoch of 6 batches)
        a, b = next(from_export), next(images)
        batch = mesh_lib.host_batch_to_global({"image": b["image"]}, mesh)
        np.testing.assert_array_equal(
            encode(tok.params, tok.model_state, batch["image"]), a["tokens"]
        )
        np.testing.assert_array_equal(a["label"], b["label"])
    images.close()
    # And a whole run: on-the-fly training reaches exactly the export run's step-8 parameters.
    overrides = {
        "tokenizer.workdir": tokenizer_dir,
        "num_steps": 8,
        "data.source": "builtin:shapes",
        "data.max_examples": NUM,
    }
    workdir = str(tmp_path)
    train_maskgit.run(mg_config(**overrides), workdir)
    assert TrainedMaskGIT.from_workdir(workdir).resolved["tokens"] == "encode:builtin:shapes:train"
    _, a = _params(workdir)
    _, b = _params(reference_run[0], step=8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _sample_cfg(maskgit_dir, **extra):
    config = sample_config.get_config("tiny")
    overrides = {
        "maskgit.workdir": maskgit_dir,
        "num_samples": 20,
        "batch_size": 16,
        "classes": (1, 3),
        "steps": 3,
        "guidance_scale": 1.5,
        "grid.per_class": 4,
    }
    return _set(config, {**overrides, **extra})


def test_sample_job_writes_adm_samples_of_the_model(reference_run, tokenizer_dir, tmp_path):
    out = str(tmp_path)
    config = _sample_cfg(reference_run[0])
    result = sample.run(config, out)
    assert result["num_samples"] == 20
    with np.load(os.path.join(out, "samples.npz")) as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [1, 3] * 10)
    reader = metrics.NpzImages(os.path.join(out, "samples.npz"))  # what evaluate.py reads
    assert reader.num_images == 20 and list(reader.labels) == [1, 3] * 10
    grid = Image.open(os.path.join(out, "samples.png"))
    assert grid.size == (8 * 34, 2 * 34)  # one row per class, 8 columns of 32 px + 2 px gaps
    assert len(os.listdir(os.path.join(out, "grids"))) == 2
    record = json.load(open(os.path.join(out, "samples.json")))
    assert record["steps"] == 3 and record["guidance_scale"] == 1.5
    assert record["maskgit_weights"] == "ema"  # the generator's EMA samples
    assert record["maskgit"]["step"] == 16 and record["tokenizer"]["step"] == 0
    assert not os.path.exists(os.path.join(out, sample.PARTS))
    # The samples are the model's: batch b = sample(labels, fold_in(key(seed), b)), decoded.
    maskgit = TrainedMaskGIT.from_workdir(reference_run[0])
    tok = TrainedTokenizer.from_workdir(tokenizer_dir)
    options = maskgit_lib.sample_options(config)

    @jax.jit
    def generate(mg_params, tok_params, labels, rng):
        model = maskgit.model_def.merge(mg_params, maskgit.model_state)
        tokens = model.sample(labels, rng, **options)
        return tok.model_def.merge(tok_params, tok.model_state).decode(tokens)

    padded = np.array([1, 3] * 2 + [1] * 12, np.int32)  # batch 1, padded with its first label
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    want = generate(maskgit.params, tok.params, padded, key)[:4]
    want = np.clip(np.round((np.asarray(want) + 1) * 127.5), 0, 255).astype(int)
    diff = np.abs(images[16:].astype(int) - want)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    # Rerun: already done, nothing regenerated; other settings on this OUT are refused.
    stamp = os.stat(os.path.join(out, "samples.npz")).st_mtime_ns
    assert sample.run(config, out)["num_samples"] == 20
    assert os.stat(os.path.join(out, "samples.npz")).st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings"):
        sample.run(_sample_cfg(reference_run[0], steps=4), out)


def test_sample_job_resumes_from_finished_batches(reference_run, tmp_path, monkeypatch):
    """A crash after two of three batches: a rerun generates only the third."""
    calls = []

    class Fake:  # labels -> images filled with the label; records what it was asked for
        def __call__(self, params, model_state, labels, rng):
            calls.append(labels.copy())
            return np.broadcast_to(labels[:, None, None, None], (len(labels), 32, 32, 3)).astype(
                np.uint8
            )

    monkeypatch.setattr(sample.Generator, "create", classmethod(lambda cls, *a, **k: Fake()))
    config = _sample_cfg(reference_run[0], num_samples=20, batch_size=8)
    out = str(tmp_path)
    spec = sample._spec(config, TrainedMaskGIT.from_workdir(reference_run[0]), [1, 3])
    parts = sample._parts_dir(out, spec)
    for b in range(2):  # what the killed run left: two finished batches (marked with 7s)
        sample._save_part(sample._part(parts, b), np.full((8, 32, 32, 3), 7, np.uint8), [1, 3] * 4)
    with open(os.path.join(parts, ".batch_000002.npz.tmp123.npz"), "wb") as f:
        f.write(b"partial")  # a half-written temporary file is ignored
    sample.run(config, out)
    assert len(calls) == 1 and list(calls[0]) == [1, 3, 1, 3] + [1] * 4  # batch 2, padded
    with np.load(os.path.join(out, "samples.npz")) as z:
        np.testing.assert_array_equal(z["arr_0"][:16], 7)  # kept, not regenerated
        np.testing.assert_array_equal(z["arr_0"][16:, 0, 0, 0], [1, 3, 1, 3])
        np.testing.assert_array_equal(z["arr_1"], [1, 3] * 10)


def test_sharded_train_step_equals_single_device():
    config = mg_config(**{"model.dropout": 0.1})
    resolved = {
        "vocab": {"size": 64, "bits": None, "groups": None},
        "token_shape": [4, 4],
        "num_classes": 5,
    }
    config.resolved = resolved
    model_fn = maskgit_lib.model_fn_from_config(config)
    # Plain SGD: the update is linear in the gradient, so reduction-order differences stay
    # small (Adam's first step is lr * sign(g) and amplifies them for near-zero gradients).
    optimizer, lr_fn = optax.sgd(0.5), lambda step: 0.5
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, 64, (16, 4, 4)).astype(np.int32),
        "label": rng.integers(0, 5, 16).astype(np.int32),
    }
    rules = mesh_lib.DEFAULT_RULES
    _, params, rest = train_state.split_model(model_fn())
    host_state = jax.tree.map(  # numpy: donation must not delete the shared initial values
        np.asarray, train_state.TrainState(np.int32(0), params, rest, optimizer.init(params))
    )
    results = []
    for shape, devices in (
        ({"data": 4, "fsdp": 2, "model": 1}, jax.devices()),
        ({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1]),
    ):
        mesh = mesh_lib.make_mesh(shape, devices)
        model_def, _, shardings = train_state.state_shardings(model_fn, optimizer, mesh, rules)
        state = jax.device_put(host_state, shardings)  # the same initial values on both meshes
        step = train_maskgit.make_train_step(
            model_def, optimizer, lr_fn, seed=3, loss=config.loss.to_dict()
        )
        sh = {"tokens": mesh_lib.batch_sharding(mesh, 3), "label": mesh_lib.batch_sharding(mesh)}
        jitted = train_state.compile_train_step(step, shardings, sh, mesh)
        for _ in range(2):
            state, out = jitted(state, mesh_lib.host_batch_to_global(batch, mesh))
        results.append((state, out))
    (sharded, m_sharded), (single, m_single) = results
    assert sharded.params["mask_embed"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
    assert float(m_single["loss"]) > 0
    np.testing.assert_allclose(float(m_sharded["loss"]), float(m_single["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_vocab_mismatch_between_export_and_tokenizer_is_refused(
    export_dir, tokenizer_dir, tmp_path
):
    exported = tb.load_export(export_dir)
    assert exported.vocab == Vocab(256)
    other = str(tmp_path / "tok")  # the same run, but its saved config says 128 codes
    shutil.copytree(tokenizer_dir, other)
    path = os.path.join(other, "checkpoints", "0", "config", "metadata")
    saved = json.load(open(path))
    saved["quantizer"]["codebook_size"] = 128
    json.dump(saved, open(path, "w"))
    config = mg_config(**{"tokens.export_dir": export_dir, "tokenizer.workdir": other})
    with pytest.raises(ValueError, match="vocab"):
        train_maskgit.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_configs_follow_the_official_maskgit_recipe():
    from visual_tokenizers.configs import maskgit_binary_b16
    from visual_tokenizers.models.maskgit import head_groups

    config = maskgit_b16.get_config()
    m, o = config.model, config.optimizer
    assert (m.depth, m.width, m.heads, m.mlp_dim, m.dropout) == (24, 768, 16, 3072, 0.1)
    assert (o.name, o.lr, o.b1, o.b2, o.weight_decay, o.warmup_steps) == (
        "adamw",
        1e-4,
        0.9,
        0.96,
        0.045,
        5000,
    )
    assert config.data.batch_size == 256 and config.loss.label_smoothing == 0.1
    assert config.loss.mask_schedule == "cosine"
    options = maskgit_lib.sample_options(sample_config.get_config())
    assert options["steps"] == 8 and options["choice_temperature"] == 4.5
    assert options["guidance_scale"] is None  # the original MaskGIT samples without guidance
    binary = maskgit_binary_b16.get_config()
    assert head_groups(Vocab(2**18, 18, (18,)), binary.model.head_group_bits) == (9, 9)
