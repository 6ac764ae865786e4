"""One config vocabulary: old key names fail with their new spelling, misspelt keys keep
ml_collections' suggestion, --print_config and WORKDIR/config.json show the resolved config,
and configs load without JAX."""

import glob
import importlib
import json
import os
import subprocess
import sys

import pytest

from visual_tokenizers.configs import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_NAMES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if not os.path.basename(p).startswith("_")
)


def _run_py(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _flat_keys(config, prefix=""):
    for key in config.keys():
        value = config[key]
        yield prefix + key
        if hasattr(value, "keys"):
            yield from _flat_keys(value, f"{prefix}{key}.")


def test_configs_import_without_jax():
    names = ", ".join(repr(n) for n in CONFIG_NAMES)
    code = (
        "import sys, importlib, this_checkout; this_checkout.use()\n"
        f"for name in [{names}]:\n"
        "    module = importlib.import_module('visual_tokenizers.configs.' + name)\n"
        "    getattr(module, 'get_config', lambda: None)()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax'))\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("name", [n for n in CONFIG_NAMES if n != "common"])
def test_configs_use_only_the_new_vocabulary(name):
    config = importlib.import_module(f"visual_tokenizers.configs.{name}").get_config()
    for key in _flat_keys(config):
        assert common.renamed_key_message(config, key) is None, key


def test_every_new_name_exists_in_some_config():
    configs = [
        importlib.import_module(f"visual_tokenizers.configs.{n}").get_config()
        for n in CONFIG_NAMES
        if n != "common"
    ]
    keys = {k.split(".", 1)[1] if k.startswith(("export.", "sample.")) else k
            for c in configs for k in _flat_keys(c)}  # fmt: skip
    assert set(common.RENAMED.values()) <= keys


@pytest.mark.parametrize(
    "config, old, new",
    [
        ("export_tokens.py:tiny", "tokenizer_workdir", "tokenizer.workdir"),
        ("export_tokens.py", "use_ema", "tokenizer.use_ema"),
        ("export_tokens.py", "batch_size", "data.batch_size"),
        ("sample.py", "maskgit_workdir", "maskgit.workdir"),
        ("maskgit_b16.py:tiny", "data.train", "data.source"),
        ("vq_b16.py:tiny", "data.eval_split", "eval.split"),
        ("vq_b16.py", "data.global_batch_size", "data.batch_size"),
        ("evaluate.py:tiny", "data.spec", "data.source"),
        ("demo.py:test", "export.tokenizer_workdir", "export.tokenizer.workdir"),
    ],
)
def test_an_old_key_fails_naming_its_new_spelling(config, old, new):
    proc = _run_py(f"--config=configs/{config}", f"--config.{old}=1", "--print_config")
    assert proc.returncode != 0
    assert f"config.{old} was renamed config.{new}" in proc.stderr


def test_a_misspelt_key_gets_the_suggestion_of_its_own_job():
    proc = _run_py("--config=configs/export_tokens.py", "--config.tokenizer.wrkdir=X")
    assert proc.returncode != 0 and 'Did you mean "workdir"' in proc.stderr
    assert "renamed" not in proc.stderr
    # The sample job keeps a top-level batch_size: a misspelling of it is suggested there.
    proc = _run_py("--config=configs/sample.py", "--config.batch_sise=8", "--print_config")
    assert proc.returncode != 0 and 'Did you mean "batch_size"' in proc.stderr


def test_print_config_prints_the_resolved_config_without_a_workdir():
    args = ["--config=configs/export_tokens.py:tiny", "--config.data.batch_size=8"]
    proc = _run_py(*args, "--print_config")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed["job"] == "export_tokens" and printed["data"]["batch_size"] == 8
    assert printed["tokenizer"] == {"workdir": "runs/vq_tiny", "step": -1, "use_ema": None}
    assert _run_py(*args).returncode != 0  # without --print_config a workdir is required


def test_every_run_writes_its_config_and_a_rerun_overwrites_it(tmp_path):
    """Written before the job starts: here the job itself then fails (no such MaskGIT run)."""
    workdir = str(tmp_path / "out")
    for seed in (3, 4):
        args = ["--config=configs/sample.py", f"--workdir={workdir}", f"--config.seed={seed}"]
        proc = _run_py(*args, f"--config.maskgit.workdir={tmp_path / 'missing'}", timeout=300)
        assert proc.returncode != 0
        with open(os.path.join(workdir, "config.json")) as f:
            written = json.load(f)
        assert written["seed"] == seed and written["maskgit"]["workdir"].endswith("missing")
    assert os.listdir(workdir) == ["config.json"]  # no temporary file left behind
