"""Entry point: python run.py --config=configs/vq_b16.py[:tiny] --workdir=DIR [--config.KEY=VALUE]

Parses flags, sets up logging and multi-host JAX, writes the resolved config to
WORKDIR/config.json and runs the job named by `config.job`. `--print_config` prints the
resolved config (after overrides) and exits. An override of a key from the old vocabulary
(configs/common.py RENAMED) fails with the key's new name.

Exit codes (core/errors.py): 0 finished; 1 unexpected error (a bug: traceback printed);
2 an error the user fixes (config, data, weights, workdir, checkpoint: one or two lines, the
traceback only with --verbose); 3 training diverged (NaN/inf; the last checkpoint is finite);
75 preempted (SIGTERM: a checkpoint was saved; rerunning the same command resumes).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow is only used for TFDS input

if __package__ != "visual_tokenizers":  # run as a script: use this checkout, installed or not
    import this_checkout

    this_checkout.use()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from visual_tokenizers.configs import common as configs_common  # noqa: E402
from visual_tokenizers.core import errors  # noqa: E402

# config.job -> module under jobs/ exposing run(config, workdir) -> dict.
JOBS = {
    "train_tokenizer": "visual_tokenizers.jobs.train_tokenizer",
    "train_classifier": "visual_tokenizers.jobs.train_classifier",
    "evaluate": "visual_tokenizers.jobs.evaluate",
    "export_tokens": "visual_tokenizers.jobs.export_tokens",
    "train_maskgit": "visual_tokenizers.jobs.train_maskgit",
    "sample": "visual_tokenizers.jobs.sample",
    "demo": "visual_tokenizers.jobs.demo",
    "reference_batch": "visual_tokenizers.jobs.reference_batch",
    "import_maskgit": "visual_tokenizers.jobs.import_maskgit",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. configs/vq_b16.py or configs/vq_b16.py:tiny.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config as JSON and exit (no --workdir needed)."
)
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "On an error you can fix (config, data, weights...), show the traceback too."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs started by hand."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (by hand).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (by hand).")


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Keeps orbax's and TensorFlow's per-save INFO chatter out of the console."""
    noisy = ("/orbax/", "/tensorflow/", "/tensorflow_datasets/")
    return record.levelno >= logging.WARNING or not any(n in record.pathname for n in noisy)


def job_module(name: str):
    if name not in JOBS:
        raise errors.ConfigError(f"config.job={name!r} is unknown; choose one of {sorted(JOBS)}")
    return importlib.import_module(JOBS[name])


def config_json(config) -> str:
    """The resolved config as strict JSON (tuples become lists, NaN/inf null)."""
    from visual_tokenizers.core import files

    return files.json_text(config.to_dict(), indent=2, default=str)


def _config_overrides(argv) -> tuple[str | None, list[str]]:
    """(the --config file argument, the dotted keys of its --config.KEY overrides)."""
    spec, keys = None, []
    for i, arg in enumerate(argv):
        name, has_value, value = arg.partition("=")
        if name in ("--config", "-config"):
            spec = value if has_value else (argv[i + 1] if i + 1 < len(argv) else None)
        for prefix in ("--config.", "-config.", "--noconfig.", "-noconfig."):
            if name.startswith(prefix):
                keys.append(name[len(prefix) :])
    return spec, keys


def _load_config_file(spec: str):
    """The config a --config=PATH[:ARG] argument names, before overrides."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def override_error(argv, err: Exception) -> str:
    """Why a --config.KEY override failed: the key's new name when it was renamed, else
    ml_collections' message (with its closest-key suggestion)."""
    spec, keys = _config_overrides(argv)
    if spec:
        config = _load_config_file(spec)
        for key in keys:
            message = configs_common.renamed_key_message(config, key)
            if message:
                return message
    inner = err.args[0] if err.args else err
    text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
    return f"unknown config key in {' '.join(f'--config.{k}' for k in keys)}: {text}"


def parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as err:  # An override of a key the config lacks.
        _fail(override_error(argv, err))
    except (flags.Error, OSError) as err:  # A config file that fails to load, a bad value.
        _fail(f"{_first_and_last_line(str(err))}\nSee python run.py --helpfull for the flags.")


def _first_and_last_line(text: str) -> str:
    """What failed and why, without the traceback a config file's error arrives with."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1]}"


def _fail(message: str, code: int = errors.EXIT_USER_ERROR):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_workdir(workdir: str) -> None:
    """Creates the workdir; refuses one that is a file or cannot be written, before any work."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise errors.WorkdirError(f"--workdir={workdir} is a file; pass a directory (new or old)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise errors.WorkdirError(f"cannot create --workdir={workdir}: {err.strerror}") from err
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise errors.WorkdirError(
            f"--workdir={workdir} is not writable; fix its permissions or pick another directory"
        )


def run_job(config, workdir: str) -> dict:
    """Runs the job named by config.job. A job whose run() takes `run_job` (the demo, which runs
    other jobs as stages) gets this dispatcher: jobs never import jobs."""
    run = job_module(config.job).run
    if "run_job" in inspect.signature(run).parameters:
        return run(config, workdir, run_job=run_job)
    return run(config, workdir)


def main(argv):
    """Runs the job; maps how it ended onto the exit codes of core/errors.py."""
    try:
        result = _main(argv)
    except errors.UserError as err:
        if _VERBOSE.value:
            logging.exception("%s: %s", type(err).__name__, err)
        hint = "" if _VERBOSE.value else " (--verbose shows the traceback)"
        _fail(f"{err}{hint}")
    except errors.Diverged as err:
        _fail(str(err), errors.EXIT_NON_FINITE)
    if isinstance(result, dict) and result.get("stopped_early"):
        logging.warning("stopped early (preempted): rerun the same command to resume")
        sys.exit(errors.EXIT_PREEMPTED)


def _main(argv) -> dict | None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    try:
        config.job  # noqa: B018 (a config file that failed to load raises on first use)
    except OSError as err:  # ml_collections reports a config file it could not load here
        raise errors.ConfigError(_first_and_last_line(str(err))) from None
    if _PRINT_CONFIG.value:
        print(config_json(config), flush=True)
        return None
    workdir = _WORKDIR.value
    if not workdir:
        raise app.UsageError("--workdir is required (except with --print_config)")
    from visual_tokenizers.core import files
    from visual_tokenizers.core.runtime import mesh as mesh_lib

    check_workdir(workdir)
    mesh_lib.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.getLogger().setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_libraries)
    import jax

    logging.info(
        "job %s on %d %s device(s), process %d/%d, workdir %s",
        config.job,
        jax.device_count(),
        jax.devices()[0].platform,
        jax.process_index(),
        jax.process_count(),
        workdir,
    )
    if jax.process_index() == 0:  # A rerun overwrites it: it describes the latest run.
        files.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    result = run_job(config, workdir)
    if jax.process_index() == 0:
        print(files.json_text(result, default=float), flush=True)  # strict: NaN as null
    return result


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    sys.exit(app.run(main, flags_parser=parse_flags))
