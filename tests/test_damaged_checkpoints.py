"""A damaged checkpoint (truncated or deleted array data files, a deleted _METADATA) is refused
in two lines naming the step, what is unreadable, the newest intact step and the setting that
uses it: when training resumes, in `init_from`, and where export, evaluation and sampling read
a finished run. `resume_step` resumes from the intact step and sets the newer ones aside."""

import glob
import importlib
import os
import re
import shutil

import jax
import numpy as np
import pytest
from test_train_run import tiny_config

from visual_tokenizers.core.runtime import checkpoint
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.jobs import train_tokenizer
from visual_tokenizers.trained import TrainedTokenizer, builders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Checkpoints at steps 2 and 4; a small held-out pass keeps each run short.
SMALL = {"checkpoint_every": 2, "log_every": 2, "eval.num_examples": 16}
# What the first line says is unreadable, per damage.
PROBLEM = {
    "truncated": r"array [\w.]+ cannot be read \([A-Z_]+: ",  # TensorStore's status code
    "deleted": r"array [\w.]+ cannot be read \([A-Z_]+: ",
    "no_metadata": r"state/_METADATA is missing\.",
}


def config(**extra):
    return tiny_config(**{**SMALL, **extra})


def steps_in(folder):
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("two_checkpoints"))
    train_tokenizer.run(config(num_steps=4), workdir)
    assert steps_in(os.path.join(workdir, "checkpoints")) == [2, 4]
    return workdir


def damage(workdir: str, how: str, step: int = 4) -> None:
    """What a full disk, a killed copy or a stray `rm` leaves of orbax's files: the arrays live
    in OCDBT data files (state/ocdbt.process_0/d/<hash>), the tree in state/_METADATA. Which
    data file holds which array varies from run to run, so every one is damaged."""
    state = os.path.join(workdir, "checkpoints", str(step), "state")
    data = glob.glob(os.path.join(state, "ocdbt.process_*", "d", "*"))
    assert data
    for path in data:
        if how == "truncated":
            os.truncate(path, os.path.getsize(path) // 4)
        elif how == "deleted":
            os.remove(path)
    if how == "no_metadata":
        os.remove(os.path.join(state, "_METADATA"))


@pytest.fixture(params=sorted(PROBLEM))
def damaged(request, trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    damage(workdir, request.param)
    return workdir, request.param


def check_message(err, workdir: str, how: str, fix: str) -> None:
    message = str(err)
    lines = message.splitlines()
    assert len(lines) == 2 and len(message) < 600, message
    directory = os.path.join(workdir, "checkpoints")
    assert lines[0].startswith(f"checkpoint step 4 in {directory} is damaged: "), message
    assert re.search(PROBLEM[how], lines[0]), message
    assert lines[1].startswith(f"The newest intact step is 2; use it with {fix}=2"), message
    assert "TensorStore" not in message


def params_of(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_same(a, b):
    for x, y in zip(params_of(a), params_of(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_refuses_the_damaged_step_and_names_the_intact_one(damaged):
    workdir, how = damaged
    with pytest.raises(checkpoint.CheckpointError) as err:
        train_tokenizer.run(config(num_steps=6), workdir)
    check_message(err.value, workdir, how, "--config.resume_step")
    assert f"moved to {os.path.join(workdir, checkpoint.ASIDE)})" in str(err.value)
    assert steps_in(os.path.join(workdir, "checkpoints")) == [2, 4]  # refusing touches nothing


def test_resume_step_continues_from_the_intact_step_and_sets_the_damaged_one_aside(
    trained, tmp_path
):
    # Past the refusal nothing depends on how the step was damaged: one kind is enough here.
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    damage(workdir, "truncated")
    result = train_tokenizer.run(config(num_steps=6, resume_step=2), workdir)
    assert result["step"] == 6
    aside = os.path.join(workdir, checkpoint.ASIDE)
    assert os.listdir(aside) == ["4"]  # kept, not deleted
    assert os.listdir(os.path.join(aside, "4", "state"))
    assert steps_in(os.path.join(workdir, "checkpoints")) == [2, 4, 6]
    # Resumed from step 2: step 4 again is exactly the original run's (constant learning rate).
    resumed, original = checkpoint.load_raw(workdir, 4)[1], checkpoint.load_raw(trained, 4)[1]
    assert_same(resumed["params"], original["params"])

    # A plain rerun resumes from the new latest step and never meets the damaged one again.
    assert train_tokenizer.run(config(num_steps=6), workdir)["step"] == 6


def test_finished_run_readers_refuse_the_damaged_step_and_read_the_intact_one(damaged, trained):
    workdir, how = damaged
    with pytest.raises(checkpoint.CheckpointError) as err:
        TrainedTokenizer.from_workdir(workdir)  # what export, evaluation and MaskGIT use
    check_message(err.value, workdir, how, "--config.tokenizer.step")
    assert "(from Python: step=2)" in str(err.value)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_raw(workdir)
    check_message(err.value, workdir, how, "step")

    tok = TrainedTokenizer.from_workdir(workdir, step=2)
    assert tok.step == 2
    assert_same(tok.params, checkpoint.load_raw(trained, 2)[1]["params"])
    assert checkpoint.read_config(workdir, 2)[0] == 2


def test_a_damaged_config_is_refused_where_it_is_read(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    saved = os.path.join(workdir, "checkpoints", "4", "config", "metadata")
    os.truncate(saved, os.path.getsize(saved) // 2)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.read_config(workdir)
    message = str(err.value)
    assert "step 4" in message and "config/metadata cannot be read (JSONDecodeError" in message
    assert message.splitlines()[1] == "The newest intact step is 2; use it with step=2."
    with pytest.raises(checkpoint.CheckpointError, match=r"use it with --config.resume_step=2"):
        train_tokenizer.run(config(num_steps=6), workdir)


def test_a_step_that_does_not_exist_lists_the_available_ones(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    available = r"there is no checkpoint step 7 in \S+ \(available steps: 2, 4\); pick one with "
    with pytest.raises(checkpoint.CheckpointError, match=available + "--config.resume_step=N"):
        train_tokenizer.run(config(num_steps=6, resume_step=7), workdir)
    with pytest.raises(checkpoint.CheckpointError, match=available + "--config.tokenizer.step=N"):
        TrainedTokenizer.from_workdir(workdir, step=7)


def restore_or_init(workdir: str, c=None, init_from: str = ""):
    """The resume of a training job, without the job's check of its saved config."""
    c = c or config()
    mngr = checkpoint.manager(workdir, keep=1, async_save=False)
    try:
        _, state, _ = ts.restore_or_init(
            builders.model_fn_from_config(c),
            builders.optimizer_from_config(c),
            mesh_lib.make_mesh(c.mesh),
            tuple(tuple(r) for r in c.sharding_rules),
            ckpt_manager=mngr,
            init_from=init_from,
        )
    finally:
        mngr.close()
    return state


def test_init_from_a_damaged_run_names_the_intact_step_folder(trained, tmp_path):
    source = str(tmp_path / "source")
    shutil.copytree(trained, source)
    damage(source, "deleted")
    with pytest.raises(checkpoint.CheckpointError) as err:
        restore_or_init(str(tmp_path / "new"), init_from=source)
    intact = os.path.join(source, "checkpoints", "2")
    assert f"use it with --config.init_from={intact}" in str(err.value)
    state = restore_or_init(str(tmp_path / "new"), init_from=intact)
    assert_same(state.params, checkpoint.load_raw(trained, 2)[1]["params"])
    assert int(state.step) == 0  # a new run from those params


def test_a_checkpoint_of_another_model_is_refused_in_one_short_line(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    with pytest.raises(checkpoint.CheckpointError) as err:
        restore_or_init(workdir, config(**{"model.encoder.depth": 3}))
    message = str(err.value)
    assert "does not match this model" in message and "tree structures do not match at" in message
    assert len(message.splitlines()) == 1 and len(message) < 400, message


def test_every_training_config_resumes_from_the_latest_step_by_default():
    names = [n[:-3] for n in os.listdir(os.path.join(REPO, "configs")) if n.endswith(".py")]
    training = 0
    for name in sorted(names):
        get_config = getattr(
            importlib.import_module(f"visual_tokenizers.configs.{name}"), "get_config", None
        )
        if get_config is None:
            continue
        c = get_config()
        if str(c.get("job", "")).startswith("train_"):
            training += 1
            assert c.resume_step == -1, name
    assert training >= 5
