"""The official MaskGIT (PyPI `maskgit`) against our import of it: random weights serialised as
the released checkpoints are, imported by jobs/import_maskgit.py into workdirs, then restored
as any trained run. Same token indices, decoded images within float tolerance, transformer
logits within 1e-4; the official tree at full size; refusals of wrong files."""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import official_maskgit as om
import pytest
from flax import nnx, serialization
from ml_collections import ConfigDict

from visual_tokenizers.configs.maskgit_b16 import sampling
from visual_tokenizers.core.tokens.layout import Vocab
from visual_tokenizers.jobs import import_maskgit
from visual_tokenizers.models import maskgit_decode as dec
from visual_tokenizers.models import maskgit_sampling as ms
from visual_tokenizers.models.maskgit_official import OfficialMaskGIT, official_param_names
from visual_tokenizers.trained import official_maskgit as importer
from visual_tokenizers.trained.maskgit import TrainedMaskGIT, sample_options
from visual_tokenizers.trained.tokenizer import TrainedTokenizer

pytest.importorskip("maskgit.nets.maskgit_transformer")

LOGITS_ATOL = 1e-4  # the bound, float32 on CPU
IMAGE_ATOL = 1e-4


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Random official checkpoints, imported; (import config, official config, variables,
    paths, workdir)."""
    root = tmp_path_factory.mktemp("official")
    c = om.import_config()
    cf = om.official_config(c)
    paths, variables = om.write_checkpoints(str(root), cf)
    c.update(tokenizer_path=paths[0], maskgit_path=paths[1])
    workdir = str(root / "imported")
    import_maskgit.run(c, workdir)
    return c, cf, variables, paths, workdir


def test_official_tree_at_256_maps_onto_ours():
    """Every array of the full-size official transformer has a place of the same shape in
    ours (traced abstractly: nothing allocated)."""
    from maskgit.configs import maskgit_class_cond_config

    cf = maskgit_class_cond_config.get_config()
    _, transformer, length = om.official_models(cf)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    theirs = jax.eval_shape(lambda x: transformer.init(jax.random.PRNGKey(0), x), ids)["params"]
    theirs = {path: tuple(v.shape) for path, v in importer._flat(dict(theirs)).items()}

    def build():
        return OfficialMaskGIT(vocab=Vocab(1024), token_shape=(16, 16), rngs=nnx.Rngs(0))

    ours = nnx.eval_shape(build)
    shapes = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    names = official_param_names(ours)
    assert {names[p]: s for p, s in shapes.items()} == theirs
    assert theirs[("Embed_0", "word_embeddings", "embedding")] == (1024 + 1000 + 1, 768)


def test_layernorm_epsilon_and_init_are_the_official_ones():
    """What the logits test cannot see (random weights of order one): BERT's epsilon 1e-12 in
    every LayerNorm, and their truncated normal (cut at 2 sigma, no variance correction: std
    0.02 * 0.8796) for tables and kernels."""
    from maskgit.nets import maskgit_transformer as theirs

    def build():
        return OfficialMaskGIT(
            vocab=Vocab(1024), token_shape=(4, 4), num_classes=10, width=64, depth=1, heads=2,
            mlp_dim=128, rngs=nnx.Rngs(0),
        )  # fmt: skip

    model = nnx.jit(build)()
    norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.LayerNorm)]
    assert len(norms) == 4 and all(n.epsilon == theirs.LAYERNORM_EPSILON for n in norms)
    want = float(jnp.std(theirs.truncated_normal(0.02)(jax.random.key(0), (1035, 64))))
    for table in (model.word_embed[...], model.blocks[0].fc1.kernel[...]):
        assert abs(float(jnp.std(table)) / want - 1) < 0.03
        assert float(jnp.max(jnp.abs(table))) <= 0.04 + 1e-6  # cut at 2 sigma
    assert not np.any(np.asarray(model.head_bias[...]))


def test_tokens_and_images_match_official(imported):
    c, cf, variables, _, workdir = imported
    tokenizer_model, _, _ = om.official_models(cf)
    tok = TrainedTokenizer.from_workdir(os.path.join(workdir, "tokenizer"))
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    # The official colab feeds float images in [0, 1].
    apply = jax.jit(tokenizer_model.apply, static_argnames="method")  # one compile, not many
    want = apply(variables[0], images / np.float32(255.0), method="encode_to_indices")
    got = tok.encode(images)
    assert got.shape == (8, 8, 8)
    assert len(np.unique(want)) > 5  # many codes in use: agreement means something
    np.testing.assert_array_equal(got, want)
    # Decoded images (before rounding to uint8): ours in [-1, 1], theirs in [0, 1].
    model = tok.model()
    ours = (nnx.jit(lambda m, i: m.decode(i))(model, jnp.asarray(want)) + 1.0) / 2.0
    theirs = apply(variables[0], want, method="decode_from_indices")
    assert float(jnp.std(theirs)) > 1e-2
    np.testing.assert_allclose(ours, theirs, atol=IMAGE_ATOL, rtol=1e-4)


def test_logits_match_official(imported):
    c, cf, variables, _, workdir = imported
    _, transformer, length = om.official_models(cf)
    mg = TrainedMaskGIT.from_workdir(os.path.join(workdir, "maskgit"))
    assert mg.config.model.architecture == "official"
    rng = np.random.default_rng(1)
    k, n = c.tokenizer.codebook_size, length - 1
    ids = rng.integers(0, k, (3, n)).astype(np.int32)
    masked = rng.random((3, n)) < 0.5
    labels = np.array([0, 7, c.num_classes - 1], np.int32)
    seq = np.concatenate([k + labels[:, None], np.where(masked, -1, ids)], 1)  # mask id -1
    want = jax.jit(transformer.apply)(variables[1], seq)[:, 1:, :k]  # deterministic
    model = mg.model()
    (got,) = nnx.jit(lambda m, i, x, y: m(i, x, y))(model, ids[..., None], masked, labels)
    assert got.dtype == jnp.float32 and float(jnp.std(want)) > 0.5
    np.testing.assert_allclose(got, want, atol=LOGITS_ATOL, rtol=0)


def test_import_records_sha256_and_reruns_as_noop(imported):
    c, _, _, paths, workdir = imported
    with open(os.path.join(workdir, import_maskgit.RESULT)) as f:
        record = json.load(f)
    for part, path in zip(("tokenizer", "maskgit"), paths, strict=True):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        assert record[part]["sha256"] == digest
        assert importer.imported_record(os.path.join(workdir, part))["sha256"] == digest
    mg = TrainedMaskGIT.from_workdir(os.path.join(workdir, "maskgit"))
    assert mg.config.imported.sha256 == record["maskgit"]["sha256"]
    assert mg.resolved["tokenizer"]["workdir"] == os.path.join(workdir, "tokenizer")
    result = import_maskgit.run(c, workdir)  # the same files again: nothing to do
    assert result["maskgit_sha256"] == record["maskgit"]["sha256"]


def _write(path, tree):
    with open(path, "wb") as f:
        f.write(serialization.to_bytes(tree))


def test_wrong_files_are_refused_naming_the_first_difference(imported, tmp_path):
    c, _, variables, paths, _ = imported
    tokenizer, transformer = variables
    bad = tmp_path / "bad"
    # The transformer file where the tokenizer is expected: its first array is named.
    with pytest.raises(
        importer.WrongWeights, match="unexpected array params/Embed_0/embeddings_ln/bias"
    ):
        importer.import_tokenizer(c, paths[1], str(bad / "tok"))
    # One shape changed (a 512 file into a 256 config): the position table is named.
    params = jax.tree.map(lambda x: x, transformer)
    embed = params["params"]["Embed_0"]["position_embeddings"]
    embed["embedding"] = np.zeros((5, c.transformer.width), np.float32)
    _write(tmp_path / "shape", params)
    with pytest.raises(importer.WrongWeights, match="position_embeddings/embedding has shape"):
        importer.import_transformer(c, str(tmp_path / "shape"), str(bad / "mg"), str(bad))
    # An extra collection, and bytes that are not msgpack.
    _write(tmp_path / "extra", {**tokenizer, "batch_stats": {"x": np.zeros(2)}})
    with pytest.raises(importer.WrongWeights, match="unexpected array batch_stats/x"):
        importer.import_tokenizer(c, str(tmp_path / "extra"), str(bad / "tok"))
    (tmp_path / "junk").write_bytes(b"not a checkpoint")
    with pytest.raises(importer.WrongWeights, match="not a flax msgpack checkpoint"):
        importer.import_tokenizer(c, str(tmp_path / "junk"), str(bad / "tok"))
    with pytest.raises(importer.checkpoint.CheckpointError, match="Reproducing MaskGIT"):
        importer.import_tokenizer(c, str(tmp_path / "missing"), str(bad / "tok"))
    assert not bad.exists()  # nothing written for a refused file


def _official_generator(root, cf, monkeypatch):
    """ImageNet_class_conditional_generator as inference.py builds it, reading our random files
    from ./checkpoints with restore_from_path; records the decoded token sequences and how many
    tokens each step starts with unknown."""
    from maskgit import inference

    monkeypatch.setattr(inference.maskgit_class_cond_config, "get_config", lambda: cf)
    monkeypatch.chdir(root)
    generator = inference.ImageNet_class_conditional_generator(image_size=cf.image_size)
    record = {"counts": []}
    decode = inference.parallel_decode.decode

    def recording_decode(*args, **kwargs):
        record["seqs"] = decode(*args, **kwargs)
        return record["seqs"]

    class Counting:  # the transformer, counting mask ids (-1) in what each step sees
        def __init__(self, model):
            self.model = model

        def apply(self, variables, seq, **kwargs):
            jax.debug.callback(record["counts"].append, jnp.sum(seq == -1, -1), ordered=True)
            return self.model.apply(variables, seq, **kwargs)

    monkeypatch.setattr(inference.parallel_decode, "decode", recording_decode)
    generator.transformer_model = Counting(generator.transformer_model)
    return generator, record


@pytest.mark.parametrize("steps", [8, 5])
def test_full_sampler_matches_official_generate_samples(imported, monkeypatch, steps):
    """Our sampler (rng='official') from the imported workdir vs the official generator on the
    released-format files: same tokens for the same key, same number of tokens fixed at every
    step, same images."""
    c, cf, _, paths, workdir = imported
    root = os.path.dirname(os.path.dirname(paths[0]))
    generator, record = _official_generator(root, cf, monkeypatch)
    k, n = c.tokenizer.codebook_size, generator.transformer_latent_size**2
    labels = np.array([0, 1, 2, 3, 5, 7, 8, 9], np.int32)
    inputs = np.concatenate([k + labels[:, None], np.full((8, n), -1)], 1).astype(np.int32)
    key = jax.random.key(11)
    # jit: the decoder's sequences leave the trace as an output (recorded while tracing).
    run = jax.jit(
        lambda x, r: (generator.generate_samples(x, r, num_iterations=steps), record["seqs"])
    )
    images, seqs = run(inputs, key)
    jax.effects_barrier()
    theirs = np.asarray(seqs)[:, -1, 1:]
    started = np.stack([np.asarray(x) for x in record["counts"]])

    mg = TrainedMaskGIT.from_workdir(os.path.join(workdir, "maskgit"))
    options = dict(steps=steps, rng="official")  # the rest: the official settings (defaults)
    sampler = mg.generator(sample_options(ConfigDict(sampling(**options)))).sampler
    tokens = sampler(mg.params, mg.model_state, labels, key)
    np.testing.assert_array_equal(np.asarray(tokens).reshape(8, n), theirs)
    assert len(np.unique(theirs)) > 10  # not a degenerate draw

    model = mg.model()
    o = ms.SamplingOptions(steps=steps, rng="official")
    start = (jnp.zeros((8, n, 1), jnp.int32), jnp.ones((8, n), bool))
    decode = nnx.jit(
        lambda m, lab: dec.decode(m.guided_logits_fn(lab, steps), *start, key, o, prefix=1)
    )
    _, remaining = decode(model, labels)
    assert started.shape == (steps, 8) and np.all(started[0] == n)
    np.testing.assert_array_equal(np.asarray(remaining)[:-1], started[1:])
    # Pixels through the Python API (key(seed) as above): ours uint8, theirs in [0, 1].
    ours = mg.sample(labels, seed=11, **options).astype(np.float32)
    want = np.clip(np.round(np.asarray(images) * 255.0), 0, 255)
    assert np.max(np.abs(ours - want)) <= 1.0
