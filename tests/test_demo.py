"""The demo pipeline end to end at test size (configs/demo.py:test): tokenizer, export, MaskGIT,
samples, classifier, evaluation and report.md; a rerun skips every finished stage."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from visual_tokenizers import run
from visual_tokenizers.configs import demo as demo_config
from visual_tokenizers.jobs import demo

SECTIONS = (
    "## Timings",
    "## Tokenizer",
    "## Tokens",
    "## MaskGIT",
    "## Samples",
    "## Sample metrics",
)


def test_demo_runs_end_to_end_writes_the_report_and_resumes(tmp_path):
    workdir = str(tmp_path)
    config = demo_config.get_config("test")
    result = demo.run(config, workdir, run_job=run.run_job)
    report = open(os.path.join(workdir, "report.md")).read()
    assert [s for s in SECTIONS if s not in report] == []
    # Every image the report links exists and is a PNG: reconstructions, token statistics,
    # the sample grid and one grid per class.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) == 3 + 10
    for link in links:
        assert Image.open(os.path.join(workdir, link)).format == "PNG"
    # The figures are the stages' own.
    stages = json.load(open(os.path.join(workdir, demo.STAGES_FILE)))
    assert list(stages) == ["tokenizer", "tokens", "maskgit", "samples", "classifier", "evaluate"]
    psnr = stages["tokenizer"]["result"]["eval/psnr"]
    assert f"| {demo._fmt(psnr)} |" in report and result["psnr"] > 0
    scores = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
    assert result["shapes_accuracy"] == scores["shapes_accuracy"]
    assert f"| shapes_accuracy | {demo._fmt(scores['shapes_accuracy'])} |" in report
    assert f"| shapes_fd | {demo._fmt(scores['shapes_fd'])} |" in report
    stats = json.load(open(os.path.join(workdir, "tokens", "stats.json")))
    assert f"| entropy (bits/token) | {demo._fmt(stats['entropy_bits'])} " in report
    with np.load(os.path.join(workdir, "samples", "samples.npz")) as z:
        assert z["arr_0"].shape == (40, 32, 32, 3) and z["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(z["arr_1"]), [4] * 10)
    for name, record in stages.items():
        assert f"| {name} | {record['seconds']:.1f} |" in report
    # A rerun skips every finished stage and reports the same figures.
    checkpoint = os.path.join(workdir, "maskgit", "checkpoints")
    before = sorted(os.listdir(checkpoint))
    again = demo.run(config, workdir, run_job=run.run_job)
    assert {k: v for k, v in again.items()} == result
    assert sorted(os.listdir(checkpoint)) == before
    report = open(os.path.join(workdir, "report.md")).read()
    assert report.count("skipped now") == len(stages)
    config.maskgit.num_steps = 21  # other settings for a finished stage are refused
    with pytest.raises(ValueError, match="other settings"):
        demo.run(config, workdir, run_job=run.run_job)


def test_a_preempted_stage_is_not_recorded_and_the_demo_says_it_stopped(tmp_path):
    calls = []

    def run_job(config, workdir):  # the tokenizer finishes, the export is preempted
        calls.append(config.job)
        if config.job == "export_tokens":
            return {"rows": 3, "stopped_early": True}
        return {"step": 1}

    result = demo.run(demo_config.get_config("test"), str(tmp_path), run_job=run_job)
    assert result == {"stopped_early": True, "stage": "tokens"}
    assert calls == ["train_tokenizer", "export_tokens"]
    done = json.load(open(tmp_path / "stages.json"))
    assert list(done) == ["tokenizer"]  # a rerun resumes the export instead of skipping it


def test_the_demo_can_report_both_inception_pipelines(tmp_path):
    """config.inception_metrics: the evaluate stage's sub-configs ask for FID/sFID/KID in both
    pipelines (valid for the evaluate job) and report.md shows them side by side with the gap."""
    from visual_tokenizers.jobs import evaluate

    config = demo_config.get_config("test")
    assert not config.inception_metrics  # the default demo downloads nothing
    config.inception_metrics = True
    seen = {}

    def run_job(sub, workdir):
        seen[os.path.basename(workdir)] = sub
        return {"step": 1}

    demo._evaluation_stage(config, {k: str(tmp_path / k) for k in demo.STAGE_DIRS},
                           demo.Stages(str(tmp_path)), run_job)  # fmt: skip
    samples, recon = seen["eval"], seen["eval_tokenizer"]
    assert {"fid", "sfid", "is", "pr", "kid"} <= set(samples.metrics)
    assert samples.reference.source == demo_config.DATA and samples.kid.subset_size == 40
    assert {"fid", "sfid", "kid"} <= set(recon.metrics) and tuple(recon.pipelines) == (
        "adm", "pytorch_fid")  # fmt: skip
    for sub in (samples, recon):
        evaluate.validate(sub)
    results = {"num_samples": 40, "pipelines": ["adm", "pytorch_fid"], "gfid_adm": 12.0,
               "gfid_pytorch_fid": 10.0, "sfid_adm": 3.0, "sfid_pytorch_fid": 2.5,
               "reference": {"name": "builtin:shapes_plain:test at 32px, 40 images"}}  # fmt: skip
    report = "\n".join(demo.eval_report.sections({"samples": results}))
    assert "| gFID | 12 | 10 |" in report and "| sFID | 3 | 2.5 |" in report
    assert "differ by 2 (20.0% of the pytorch_fid value)" in report
