"""The end-to-end CPU demo: every job of the codebase in turn, on built-in shapes, then a report.

  python run.py --config=configs/demo.py --workdir=runs/demo

Stages (each a sub-job run through run.py's dispatcher with its sub-config from
configs/demo.py, in WORKDIR/<dir>):
  tokenizer   jobs/train_tokenizer.py          tokenizer/  (PSNR, reconstruction grid)
  tokens      jobs/export_tokens.py            tokens/     (Parquet shards, stats.json)
  maskgit     jobs/train_maskgit.py            maskgit/    (class-conditional, on the export)
  samples     jobs/sample.py                   samples/    (ADM npz, per-class grids)
  classifier  jobs/train_classifier.py         shapes_classifier/ (trained once, cached)
  evaluate    jobs/evaluate.py samples mode    eval/       (shapes_accuracy, shapes_fd)
              and tokenizer mode               eval_tokenizer/ (the same signals on
                                                           reconstructions: the ceiling)
then WORKDIR/report.md. With config.inception_metrics the evaluate stage also measures FID,
sFID and KID in both Inception pipelines (`adm`, `pytorch_fid`), IS and precision/recall, and
the report shows them side by side with the gap between the two FIDs.
WORKDIR/stages.json records each finished stage with its settings,
result and time: a rerun skips finished stages (an interrupted one resumes through its job's
own resume) and refuses settings that differ from the recorded ones.
"""

from __future__ import annotations

import json
import logging
import os
import time

import ml_collections

from visual_tokenizers.core import files
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.evaluation import report as eval_report
from visual_tokenizers.core.runtime import checkpoint

STAGES_FILE = "stages.json"
REPORT = "report.md"


class StageStopped(Exception):
    """A stage's job was preempted: it saved its checkpoint and is not finished."""

    def __init__(self, name: str, result: dict):
        super().__init__(f"stage {name} stopped early")
        self.name, self.result = name, result


class Stages:
    """WORKDIR/stages.json: {stage: {settings, result, seconds}} of finished stages."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, STAGES_FILE)
        self.done = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.done = json.load(f)
        self.skipped: set[str] = set()

    def run(self, name: str, settings: dict, fn) -> dict:
        settings = files.as_json(settings)
        if name in self.done:
            files.refuse_other_settings(
                self.done[name]["settings"],
                settings,
                what=f"stage {name!r} of {os.path.dirname(self.path)} finished",
                fix=f"Rerun with the settings recorded in {self.path}, or use a fresh --workdir "
                "for new settings.",
            )
            logging.info("demo: stage %s already finished, skipped", name)
            self.skipped.add(name)
            return self.done[name]["result"]
        logging.info("demo: stage %s", name)
        start = time.perf_counter()
        result = files.as_json(fn(), default=float)  # as stages.json will hold it
        if any(isinstance(r, dict) and r.get("stopped_early") for r in (result, *result.values())):
            raise StageStopped(name, result)  # Not recorded: a rerun resumes the stage.
        self.done[name] = {
            "settings": settings,
            "result": result,
            "seconds": time.perf_counter() - start,
        }
        files.write_json(self.path, self.done)
        logging.info("demo: stage %s done in %.1fs", name, self.done[name]["seconds"])
        return result


def _copy(config) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(config.to_dict())


STAGE_DIRS = (
    "tokenizer",
    "tokens",
    "maskgit",
    "samples",
    "shapes_classifier",
    "eval",
    "eval_tokenizer",
)


def run(config, workdir: str, run_job=None) -> dict:
    """run_job(stage_config, stage_workdir) -> dict runs one stage's job: run.py passes its
    dispatcher (jobs never import jobs)."""
    if run_job is None:
        raise ConfigError(
            "the demo runs other jobs through run_job(config, workdir): call it through run.py "
            "(python run.py --config=configs/demo.py ...) or pass visual_tokenizers.run.run_job"
        )
    os.makedirs(workdir, exist_ok=True)
    where = {k: os.path.join(os.path.abspath(workdir), k) for k in STAGE_DIRS}
    stages = Stages(workdir)
    try:
        maskgit = _training_stages(config, where, stages, run_job)
        scores = _evaluation_stage(config, where, stages, run_job)
    except StageStopped as stopped:
        logging.warning("demo: stage %s was preempted; rerun to resume it", stopped.name)
        return {"stopped_early": True, "stage": stopped.name}
    path = write_report(workdir, where, stages, config)
    recon, gen = scores["reconstructions"], scores["samples"]
    return {
        "report": path,
        "psnr": recon["psnr"],
        "reconstruction_shapes_accuracy": recon["shapes_accuracy"],
        "shapes_accuracy": gen["shapes_accuracy"],
        "shapes_fd": gen["shapes_fd"],
        "maskgit_loss": maskgit.get("loss"),
        **{k: v for k, v in gen.items() if k.startswith(("gfid_", "sfid_", "kid_"))},
        "seconds": sum(s["seconds"] for s in stages.done.values()),
    }


def _training_stages(config, where: dict, stages: Stages, run_job) -> dict:
    """Tokenizer, token export, MaskGIT, samples and classifier; returns the MaskGIT's result."""
    tok_cfg = _copy(config.tokenizer)
    stages.run("tokenizer", tok_cfg.to_dict(), lambda: run_job(tok_cfg, where["tokenizer"]))

    export_cfg = _copy(config.export)
    export_cfg.tokenizer.workdir = where["tokenizer"]
    stages.run("tokens", export_cfg.to_dict(), lambda: run_job(export_cfg, where["tokens"]))

    mg_cfg = _copy(config.maskgit)
    mg_cfg.tokens.export_dir = where["tokens"]
    mg_cfg.tokenizer.workdir = ""
    maskgit = stages.run("maskgit", mg_cfg.to_dict(), lambda: run_job(mg_cfg, where["maskgit"]))

    sample_cfg = _copy(config.sample)
    sample_cfg.maskgit.workdir = where["maskgit"]
    stages.run("samples", sample_cfg.to_dict(), lambda: run_job(sample_cfg, where["samples"]))

    cls_cfg = _copy(config.classifier)
    stages.run(
        "classifier",
        cls_cfg.to_dict(),
        lambda: _classifier(run_job, cls_cfg, where["shapes_classifier"]),
    )
    return maskgit


def _evaluation_stage(config, where: dict, stages: Stages, run_job) -> dict:
    """The evaluate job on the samples and on the tokenizer's reconstructions (the ceiling)."""
    eval_cfg = _copy(config.evaluate)
    eval_cfg.shapes.classifier_workdir = where["shapes_classifier"]
    samples_eval = _copy(eval_cfg)
    samples_eval.update(mode="samples", metrics=("shapes",))
    samples_eval.samples.path = os.path.join(where["samples"], "samples.npz")
    recon_eval = _copy(eval_cfg)
    recon_eval.tokenizer.workdir = where["tokenizer"]
    if config.get("inception_metrics"):
        _add_inception_metrics(config, samples_eval, recon_eval)
    settings = {"samples": samples_eval.to_dict(), "reconstructions": recon_eval.to_dict()}
    return stages.run(
        "evaluate",
        settings,
        lambda: {
            "samples": run_job(samples_eval, where["eval"]),
            "reconstructions": run_job(recon_eval, where["eval_tokenizer"]),
        },
    )


def _add_inception_metrics(config, samples_eval, recon_eval) -> None:
    """FID/sFID/KID in both pipelines, IS and precision/recall: samples against as many real
    test images of the demo's data, reconstructions against their originals."""
    num = config.sample.num_samples
    samples_eval.metrics = (*samples_eval.metrics, "fid", "sfid", "is", "pr", "kid")
    data = config.tokenizer.data
    samples_eval.reference.update(
        source=data.source, split="test", image_size=data.image_size, num_examples=num
    )
    recon_eval.metrics = (*recon_eval.metrics, "fid", "sfid", "kid")
    for evaluation in (samples_eval, recon_eval):
        # KID subsets of at most the evaluated count (torch-fidelity's default is 1,000).
        count = num if evaluation is samples_eval else evaluation.num_examples
        evaluation.kid.subset_size = min(evaluation.kid.subset_size, count)
        evaluation.is_split_size = min(evaluation.is_split_size, num)


def _classifier(run_job, config, workdir: str) -> dict:
    """Trains the shapes classifier once (cached in its workdir) and reports its accuracy."""
    cached = True
    try:
        step, saved = checkpoint.read_config(workdir)
        cached = step >= saved["num_steps"]
    except checkpoint.CheckpointError:
        cached = False
    if not cached:
        return run_job(config, workdir)
    return {"step": step, "cached": True}


# ----------------------------------------------------------------------------- report


def _rel(workdir: str, path: str) -> str:
    return os.path.relpath(path, os.path.abspath(workdir))


def _latest(folder: str, prefix: str) -> str | None:
    if not os.path.isdir(folder):
        return None
    names = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".png"))
    return os.path.join(folder, names[-1]) if names else None


def _fmt(x, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _per_class(samples_json: dict) -> str:
    counts = sorted(set(samples_json["samples_per_class"].values()))
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"


def write_report(workdir: str, where: dict, stages: Stages, config) -> str:
    done = stages.done
    scores = done["evaluate"]["result"]
    stats = json.load(open(os.path.join(where["tokens"], "stats.json")))
    samples_json = json.load(open(os.path.join(where["samples"], "samples.json")))
    lines = _intro(workdir, stages, config)
    lines += _tokenizer_section(workdir, where, done["tokenizer"]["result"], scores, config)
    lines += _tokens_section(workdir, where, done["tokens"]["result"], stats)
    lines += _generator_sections(workdir, done, samples_json, config)
    lines += _metrics_section(done, scores, samples_json, config)
    lines += eval_report.sections(scores)  # empty unless config.inception_metrics
    path = os.path.join(workdir, REPORT)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    logging.info("demo: report %s", path)
    return path


def _intro(workdir: str, stages: Stages, config) -> list[str]:
    done = stages.done
    lines = ["# Demo report", ""]
    lines += [
        "Everything below ran on this machine from built-in data "
        f"(`{config.tokenizer.data.source}`,",
        "32x32, 10 classes): `python run.py --config=configs/demo.py --workdir=" + workdir + "`.",
        "`shapes_accuracy` / `shapes_fd` come from a small shapes classifier (offline signals,",
        "**not FID**; compare them only with each other).",
        "",
        "## Timings",
        "",
        "| stage | seconds | |",
        "|---|---|---|",
    ]
    for name, record in done.items():
        note = "skipped now (finished in an earlier run)" if name in stages.skipped else ""
        lines.append(f"| {name} | {record['seconds']:.1f} | {note} |")
    total = sum(r["seconds"] for r in done.values())
    lines += [f"| **total** | **{total:.1f}** | |", ""]
    return lines


def _tokenizer_section(workdir: str, where: dict, tok: dict, scores: dict, config) -> list[str]:
    recon = scores["reconstructions"]
    recon_png = _latest(os.path.join(where["tokenizer"], "images"), "reconstructions_")
    tc = config.tokenizer
    lines = [
        "## Tokenizer",
        "",
        f"`configs/vq_b16.py:tiny` settings on `{tc.data.source}`: {tc.num_steps} steps of batch "
        f"{tc.data.batch_size}, {tc.quantizer.codebook_size} codes, patch "
        f"{tc.model.encoder.patch_size} (8x8 tokens at 32x32), dead-code restarts "
        f"{'on' if tc.quantizer.restart_dead_codes else 'off'}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| reconstruction PSNR (dB, held-out, tokenizer run) | {_fmt(tok.get('eval/psnr'))} |",
        f"| reconstruction SSIM | {_fmt(tok.get('eval/ssim'))} |",
        f"| codebook usage | {_fmt(tok.get('eval/codebook_usage'))} |",
        f"| shapes_accuracy of reconstructions | {_fmt(recon.get('shapes_accuracy'))} |",
        f"| shapes_fd of reconstructions | {_fmt(recon.get('shapes_fd'))} |",
        "",
    ]
    if recon_png:
        lines += [
            f"Originals over reconstructions: ![reconstructions]({_rel(workdir, recon_png)})",
            "",
        ]
    return lines


def _tokens_section(workdir: str, where: dict, exp: dict, stats: dict) -> list[str]:
    lines = [
        "## Tokens",
        "",
        f"{exp.get('rows')} training images exported to `{_rel(workdir, where['tokens'])}` "
        f"({exp.get('shards')} Parquet shards, {_fmt(exp.get('images_per_s'))} images/s).",
        "",
        "| statistic | value |",
        "|---|---|",
        f"| entropy (bits/token) | {_fmt(stats['entropy_bits'])} of log2(vocab) "
        f"{_fmt(stats['log2_vocab'])} |",
        f"| perplexity | {_fmt(stats['perplexity'])} |",
        f"| conditional entropy given the raster predecessor | "
        f"{_fmt(stats['conditional_entropy_bits'])} |",
        f"| vocabulary used | {stats['vocab_used']} ({_fmt(stats['vocab_used_fraction'])}) |",
        f"| Zipf exponent (MLE) | {_fmt(stats['zipf_exponent'])} |",
        "",
        f"Rank-frequency: ![rank frequency]({_rel(workdir, where['tokens'])}/rank_frequency.png)",
        "",
    ]
    return lines


def _generator_sections(workdir: str, done: dict, samples_json: dict, config) -> list[str]:
    mg, smp = done["maskgit"]["result"], done["samples"]["result"]
    mc = config.maskgit
    lines = [
        "## MaskGIT",
        "",
        f"width {mc.model.width}, depth {mc.model.depth}, heads {mc.model.heads}, MLP "
        f"{mc.model.mlp_dim}; {mc.num_steps} steps of batch {mc.data.batch_size}, AdamW "
        f"lr {mc.optimizer.lr}; final training loss {_fmt(mg.get('loss'))}, masked-token "
        f"accuracy {_fmt(mg.get('accuracy'))}.",
        "",
        "## Samples",
        "",
        f"{smp.get('num_samples')} samples ({_per_class(samples_json)} per class), "
        f"T = {samples_json['steps']}, temperature {samples_json['temperature']}, choice "
        f"temperature {samples_json['choice_temperature']}, guidance "
        f"{samples_json['guidance_scale'] or 'none'} ({samples_json['guidance_schedule']}), "
        f"{_fmt(samples_json.get('images_per_s'))} images/s.",
        "",
        f"One row per class: ![samples]({_rel(workdir, samples_json['grid'])})",
        "",
    ]
    names = samples_json.get("class_names") or []
    for c, png in samples_json.get("class_grids", {}).items():
        label = names[int(c)] if int(c) < len(names) else c
        lines.append(f"- class {c} ({label}): ![{label}]({_rel(workdir, png)})")
    return lines


def _metrics_section(done: dict, scores: dict, samples_json: dict, config) -> list:
    cls_acc = done["classifier"]["result"].get("test_accuracy", "cached")
    gen, recon = scores["samples"], scores["reconstructions"]
    names = samples_json.get("class_names") or []
    lines = [
        "",
        "## Sample metrics",
        "",
        "| metric | samples | reconstructions (ceiling) |",
        "|---|---|---|",
        f"| shapes_accuracy | {_fmt(gen.get('shapes_accuracy'))} | "
        f"{_fmt(recon.get('shapes_accuracy'))} |",
        f"| shapes_fd | {_fmt(gen.get('shapes_fd'))} | {_fmt(recon.get('shapes_fd'))} |",
        "",
        "shapes_accuracy: how often the classifier assigns a sample its conditioning class "
        "(reconstructions: their true class); chance is "
        f"{1 / max(len(names), 1):.2g}. shapes_fd: Frechet distance of the classifier's "
        f"features against real `{config.evaluate.shapes.reference}` test images (lower is "
        "closer). The generator "
        "cannot do better than its tokenizer's decoder: the reconstruction column is the "
        f"ceiling. Shapes classifier: {_fmt(cls_acc)} test accuracy on real images.",
        "",
    ]
    return lines
