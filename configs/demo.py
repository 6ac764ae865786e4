"""The CPU demo (jobs/demo.py): tokenizer -> token export -> class-conditional MaskGIT -> samples
-> offline evaluation -> WORKDIR/report.md, on builtin:shapes_plain at 32x32 with no download.

builtin:shapes_plain rather than builtin:shapes: on the textured variant an 8x8-token, 256-code
tokenizer spends its bits on background colours and loses the outlines (reconstructions are
classified correctly 54 % of the time, which caps any generator on its tokens), while on the
plain variant every reconstruction keeps its class. Samples: 0.982 shapes_accuracy on the
plain variant; 0.61 when its shapes were rotated, 0.12 on builtin:shapes (README).

  python run.py --config=configs/demo.py --workdir=runs/demo     # ~8 minutes on 2 CPU cores
  python run.py --config=configs/demo.py:test --workdir=DIR      # seconds per stage (tests)
  python run.py --config=configs/demo.py --workdir=runs/demo --config.inception_metrics=True
      # + FID/sFID/KID per Inception pipeline, IS, precision/recall (needs the FID Inception
      # weights: downloaded once into $TOKENIZERS_CACHE, or --config.evaluate.weights.inception)

Each stage is the sub-job's run() with the sub-config below (override any value, e.g.
--config.maskgit.num_steps=3000); rerunning on the same workdir skips finished stages.
"""

from ml_collections import ConfigDict

from visual_tokenizers.configs import (
    evaluate,
    export_tokens,
    maskgit_b16,
    sample,
    shapes_classifier,
    vq_b16,
)

DATA = "builtin:shapes_plain"


def get_config(arg=None):
    if arg not in (None, "", "tiny", "test"):
        raise ValueError(f"unknown variant {arg!r} of configs/demo.py; use '', 'tiny' or 'test'")
    tokenizer = vq_b16.get_config("tiny")  # README's tiny tokenizer (8x8 tokens, 256 codes)
    tokenizer.data.source = tokenizer.eval.source = DATA
    # No dead-code restarts: they re-seed unused codes at encoder outputs, so one flat colour
    # ends up spread over near-duplicate codes. Without them the tokens' entropy given their
    # raster predecessor falls from 4.0 to 2.6 bits (reconstructions keep their class either
    # way), which is what a small MaskGIT can learn in minutes.
    tokenizer.quantizer.restart_dead_codes = False
    export = export_tokens.get_config("tiny")
    export.data.update(source=DATA, split="train")
    export.data.update(max_examples=20_000, batch_size=256)
    export.rows_per_shard = 5000
    maskgit = maskgit_b16.get_config("tiny")
    maskgit.tokenizer.workdir = ""  # the demo trains on the export
    # Tuned for the CPU budget: a small transformer without dropout (it underfits here: at
    # 600 steps dropout 0.1 ends at loss 4.60, none at 4.49) and a high learning rate.
    maskgit.update(num_steps=2000, checkpoint_every=500, log_every=100)
    maskgit.model.update(width=64, depth=3, heads=4, mlp_dim=256, dropout=0.0)
    maskgit.optimizer.update(lr=3e-3, warmup_steps=100)
    maskgit.data.batch_size = 64
    # Pooled loss, not the official per-sample mean, with the generator EMA (0.999, warm-up),
    # measured on this demo (1000 samples; shapes_accuracy / shapes_fd): pooled + EMA
    # 0.982 / 31.8; pooled, no EMA (the former trainer) 0.983 / 29.7; per-sample + EMA
    # 0.972 / 27.8; per-sample, no EMA 0.968 / 26.7. Per-sample trades ~1 point of accuracy
    # for a lower FD here; the demo keeps its class-faithfulness figure.
    maskgit.loss.normalize = "token"
    samples = sample.get_config("tiny")
    samples.update(num_samples=1000, batch_size=200, guidance_scale=3.0)  # 100 per class
    samples.grid.update(columns=10, per_class=32)
    maskgit.data.source = DATA  # (tokens come from the export; this names their source)
    classifier = shapes_classifier.get_config("tiny")
    classifier.data.source = classifier.eval.source = DATA
    evaluation = evaluate.get_config("tiny")  # psnr, ssim, usage, shapes (offline)
    evaluation.shapes.reference = DATA
    evaluation.samples.batch_size = 200
    if arg == "test":  # seconds per stage: checks the pipeline, not the quality
        tokenizer.update(num_steps=20, log_every=10, checkpoint_every=20)
        tokenizer.eval.update(batch_size=32, num_examples=64)
        export.data.update(max_examples=256, batch_size=64)
        export.rows_per_shard = 128
        maskgit.update(num_steps=20, log_every=10, checkpoint_every=20)
        maskgit.model.update(width=32, depth=1, heads=2, mlp_dim=64)
        maskgit.optimizer.warmup_steps = 5
        maskgit.data.batch_size = 32
        samples.update(num_samples=40, batch_size=40, steps=4)
        samples.grid.update(columns=4, per_class=4)
        classifier.update(num_steps=20, log_every=10, checkpoint_every=20)
        classifier.eval.num_examples = 64
        evaluation.update(num_examples=64)
        evaluation.samples.batch_size = 40
        evaluation.data.batch_size = 32
    return ConfigDict(
        dict(
            job="demo",
            # Also the Inception metrics of both pipelines (jobs/evaluate.py) on the samples
            # (against real test images of DATA) and on the reconstructions. Off by default:
            # the demo otherwise needs no download.
            inception_metrics=False,
            tokenizer=tokenizer,
            export=export,
            maskgit=maskgit,
            sample=samples,
            classifier=classifier,
            evaluate=evaluation,
        )
    )
