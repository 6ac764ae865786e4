"""Which codes of a VQ codebook are dead (tokenizers/vq.py `restart_dead_codes`), and the guard
that keeps a restarted code from being restarted again at once.

Two rules (`dead_code_rule`), both evaluated after the step's statistics are updated:

- 'share' (this codebase's own): usage_i <- usage_decay * usage_i + (1 - usage_decay) *
  (vectors assigned to i) / N, starting at 0. With t train calls so far, code i is dead when its
  bias-corrected share usage_i / (1 - usage_decay**t) is below dead_code_threshold / K, i.e. it
  receives less than `dead_code_threshold` times its uniform share of the assignments. A
  restarted code becomes a cluster of size 1 (EMA codebook) and its usage goes back to 0, so it
  must win at least dead_code_threshold * N / (K * (1 - usage_decay)) vectors in its next step
  (any one vector when N <= 10 K at the defaults) or it is restarted again.
- 'ema_count' (vector-quantize-pytorch's `threshold_ema_dead_code`, vector_quantize_pytorch.py
  `Codebook.expire_codes_`): an absolute count. cluster_size_i <- ema_decay * cluster_size_i +
  (1 - ema_decay) * (vectors assigned to i), starting at 1 (the EMA codebook's own cluster sizes;
  with a gradient-trained codebook the same EMA is kept for this rule alone, as the peer does);
  code i is dead when cluster_size_i < dead_code_min_count. A restarted code gets
  cluster_size = dead_code_min_count (the peer's default `reset_cluster_size`). Being an
  absolute count, the rule depends on the batch size N: a code is kept when it wins, on
  average, at least dead_code_min_count vectors per step. Sizes start at 1, below the peer's
  threshold 2, so at the first step every code that wins fewer than
  (dead_code_min_count - ema_decay) / (1 - ema_decay) vectors is restarted, as in the peer.

Dead codes are set to random vectors of the current batch, drawn with replacement (the peer
draws without replacement and, when there are more dead codes than vectors, restarts a random
subset). Under jax.jit with a data-sharded input the batch is the global array, so candidates
come from every device, and the key (seed folded with the step counter) is the same everywhere.

Guard (`dead_code_cooldown` = c > 0): a code restarted at step s is left alone at steps s + 1 ..
s + c, however low its statistics, and may be restarted again from step s + c + 1: without it,
a restarted code that wins too few vectors in its first step (under either rule, most likely
with small codebooks and small batches) is restarted every step and never settles. The step of
each code's last restart is kept in `last_restart` (a never-restarted code holds NEVER).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from visual_tokenizers.core.errors import ConfigError

RULES = ("share", "ema_count")
NEVER = -(2**30)  # `last_restart` of a code never restarted: always past any cooldown


def check(rule: str, min_count: float, cooldown: int) -> None:
    """ConfigError unless the dead-code options make sense."""
    if rule not in RULES:
        raise ConfigError(f"quantizer.dead_code_rule must be one of {RULES}, got {rule!r}")
    if rule == "ema_count" and not min_count > 0:
        raise ConfigError(
            f"quantizer.dead_code_min_count must be > 0 for the 'ema_count' rule, got {min_count}"
        )
    if int(cooldown) != cooldown or cooldown < 0:
        raise ConfigError(
            f"quantizer.dead_code_cooldown must be a whole number of steps >= 0, got {cooldown}"
        )


def never_restarted(k: int) -> jax.Array:
    """`last_restart` of K codes none of which was restarted yet."""
    return jnp.full((k,), NEVER, jnp.int32)


def share_dead(vq, t: jax.Array) -> jax.Array:
    """'share' for a VectorQuantizer after t >= 1 train calls: its bias-corrected usage share
    is below dead_code_threshold / K. ('ema_count' is cluster_size < dead_code_min_count.)"""
    usage = vq.usage[...]
    share = usage / (1.0 - vq.usage_decay ** t.astype(jnp.float32))  # as Adam's bias correction
    return share < vq.dead_code_threshold / usage.shape[0]


def guard(dead: jax.Array, step: jax.Array, last_restart: jax.Array, cooldown: int):
    """(codes to restart at `step`, updated last_restart): dead codes restarted within the last
    `cooldown` steps are spared."""
    due = dead & (step - last_restart > cooldown)
    return due, jnp.where(due, step, last_restart)
