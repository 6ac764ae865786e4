"""A trained tokenizer: restored from its run's workdir, used from Python or by the jobs.

  tok = TrainedTokenizer.from_workdir("runs/vq_tiny")      # EMA weights when the run kept them
  indices = tok.encode(uint8_images)                        # any size: resized + centre-cropped
  images = tok.decode(indices)                              # uint8 [B, H, W, 3]

Jobs use the sharded, jitted pieces directly: `compile_encode` / `compile_decode` (the batch
sharded over ('data', 'fsdp')), `codebook_arrays`, and `record()` / `from_record()`: the
{workdir, step, weights} note that token files and MaskGITs keep of the tokenizer that made them.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from visual_tokenizers.core.data.images import to_model
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.trained import inputs
from visual_tokenizers.trained.builders import model_fn_from_config
from visual_tokenizers.trained.restored import EMA, PARAMS, Restored, restore

STEP_KEY = "tokenizer.step"  # the jobs' key for a tokenizer run's step (configs/common.py)


def _to_uint8(images):
    return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@dataclasses.dataclass
class TrainedTokenizer(Restored):
    """A tokenizer training run on a mesh, with the weights it uses (`weights`: 'ema' or
    'params'). `model()`, `encode`, `decode` and the compiled functions all use `params`."""

    _compiled: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_workdir(cls, path: str, step=None, use_ema=None, mesh=None) -> TrainedTokenizer:
        """The tokenizer of a train_tokenizer run (its saved config rebuilds the model).

        step: None = the latest checkpoint. use_ema: None = the EMA weights when the run kept
        them, else the trained params; True = the EMA (an error without one); False = params.
        mesh: None = the run's own mesh from its config.
        """
        fields = restore(
            path, model_fn_from_config, step=step, use_ema=use_ema, mesh=mesh, step_key=STEP_KEY
        )
        return cls(**fields)

    def record(self) -> dict:
        """{workdir, step, weights}: which tokenizer made a token file or trained a MaskGIT."""
        return {"workdir": self.workdir, "step": int(self.step), "weights": self.weights}

    @classmethod
    def from_record(
        cls, record: dict, mesh=None, moved_to: str = "", setting: str = "moved_to"
    ) -> TrainedTokenizer:
        """The tokenizer a `record()` names, with the same step and weights. The recorded
        workdir is used while it exists; `moved_to` names the run's new place when it has moved
        (`setting`: what the caller calls that argument, for the error message).
        """
        where = record["workdir"] if os.path.isdir(record["workdir"]) else moved_to
        if not where or not os.path.isdir(where):
            tried = f" ({moved_to} is not a directory either)" if moved_to else ""
            raise FileNotFoundError(
                f"the tokenizer run {record['workdir']} (step {record['step']}) is gone{tried}; "
                f"pass its new place as {setting}"
            )
        use_ema = {EMA: True, PARAMS: False}[record["weights"]]
        return cls.from_workdir(where, int(record["step"]), use_ema, mesh)

    @functools.cached_property
    def vocab(self):
        return self.model().vocab

    @property
    def image_size(self) -> int:
        """The size the tokenizer was trained at: what `encode` resizes images to."""
        return int(self.config.data.image_size)

    @functools.cached_property
    def indices_shape(self) -> tuple[int, ...]:
        """Per-image shape of the indices at `image_size` ([h, w], [L], or [h, w, groups])."""
        return self.encoded_shape(self.image_size)

    def encoded_shape(self, image_size: int) -> tuple[int, ...]:
        """Per-image shape of the indices of `image_size` images (traced, not run)."""

        def encode(params, model_state, images):
            return self.model_def.merge(params, model_state).encode(images)

        images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
        return tuple(jax.eval_shape(encode, self.params, self.model_state, images).shape[1:])

    # ------------------------------------------------------------------------- Python API

    def encode(self, images) -> np.ndarray:
        """uint8 images [B, H, W, 3] (or a list of [H, W, 3] of any sizes) -> int32 indices
        [B, *indices_shape]. Each image is preprocessed as export and evaluation do: shorter
        side resized to `image_size`, centre crop. B must divide over the mesh's batch axes."""
        batch = inputs.model_images(images, self.image_size)
        inputs.check_batch(len(batch), self.mesh)
        key = ("encode", len(batch))
        if key not in self._compiled:
            self._compiled[key] = self.compile_encode(len(batch), self.image_size)[0]
        return self._run(self._compiled[key], batch)

    def decode(self, indices) -> np.ndarray:
        """int indices [B, *indices_shape] (or flat rows [B, L]) -> uint8 images [B, S, S, 3]."""
        batch = inputs.model_indices(indices, self.indices_shape, self.vocab)
        inputs.check_batch(len(batch), self.mesh)
        key = ("decode", batch.ndim)
        if key not in self._compiled:
            self._compiled[key] = self.compile_decode(batch.ndim)
        return self._run(self._compiled[key], batch)

    def _run(self, fn, batch: np.ndarray) -> np.ndarray:
        """fn over a global batch every process passes whole; every process gets all rows."""
        local = len(batch) // jax.process_count()
        mine = batch[jax.process_index() * local :][:local]
        array = mesh_lib.host_batch_to_global({"x": mine}, self.mesh)["x"]
        out = fn(self.params, self.model_state, array)
        return np.asarray(multihost_utils.process_allgather(out, tiled=True))

    # ------------------------------------------------------------------------- for jobs

    def compile_encode(self, global_batch: int, image_size: int):
        """(AOT-compiled encode(params, model_state, uint8 images) -> indices, per-image shape).

        Images [B, H, W, 3] uint8 travel to the device (4x less than float32) and are sharded
        over the batch axes; so are the returned indices.
        """
        model_def, sh, mesh = self.model_def, self.shardings, self.mesh

        def encode(params, model_state, images):
            return model_def.merge(params, model_state).encode(to_model(images))

        images = jax.ShapeDtypeStruct((global_batch, image_size, image_size, 3), jnp.uint8)
        out = jax.eval_shape(encode, self.params, self.model_state, images)
        jitted = jax.jit(
            encode,
            in_shardings=(sh.params, sh.model_state, mesh_lib.batch_sharding(mesh, 4)),
            out_shardings=mesh_lib.batch_sharding(mesh, out.ndim),
        )
        compiled = jitted.lower(self.params, self.model_state, images).compile()
        return compiled, tuple(out.shape[1:])

    def compile_decode(self, indices_ndim: int):
        """Jitted decode(params, model_state, indices [B, ...]) -> uint8 images, batch-sharded."""
        model_def, sh, mesh = self.model_def, self.shardings, self.mesh

        def decode(params, model_state, indices):
            return _to_uint8(model_def.merge(params, model_state).decode(indices))

        return jax.jit(
            decode,
            in_shardings=(sh.params, sh.model_state, mesh_lib.batch_sharding(mesh, indices_ndim)),
            out_shardings=mesh_lib.batch_sharding(mesh, 4),
        )

    def codebook_arrays(self) -> dict:
        """name -> (array, meaning) of the codebook tables; every process must call it.

        A quantizer may define `codebook_embeddings() -> {name: array}` (both codebooks of a
        dual tokenizer); plain codebooks give `codebook` (what the decoder receives per index)
        and, when the quantizer has `codes()`, `codebook_code_space`. Binary vocabularies have
        no table.
        """
        model_def, sh = self.model_def, self.shardings
        custom = hasattr(self.model().quantizer, "codebook_embeddings")
        if not custom and self.vocab.bits is not None:
            return {}

        def tables(params, model_state):
            q = model_def.merge(params, model_state).quantizer
            if custom:
                return dict(q.codebook_embeddings())
            out = {"codebook": q.embed(jnp.arange(q.vocab.size))}
            if hasattr(q, "codes"):
                out["codebook_code_space"] = q.codes()
            return out

        replicated = mesh_lib.replicated(self.mesh)
        jitted = jax.jit(tables, in_shardings=(sh.params, sh.model_state), out_shardings=replicated)
        arrays = jitted(self.params, self.model_state)
        return {k: (np.asarray(v), _CODEBOOK_MEANINGS.get(k, "")) for k, v in arrays.items()}


_CODEBOOK_MEANINGS = {
    "codebook": "[vocab, latent_dim]: the vector the decoder receives for each index "
    "(quantizer.embed)",
    "codebook_code_space": "[vocab, code_dim]: the code vectors the nearest-neighbour search "
    "compares against (quantizer.codes())",
}
