"""The parameter EMA's warm-up (tokenizers/training.py): d_t = min(d, (1 + t) / (10 + t)) as
TensorFlow's ExponentialMovingAverage with num_updates, and the effective decay saved with every
checkpoint (core/runtime/checkpoint.py read_meta)."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from visual_tokenizers.configs import vq_b16
from visual_tokenizers.core.runtime import checkpoint
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.jobs import train_tokenizer
from visual_tokenizers.tokenizers import training


@pytest.mark.parametrize(
    "t, want",
    [(0, 1 / 10), (1, 2 / 11), (10, 11 / 20), (80, 0.9), (10**7, 0.9999)],
)
def test_effective_decay_follows_the_warm_up_then_the_configured_decay(t, want):
    decay = 0.9 if t == 80 else 0.9999  # t = 80: (1 + t) / (10 + t) = 0.9 exactly
    np.testing.assert_allclose(float(training.ema_decay_at(decay, t)), want, rtol=1e-6)
    # Off: the configured decay from the first step.
    assert float(training.ema_decay_at(decay, t, warmup=False)) == np.float32(decay)


def test_ema_update_is_the_warm_up_recursion():
    """Five updates of a small tree through TokenizerStep.ema_update against float64 numpy."""
    step = training.TokenizerStep(None, None, training.LossConfig(), ema_decay=0.95)
    rng = np.random.default_rng(0)
    params = [{"w": rng.normal(size=(3, 2)).astype(np.float32)} for _ in range(6)]
    ema = jax.tree.map(jnp.asarray, params[0])  # the EMA starts as a copy of the init
    want = np.float64(params[0]["w"])
    update = jax.jit(step.ema_update)
    for k in range(5):  # state.step = k before update t = k + 1
        state = ts.TrainState(jnp.asarray(k, jnp.int32), params[k + 1], {}, None)
        ema = update(state, ema).ema_params
        t = k + 1
        d = min(0.95, (1 + t) / (10 + t))
        want = d * want + (1 - d) * params[k + 1]["w"]
    np.testing.assert_allclose(ema["w"], want, rtol=1e-6, atol=1e-7)
    # What is left of the init after five updates: prod d_t = 0.2 %, not 0.95**5 = 77 %.
    zeros = ts.TrainState(jnp.asarray(0, jnp.int32), {"w": jnp.zeros((1,))}, {}, None)
    left = {"w": jnp.ones((1,))}
    for k in range(5):
        left = update(zeros.replace(step=jnp.asarray(k, jnp.int32)), left).ema_params
    np.testing.assert_allclose(left["w"], np.prod([2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15]), 1e-6)


def _run(tmp_path, **overrides):
    config = vq_b16.get_config("tiny")
    config.update(num_steps=3, log_every=1, checkpoint_every=1, keep_checkpoints=3)
    config.update(ema_decay=0.9, **overrides)
    config.data.batch_size = config.eval.batch_size = 16
    config.eval.num_examples = 16
    config.optimizer.update(schedule="constant", warmup_steps=0)
    train_tokenizer.run(config, str(tmp_path))
    return {s: checkpoint.load_raw(str(tmp_path), s)[1] for s in (1, 2, 3)}


def test_training_run_applies_the_warm_up_and_records_the_decay(tmp_path):
    states = _run(tmp_path)
    for t in (2, 3):  # each checkpoint's EMA is the recursion from the one before it
        d = np.float32(min(0.9, (1 + t) / (10 + t)))
        before, now = states[t - 1]["ema_params"], states[t]["params"]
        expected = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, before, now)
        pairs = zip(
            jax.tree.leaves(expected), jax.tree.leaves(states[t]["ema_params"]), strict=True
        )
        for a, b in pairs:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        step, meta = checkpoint.read_meta(str(tmp_path), t)
        assert step == t
        assert meta["ema"] == {
            "decay": 0.9,
            "warmup": True,
            "updates": t,
            "effective_decay": float(d),  # the float32 value the step used
        }
    assert checkpoint.read_meta(str(tmp_path))[1]["ema"]["updates"] == 3  # latest by default


def test_warm_up_off_keeps_the_constant_decay():
    step = training.TokenizerStep(
        None, None, training.LossConfig(), ema_decay=0.9, ema_warmup=False
    )
    state = ts.TrainState(jnp.asarray(0, jnp.int32), {"w": jnp.zeros((1,))}, {}, None)
    ema = jax.jit(step.ema_update)(state, {"w": jnp.ones((1,))}).ema_params
    np.testing.assert_allclose(ema["w"], 0.9, rtol=1e-6)  # not 1 / 10 at the first update
    assert training.ema_record(0.9, False, 7)["ema"]["effective_decay"] == pytest.approx(0.9)


def test_checkpoint_without_meta_reads_as_empty_and_restores(tmp_path):
    """A checkpoint as written before the meta item (state and config only) still loads."""
    state = {"step": jnp.asarray(5, jnp.int32), "params": {"w": jnp.ones((2,))}}
    mngr = checkpoint.manager(str(tmp_path), keep=1, async_save=False)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave({"job": "x"})
    )
    mngr.save(5, args=args)
    mngr.close()
    assert checkpoint.read_meta(str(tmp_path)) == (5, {})
    assert checkpoint.read_config(str(tmp_path)) == (5, {"job": "x"})
    assert checkpoint.load_raw(str(tmp_path))[0] == 5
    # And a new one carries what it is given.
    mngr = checkpoint.manager(str(tmp_path), keep=2, async_save=False)
    checkpoint.save(mngr, 6, state, {"job": "x"}, meta={"ema": {"effective_decay": 0.5}})
    mngr.close()
    assert checkpoint.read_meta(str(tmp_path)) == (6, {"ema": {"effective_decay": 0.5}})
    assert training.ema_record(0.0, True, 6) == {}  # no EMA, nothing to record
