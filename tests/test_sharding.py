"""The train step is the same computation on one device and on a (4, 2) data x fsdp mesh,
and parameters and optimizer state are really sharded there."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from visual_tokenizers.configs import vq_b16
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.jobs import train_tokenizer
from visual_tokenizers.trained import builders


def _setup(mesh):
    config = vq_b16.get_config("tiny")
    rules = tuple(config.sharding_rules)
    model_fn = builders.model_fn_from_config(config)
    optimizer = builders.optimizer_from_config(config)
    model_def, _, shardings = ts.state_shardings(model_fn, optimizer, mesh, rules)
    state = ts.init_state(model_fn, optimizer, shardings)
    batch_sh = {"image": mesh_lib.batch_sharding(mesh, 4)}
    step = ts.compile_train_step(
        train_tokenizer.make_train_step(model_def, optimizer, config.loss.to_dict()),
        shardings,
        batch_sh,
        mesh,
    )
    return state, step, batch_sh


def _batches(n):
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)} for _ in range(n)]


def _train(mesh, batches):
    state, step, batch_sh = _setup(mesh)
    losses = []
    for batch in batches:
        state, metrics = step(state, jax.device_put(batch, batch_sh))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def runs():
    batches = _batches(3)
    one = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "model": 1}, devices=jax.devices()[:1])
    eight = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "model": 1})
    return _train(one, batches), _train(eight, batches), eight


def test_sharded_step_matches_single_device(runs):
    (state1, losses1), (state8, losses8), _ = runs
    np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
    assert losses1[-1] < losses1[0]  # it actually trains
    flat1 = jax.tree_util.tree_leaves_with_path(jax.device_get(state1.params))
    flat8 = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(state8.params)))
    for path, value in flat1:
        np.testing.assert_allclose(value, flat8[path], rtol=2e-4, atol=2e-6, err_msg=str(path))
    for a, b in zip(
        jax.tree.leaves(jax.device_get(state1.model_state)),
        jax.tree.leaves(jax.device_get(state8.model_state)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_params_and_optimizer_state_are_sharded(runs):
    _, (state8, _), mesh = runs
    kernel = state8.params["encoder"]["transformer"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", None)  # ('embed', 'mlp'); model axis has size 1
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1])
    adam = [s for s in jax.tree.leaves(state8.opt_state, is_leaf=lambda x: hasattr(x, "mu"))]
    adam = [s for s in adam if hasattr(s, "mu")][0]
    mu = adam.mu["encoder"]["transformer"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert mu.sharding.spec == P("fsdp", None)
    assert state8.step.sharding.spec == P()


def test_logical_rules_replicate_axes_that_do_not_divide():
    mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "model": 1})
    rules = mesh_lib.DEFAULT_RULES
    assert mesh_lib.logical_to_mesh_spec(("embed", "mlp"), (64, 128), mesh, rules) == P(
        "fsdp", None
    )
    assert mesh_lib.logical_to_mesh_spec(("embed", None), (7, 3), mesh, rules) == P(None, None)


def test_mesh_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown axes"):
        mesh_lib.resolve_mesh_shape({"tensor": 2}, 8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        mesh_lib.resolve_mesh_shape({"data": 8, "fsdp": 2}, 8)
    assert mesh_lib.resolve_mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2, 1)
