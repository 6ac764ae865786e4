"""Dual-codebook (TokenFlow) tokenizer: the shared index, gradients, the frozen teacher and its
big_vision .npz weights, and the sharded train step."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from visual_tokenizers.configs import dual_b16
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.jobs import train_tokenizer
from visual_tokenizers.models import teacher as teacher_lib
from visual_tokenizers.models.vit import ViTEncoder
from visual_tokenizers.tokenizers import losses as losses_lib
from visual_tokenizers.tokenizers.dual import DualCodebookQuantizer
from visual_tokenizers.trained import builders

SEM, PIX = 32, 8  # code dims; the quantizer's inputs have these widths, so no projections


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _setup(k, w, chunk, n=256, seed=0):
    q = DualCodebookQuantizer(
        SEM, PIX, k, pixel_weight=w, search_chunk_size=chunk, loss_average="per_branch",
        rngs=nnx.Rngs(seed),
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    zs, zp = rng.normal(size=(n, SEM)), rng.normal(size=(n, PIX))
    cs = _unit(np.asarray(q.semantic.codebook[...], np.float64))
    cp = _unit(np.asarray(q.pixel.codebook[...], np.float64))
    d_sem = np.sum((_unit(zs)[:, None] - cs[None]) ** 2, -1)  # brute force, float64
    d_pix = np.sum((_unit(zp)[:, None] - cp[None]) ** 2, -1)
    return q, zs, zp, cs, cp, d_sem, d_pix


def _assert_argmin(indices, d, min_clear=0.9):
    """indices == argmin d on every row whose best code wins by a float32-safe margin."""
    order = np.sort(d, -1)
    clear = order[:, 1] - order[:, 0] > 1e-4
    assert clear.mean() >= min_clear
    np.testing.assert_array_equal(np.asarray(indices)[clear], np.argmin(d, -1)[clear])


@pytest.mark.parametrize("w", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("chunk", [32, 8192])  # 32: chunked (100 = 3 x 32 + 4), 8192: one chunk
def test_shared_index_is_the_weighted_argmin(w, chunk):
    q, zs, zp, cs, cp, d_sem, d_pix = _setup(100, w, chunk)
    out = q(jnp.asarray(zs, jnp.float32), jnp.asarray(zp, jnp.float32))
    idx = np.asarray(out.indices)
    assert out.indices.dtype == jnp.int32
    _assert_argmin(idx, d_sem + w * d_pix)
    # Both codebooks are read at the shared index, and embed() gives the same vectors.
    q_sem, q_pix = (np.asarray(a) for a in q.split(out.quantized))
    np.testing.assert_allclose(q_sem, cs[idx], atol=1e-5)
    np.testing.assert_allclose(q_pix, cp[idx], atol=1e-5)
    np.testing.assert_allclose(np.asarray(q.embed(out.indices)), np.asarray(out.quantized))
    tables = q.codebook_embeddings()  # what export writes: both tables, row i = code i
    np.testing.assert_allclose(np.asarray(tables["codebook_pixel"])[idx], q_pix, atol=1e-6)
    # The per-branch option: codebook and commitment terms of each branch, in code space.
    # (TokenFlow's one mean over the concatenated code: tests/test_dual_tokenflow.py.)
    for name, codes, z in (("semantic", cs, zs), ("pixel", cp, zp)):
        mse = np.mean((codes[idx] - _unit(z)) ** 2)
        np.testing.assert_allclose(out.losses[f"codebook_{name}"], mse, rtol=1e-4)
        np.testing.assert_allclose(out.losses[f"commitment_{name}"], 0.25 * mse, rtol=1e-4)
    assert q.vocab.size == 100


def test_pixel_weight_limits_pick_one_codebook():
    _, zs, zp, *_ = _setup(100, 1.0, 32)
    z = (jnp.asarray(zs, jnp.float32), jnp.asarray(zp, jnp.float32))
    q_small, *_, d_sem, d_pix = _setup(100, 1e-6, 32)
    q_large = _setup(100, 1e6, 32)[0]
    small, large = q_small(*z).indices, q_large(*z).indices
    _assert_argmin(small, d_sem)  # w -> 0: the semantic nearest code
    _assert_argmin(large, d_pix)  # w large: the pixel nearest code
    assert np.mean(np.asarray(small) != np.asarray(large)) > 0.5  # the two really differ


# The tiny config, one block per ViT and narrower: the same code paths, compiled faster on CPU.
VIT = dict(patch_size=4, width=32, depth=1, heads=2, mlp_dim=64)


def _config():
    config = dual_b16.get_config("tiny")
    for part in (config.model.encoder, config.model.decoder):
        part.pixel.update(VIT)
    config.model.encoder.semantic.update(VIT)
    config.model.decoder.semantic.update(
        {k: VIT[k] for k in ("width", "depth", "heads", "mlp_dim")}
    )
    config.quantizer.codebook_size = 64
    # One block: the last block's output before the final norm (TokenFlow's -2 needs two).
    config.model.encoder.semantic_layer = config.model.decoder.teacher_layer = -1
    return config


def _tiny_model():
    return builders.model_fn_from_config(_config())()


def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(-1, 1, (n, 32, 32, 3)), jnp.float32)


def _norms(tree):
    return {
        k: float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(v))) for k, v in tree.items()
    }


def test_gradients_reach_both_encoders_and_the_teacher_is_not_trained():
    model = _tiny_model()
    assert not any(isinstance(v, nnx.Param) for _, v in nnx.iter_graph(model.teacher))
    graphdef, params, model_state = ts.split_model(model)
    assert "teacher" not in params and "teacher" in model_state
    images = _images()

    def terms(p):
        recon, quantized = nnx.merge(graphdef, p, model_state)(images, train=True)
        l2 = losses_lib.reconstruction_losses(images, recon, l2_weight=1.0, l1_weight=0.0)["l2"]
        return jnp.stack([quantized.losses["semantic_cosine"], l2])

    @jax.jit
    def grads(p):  # one forward, the backward pass vmapped over the two loss terms
        _, vjp = jax.vjp(terms, p)
        return jax.vmap(vjp)(jnp.eye(2))[0]

    both = grads(params)
    semantic, pixel = (_norms(jax.tree.map(lambda g, i=i: g[i], both)) for i in range(2))
    # The semantic regression trains the semantic encoder (straight through the codes) and
    # decoder, not the pixel branch; the reconstruction trains the pixel branch only.
    assert semantic["semantic_encoder"] > 0 and semantic["semantic_decoder"] > 0
    assert semantic["encoder"] == 0 and semantic["decoder"] == 0
    assert pixel["encoder"] > 0 and pixel["decoder"] > 0
    assert pixel["semantic_encoder"] == 0


def test_conv_pixel_branch_and_1d_latents_build_with_the_right_shapes():
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

    def shapes(config):
        model = nnx.eval_shape(builders.model_fn_from_config(config))
        graphdef, state = nnx.split(model)

        def run(state, x):
            m = nnx.merge(graphdef, state)
            recon, out = m(x, train=True)
            return recon, out.indices, m.decode(out.indices), m.decode_semantic(out.indices)

        return [a.shape for a in jax.eval_shape(run, state, images)]

    conv = _config()  # f4 conv pixel branch: the same 8 x 8 grid as the patch-4 semantic ViT
    for part in (conv.model.encoder, conv.model.decoder):
        part.pixel = dict(architecture="conv", filters=32, channel_multipliers=(1, 2, 2))
    assert shapes(conv) == [(2, 32, 32, 3), (2, 8, 8), (2, 32, 32, 3), (2, 8, 8, 32)]
    one_d = _config()
    for part in (
        one_d.model.encoder.pixel,
        one_d.model.encoder.semantic,
        one_d.model.decoder.pixel,
    ):
        part.num_latents = 16
    assert shapes(one_d) == [(2, 32, 32, 3), (2, 16), (2, 32, 32, 3), (2, 8, 8, 32)]
    # A 1-D semantic encoder starts from the teacher on its patch positions only.
    params = {"semantic_encoder": {"patch_embed": {"k": jnp.zeros(3)}, "transformer": {
        "pos_embedding": jnp.zeros((1, 5, 4))}}}  # fmt: skip
    state = {"teacher": {"patch_embed": {"k": jnp.ones(3)}, "transformer": {
        "pos_embedding": jnp.ones((1, 4, 4))}}}  # fmt: skip
    pos = teacher_lib.init_semantic_encoder_from_teacher(params, state)["semantic_encoder"]
    np.testing.assert_array_equal(pos["transformer"]["pos_embedding"][0, :, 0], [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(pos["patch_embed"]["k"], 1)


def _vit(seed, **kw):
    return ViTEncoder(out_dim=0, image_size=32, rngs=nnx.Rngs(seed), **{**VIT, **kw})


def _teacher_file(tmp_path, seed=7, prefix="params/img/", **kw):
    """A random ViT saved in the big_vision layout (+ an unrelated text-tower key)."""
    vit = _vit(seed, **kw)
    path = str(tmp_path / f"teacher_{seed}.npz")
    heads = kw.get("heads", VIT["heads"])
    flat = teacher_lib.vit_to_big_vision(nnx.state(vit, nnx.Param).to_pure_dict(), heads, prefix)
    np.savez(path, **flat, **{"params/txt/Embed_0/embedding": np.zeros((5, 3))})
    return vit, path


def _ln(x, scale, bias):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * scale + bias


def _big_vision_forward(w, x, heads):
    """big_vision's ViT (patch embed + learned posemb + pre-norm blocks + encoder_norm) in numpy,
    read from the flat .npz keys: the reference the layout must reproduce."""
    kernel = w["embedding/kernel"]
    p, d = kernel.shape[0], kernel.shape[-1]
    b, hh, ww, c = x.shape
    g = hh // p
    patches = x.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
    h = patches @ kernel.reshape(-1, d) + w["embedding/bias"] + w["pos_embedding"]
    for i in range(len([k for k in w if k.endswith("LayerNorm_0/scale")])):
        pre = f"Transformer/encoderblock_{i}/"
        a = pre + "MultiHeadDotProductAttention_0/"
        y = _ln(h, w[pre + "LayerNorm_0/scale"], w[pre + "LayerNorm_0/bias"])
        q, k, v = (
            np.einsum("bnd,dhk->bnhk", y, w[f"{a}{n}/kernel"]) + w[f"{a}{n}/bias"]
            for n in ("query", "key", "value")
        )
        logits = np.einsum("bqhk,bnhk->bhqn", q, k) / np.sqrt(d // heads)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("bhqn,bnhk->bqhk", att, v)
        h = h + np.einsum("bqhk,hkd->bqd", o, w[a + "out/kernel"]) + w[a + "out/bias"]
        y = _ln(h, w[pre + "LayerNorm_1/scale"], w[pre + "LayerNorm_1/bias"])
        y = y @ w[pre + "MlpBlock_0/Dense_0/kernel"] + w[pre + "MlpBlock_0/Dense_0/bias"]
        y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))
        h = h + y @ w[pre + "MlpBlock_0/Dense_1/kernel"] + w[pre + "MlpBlock_0/Dense_1/bias"]
    h = _ln(h, w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"])
    return h.reshape(b, g, g, d)


def test_teacher_npz_round_trip_matches_big_vision(tmp_path):
    vit, path = _teacher_file(tmp_path, width=64, depth=2, heads=4, mlp_dim=128)
    images = _images(2)
    expected = np.asarray(vit(images))
    with np.load(path) as npz:
        flat = {k[len("params/img/") :]: npz[k] for k in npz if k.startswith("params/img/")}
    assert flat["Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"].shape == (
        64, 4, 16,
    )  # fmt: skip
    assert flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel"].shape == (
        4, 16, 64,
    )  # fmt: skip
    reference = _big_vision_forward(flat, np.asarray(images, np.float64), heads=4)
    np.testing.assert_allclose(expected, reference, atol=2e-4)

    # Load into a differently initialised teacher through the job-facing function.
    teacher = teacher_lib.Teacher(
        image_size=32, patch_size=4, width=64, depth=2, heads=4, mlp_dim=128,
        dtype=jnp.float32, rngs=nnx.Rngs(0),
    )  # fmt: skip
    graphdef, state = nnx.split(teacher)
    assert not np.allclose(np.asarray(teacher(images)), expected, atol=1e-2)
    model_state = teacher_lib.init_teacher(
        {"teacher": state.to_pure_dict()}, {"weights": path, "random_init": False}
    )
    loaded = nnx.merge(graphdef, model_state["teacher"])
    np.testing.assert_allclose(np.asarray(loaded(images)), expected, atol=1e-5)
    assert bool(loaded.loaded[...])

    # A scanned checkpoint (blocks stacked on a leading depth axis) reads the same.
    scanned = {}
    for key, value in flat.items():
        if key.startswith("Transformer/encoderblock_"):
            i, rest = key[len("Transformer/encoderblock_") :].split("/", 1)
            scanned.setdefault("Transformer/encoderblock/" + rest, {})[int(i)] = value
        else:
            scanned[key] = value
    scanned = {k: np.stack([v[i] for i in sorted(v)]) if isinstance(v, dict) else v
               for k, v in scanned.items()}  # fmt: skip
    like = state.to_pure_dict()
    again = teacher_lib.big_vision_to_vit(scanned, like, heads=4)
    direct = teacher_lib.big_vision_to_vit(flat, like, heads=4, prefix="")
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(a, b)
    path2 = str(tmp_path / "roundtrip.npz")
    teacher_lib.save_vit_npz(path2, model_state["teacher"], heads=4)
    with np.load(path2) as npz:
        for key, value in flat.items():
            np.testing.assert_allclose(npz[key], value, atol=1e-7, err_msg=key)


def test_missing_or_wrong_teacher_weights_are_clear_errors(tmp_path, caplog):
    _, _, model_state = ts.split_model(_tiny_model())
    with pytest.raises(teacher_lib.TeacherWeightsError, match="teacher.weights is empty"):
        teacher_lib.init_teacher(model_state, {"weights": "", "random_init": False})
    with pytest.raises(teacher_lib.TeacherWeightsError, match="no such file"):
        teacher_lib.init_teacher(model_state, {"weights": str(tmp_path / "nope.npz")})
    _, wide = _teacher_file(tmp_path, width=96, heads=4, mlp_dim=128)
    with pytest.raises(teacher_lib.TeacherWeightsError, match=r"embedding/kernel' has shape"):
        teacher_lib.init_teacher(model_state, {"weights": wide})
    with caplog.at_level(logging.WARNING):
        same = teacher_lib.init_teacher(model_state, {"weights": "", "random_init": True})
    assert any(r.levelno == logging.WARNING and "RANDOM" in r.message for r in caplog.records)
    assert same["teacher"] is model_state["teacher"]


# --- the train step: teacher carried unchanged, sharded == one device -------------------------


def _train(model_def, optimizer, config, mesh, shardings, start, steps=3):
    """`steps` train steps from the host state `start` placed on `mesh`."""
    state = jax.device_put(start, shardings)
    # Idempotent here (same file): runs the loading onto this mesh's shardings as well.
    state = teacher_lib.init_train_state(state, config.teacher)
    batch_sh = {"image": mesh_lib.batch_sharding(mesh, 4)}
    step = ts.compile_train_step(
        train_tokenizer.make_train_step(model_def, optimizer, config.loss.to_dict()),
        shardings, batch_sh, mesh, extra_shardings=mesh_lib.replicated(mesh),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    metrics = []
    for _ in range(steps):
        batch = {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)}
        state, m = step(state, jax.device_put(batch, batch_sh), {})  # no frozen networks
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    _, path = _teacher_file(tmp_path_factory.mktemp("teacher"))
    config = _config()
    config.teacher.weights = path
    model_fn = builders.model_fn_from_config(config)
    optimizer = builders.optimizer_from_config(config)
    rules = tuple(config.sharding_rules)
    one = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "model": 1}, devices=jax.devices()[:1])
    eight = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "model": 1})
    model_def, _, shardings1 = ts.state_shardings(model_fn, optimizer, one, rules)
    _, _, shardings8 = ts.state_shardings(model_fn, optimizer, eight, rules)
    state = ts.init_state(model_fn, optimizer, shardings1)
    start = jax.device_get(teacher_lib.init_train_state(state, config.teacher))
    run1 = _train(model_def, optimizer, config, one, shardings1, start)
    run8 = _train(model_def, optimizer, config, eight, shardings8, start)
    return path, start, run1, run8


def test_teacher_is_loaded_and_never_changes_in_training(runs):
    path, start, (end, metrics), _ = runs
    with np.load(path) as npz:
        kernel = npz["params/img/embedding/kernel"]
    np.testing.assert_array_equal(start.model_state["teacher"]["patch_embed"]["kernel"], kernel)
    # The semantic encoder starts from the teacher.
    np.testing.assert_array_equal(start.params["semantic_encoder"]["patch_embed"]["kernel"], kernel)
    for a, b in zip(
        jax.tree.leaves(start.model_state["teacher"]),
        jax.tree.leaves(end.model_state["teacher"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert all(m["quantizer/teacher_loaded"] == 1.0 for m in metrics)
    assert "loss/semantic_cosine" in metrics[0] and "loss/commitment" in metrics[0]
    moved = _norms(jax.tree.map(lambda a, b: a - b, end.params, start.params))
    assert moved["semantic_encoder"] > 0 and moved["encoder"] > 0
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_sharded_step_matches_single_device(runs):
    _, _, (end1, metrics1), (end8, metrics8) = runs
    np.testing.assert_allclose(
        [m["loss"] for m in metrics1], [m["loss"] for m in metrics8], rtol=1e-5
    )
    flat8 = dict(jax.tree_util.tree_leaves_with_path(end8.params))
    for path, value in jax.tree_util.tree_leaves_with_path(end1.params):
        np.testing.assert_allclose(value, flat8[path], rtol=2e-4, atol=2e-6, err_msg=str(path))
    for a, b in zip(
        jax.tree.leaves(end1.model_state), jax.tree.leaves(end8.model_state), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_training_job_refuses_to_start_without_teacher_weights(tmp_path):
    config = dual_b16.get_config("tiny")
    config.teacher.random_init = False
    with pytest.raises(teacher_lib.TeacherWeightsError, match="teacher.weights is empty"):
        train_tokenizer.run(config, str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "0"))  # nothing trained
