"""A trained tokenizer as sharded, jitted encode/decode functions (export, MaskGIT, sampling).

`restore(workdir, mesh)` loads a tokenizer training run onto a mesh and picks its weights:
the EMA weights (`ema_params`, a train-state field mirroring `params`) when `use_ema` and the
checkpoint has them, else the trained `params`. `compile_encode` / `compile_decode` give jitted
functions over those sharded weights with the batch sharded over ('data', 'fsdp').
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from visual_tokenizers.core.data.images import to_model
from visual_tokenizers.core.runtime import mesh as mesh_lib


@dataclasses.dataclass
class Restored:
    """A restored tokenizer (`jobs.train_tokenizer.TrainedTokenizer`) plus the chosen weights."""

    tokenizer: object
    params: dict
    weights: str  # 'ema' or 'params'
    workdir: str

    @property
    def model_state(self) -> dict:
        return self.tokenizer.model_state

    @property
    def config(self):
        return self.tokenizer.config

    @property
    def step(self) -> int:
        return self.tokenizer.step

    def model(self):
        return self.tokenizer.model_def.merge(self.params, self.model_state)

    @property
    def vocab(self):
        return self.model().vocab


def restore(workdir: str, mesh, step: int | None = None, use_ema: bool | None = None) -> Restored:
    """Restores a tokenizer run onto `mesh`: its EMA weights when present, unless use_ema=False.

    The EMA weights are the checkpoint's `ema_params` (`TrainedTokenizer.ema_params`).
    """
    from visual_tokenizers.jobs.train_tokenizer import (
        load_tokenizer,  # Lazy: jobs import core, not the reverse.
    )

    tokenizer = load_tokenizer(workdir, mesh=mesh, step=step)
    ema = tokenizer.ema_params if use_ema is not False else None
    path = os.path.abspath(workdir)
    if ema is not None:
        logging.info("tokenizer: EMA weights of %s step %d", workdir, tokenizer.step)
        return Restored(tokenizer, ema, "ema", path)
    return Restored(tokenizer, tokenizer.params, "params", path)


def compile_encode(tok: Restored, mesh, global_batch: int, image_size: int):
    """(AOT-compiled encode(params, model_state, uint8 images) -> indices, per-image shape).

    Images [B, H, W, 3] uint8 travel to the device (4x less than float32) and are sharded over
    the batch axes; so are the returned indices.
    """
    model_def, sh = tok.tokenizer.model_def, tok.tokenizer.shardings

    def encode(params, model_state, images):
        return model_def.merge(params, model_state).encode(to_model(images))

    images = jax.ShapeDtypeStruct((global_batch, image_size, image_size, 3), jnp.uint8)
    out = jax.eval_shape(encode, tok.params, tok.model_state, images)
    jitted = jax.jit(
        encode,
        in_shardings=(sh.params, sh.model_state, mesh_lib.batch_sharding(mesh, 4)),
        out_shardings=mesh_lib.batch_sharding(mesh, out.ndim),
    )
    compiled = jitted.lower(tok.params, tok.model_state, images).compile()
    return compiled, tuple(out.shape[1:])


def compile_decode(tok: Restored, mesh, indices_ndim: int):
    """Jitted decode(params, model_state, indices [B, ...]) -> uint8 images, batch-sharded."""
    model_def, sh = tok.tokenizer.model_def, tok.tokenizer.shardings

    def decode(params, model_state, indices):
        images = model_def.merge(params, model_state).decode(indices)
        return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    batch = mesh_lib.batch_sharding(mesh, indices_ndim)
    return jax.jit(
        decode,
        in_shardings=(sh.params, sh.model_state, batch),
        out_shardings=mesh_lib.batch_sharding(mesh, 4),
    )


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in process-local order."""
    parts = {}
    for shard in array.addressable_shards:  # Replicas (model axis) share a start: keep one.
        parts.setdefault(shard.index[0].start or 0, shard)
    return np.concatenate([np.asarray(parts[k].data) for k in sorted(parts)])


_CODEBOOK_MEANINGS = {
    "codebook": "[vocab, latent_dim]: the vector the decoder receives for each index "
    "(quantizer.embed)",
    "codebook_code_space": "[vocab, code_dim]: the code vectors the nearest-neighbour search "
    "compares against (quantizer.codes())",
}


def codebook_arrays(tok: Restored, mesh) -> dict:
    """name -> (array, meaning) of the codebook tables; every process must call it.

    A quantizer may define `codebook_embeddings() -> {name: array}` (both codebooks of a dual
    tokenizer); plain codebooks give `codebook` (what the decoder receives per index) and, when
    the quantizer has `codes()`, `codebook_code_space`. Binary vocabularies have no table.
    """
    model_def, sh = tok.tokenizer.model_def, tok.tokenizer.shardings
    custom = hasattr(tok.model().quantizer, "codebook_embeddings")
    if not custom and tok.vocab.bits is not None:
        return {}

    def tables(params, model_state):
        q = model_def.merge(params, model_state).quantizer
        if custom:
            return dict(q.codebook_embeddings())
        out = {"codebook": q.embed(jnp.arange(q.vocab.size))}
        if hasattr(q, "codes"):
            out["codebook_code_space"] = q.codes()
        return out

    jitted = jax.jit(
        tables, in_shardings=(sh.params, sh.model_state), out_shardings=mesh_lib.replicated(mesh)
    )
    arrays = jitted(tok.params, tok.model_state)
    return {k: (np.asarray(v), _CODEBOOK_MEANINGS.get(k, "")) for k, v in arrays.items()}
