"""MaskGIT on binary (LFQ) tokens through the jobs: configs/maskgit_binary_b16.py:tiny trains
factorised heads from an export and from on-the-fly encoding, and the sample job decodes."""

import numpy as np
import pytest

from visual_tokenizers.configs import binary_b16, maskgit_binary_b16
from visual_tokenizers.configs import export_tokens as export_config
from visual_tokenizers.configs import sample as sample_config
from visual_tokenizers.jobs import export_tokens, sample, train_maskgit
from visual_tokenizers.trained import builders
from visual_tokenizers.trained.maskgit import TrainedMaskGIT


def test_binary_tokens_train_factorised_heads_and_sample(tmp_path):
    """configs/maskgit_binary_b16.py:tiny on an 18-bit LFQ tokenizer: export and on-the-fly
    encoding give the same loss, the model has two 9-bit heads, samples decode to images."""
    tokenizer = str(tmp_path / "tokenizer")
    builders.save_untrained(binary_b16.get_config("tiny"), tokenizer)
    export = export_config.get_config("tiny")
    overrides = {"tokenizer.workdir": tokenizer, "data.split": "train", "data.max_examples": 32}
    export.update_from_flattened_dict({**overrides, "data.batch_size": 16})
    export_tokens.run(export, str(tmp_path / "tokens"))
    small = {
        "num_steps": 2,
        "data.batch_size": 16,
        "data.max_examples": 32,
        "model.width": 32,
        "model.depth": 1,
        "model.heads": 2,
        "model.mlp_dim": 64,
        "log_every": 1,
        "checkpoint_every": 2,
    }
    results = {}
    for source in ("export", "encode"):
        config = maskgit_binary_b16.get_config("tiny")
        config.update_from_flattened_dict(small)
        config.tokenizer.workdir = tokenizer if source == "encode" else ""
        config.tokens.export_dir = str(tmp_path / "tokens") if source == "export" else ""
        results[source] = train_maskgit.run(config, str(tmp_path / source))
    assert results["export"]["loss"] == pytest.approx(results["encode"]["loss"], rel=1e-5)
    maskgit = TrainedMaskGIT.from_workdir(str(tmp_path / "export"))
    assert maskgit.resolved["vocab"]["bits"] == 18
    model = maskgit.model_def.merge(maskgit.params, maskgit.model_state)
    assert model.layout.sizes == (512, 512)
    config = sample_config.get_config("tiny")
    config.maskgit.workdir = str(tmp_path / "export")
    config.update(num_samples=8, batch_size=8)
    config.update(classes=(2,), steps=3)
    config.tokenizer.workdir = tokenizer  # the export run names no tokenizer workdir
    assert sample.run(config, str(tmp_path / "samples"))["num_samples"] == 8
    with np.load(str(tmp_path / "samples" / "samples.npz")) as z:
        assert z["arr_0"].shape == (8, 32, 32, 3) and list(z["arr_1"]) == [2] * 8
