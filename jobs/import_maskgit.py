"""MaskGIT's released tokenizer and transformer checkpoints -> two normal workdirs.

  python run.py --config=configs/import_maskgit.py:256 --workdir=OUT \
      --config.tokenizer_path=TOKENIZER_FILE --config.maskgit_path=MASKGIT_FILE

OUT/tokenizer is a tokenizer run (TrainedTokenizer.from_workdir: export, evaluate) and
OUT/maskgit a MaskGIT run (TrainedMaskGIT.from_workdir: jobs/sample.py) whose tokens are
OUT/tokenizer's; both are step 0 and record the sha256 of their file (trained/
official_maskgit.py). OUT/import.json lists both. A rerun with the same files does nothing; with
other files it is refused (use a fresh OUT).
"""

from __future__ import annotations

import logging
import os

import jax

from visual_tokenizers.core import files
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.runtime import checkpoint
from visual_tokenizers.trained import official_maskgit as om

RESULT = "import.json"


def validate(config) -> None:
    missing = [k for k in ("tokenizer_path", "maskgit_path") if not config[k]]
    if missing:
        raise ConfigError(
            f"set --config.{missing[0]}=FILE: a released MaskGIT checkpoint, from {om.SOURCE}"
        )
    factor = 2 ** (len(config.tokenizer.channel_multipliers) - 1)
    if config.image_size % factor:
        raise ConfigError(f"config.image_size {config.image_size} is not a multiple of {factor}")


def _done(workdir: str, path: str) -> bool:
    """True when `workdir` already holds the import of `path` (same sha256)."""
    record = om.imported_record(workdir)
    if record is None:
        return False
    _, digest = om.read_checkpoint(path, os.path.basename(workdir))
    if record.get("sha256") != digest:
        raise checkpoint.CheckpointError(
            f"{workdir} already holds an import of another file ({record.get('file')}); "
            "pass a fresh --workdir"
        )
    return True


def run(config, workdir: str) -> dict:
    validate(config)
    if jax.process_count() > 1:
        raise ConfigError("import_maskgit runs on one process; start it without --num_processes")
    tokenizer_dir = os.path.join(os.path.abspath(workdir), "tokenizer")
    maskgit_dir = os.path.join(os.path.abspath(workdir), "maskgit")
    if not _done(tokenizer_dir, config.tokenizer_path):
        om.import_tokenizer(config, config.tokenizer_path, tokenizer_dir)
    if not _done(maskgit_dir, config.maskgit_path):
        om.import_transformer(config, config.maskgit_path, maskgit_dir, tokenizer_dir)
    result = {
        "tokenizer": {"workdir": tokenizer_dir, **om.imported_record(tokenizer_dir)},
        "maskgit": {"workdir": maskgit_dir, **om.imported_record(maskgit_dir)},
    }
    files.write_json(os.path.join(workdir, RESULT), result)
    for name, record in result.items():
        logging.info("import_maskgit: %s %s (sha256 %s)", name, record["workdir"], record["sha256"])
    return {
        "tokenizer_workdir": tokenizer_dir,
        "maskgit_workdir": maskgit_dir,
        "tokenizer_sha256": result["tokenizer"]["sha256"],
        "maskgit_sha256": result["maskgit"]["sha256"],
    }
