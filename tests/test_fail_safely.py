"""A run that goes wrong says why and loses nothing: the NaN guard never writes a non-finite
state, and a run stopped by a preemption exits with its own code."""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train_run import tiny_config

from visual_tokenizers.configs import evaluate as evaluate_config
from visual_tokenizers.configs import export_tokens as export_config
from visual_tokenizers.configs import vq_b16
from visual_tokenizers.core.data.decoding import DataError
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.runtime import checkpoint, loop
from visual_tokenizers.jobs import evaluate, export_tokens, train_tokenizer
from visual_tokenizers.models.big_vision_npz import TeacherWeightsError, load_vit_npz
from visual_tokenizers.trained.tokenizer import TrainedTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _cli(workdir, *overrides, flags=()):
    args = [f"--config.{k}" for k in overrides] + list(flags)
    return subprocess.run(
        [
            sys.executable,
            "run.py",
            "--config=configs/vq_b16.py:tiny",
            f"--workdir={workdir}",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_resume_with_other_model_data_or_seed_is_refused_naming_each_key(trained_12_steps):
    config = tiny_config(seed=1, **{"data.batch_size": 8, "model.encoder.width": 32})
    with pytest.raises(ConfigError) as err:
        train_tokenizer.run(config, trained_12_steps)
    message = str(err.value)
    for key in ("seed: was 0, now 1", "data.batch_size: was 16, now 8", "model.encoder.width"):
        assert key in message
    assert "init_from" in message and len(message.splitlines()) == 1


def test_resume_may_change_length_cadence_evaluation_and_learning_rate(
    trained_12_steps, tmp_path, caplog
):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_12_steps, workdir)
    config = tiny_config(num_steps=13, log_every=1, **{"eval.num_examples": 16})
    config.optimizer.lr = 1e-4
    with caplog.at_level(logging.WARNING):
        result = train_tokenizer.run(config, workdir)
    assert result["step"] == 13
    logged = caplog.text
    assert "num_steps: was 12, now 13" in logged and "optimizer.lr" in logged


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    proc = _cli(a_file)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: --workdir={a_file} is a file; pass a directory (new or old) "
        "(--verbose shows the traceback)"
    ]
    proc = _cli(a_file, flags=["--verbose"])
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "WorkdirError" in proc.stderr
    proc = _cli(tmp_path / "w", "data.source=tfds:imagenet2013")
    assert proc.returncode == 2
    error_lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(error_lines) == 1 and "imagenet2013" in error_lines[0]
    assert "Traceback" not in proc.stderr


def test_full_config_without_the_dataset_fails_on_the_data_before_models_or_weights(
    tmp_path, monkeypatch
):
    """ViT-B and the LPIPS VGG16 are not built or fetched before the data is found."""
    monkeypatch.setenv("TOKENIZERS_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("TOKENIZERS_OFFLINE", "1")
    config = vq_b16.get_config()
    assert config.loss.perceptual_weight > 0  # the weights a wrong order would reach for
    config.data.data_dir = str(tmp_path / "no_tfds_here")
    with pytest.raises(DataError, match="imagenet2012"):
        train_tokenizer.run(config, str(tmp_path / "run"))


def test_divergence_exits_with_its_own_code(tmp_path):
    proc = _cli(tmp_path, "optimizer.lr=1e39", "log_every=1", "num_steps=5")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "error: training diverged at step 1" in proc.stderr


def test_a_damaged_teacher_file_is_named(tmp_path):
    path = tmp_path / "teacher.npz"
    np.savez(path, a=np.zeros((64, 64)))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(TeacherWeightsError, match="teacher.npz is not a readable .npz"):
        load_vit_npz(str(path), {}, heads=4)


def _export_config():
    return export_config.get_config("tiny")


def _evaluate_config():
    config = evaluate_config.get_config()
    config.update(mode="tokenizer", metrics=("psnr",))
    return config


@pytest.mark.parametrize(
    "make_config, job", [(_export_config, export_tokens), (_evaluate_config, evaluate)]
)
def test_export_and_evaluation_find_their_data_before_they_restore_the_tokenizer(
    trained_12_steps, tmp_path, monkeypatch, make_config, job
):
    config = make_config()
    config.tokenizer.workdir = trained_12_steps
    config.data.source = f"folder:{tmp_path / 'missing'}"

    def too_early(*args, **kwargs):
        raise AssertionError("the tokenizer was restored before the data was found")

    monkeypatch.setattr(TrainedTokenizer, "from_workdir", too_early)
    with pytest.raises(DataError, match="no such directory"):
        job.run(config, str(tmp_path / "out"))
