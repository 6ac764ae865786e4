"""`pip install -e .` installs the checkout as `visual_tokenizers`, which lives beside Hugging
Face's `tokenizers` (same name as our tokenizers/ folder) in one process, in either import order.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Both libraries imported, then both used: a Hugging Face word-level tokenizer encodes text and
# our binary quantizer turns vectors into indices.
USE_BOTH = """
import numpy as np
from tokenizers import Tokenizer, models
hf = Tokenizer(models.WordLevel({"a": 0, "cat": 1, "[UNK]": 2}, unk_token="[UNK]"))
assert hf.encode("cat").ids == [1], hf.encode("cat").ids
from flax import nnx
from visual_tokenizers.tokenizers.binary import LookupFreeQuantizer
z = np.array([[[0.5, -1.0, 2.0, -0.1]]], np.float32)
out = LookupFreeQuantizer(4, bits=4, rngs=nnx.Rngs(0))(z)
assert int(out.indices.reshape(-1)[0]) == 0b1010, out.indices
import tokenizers, visual_tokenizers
print(tokenizers.__file__)
print(visual_tokenizers.__file__)
"""
HF_FIRST = "import tokenizers\nimport visual_tokenizers.tokenizers.vq\n" + USE_BOTH
OURS_FIRST = "import visual_tokenizers.tokenizers.vq\nimport tokenizers\n" + USE_BOTH


def _run(python: str, script: str, cwd) -> list[str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ""}
    done = subprocess.run(
        [python, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def _check_paths(printed: list[str]) -> None:
    hf_file, ours_file = printed[-2:]
    assert "site-packages" in hf_file and not hf_file.startswith(ROOT), hf_file
    assert os.path.realpath(ours_file) == os.path.realpath(os.path.join(ROOT, "__init__.py"))


def test_editable_install_lives_beside_hugging_face_tokenizers(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    done = subprocess.run([*install, "-e", ROOT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for script in (HF_FIRST, OURS_FIRST):  # cwd outside the checkout: only the install counts
        _check_paths(_run(python, script, tmp_path))


def test_scripts_in_the_checkout_do_not_shadow_hugging_face(tmp_path):
    """run.py, tests and benchmarks import the checkout via this_checkout.use(), which takes
    the checkout off sys.path: `import tokenizers` still finds Hugging Face's, even from the
    checkout's own folder."""
    bootstrap = "import this_checkout\nthis_checkout.use()\n"
    for script in (HF_FIRST, OURS_FIRST):
        _check_paths(_run(sys.executable, bootstrap + textwrap.dedent(script), ROOT))
