"""Train a class-conditional MaskGIT (models/maskgit.py) on a tokenizer's indices.

Tokens come from a finished export (`config.tokens.export_dir`, jobs/export_tokens.py) or, when
that is empty, are encoded on the fly by the tokenizer trained in `config.tokenizer.workdir`
(its EMA weights when it kept them) over `config.data`. Both paths draw the same examples in the
same order (core/tokens/batches.py) and a resumed run sees exactly the batches it would have
seen. The vocabulary, token grid and class count come from the tokenizer (the manifest or the
restored run) and are saved with every checkpoint under `config.resolved`, so
`TrainedMaskGIT.from_workdir` (trained/maskgit.py) rebuilds the model without the tokens.

The step is masked-token prediction (`MaskGIT.loss`: mask schedule, label smoothing, class
dropout for classifier-free guidance, `loss.normalize`) under AdamW, on the shared loop
(core/runtime/loop.py): logging, checkpoints, SIGTERM and the NaN guard. `config.ema_decay > 0`
keeps an EMA of the generator's weights (the official base_config `polyak_decay` 0.999; TiTok
trains with one too), updated as the tokenizer trainer's (tokenizers/training.py, warm-up
included), saved in every checkpoint and kept on resume; sampling (the PNG grids, jobs/sample.py,
TrainedMaskGIT) uses it when present. `config.sample.every > 0` adds PNG grids of samples (one
row per class) under WORKDIR/images.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time

import jax
import ml_collections
import optax
from flax import nnx

from visual_tokenizers.core import files
from visual_tokenizers.core.data import pipeline as data
from visual_tokenizers.core.data.images import save_grid
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.runtime import checkpoint, optim
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.core.runtime.job import TrainingJob
from visual_tokenizers.core.tokens import batches as tb
from visual_tokenizers.core.tokens.layout import Vocab
from visual_tokenizers.models.maskgit_decode import LOSS_NORMALIZE
from visual_tokenizers.models.maskgit_sampling import check_schedule
from visual_tokenizers.tokenizers.training import ema_decay_at, ema_record
from visual_tokenizers.trained import builders
from visual_tokenizers.trained.maskgit import (
    Generator,
    class_grid,
    labels_for,
    model_fn_from_config,
    sample_options,
    token_ndim,
)
from visual_tokenizers.trained.restored import ema_choice, step_choice
from visual_tokenizers.trained.tokenizer import STEP_KEY as TOKENIZER_STEP
from visual_tokenizers.trained.tokenizer import TrainedTokenizer


def _decay_mask(params):
    """Weight decay on matrices (kernels, embedding tables) only, not on biases or norms."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer_from_config(config):
    """(AdamW with warm-up and schedule, lr schedule) from config.optimizer.

    optimizer.decay_matrices_only keeps LayerNorm scales and biases out of the weight decay.
    """
    o = config.optimizer
    lr_fn = optim.learning_rate_schedule(
        lr=o.lr,
        schedule=o.schedule,
        warmup_steps=o.warmup_steps,
        total_steps=config.num_steps,
        end_lr_fraction=o.end_lr_fraction,
    )
    if o.name != "adamw":
        raise ConfigError(f"optimizer.name {o.name!r}: the MaskGIT trainer uses 'adamw'")
    mask = _decay_mask if o.decay_matrices_only else None
    opt = optax.adamw(lr_fn, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
    if o.grad_clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), opt)
    return opt, lr_fn


def make_train_step(
    model_def: ts.ModelDef,
    optimizer,
    lr_fn,
    *,
    seed: int,
    loss: dict,
    ema_decay: float = 0.0,
    ema_warmup: bool = True,
):
    """step(state, {'tokens', 'label'}) -> (state, {loss, accuracy, mask_ratio, lr, grad_norm}).

    Masking, class dropout and dropout draw from key(seed) folded with the step. ema_decay > 0:
    the state's ema_params move towards the updated params (tokenizers/training.py's rule).
    """
    check_schedule(loss["mask_schedule"], "loss.mask_schedule")
    normalize = loss.get("normalize", "token")  # configs before it existed pooled the tokens
    if normalize not in LOSS_NORMALIZE:
        raise ConfigError(f"loss.normalize={normalize!r} is unknown; use one of {LOSS_NORMALIZE}")

    def train_step(state: ts.TrainState, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)

        def loss_fn(params):
            model = model_def.merge(params, state.model_state)
            return model.loss(
                batch["tokens"],
                batch["label"],
                rng,
                train=True,
                schedule=loss["mask_schedule"],
                label_smoothing=loss["label_smoothing"],
                class_dropout=loss["class_dropout"],
                normalize=normalize,
            )

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        params, opt_state = ts.apply_gradients(optimizer, state, grads)
        metrics = {**metrics, "lr": lr_fn(state.step), "grad_norm": optax.global_norm(grads)}
        ema = state.ema_params
        if ema_decay > 0:
            decay = ema_decay_at(ema_decay, state.step + 1, ema_warmup)
            ema = optax.incremental_update(params, ema, 1.0 - decay)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new.replace(ema_params=ema), metrics

    return train_step


# ----------------------------------------------------------------------------- tokens


@dataclasses.dataclass
class Tokens:
    """Where training tokens come from, and what they are."""

    resolved: dict  # saved with the config: vocab, token_shape, num_classes, tokenizer, ...
    index_shape: tuple[int, ...]
    exported: tb.ExportedTokens | None = None
    tokenizer: TrainedTokenizer | None = None  # on-the-fly path
    image_size: int = 0


def resolve(config, mesh) -> Tokens:
    """Reads the export, or restores the tokenizer for on-the-fly encoding."""
    if config.tokens.export_dir:
        ex = tb.load_export(config.tokens.export_dir, verify=config.tokens.verify)
        _check_tokenizer(config, ex.vocab, mesh)
        where = f"export:{os.path.abspath(ex.directory)}"
        grid = ex.manifest["tokens"]["grid_shape"]
        info = _resolved(config, ex.vocab, grid, ex.num_classes, ex.class_names, ex.tokenizer)
        return Tokens({**info, "tokens": where, "num_examples": len(ex.keys)}, ex.index_shape, ex)
    if not config.tokenizer.workdir:
        raise ConfigError(
            "no tokens: set --config.tokens.export_dir=<jobs/export_tokens.py output> or "
            "--config.tokenizer.workdir=<tokenizer run> to encode config.data on the fly"
        )
    tok = _restore_tokenizer(config, mesh)
    d = config.data
    size = d.image_size or tok.config.data.image_size
    source = data.make_source(d.source, d.split, image_size=size, data_dir=d.data_dir or None)
    index_shape = tok.encoded_shape(size)
    names = list(getattr(source, "class_names", None) or [])
    tokenizer = tok.record()
    grid = index_shape[:-1] if tok.vocab.grouped else index_shape
    info = _resolved(config, tok.vocab, grid, source.num_classes, names, tokenizer)
    info["tokens"] = f"encode:{d.source}:{d.split}"
    info["num_examples"] = min(len(source), d.max_examples or len(source))
    return Tokens(info, index_shape, tokenizer=tok, image_size=size)


def _resolved(config, vocab: Vocab, grid, num_classes, class_names, tokenizer) -> dict:
    classes = config.model.num_classes or max(int(num_classes), 1)
    return {
        "vocab": vocab.to_dict(),
        "token_shape": [int(x) for x in grid],
        "num_classes": int(classes),
        "class_names": [str(c) for c in class_names][:classes],
        "tokenizer": tokenizer,
    }


def _restore_tokenizer(config, mesh) -> TrainedTokenizer:
    step = config.tokenizer.step if config.tokenizer.step >= 0 else None
    use_ema = ema_choice(config.tokenizer.use_ema)
    try:
        return TrainedTokenizer.from_workdir(config.tokenizer.workdir, step, use_ema, mesh)
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(f"config.tokenizer.workdir: {e}") from e


def _check_tokenizer(config, vocab: Vocab, mesh) -> None:
    """With an export and a tokenizer workdir both given, their vocabularies must agree."""
    if not config.tokenizer.workdir:
        return
    step = config.tokenizer.step if config.tokenizer.step >= 0 else None
    step, saved = checkpoint.read_config(
        config.tokenizer.workdir, step, step_choice(TOKENIZER_STEP)
    )
    tokenizer_fn = builders.model_fn_from_config(ml_collections.ConfigDict(saved))
    theirs = nnx.eval_shape(tokenizer_fn).vocab
    if theirs != vocab:
        raise ConfigError(
            f"config.tokens.export_dir holds tokens of vocab {vocab}, but "
            f"config.tokenizer.workdir={config.tokenizer.workdir!r} (step {step}) has vocab "
            f"{theirs}: point both at the same tokenizer, or leave tokenizer.workdir empty"
        )


def _check_resume(workdir: str, resolved: dict, resume_step: int = -1) -> None:
    """A workdir's checkpoints must have been trained on tokens of the same kind (those of the
    step it resumes from: the latest, or `resume_step`)."""
    try:
        step, saved = checkpoint.read_config(workdir, resume_step if resume_step >= 0 else None)
    except checkpoint.CheckpointError:
        return  # nothing to resume (a damaged step is refused by the resume itself)
    old = saved.get("resolved") or {}
    keys = ("vocab", "token_shape", "num_classes")
    files.refuse_other_settings(
        {k: old.get(k) for k in keys},
        {k: resolved[k] for k in keys},
        what=f"{workdir} holds a MaskGIT (step {step}) trained on tokens",
        fix="Use the tokens it was trained on, or a fresh --workdir.",
        error=checkpoint.CheckpointError,
    )
    if (
        old.get("num_examples") != resolved["num_examples"]
        or old.get("tokens") != resolved["tokens"]
    ):
        logging.warning(
            "resuming on other tokens (%s, %s examples; was %s, %s): the batch order changes",
            resolved["tokens"],
            resolved["num_examples"],
            old.get("tokens"),
            old.get("num_examples"),
        )


def host_batches(config, tokens: Tokens, start_step: int):
    """This process's host batches from `start_step`: {'tokens', 'label'} or {'image', 'label'}."""
    gb, p, n = config.data.batch_size, jax.process_index(), jax.process_count()
    if tokens.exported is not None:
        return tokens.exported.batches(gb, config.seed, start_step, p, n)
    return tb.EncodeBatches(
        config.data.source,
        split=config.data.split,
        image_size=tokens.image_size,
        max_examples=config.data.max_examples,
        global_batch_size=gb,
        seed=config.seed,
        num_steps=config.num_steps,
        start_step=start_step,
        data_dir=config.data.data_dir or None,
        num_threads=config.data.num_threads or None,
        prefetch=config.data.prefetch,
        process_index=p,
        process_count=n,
    )


def resolved_config(config, tokens: Tokens) -> ml_collections.ConfigDict:
    """An unlocked copy of config with `resolved` filled in (what checkpoints save)."""
    full = ml_collections.ConfigDict(config.to_dict())
    full.resolved = tokens.resolved
    return full


# ----------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
    job = TrainingJob.start(config, workdir, {"data.batch_size": config.data.batch_size})
    mesh = job.mesh
    tokens = resolve(config, mesh)
    _check_resume(workdir, tokens.resolved, config.get("resume_step", -1))
    config = resolved_config(config, tokens)
    job = dataclasses.replace(job, config=config)  # checkpoints record the resolved tokens
    r = tokens.resolved
    model_fn = model_fn_from_config(config)
    optimizer, lr_fn = optimizer_from_config(config)
    ema_decay, ema_warmup = config.get("ema_decay", 0.0), config.get("ema_warmup", True)
    model_def, state, shardings = job.restore_or_init(model_fn, optimizer, ema=ema_decay > 0)
    count = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info(
        "maskgit: %.2fM parameters; tokens %s: %d examples, grid %s, vocab %d, %d classes",
        count / 1e6,
        r["tokens"],
        r["num_examples"],
        r["token_shape"],
        r["vocab"]["size"],
        r["num_classes"],
    )
    step_fn = make_train_step(
        model_def,
        optimizer,
        lr_fn,
        seed=config.seed,
        loss=config.loss.to_dict(),
        ema_decay=ema_decay,
        ema_warmup=ema_warmup,
    )
    batch_sh = {
        "tokens": mesh_lib.batch_sharding(mesh, 1 + len(tokens.index_shape)),
        "label": mesh_lib.batch_sharding(mesh, 1),
    }
    train_step = job.compile(step_fn, shardings, batch_sh)
    step_with_tokens = _with_encoding(train_step, tokens, mesh, config)
    sampler, sample_last = None, None
    if config.sample.every > 0:
        sampler = GridSampler.create(config, model_def, tokens.tokenizer, mesh, workdir)

        def sample_last(s):  # the last grid; its timing is not a final metric
            sampler(s, int(s.step))

    outcome = job.train(
        state,
        step_with_tokens,
        host_batches(config, tokens, int(state.step)),
        eval_every=config.sample.every,
        evaluate=sampler,
        finish=sample_last,
        checkpoint_meta=functools.partial(ema_record, ema_decay, ema_warmup),
    )
    result = {"step": int(outcome.state.step), **outcome.metrics}
    if outcome.stopped_early:
        result["stopped_early"] = True
    return result


def _with_encoding(train_step, tokens: Tokens, mesh, config):
    """The loop's step: the train step, after encoding images when tokens are made on the fly."""
    if tokens.tokenizer is None:
        return train_step
    tok = tokens.tokenizer
    encode, shape = tok.compile_encode(config.data.batch_size, tokens.image_size)
    assert tuple(shape) == tuple(tokens.index_shape), (shape, tokens.index_shape)

    def step(state, batch):
        indices = encode(tok.params, tok.model_state, batch["image"])
        return train_step(state, {"tokens": indices, "label": batch["label"]})

    return step


# ----------------------------------------------------------------------------- sample grids


class GridSampler:
    """The trainer's periodic PNG: one row per class (at most 10 classes, 8 samples each)."""

    def __init__(self, generator, labels, columns, seed, workdir):
        self.generator, self.labels, self.columns = generator, labels, columns
        self.seed, self.workdir = seed, workdir

    @classmethod
    def create(cls, config, model_def, tokenizer, mesh, workdir):
        r = config.resolved.to_dict()
        if tokenizer is None:
            tokenizer = TrainedTokenizer.from_record(r["tokenizer"], mesh)
        classes = list(range(min(r["num_classes"], 10)))
        parallel = mesh_lib.batch_parallelism(mesh)
        columns = 8
        n = math.ceil(len(classes) * columns / parallel) * parallel
        labels = labels_for([c for c in classes for _ in range(columns)], n)
        options = sample_options(config.sample)
        generator = Generator.create(model_def, tokenizer, mesh, options, token_ndim(r))
        return cls(generator, labels, columns, config.seed, workdir)

    def __call__(self, state, step: int) -> dict:
        start = time.perf_counter()
        rng = jax.random.fold_in(jax.random.key(self.seed + 1), step)
        params = state.params if state.ema_params is None else state.ema_params  # as sampling
        images = self.generator(params, state.model_state, self.labels, rng)
        if jax.process_index() == 0:
            classes = sorted(set(self.labels.tolist()))
            rows = class_grid(images, self.labels, classes, self.columns)
            path = os.path.join(self.workdir, "images", f"samples_{step:07d}.png")
            save_grid(path, rows)
            logging.info("samples at step %d: %s", step, path)
        return {"sample_seconds": time.perf_counter() - start}
