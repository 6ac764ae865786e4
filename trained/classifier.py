"""The shapes classifier behind `shapes_accuracy` and `shapes_fd`: its model, its training, and
the trained classifier of a workdir.

`TrainedClassifier.ensure(workdir)` returns a trained classifier, training one there first when
the workdir holds none: the evaluation job caches it that way. jobs/train_classifier.py is the
job around `train`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from visual_tokenizers.configs import shapes_classifier as default_config
from visual_tokenizers.core.data import pipeline as data
from visual_tokenizers.core.evaluation import metrics
from visual_tokenizers.core.runtime import checkpoint, optim
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.core.runtime.job import TrainingJob
from visual_tokenizers.models.classifier import ShapesClassifier
from visual_tokenizers.trained.restored import Restored, restore


def model_fn_from_config(config):
    m = config.model
    return functools.partial(
        ShapesClassifier,
        num_classes=m.num_classes,
        widths=tuple(m.widths),
        final_convs=m.final_convs,
        hidden=m.hidden,
        image_size=config.data.image_size,
        bn_momentum=m.bn_momentum,
        seed=config.seed,
    )


def optimizer_from_config(config):
    return optim.make_optimizer(**config.optimizer.to_dict(), total_steps=config.num_steps)


def degrade(images, key, probability: float, block: int):
    """Each image, with `probability`, blurred and noised the way decoders blur and noise.

    Without this the classifier judged sharpness, not shape: 99 % on real images but 31 % on
    real images after a 2x bilinear down-up. Per image, one blur (bilinear down-up by 2 or 4,
    or a `block`x smaller image upsampled by repetition: a patch-`block` ViT decoder's look),
    then per-block colour offsets (token seams, std up to 16) and pixel noise (std up to 8).
    Returns float32 images in [0, 255].
    """
    x = images.astype(jnp.float32)
    b, h, w, c = x.shape
    k_apply, k_kind, k_seams, k_pixels, k_strength = jax.random.split(key, 5)

    def down_up(factor, up_method):
        small = jax.image.resize(x, (b, h // factor, w // factor, c), "bilinear", antialias=True)
        return jax.image.resize(small, x.shape, up_method)

    blurs = jnp.stack([down_up(2, "bilinear"), down_up(4, "bilinear"), down_up(block, "nearest")])
    kind = jax.random.randint(k_kind, (b,), 0, len(blurs))
    blurred = blurs[kind, jnp.arange(b)]
    strength = jax.random.uniform(k_strength, (b, 1, 1, 1, 2)) * jnp.array([16.0, 8.0])
    seam_std, pixel_std = strength[..., 0], strength[..., 1]
    seams = jax.random.normal(k_seams, (b, h // block, w // block, c))
    seams = jnp.repeat(jnp.repeat(seams, block, axis=1), block, axis=2)
    noisy = blurred + seam_std * seams + pixel_std * jax.random.normal(k_pixels, x.shape)
    apply = jax.random.bernoulli(k_apply, probability, (b, 1, 1, 1))
    return jnp.clip(jnp.where(apply, noisy, x), 0.0, 255.0)


def augment_from_config(config) -> dict | None:
    a = config.get("augment")
    if not a:
        return None
    return {"degrade_prob": float(a.degrade_prob), "block": int(a.block), "seed": config.seed}


def make_train_step(model_def: ts.ModelDef, optimizer, augment=None):
    """Cross-entropy step; BatchNorm statistics travel in model_state. `augment`:
    {'degrade_prob', 'block', 'seed'} for `degrade` (None or probability 0: real images only)."""

    def loss_fn(params, model_state, batch, key):
        model = model_def.merge(params, model_state)
        images = batch["image"]
        if augment and augment["degrade_prob"] > 0:
            images = degrade(images, key, augment["degrade_prob"], augment["block"])
        logits = model(images, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        return loss, (accuracy, ts.model_state_of(model))

    def train_step(state: ts.TrainState, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        key = jax.random.fold_in(jax.random.key(augment["seed"] if augment else 0), state.step)
        (loss, (accuracy, model_state)), grads = grad_fn(
            state.params, state.model_state, batch, key
        )
        params, opt_state = ts.apply_gradients(optimizer, state, grads)
        new_state = state.replace(
            step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
        )
        logged = {"loss": loss, "train_accuracy": accuracy, "grad_norm": optax.global_norm(grads)}
        return new_state, logged

    return train_step


def test_accuracy(config, model: ShapesClassifier, mesh) -> float:
    """Accuracy on the first config.eval.num_examples images of the held-out split."""
    apply = metrics.ShardedApply(model, lambda m, x: m(x).argmax(-1), mesh)
    batches = data.held_out_batches(config)
    correct = seen = 0
    for batch in batches:
        predictions = apply(batch["image"])  # The whole global batch, on every process.
        labels, mask = multihost_utils.process_allgather(
            (batch["label"], batch["mask"]), tiled=True
        )
        mask = np.asarray(mask) & (np.arange(len(mask)) < config.eval.num_examples - seen)
        correct += int((predictions[mask] == np.asarray(labels)[mask]).sum())
        seen += int(mask.sum())
        if seen >= config.eval.num_examples:
            break
    batches.close()
    return correct / max(seen, 1)


def train(config, workdir: str) -> dict:
    """Trains (or resumes) the classifier of `config` in `workdir`; the train_classifier job.

    It lives here, not in a job, because the classifier is a measuring instrument: evaluation
    trains it on first use (`ensure`), and jobs never import jobs.
    """
    job = TrainingJob.start(
        config,
        workdir,
        {
            "data.batch_size": config.data.batch_size,
            "eval.batch_size": config.eval.batch_size,
        },
    )
    model_fn, optimizer = model_fn_from_config(config), optimizer_from_config(config)
    model_def, state, shardings = job.restore_or_init(model_fn, optimizer)
    batch_sh = {
        "image": mesh_lib.batch_sharding(job.mesh, 4),
        "label": mesh_lib.batch_sharding(job.mesh),
    }
    train_step = job.compile(
        make_train_step(model_def, optimizer, augment_from_config(config)), shardings, batch_sh
    )

    def finish(s):
        model = model_def.merge(s.params, s.model_state)
        return {"test_accuracy": test_accuracy(config, model, job.mesh)}

    outcome = job.train(
        state,
        train_step,
        data.training_batches(config, start_step=int(state.step)),
        finish=finish,
    )
    result = {"step": int(outcome.state.step), **outcome.metrics}
    if outcome.stopped_early:
        result["stopped_early"] = True
    else:
        result["test_accuracy"] = outcome.final["test_accuracy"]
        logging.info("shapes classifier: test accuracy %.4f", result["test_accuracy"])
    return result


def is_trained(workdir: str) -> bool:
    """Whether `workdir` holds a classifier trained for all of its config's steps."""
    try:
        step, saved = checkpoint.read_config(workdir)
    except checkpoint.CheckpointError:
        return False
    return step >= saved["num_steps"]


@dataclasses.dataclass
class TrainedClassifier(Restored):
    """A shapes classifier training run on a mesh; `model()` is the ShapesClassifier."""

    @classmethod
    def from_workdir(cls, path: str, step=None, use_ema=None, mesh=None) -> TrainedClassifier:
        """The classifier of a train_classifier run (its saved config rebuilds the model).
        use_ema: as for every finished run (this trainer keeps no EMA: None or False)."""
        return cls(**restore(path, model_fn_from_config, step=step, use_ema=use_ema, mesh=mesh))

    @classmethod
    def ensure(cls, workdir: str, config=None, mesh=None) -> TrainedClassifier:
        """The classifier cached in `workdir`, trained there first (with `config`, default
        configs/shapes_classifier.py) if absent or unfinished. A damaged cache is refused: the
        fix is to delete it, not a step setting of the job that asked for it."""
        try:
            if not is_trained(workdir):
                config = config if config is not None else default_config.get_config()
                logging.info(
                    "training the shapes classifier in %s (cached for later runs)", workdir
                )
                train(config, workdir)
            return cls.from_workdir(workdir, mesh=mesh)
        except checkpoint.CheckpointError as e:
            raise checkpoint.CheckpointError(
                f"the shapes classifier cached in {workdir} cannot be used: "
                f"{str(e).splitlines()[0]}\nIt is a cache: delete that folder to train it again."
            ) from e
