"""End to end: the tiny tokenizer run trains, logs, checkpoints, survives a kill and resumes to
exactly the parameters of an uninterrupted run; NaNs and config mistakes stop it clearly."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from visual_tokenizers.configs import vq_b16
from visual_tokenizers.core.runtime import checkpoint, loop
from visual_tokenizers.jobs import train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small and fast; a constant learning rate makes the trajectory independent of num_steps, so a
# run started with a longer horizon and killed can be compared with a short uninterrupted one.
OVERRIDES = {
    "num_steps": 12,
    "data.batch_size": 16,
    "eval.batch_size": 16,
    "eval.num_examples": 32,
    "optimizer.schedule": "constant",
    "optimizer.warmup_steps": 0,
    "log_every": 2,
    "checkpoint_every": 4,
}


def tiny_config(**extra):
    config = vq_b16.get_config("tiny")
    for key, value in {**OVERRIDES, **extra}.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def final_params(workdir):
    step, state = checkpoint.load_raw(workdir)
    return step, jax.tree.leaves(state["params"])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = train_tokenizer.run(tiny_config(), workdir)
    return workdir, result


def test_tiny_run_trains_logs_and_evaluates(reference_run):
    workdir, result = reference_run
    assert result["step"] == 12
    assert 5.0 < result["eval/psnr"] < 60.0 and 0.0 < result["eval/ssim"] <= 1.0
    assert 0.0 < result["eval/codebook_usage"] <= 1.0
    assert result["eval/num_examples"] == 32
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == [2, 4, 6, 8, 10, 12]
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    assert {"steps_per_s", "quantizer/perplexity", "loss/commitment"} <= set(train_lines[0])
    assert any("final/psnr" in x for x in lines)
    assert glob.glob(os.path.join(workdir, "images", "reconstructions_*.png"))
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/[0-9]*"))
    assert steps == [4, 8, 12]
    saved_config = json.load(open(f"{workdir}/checkpoints/12/config/metadata"))
    assert saved_config["num_steps"] == 12


def _start_cli(workdir, **extra):
    args = [sys.executable, "run.py", "--config=configs/vq_b16.py:tiny", f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in {**OVERRIDES, **extra}.items()]
    return subprocess.Popen(
        args, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _wait_for_checkpoint(proc, workdir, step, timeout=240):
    path = os.path.join(workdir, "checkpoints", str(step))
    deadline = time.time() + timeout
    while not os.path.isdir(path):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(proc.stdout.read().decode()[-3000:])
        time.sleep(0.01)


def test_killed_run_resumes_to_identical_parameters(reference_run, tmp_path):
    workdir = str(tmp_path)
    proc = _start_cli(workdir, num_steps=100_000)  # would run for hours: it must be killed
    _wait_for_checkpoint(proc, workdir, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    mngr = checkpoint.manager(workdir, keep=3)
    killed_at = mngr.latest_step()
    mngr.close()
    assert killed_at is not None and 4 <= killed_at < 12

    result = train_tokenizer.run(tiny_config(), workdir)
    assert result["step"] == 12
    step_a, params_a = final_params(reference_run[0])
    step_b, params_b = final_params(workdir)
    assert step_a == step_b == 12
    for a, b in zip(params_a, params_b, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_a_checkpoint_and_exits_with_the_preempted_code(tmp_path):
    workdir = str(tmp_path)
    proc = _start_cli(workdir, num_steps=100_000, checkpoint_every=100_000)
    _wait_for_metrics(proc, workdir)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 75, output[-3000:]  # EXIT_PREEMPTED: a scheduler requeues it
    assert '"stopped_early": true' in output
    mngr = checkpoint.manager(workdir, keep=3)
    assert mngr.latest_step() is not None and mngr.latest_step() >= 2
    mngr.close()


def _wait_for_metrics(proc, workdir, timeout=240):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(proc.stdout.read().decode()[-3000:])
        time.sleep(0.05)


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(log_every=1, checkpoint_every=1, **{"optimizer.lr": 1e38})
    config.optimizer.grad_clip_norm = 0.0
    with pytest.raises(loop.NonFiniteLossError, match=r"diverged at step (\d+).*last finite ones"):
        train_tokenizer.run(config, str(tmp_path))
    mngr = checkpoint.manager(str(tmp_path), keep=3)
    last = mngr.latest_step()
    mngr.close()
    assert last is not None
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert all(np.isfinite(x["loss"]) for x in lines)  # nothing non-finite was logged or saved
    assert max(x["step"] for x in lines) == last


def test_unknown_config_key_is_named(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "--config=configs/vq_b16.py:tiny",
            f"--workdir={tmp_path}",
            "--config.optimizer.lrr=0.1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "lrr" in proc.stderr + proc.stdout


def test_two_processes_train_like_one(reference_run, tmp_path):
    """Two processes with 4 CPU devices each form one 8-device mesh, each reading its own half
    of every batch; they must end with the parameters of the single-process 8-device run."""
    workdir = str(tmp_path)
    port = 20000 + os.getpid() % 20000
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    procs = []
    for i in range(2):
        args = [
            sys.executable,
            "run.py",
            "--config=configs/vq_b16.py:tiny",
            f"--workdir={workdir}",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
        procs.append(
            subprocess.Popen(
                args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = [p.communicate(timeout=400)[0].decode() for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "process 0/2" in outputs[0] or "process 0 of 2" in outputs[0]
    step_a, params_a = final_params(reference_run[0])
    step_b, params_b = final_params(workdir)
    assert step_a == step_b == 12
    # Cross-process reductions add in another order: differences of ~1e-5 are float noise,
    # while a wrong data split moves parameters by ~lr * steps = 1e-2.
    for a, b in zip(params_a, params_b, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=3e-4)


def test_load_tokenizer_restores_the_trained_model(reference_run):
    from visual_tokenizers.trained import TrainedTokenizer

    workdir = reference_run[0]
    loaded = TrainedTokenizer.from_workdir(workdir)
    assert loaded.step == 12 and loaded.config.num_steps == 12
    _, saved = final_params(workdir)
    for a, b in zip(jax.tree.leaves(loaded.params), saved, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    model = loaded.model()
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    indices = model.encode(images)
    assert indices.shape == (2, 8, 8) and int(indices.max()) < model.vocab.size
    reconstruction, quantized = model(images)
    np.testing.assert_array_equal(indices, quantized.indices)
    np.testing.assert_allclose(model.decode(indices), reconstruction, atol=1e-5)


def test_checkpoint_restores_onto_another_mesh(reference_run):
    """Written by a data-parallel run, read back FSDP-sharded on a (4, 2) mesh."""
    from jax.sharding import PartitionSpec as P

    from visual_tokenizers.core.runtime import mesh as mesh_lib
    from visual_tokenizers.trained import TrainedTokenizer

    mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "model": 1})
    loaded = TrainedTokenizer.from_workdir(reference_run[0], mesh=mesh)
    kernel = loaded.params["encoder"]["transformer"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh.shape and kernel.sharding.spec == P("fsdp", None)
    _, saved = final_params(reference_run[0])
    for a, b in zip(jax.tree.leaves(loaded.params), saved, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
