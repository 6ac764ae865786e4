"""Degenerate inputs fail safely and say why: empty or malformed sample files, labels that do not
match the images, too few images for a statistic, an export without one readable image, shapes
signals on images they mean nothing for, and JSON files that strict parsers accept."""

import json
import logging
import math
import types

import numpy as np
import pytest
from PIL import Image

from visual_tokenizers.configs import evaluate as evaluate_config
from visual_tokenizers.configs import export_tokens as export_config
from visual_tokenizers.configs import vq_b16
from visual_tokenizers.core import files
from visual_tokenizers.core.data.builtin import ALL_PHOTOS
from visual_tokenizers.core.data.decoding import DataError
from visual_tokenizers.core.errors import UserError
from visual_tokenizers.core.evaluation import metrics
from visual_tokenizers.core.runtime import loop
from visual_tokenizers.core.tokens import manifest as token_manifest
from visual_tokenizers.core.tokens import stats as token_stats
from visual_tokenizers.jobs import evaluate, export_tokens
from visual_tokenizers.trained import builders, evaluation


def strict_loads(text: str):
    """json.loads that refuses the bare NaN / Infinity tokens Python's json writes by default."""

    def refuse(token):
        raise ValueError(f"bare {token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def strict_load(path):
    with open(path) as f:
        return strict_loads(f.read())


@pytest.fixture
def no_networks(monkeypatch):
    """Degenerate inputs are refused before any network is loaded (or trained)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network was loaded for inputs that cannot be evaluated")

    monkeypatch.setattr(evaluation, "inception_apply", refuse)
    monkeypatch.setattr(evaluate, "shapes_apply", refuse)


def _samples_config(path, *metric_names):
    config = evaluate_config.get_config("samples")
    config.metrics = metric_names
    config.samples.update(path=str(path), batch_size=8)
    return config


def _images(n, size=8):
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- samples files


def test_empty_samples_file_is_named(tmp_path, no_networks):
    path = tmp_path / "empty.npz"
    np.savez(path, np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(
        DataError, match=r"samples file .*empty\.npz holds no images.*\(0, 8, 8, 3\)"
    ):
        evaluate.run(_samples_config(path, "is"), str(tmp_path / "out"))
    assert issubclass(DataError, UserError)  # run.py: one line, exit 2


@pytest.mark.parametrize(
    "array, fix",
    [
        (np.full((4, 8, 8, 3), 0.5, np.float32), r"float32 .*np\.round\(x \* 255\)"),
        (
            np.zeros((4, 8, 8, 3), np.int64),
            r"int64 .*values lie in \[0, 255\].*astype\(np\.uint8\)",
        ),
        (np.zeros((4, 3, 8, 8), np.uint8), r"channels come first: .*transpose\(0, 2, 3, 1\)"),
        (np.zeros((4, 8, 8), np.uint8), r"grey images: .*np\.repeat\(x\[\.\.\., None\], 3"),
        (np.zeros((4, 8, 8, 4), np.uint8), r"RGBA images: save x\[\.\.\., :3\]"),
        (np.zeros((8, 8, 3), np.uint8), r"one image, not a batch: save x\[None\]"),
    ],
)
def test_malformed_samples_arrays_name_the_fix(tmp_path, array, fix):
    path = tmp_path / "s.npz"
    np.savez(path, array)
    with pytest.raises(DataError, match=fix):
        metrics.NpzImages(str(path))


def test_a_file_that_is_not_an_npz_is_named(tmp_path):
    path = tmp_path / "s.npy"
    np.save(path, _images(2))
    with pytest.raises(DataError, match=r"s\.npy is not an npz archive; save it with np\.savez"):
        metrics.NpzImages(str(path))


def test_labels_must_be_one_integer_per_image(tmp_path, no_networks):
    path = tmp_path / "s.npz"
    np.savez(path, _images(4), np.arange(3))
    with pytest.raises(DataError, match=r"arr_1 holds 3 labels but arr_0 holds 4 images"):
        evaluate.run(_samples_config(path, "fid"), str(tmp_path / "out"))
    for labels in (np.zeros(4, np.float32), np.zeros((4, 1), np.int64)):
        np.savez(path, _images(4), labels)
        with pytest.raises(DataError, match=r"arr_1 \(labels\) is .*one integer class id"):
            metrics.NpzImages(str(path))
    np.savez(path, _images(4), np.arange(4))
    np.testing.assert_array_equal(metrics.NpzImages(str(path)).labels, np.arange(4))


def test_too_few_images_for_a_statistic(tmp_path, no_networks):
    path = tmp_path / "one.npz"
    np.savez(path, _images(1))
    with pytest.raises(DataError, match=r"one\.npz gives 1 image\(s\): FID needs at least 2"):
        evaluate.run(_samples_config(path, "fid"), str(tmp_path / "a"))
    np.savez(path, _images(3))
    with pytest.raises(DataError, match=r"precision/recall with pr_k=3 needs at least 4"):
        evaluate.run(_samples_config(path, "pr"), str(tmp_path / "b"))
    # The statistics themselves say what they need, wherever they are called from.
    with pytest.raises(DataError, match="needs at least 2 images"):
        metrics.gaussian_stats(np.zeros((1, 4)))
    with pytest.raises(DataError, match="lower config.pr_k"):
        metrics.manifold_radii(np.zeros((3, 4)), k=3)


# ----------------------------------------------------------------------------- shapes signals


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A freshly initialised tiny tokenizer, saved as a training run saves it."""
    workdir = str(tmp_path_factory.mktemp("tokenizer"))
    builders.save_untrained(vq_b16.get_config("tiny"), workdir)
    return workdir


def test_shapes_signals_are_skipped_on_photographs(tokenizer_dir, tmp_path, no_networks, caplog):
    config = evaluate_config.get_config("tiny")  # psnr, ssim, usage, shapes
    config.tokenizer.workdir = tokenizer_dir
    config.data.update(source="builtin:photos", split="test", batch_size=8)
    config.num_examples = 8
    with caplog.at_level(logging.WARNING):
        results = evaluate.run(config, str(tmp_path))
    assert "shapes_accuracy" not in results and "shapes_fd" not in results
    assert "builtin:photos is not builtin:shapes" in results["shapes_skipped"]
    assert "shapes_fd skipped: the evaluated data builtin:photos" in caplog.text
    assert results["num_examples"] == 8 and results["psnr"] > 0  # the rest is measured
    assert strict_load(tmp_path / "metrics.json") == pytest.approx(results)


def test_shapes_signals_are_skipped_for_samples_of_other_classes(tmp_path, no_networks):
    # jobs/sample.py's record next to its samples.npz names the classes the samples show.
    np.savez(tmp_path / "samples.npz", _images(4), np.arange(4))
    files.write_json(str(tmp_path / "samples.json"), {"class_names": list(ALL_PHOTOS)})
    results = evaluate.run(_samples_config(tmp_path / "samples.npz", "shapes"), str(tmp_path / "a"))
    assert "shapes_accuracy" not in results and "samples.json says" in results["shapes_skipped"]
    # A bare npz whose labels are not shape classes (e.g. ImageNet's 1000).
    np.savez(tmp_path / "imagenet.npz", _images(4), np.array([0, 5, 999, 7]))
    results = evaluate.run(
        _samples_config(tmp_path / "imagenet.npz", "shapes"), str(tmp_path / "b")
    )
    assert "labels 0..999, not the 10 shape classes" in results["shapes_skipped"]
    assert "shapes_fd" not in strict_load(tmp_path / "b" / "metrics.json")


def test_a_degenerate_evaluation_config_is_refused():
    config = _samples_config("s.npz", "is")
    config.is_split_size = 0
    with pytest.raises(UserError, match=r"config.is_split_size=0 must be at least 1"):
        evaluate.validate(config)


# ----------------------------------------------------------------------------- export


def test_an_export_without_one_readable_image_fails(tokenizer_dir, tmp_path):
    root = tmp_path / "images"
    for name in ("cats/a.png", "cats/b.png", "dogs/c.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not an image")
    config = export_config.get_config("tiny")
    config.tokenizer.workdir = tokenizer_dir
    config.data.update(source=f"folder:{root}", split="train", max_examples=0, batch_size=16)
    out = tmp_path / "out"
    with pytest.raises(
        token_manifest.ExportError,
        match=r"folder:.*images: no readable image to export: 3 example\(s\) tried, 3 unreadable"
        r" in this run \(e\.g\. .*\), 0 rows written\..*fresh --workdir",
    ):
        export_tokens.run(config, str(out))
    assert not (out / token_manifest.MANIFEST).exists()  # never passes for a finished export
    # One readable image is an export (the unreadable ones are listed, as before).
    Image.fromarray(_images(1, 40)[0]).save(root / "dogs" / "ok.png")
    result = export_tokens.run(config, str(tmp_path / "out2"))
    assert result["rows"] == 1 and result["unreadable"] == 3


# ----------------------------------------------------------------------------- strict JSON


def test_write_json_writes_non_finite_numbers_as_null(tmp_path):
    value = {
        "nan": float("nan"),
        "inf": np.float32("inf"),
        "neg": -math.inf,
        "array": np.array([1.0, np.nan]),
        "nested": ({"x": np.float64("nan")}, np.int64(3)),
        np.int64(7): True,
    }
    path = str(tmp_path / "x.json")
    files.write_json(path, value)
    expected = {
        "nan": None,
        "inf": None,
        "neg": None,
        "array": [1.0, None],
        "nested": [{"x": None}, 3],
        "7": True,
    }
    assert strict_load(path) == expected
    assert strict_loads(files.json_text(value)) == expected == files.as_json(value)


def test_a_setting_that_is_nan_matches_itself_on_rerun(tmp_path):
    path = str(tmp_path / "settings.json")
    kwargs = dict(what="an output made", fix="Rerun with the same settings.")
    files.check_or_record_settings(path, {"lr": float("nan"), "n": 1}, **kwargs)
    files.check_or_record_settings(path, {"lr": float("nan"), "n": 1}, **kwargs)  # no error
    assert strict_load(path) == {"lr": None, "n": 1}


def test_stats_json_of_a_one_token_language_is_strict(tmp_path):
    stats = token_stats.TokenStats(8)
    stats.update(np.zeros((3, 5), np.int64))  # every token the same: no Zipf fit exists
    layout = types.SimpleNamespace(grouped=False)
    token_manifest._write_stats(str(tmp_path), stats, layout, top_k=4)
    written = strict_load(tmp_path / token_manifest.STATS)
    assert written["zipf_exponent"] is None and written["zipf_exponent_loglog"] is None
    assert written["num_tokens"] == 15 and written["vocab_used"] == 1


def test_metrics_jsonl_and_metrics_json_are_strict(tmp_path):
    writer = loop.MetricWriter(str(tmp_path))
    writer.write(3, {"loss": np.float32("nan"), "lr": 0.5})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [strict_loads(line) for line in lines] == [{"step": 3, "loss": None, "lr": 0.5}]
    evaluate.report({"gfid": float("inf"), "num_samples": 2}, str(tmp_path / "eval"))
    assert strict_load(tmp_path / "eval" / "metrics.json") == {"gfid": None, "num_samples": 2}
