"""Tokenizer training losses. Each returns a dict of already-weighted scalar terms."""

from __future__ import annotations

import jax.numpy as jnp


def reconstruction_losses(images, reconstructions, *, l1_weight: float, l2_weight: float):
    """Pixel losses on [-1, 1] images; a term with weight 0 is left out."""
    diff = reconstructions.astype(jnp.float32) - images.astype(jnp.float32)
    terms = {}
    if l2_weight:
        terms["l2"] = l2_weight * jnp.mean(jnp.square(diff))
    if l1_weight:
        terms["l1"] = l1_weight * jnp.mean(jnp.abs(diff))
    if not terms:
        raise ValueError("loss.l1_weight and loss.l2_weight are both 0: nothing to train on")
    return terms
