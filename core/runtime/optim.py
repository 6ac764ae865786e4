"""Optimizers and learning-rate schedules from config, built with optax."""

from __future__ import annotations

import optax

from visual_tokenizers.core.errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(
    *, lr: float, schedule: str, warmup_steps: int, total_steps: int, end_lr_fraction: float
):
    """Linear warm-up to `lr`, then constant, cosine or linear decay to lr * end_lr_fraction."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule {schedule!r} is unknown; use one of {SCHEDULES}")
    warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
    decay_steps = max(total_steps - warmup_steps, 1)
    end = lr * end_lr_fraction
    if schedule == "constant":
        decay = optax.constant_schedule(lr)
    elif schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr_fraction)
    else:
        decay = optax.linear_schedule(lr, end, decay_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(
    *,
    name: str,
    lr: float,
    b1: float,
    b2: float,
    weight_decay: float,
    grad_clip_norm: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    end_lr_fraction: float = 0.0,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Adam/AdamW with optional global-norm clipping and a warm-up + decay schedule."""
    lr_fn = learning_rate_schedule(
        lr=lr,
        schedule=schedule,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        end_lr_fraction=end_lr_fraction,
    )
    if name == "adam":
        opt = optax.adam(lr_fn, b1=b1, b2=b2, eps=eps)
    elif name == "adamw":
        opt = optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    else:
        raise ConfigError(f"optimizer.name {name!r} is unknown; use 'adam' or 'adamw'")
    if grad_clip_norm and grad_clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(grad_clip_norm), opt)
    return opt
