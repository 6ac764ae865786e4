"""A trained class-conditional MaskGIT, with the tokenizer its tokens came from.

  mg = TrainedMaskGIT.from_workdir("runs/maskgit_tiny")
  images = mg.sample([0, 1, 2, 3, 4, 5, 6, 7], seed=0, steps=8)   # uint8 [8, H, W, 3]

`Generator` (MaskGIT sampling then the tokenizer's decoder, both sharded) is what the sample job
and the trainer's periodic sample grids run.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from visual_tokenizers.configs.maskgit_b16 import sampling
from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.runtime import checkpoint
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.tokens.layout import Vocab
from visual_tokenizers.models.maskgit import MaskGIT, make_sampler
from visual_tokenizers.models.maskgit_official import OfficialMaskGIT
from visual_tokenizers.models.maskgit_sampling import SamplingOptions
from visual_tokenizers.tokenizers.tokenizer import DTYPES
from visual_tokenizers.trained import inputs
from visual_tokenizers.trained.restored import Restored, restore
from visual_tokenizers.trained.tokenizer import TrainedTokenizer

STEP_KEY = "maskgit.step"  # the jobs' key for a MaskGIT run's step (configs/common.py)


# model.architecture -> class: our pre-norm transformer, or the official post-norm BERT
# (models/maskgit_official.py, what jobs/import_maskgit.py loads the released weights into).
ARCHITECTURES = {"ours": MaskGIT, "official": OfficialMaskGIT}


def build_maskgit(*, seed: int, dtype: str, architecture: str = "ours", **kwargs) -> MaskGIT:
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype {dtype!r} is unknown; choose one of {sorted(DTYPES)}")
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"model.architecture {architecture!r} is unknown; choose one of {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[architecture](dtype=DTYPES[dtype], rngs=nnx.Rngs(seed), **kwargs)


def model_fn_from_config(config):
    """The MaskGIT of a config whose `resolved` section names the tokens (train_maskgit)."""
    m, r = config.model, config.resolved
    return functools.partial(
        build_maskgit,
        architecture=m.get("architecture", "ours"),  # runs saved before the key existed
        vocab=Vocab.from_dict(r.vocab.to_dict()),
        token_shape=tuple(r.token_shape),
        num_classes=int(r.num_classes),
        width=m.width,
        depth=m.depth,
        heads=m.heads,
        mlp_dim=m.mlp_dim,
        dropout=m.dropout,
        head_group_bits=m.head_group_bits,
        dtype=m.dtype,
        seed=config.seed,
    )


def sample_options(s) -> dict:
    """MaskGIT.sample keyword options from a config section (configs/maskgit_b16.py `sampling`),
    checked (ConfigError naming the option and the fix).

    No guidance (scale 1 in our form, 0 in TiTok's, whatever the schedule) is plain conditional
    sampling (one pass, the official MaskGIT); anything else runs classifier-free guidance.
    Keys added since a config was saved take their defaults (the former behaviour).
    """
    d = sampling()
    d.update({k: v for k, v in s.items() if k in d})
    form = d["guidance_form"]
    plain = float(d["guidance_scale"]) == (1.0 if form == "ours" else 0.0)
    end = d["temperature_end"]
    options = dict(
        steps=int(d["steps"]),
        temperature=float(d["temperature"]),
        temperature_end=None if end is None else float(end),
        top_k=int(d["top_k"]),
        top_p=float(d["top_p"]),
        choice_temperature=float(d["choice_temperature"]),
        schedule=d["mask_schedule"],
        confidence=d["confidence"],
        rng=d["rng"],
        guidance_scale=None if plain else float(d["guidance_scale"]),
        guidance_form=form,
        guidance_schedule=d["guidance_schedule"],
        guidance_interval=tuple(float(x) for x in d["guidance_interval"]),
    )
    try:
        SamplingOptions(**options)
    except ConfigError as e:
        raise ConfigError(f"sampling option {e}") from e
    return options


def token_ndim(resolved: dict) -> int:
    """Rank of a batch of the MaskGIT's tokens: batch, grid, and a group axis for > 31 bits."""
    return 1 + len(Vocab.from_dict(resolved["vocab"]).index_shape(resolved["token_shape"]))


def labels_for(classes, num_samples: int) -> np.ndarray:
    return np.array([classes[i % len(classes)] for i in range(num_samples)], np.int32)


def class_grid(images: np.ndarray, labels: np.ndarray, classes, columns: int) -> list:
    """Rows of up to `columns` images, one row per class in `classes` that has samples."""
    rows = [images[labels == c][:columns] for c in classes]
    return [r for r in rows if len(r)]


@dataclasses.dataclass
class Generator:
    """labels -> uint8 images: MaskGIT sampling then the tokenizer's decoder, both sharded."""

    sampler: object
    decode: object
    tokenizer: TrainedTokenizer
    mesh: object

    @classmethod
    def create(cls, model_def, tokenizer: TrainedTokenizer, mesh, options: dict, ndim: int):
        sampler = make_sampler(model_def, mesh=mesh, **options)
        return cls(sampler, tokenizer.compile_decode(ndim), tokenizer, mesh)

    def __call__(self, params, model_state, labels: np.ndarray, rng) -> np.ndarray:
        """Every process passes the same global labels; every process gets all images."""
        local = len(labels) // jax.process_count()
        mine = labels[jax.process_index() * local :][:local].astype(np.int32)
        labels = mesh_lib.host_batch_to_global({"label": mine}, self.mesh)["label"]
        tokens = self.sampler(params, model_state, labels, rng)
        images = self.decode(self.tokenizer.params, self.tokenizer.model_state, tokens)
        return np.asarray(multihost_utils.process_allgather(images, tiled=True))


@dataclasses.dataclass
class TrainedMaskGIT(Restored):
    """A train_maskgit run on a mesh. `resolved`: its tokens (vocab, token_shape, num_classes,
    class_names, and the record of the tokenizer that made them)."""

    _generators: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_workdir(cls, path: str, step=None, use_ema=None, mesh=None) -> TrainedMaskGIT:
        """The MaskGIT of a train_maskgit run (its saved config rebuilds the model).
        use_ema: as for every finished run: None = its EMA weights when it kept them
        (config.ema_decay > 0), False = the trained weights."""
        fields = restore(
            path, model_fn_from_config, step=step, use_ema=use_ema, mesh=mesh, step_key=STEP_KEY
        )
        if "resolved" not in fields["config"]:
            raise checkpoint.CheckpointError(
                f"{path} was not written by jobs/train_maskgit.py (its config has no 'resolved')"
            )
        return cls(**fields)

    @property
    def resolved(self) -> dict:
        return self.config.resolved.to_dict()

    @functools.cached_property
    def tokenizer(self) -> TrainedTokenizer:
        """The tokenizer the MaskGIT's tokens came from (same step and weights). Assign another
        (e.g. `TrainedTokenizer.from_record(mg.resolved['tokenizer'], moved_to=...)`) when
        that run has moved."""
        return TrainedTokenizer.from_record(self.resolved["tokenizer"], self.mesh)

    def generator(self, options: dict) -> Generator:
        """A Generator for MaskGIT.sample `options` (compiled once per set of options)."""
        key = tuple(sorted(options.items()))
        if key not in self._generators:
            ndim = token_ndim(self.resolved)
            self._generators[key] = Generator.create(
                self.model_def, self.tokenizer, self.mesh, options, ndim
            )
        return self._generators[key]

    def sample(self, labels, seed: int = 0, **options) -> np.ndarray:
        """Class labels [B] -> uint8 images [B, H, W, 3], decoded by `tokenizer`.

        options: the sampling settings of configs/sample.py (configs/maskgit_b16.py
        `sampling`: steps, temperature, temperature_end, top_k, top_p, choice_temperature,
        mask_schedule, confidence, rng, guidance_*); the rest keep the official defaults. B
        must divide over the mesh's batch axes.
        """
        unknown = sorted(set(options) - set(sampling()))
        if unknown:
            raise inputs.InputError(f"unknown sampling options {unknown}; use {sorted(sampling())}")
        labels = np.asarray(labels)
        classes = self.resolved["num_classes"]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise inputs.InputError(f"labels must be a 1-D integer array, got {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= classes):
            raise inputs.InputError(f"labels must be class ids in [0, {classes})")
        inputs.check_batch(len(labels), self.mesh)
        generator = self.generator(sample_options(ml_collections.ConfigDict(sampling(**options))))
        return generator(self.params, self.model_state, labels, jax.random.key(seed))
