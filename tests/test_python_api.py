"""The README's "Use from Python" section runs as written, on tiny runs prepared under the paths
it names; the API's encode is the export's; wrong input fails with one message naming the fix."""

import os
import re

import jax
import numpy as np
import pytest

from visual_tokenizers.configs import export_tokens as export_config
from visual_tokenizers.configs import maskgit_b16, vq_b16
from visual_tokenizers.core.data import builtin as builtin_data
from visual_tokenizers.core.data.decoding import preprocess
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.tokens import manifest as token_manifest
from visual_tokenizers.jobs import export_tokens, train_maskgit
from visual_tokenizers.trained import InputError, TrainedTokenizer, builders

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_python(section: str = "## Use from Python") -> str:
    text = open(README).read()
    body = text[text.index(section) + len(section) :]
    body = body[: body.index("\n## ")]
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    assert blocks, f"no python block under {section!r}"
    return "\n".join(blocks)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/vq_tiny (an untrained step-0 checkpoint), runs/vq_tiny_tokens (the tiny export
    config, fewer examples) and runs/maskgit_tiny (a few steps on that export), in a fresh cwd."""
    root = tmp_path_factory.mktemp("cwd")
    here = os.getcwd()
    os.chdir(root)
    try:
        builders.save_untrained(vq_b16.get_config("tiny"), "runs/vq_tiny")
        export = export_config.get_config("tiny")
        export.data.update(max_examples=128, batch_size=32)
        export.rows_per_shard = 64
        export_tokens.run(export, "runs/vq_tiny_tokens")
        maskgit = maskgit_b16.get_config("tiny")
        maskgit.tokens.export_dir = "runs/vq_tiny_tokens"
        maskgit.update(num_steps=2, log_every=1, checkpoint_every=2)
        maskgit.model.update(width=32, depth=1, heads=2, mlp_dim=64)
        maskgit.data.batch_size = 16
        train_maskgit.run(maskgit, "runs/maskgit_tiny")
        yield str(root)
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def tok(runs):
    return TrainedTokenizer.from_workdir(os.path.join(runs, "runs/vq_tiny"))


def test_readme_snippet_runs(runs):
    here = os.getcwd()
    os.chdir(runs)
    try:
        scope = {}
        exec(compile(readme_python(), "README.md", "exec"), scope)
    finally:
        os.chdir(here)
    assert scope["tok"].weights == "params"  # the untrained run keeps no EMA
    assert scope["indices"].shape == (8, 8, 8) and scope["indices"].dtype == np.int32
    for name in ("reconstructions", "decoded", "samples"):
        assert scope[name].shape == (8, 32, 32, 3) and scope[name].dtype == np.uint8, name
    # The export's rows decode to what their indices decode to.
    np.testing.assert_array_equal(
        scope["decoded"], scope["tok"].decode(scope["tokens"].reshape(8, 8, 8))
    )
    assert scope["generator"].tokenizer.record() == scope["exporter"].record()


def test_encode_equals_what_the_export_wrote(runs, tok):
    out = os.path.join(runs, "runs/vq_tiny_tokens")
    keys, tokens = token_manifest.read_rows(out, token_manifest.read_manifest(out), 16)
    source = builtin_data.ShapesSource("test", 32)
    images = np.stack([source.read(int(k.split("/")[-1]))[0] for k in keys])
    np.testing.assert_array_equal(tok.encode(images), tokens.reshape(-1, 8, 8))


def test_any_size_is_preprocessed_as_export_does(tok):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (48 + i, 40 + 3 * i, 3), dtype=np.uint8) for i in range(8)]
    want = tok.encode(np.stack([preprocess(im, 32) for im in images]))
    np.testing.assert_array_equal(tok.encode(images), want)
    model = tok.model()  # the same (chosen) weights as encode
    same = jax.jit(lambda x: model.encode(x.astype(np.float32) / 127.5 - 1.0))
    prepared = np.stack([preprocess(im, 32) for im in images])
    np.testing.assert_array_equal(np.asarray(same(prepared)), want)


def test_wrong_input_raises_one_clear_error(tok):
    parallel = mesh_lib.batch_parallelism(tok.mesh)
    images = np.zeros((parallel, 32, 32, 3), np.uint8)
    with pytest.raises(InputError, match=r"uint8.*astype\(np.uint8\)"):
        tok.encode(images.astype(np.float32) * 255.0)
    with pytest.raises(InputError, match=r"images\[None\]"):
        tok.encode(images[0])
    with pytest.raises(InputError, match="3 \\(RGB\\) channels"):
        tok.encode(images[..., :1])
    with pytest.raises(InputError, match=f"multiple of {parallel}"):
        tok.encode(images[:3])
    indices = tok.encode(images)
    with pytest.raises(InputError, match="outside the tokenizer's vocabulary"):
        tok.decode(indices + tok.vocab.size)
    with pytest.raises(InputError, match="outside the tokenizer's vocabulary"):
        tok.decode(np.full_like(indices, -1))
    with pytest.raises(InputError, match=r"indices must be \[batch, 8, 8\]"):
        tok.decode(indices[:, :4])
    with pytest.raises(InputError, match=f"multiple of {parallel}"):
        tok.decode(indices[:5])
