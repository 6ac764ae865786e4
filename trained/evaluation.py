"""Reconstruction evaluation of a tokenizer: the one loop behind the trainer's held-out
evaluation and the evaluate job's tokenizer mode, plus the networks that measure it.

`reconstruct(global batch) -> {'psnr', 'ssim', 'indices', 'reconstruction'}` is the jitted
`make_eval_step`; `reconstruction_pass` runs it over a batch iterator and gathers per-image
metrics, codebook usage and (optionally) the features of each feature space (Inception per
pipeline, DINOv2) / LPIPS / shapes-classifier outputs. `training_rfid` measures them with the
same code as the evaluate job (core/evaluation/scores.py).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from visual_tokenizers.core import weights
from visual_tokenizers.core.data import pipeline as data
from visual_tokenizers.core.data.images import to_model
from visual_tokenizers.core.evaluation import metrics, scores
from visual_tokenizers.core.evaluation.reference import Reference, Space, global_mask, progress
from visual_tokenizers.core.runtime import mesh as mesh_lib
from visual_tokenizers.core.runtime import train_state as ts
from visual_tokenizers.models import inception as inception_lib
from visual_tokenizers.models import lpips as lpips_lib


def make_eval_step(model_def: ts.ModelDef):
    """eval_step(params, model_state, {'image': uint8}) -> per-image PSNR/SSIM, indices and the
    uint8 reconstruction."""

    def eval_step(params, model_state, batch):
        model = model_def.merge(params, model_state)
        reconstructions, quantized = model(to_model(batch["image"]), train=False)
        recon_uint8 = jnp.clip(jnp.round((reconstructions + 1.0) * 127.5), 0, 255)
        psnr, ssim = metrics.psnr_ssim(batch["image"], recon_uint8)
        return {
            "psnr": psnr,
            "ssim": ssim,
            "indices": quantized.indices,
            "reconstruction": recon_uint8.astype(jnp.uint8),
        }

    return eval_step


@functools.cache
def _inception(path: str):
    """(network, sha256 of its weights): loaded once per process, shared by both pipelines."""
    net, file = inception_lib.load_fid_inception(path or None)
    return net, weights.sha256_of(file)


@functools.cache
def inception_apply(path: str, mesh, pipeline: str = "pytorch_fid"):
    """(uint8 images -> {'pool', 'logits', 'spatial'}, sha256 of the weights) for one input
    pipeline ('adm' or 'pytorch_fid', models/inception.py); built once per process."""
    net, sha = _inception(path)
    prepare = functools.partial(inception_lib.preprocess, pipeline=pipeline)
    return metrics.ShardedApply(net, lambda m, x: m(x), mesh, prepare=prepare), sha


@functools.cache
def dinov2_apply(path: str, mesh):
    """(uint8 images -> {'cls'}, sha256 of the weights) for FD-DINOv2; built once per process."""
    # Imported here: the ViT-L is only built when FD-DINOv2 is asked for.
    from visual_tokenizers.models import dinov2 as dinov2_lib

    net, file = dinov2_lib.load_dinov2(path or None)
    apply = metrics.ShardedApply(net, lambda m, x: m(x), mesh, prepare=dinov2_lib.preprocess)
    return apply, weights.sha256_of(file)


def feature_spaces(names, mesh, *, inception_path: str = "", dinov2_path: str = "") -> list:
    """The `Space`s named (Inception pipelines and/or 'dinov2'), networks loaded once."""
    spaces = []
    for name in names:
        if name == scores.DINOV2:
            apply, sha = dinov2_apply(dinov2_path, mesh)
            spaces.append(Space(name, apply, sha, primary="cls"))
        else:
            apply, sha = inception_apply(inception_path, mesh, name)
            spaces.append(Space(name, apply, sha))
    return spaces


@functools.cache
def lpips_apply(vgg_path: str, lpips_path: str, mesh) -> metrics.ShardedApply:
    model, _ = lpips_lib.load_lpips(vgg_path or None, lpips_path or None)
    return metrics.ShardedApply(model, lambda m, a, b: m(to_model(a), to_model(b)), mesh)


def _gather(tree):
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def reconstruction_pass(
    reconstruct,
    batches,
    num,
    mesh,
    vocab=None,
    *,
    spaces=(),
    originals=False,
    lpips=None,
    shapes=None,
    keep_first=False,
    empty="the evaluation data gave no images; check data.source and data.split",
) -> dict:
    """One pass over `batches`: per-image metrics and features of up to `num` reconstructions.

    Returns {'psnr', 'ssim'} per image, 'codebook' (usage statistics, with `vocab`) and, when
    asked: 'features' ({space: {kind: features}} of the reconstructions in each of `spaces`;
    with `originals`, 'reference_features' of the inputs too: one decode, every space),
    'lpips', 'shapes_*', and with `keep_first` the first batch's 'first_originals' and
    'first_reconstructions' (the trainer's PNG grid). `empty`: the error without images.
    """
    out, seen = collections.defaultdict(list), 0
    stats = metrics.CodebookStats(vocab.size, vocab) if vocab is not None else None
    first = {}
    for batch in progress(batches, "reconstruct"):
        images = mesh_lib.host_batch_to_global({"image": batch["image"]}, mesh)["image"]
        result = reconstruct({"image": images})
        mask = global_mask(batch["mask"], num - seen)
        small = _gather({k: result[k] for k in ("psnr", "ssim", "indices")})
        out["psnr"].append(small["psnr"][mask])
        out["ssim"].append(small["ssim"][mask])
        if stats is not None:
            stats.update(small["indices"][mask])
        recon = result["reconstruction"]
        if keep_first and not first:
            first["first_originals"] = _gather(batch["image"])[mask]
            first["first_reconstructions"] = _gather(recon)[mask]
        _measure(out, images, recon, mask, batch, spaces, originals, lpips, shapes)
        seen += int(mask.sum())
        if seen >= num:
            break
    batches.close()
    if seen == 0:
        raise data.DataError(empty)
    merged = {k: np.concatenate(v) for k, v in out.items()}
    for key in ("features", "reference_features"):
        nested = {}
        for flat in [k for k in merged if k.startswith(f"{key}/")]:
            _, name, kind = flat.split("/")
            nested.setdefault(name, {})[kind] = merged.pop(flat)
        if nested:
            merged[key] = nested
    if stats is not None:
        merged["codebook"] = stats.result()
    return {**merged, **first}


def _measure(out, images, recon, mask, batch, spaces, originals, lpips, shapes) -> None:
    """Appends the networks' outputs on one batch of reconstructions (and originals)."""
    for space in spaces:
        for kind, value in space.apply(recon).items():
            out[f"features/{space.name}/{kind}"].append(value[mask])
        if originals:
            for kind, value in space.apply(images).items():
                out[f"reference_features/{space.name}/{kind}"].append(value[mask])
    if lpips is not None:
        out["lpips"].append(lpips(images, recon)[mask])
    if shapes is not None:
        labels = _gather(batch["label"])[mask]
        predicted = shapes(recon)
        out["shapes_correct"].append(predicted["logits"][mask].argmax(-1) == labels)
        out["shapes_features"].append(predicted["features"][mask])
        out["shapes_reference"].append(shapes(images)["features"][mask])


def fid_pipelines(config) -> tuple[str, ...]:
    """The trainer's rFID pipelines; runs configured before pipelines existed measure both."""
    return tuple(config.eval.get("fid_pipelines", inception_lib.PIPELINES))


def training_rfid(config, reconstruct, mesh) -> dict:
    """{'rfid_<pipeline>': ...} of config.eval.fid_num_examples held-out reconstructions, for
    train_tokenizer, in each of config.eval.fid_pipelines ('adm', 'pytorch_fid').

    reconstruct(global batch) -> the trainer's eval step outputs. The reference statistics of
    the held-out originals are computed on the first call and cached.
    """
    d, num = config.data, config.eval.fid_num_examples
    pipelines = fid_pipelines(config)
    spaces = feature_spaces(
        pipelines, mesh, inception_path=config.eval.get("fid_inception_weights", "")
    )
    reference = Reference(
        spaces,
        scores.needs({"fid"}, pipelines),
        source=(config.eval.source, config.eval.split, d.image_size, num, d.data_dir),
        reference=None,
        image_size=d.image_size,
        batch_size=config.eval.batch_size,
        seed=config.seed,
    )
    batches = data.held_out_batches(config)
    out = reconstruction_pass(
        reconstruct, batches, num, mesh, spaces=spaces, originals=bool(reference.missing())
    )
    if reference.missing():
        reference.set_from_outputs(out["reference_features"])
    settings = dict(fid_name="rfid")  # FID only: no other setting is read
    result = scores.compare(reference, out["features"], {"fid"}, pipelines, settings)
    result.pop("pipeline_of")  # the names say it: rfid_adm, rfid_pytorch_fid
    return result
