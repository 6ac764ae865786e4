"""A run that goes wrong says why and loses nothing: the NaN guard never writes a non-finite
state, and a run stopped by a preemption exits with its own code."""

import json
import shutil

import jax
import numpy as np
import pytest
from test_train_run import tiny_config

from visual_tokenizers.core.runtime import checkpoint, loop
from visual_tokenizers.jobs import train_tokenizer


@pytest.fixture(scope="module")
def trained_12_steps(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("twelve"))
    train_tokenizer.run(tiny_config(), workdir)
    return workdir


def _all_finite(tree) -> bool:
    floats = [x for x in jax.tree.leaves(tree) if np.issubdtype(np.asarray(x).dtype, np.floating)]
    return all(np.isfinite(np.asarray(x)).all() for x in floats)


def test_huge_learning_rate_on_resume_never_writes_a_non_finite_checkpoint(
    trained_12_steps, tmp_path
):
    """The update at the first resumed step overflows the weights while its loss (computed
    before the update) is still finite: the guard must see the weights, not only the loss."""
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_12_steps, workdir)
    # Gradient clipping stays on (as it was saved): Adam's step is ~lr whatever the gradient.
    config = tiny_config(num_steps=20, log_every=1, checkpoint_every=1, **{"optimizer.lr": 1e39})
    with pytest.raises(loop.NonFiniteLossError) as err:
        train_tokenizer.run(config, workdir)
    message = str(err.value)
    assert "diverged at step 13" in message
    assert "non-finite after the update" in message
    assert "after step 12 were the last finite ones" in message
    assert "step 12" in message and "resumes from it" in message
    mngr = checkpoint.manager(workdir, keep=3)
    steps = mngr.all_steps()
    mngr.close()
    assert max(steps) == 12  # step 13 was never written
    for step in steps:
        _, state = checkpoint.load_raw(workdir, step)
        assert _all_finite(state), f"checkpoint {step} holds NaN/inf"
    lines = [json.loads(x) for x in open(f"{workdir}/metrics.jsonl")]
    assert max(x["step"] for x in lines) == 12  # nothing from the diverged step was logged


def test_divergence_before_any_checkpoint_says_a_rerun_starts_from_scratch(tmp_path):
    config = tiny_config(log_every=1, checkpoint_every=1000, **{"optimizer.lr": 1e39})
    config.optimizer.grad_clip_norm = 0.0
    with pytest.raises(loop.NonFiniteLossError, match="No checkpoint was written yet"):
        train_tokenizer.run(config, str(tmp_path))
    assert checkpoint.manager(str(tmp_path), keep=3).latest_step() is None


def test_guard_names_the_loss_and_the_gradient_norm():
    flags = np.zeros(3, bool)
    history = [(5, {"loss": 1.0, "grad_norm": 2.0}, flags), (6, {"loss": 1.0}, flags)]
    loop.check_finite(history, 4, "ckpts", None)  # all finite: no error
    history.append((7, {"loss/l2": float("nan"), "grad_norm": float("inf")}, flags))
    with pytest.raises(loop.NonFiniteLossError) as err:
        loop.check_finite(history, 6, "ckpts", {"w": np.zeros(3)})
    message = str(err.value)
    assert "step 7: loss/l2 = nan; grad_norm = inf" in message
    assert "after step 6 were the last finite ones" in message
    assert "step 6 in ckpts" in message
