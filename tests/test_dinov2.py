"""DINOv2 against timm's VisionTransformer with the DINOv2 settings, random weights saved as the
official checkpoint and read back through our .pth loader; the ViT-L/14 layout; weight errors."""

import jax
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from flax import nnx
from timm.models.vision_transformer import VisionTransformer

from visual_tokenizers.core import weights
from visual_tokenizers.models import dinov2

# Small but the same architecture: position embeddings trained at 518 px (37x37), run at 224
# (16x16), so the 37 -> 16 resampling is exercised as in the real network.
SMALL = dinov2.Config(width=64, depth=2, heads=4, mlp_dim=256, patch=14, trained_grid=37)


def _timm_model(img_size: int, dynamic: bool) -> VisionTransformer:
    """timm's vit_*_patch14_dinov2 settings (init_values=1e-5, LayerNorm eps 1e-6, CLS token,
    token pooling, no head) at the SMALL sizes."""
    return VisionTransformer(
        img_size=img_size,
        patch_size=SMALL.patch,
        embed_dim=SMALL.width,
        depth=SMALL.depth,
        num_heads=SMALL.heads,
        mlp_ratio=SMALL.mlp_dim / SMALL.width,
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=dynamic,
    ).eval()


def _randomise(model: torch.nn.Module, seed: int = 0) -> dict:
    """Random values of order one everywhere (LayerScale too, so no block is a no-op)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, value in model.state_dict().items():
        shape = tuple(value.shape)
        if key.endswith((".gamma", "norm1.weight", "norm2.weight", "norm.weight")):
            array = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("weight") and len(shape) >= 2:
            array = rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape)
        else:
            array = rng.normal(0, 0.5, shape)
        state[key] = torch.tensor(array, dtype=torch.float32)
    model.load_state_dict(state)
    return state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(timm model at 518 with per-call resampling, its state dict, the .pth in official layout)."""
    model = _timm_model(518, dynamic=True)
    state = _randomise(model)
    official = dict(state, mask_token=torch.zeros(1, SMALL.width))  # As the hub file has it.
    path = str(tmp_path_factory.mktemp("dinov2") / "random_dinov2.pth")
    torch.save(official, path)
    return model, state, path


def _inputs(seed=1):
    return np.random.default_rng(seed).normal(0, 1, (2, 224, 224, 3)).astype(np.float32)


@nnx.jit
def _features(net, x):
    return net(x)["cls"]  # One compiled call: eager op-by-op dispatch is 4x slower here.


def _close(ours, theirs):
    """max |ours - theirs| < 2e-5 x the largest |value| (random features are of order one).

    Measured on CPU: 2e-7. Tighter than 1e-4 so that tanh-GELU instead of torch's exact GELU
    (a 1e-4-relative change here) fails."""
    scale = np.abs(theirs).max()
    assert scale > 0.1
    return np.abs(ours - theirs).max() < 2e-5 * scale


def test_timm_resampling_matches_timm(reference):
    model, _, path = reference
    net, file = dinov2.load_dinov2(path, config=SMALL, pos_resample="timm")
    assert file == path
    x = _inputs()
    with torch.no_grad():
        expected = model(torch.tensor(x).permute(0, 3, 1, 2)).numpy()
    got = np.asarray(_features(net, x))
    assert got.shape == (2, SMALL.width)
    assert _close(got, expected)


def _hub_interpolation(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """facebookresearch/dinov2 DinoVisionTransformer.interpolate_pos_encoding for a square input
    (interpolate_offset=0.1, interpolate_antialias=False), as the hub's dinov2_vitl14 runs."""
    n = pos_embed.shape[1] - 1
    m = int(np.sqrt(n))
    scale = float(grid + 0.1) / m
    patch = pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    assert patch.shape[-2:] == (grid, grid)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([pos_embed[:, :1], patch], 1)


def test_hub_resampling_matches_the_hub_formula(reference):
    """The default: timm's blocks with the hub's interpolated position embeddings installed in
    a 224-px model, against ours from the 518-px checkpoint. The two resamplings must differ."""
    _, state, path = reference
    model = _timm_model(224, dynamic=False)
    model.load_state_dict(dict(state, pos_embed=_hub_interpolation(state["pos_embed"], 16)))
    x = _inputs()
    with torch.no_grad():
        expected = model(torch.tensor(x).permute(0, 3, 1, 2)).numpy()
    net, _ = dinov2.load_dinov2(path, config=SMALL)
    assert net.pos_resample == "hub"
    got = np.asarray(_features(net, x))
    assert _close(got, expected)
    timm_net, _ = dinov2.load_dinov2(path, config=SMALL, pos_resample="timm")
    assert not _close(np.asarray(_features(timm_net, x)), expected)  # The choice matters.


def test_vitl14_layout_and_grid():
    """The default network is timm's vit_large_patch14_dinov2 (the official layout): same keys
    and shapes, 304,367,616 parameters (+ the unused mask_token); 224 px gives 16x16 + CLS."""
    with torch.device("meta"):  # Shapes only: no 300M-parameter allocation.
        names = timm.create_model("vit_large_patch14_dinov2", pretrained=False).state_dict()
    expected = {k: tuple(v.shape) for k, v in names.items()}
    abstract = nnx.eval_shape(lambda: dinov2.DINOv2())
    graphdef, state = nnx.split(abstract)
    ours = {}
    for path, leaf in state.flat_state():
        key, torch_shape, _ = dinov2._torch_entry(tuple(path), tuple(leaf.shape))
        ours[key] = torch_shape
    assert ours == expected
    assert sum(np.prod(s) for s in ours.values()) == 304_367_616
    spec = jax.ShapeDtypeStruct((2, 224, 224, 3), np.float32)
    tokens = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).tokens(x), state, spec)
    assert tokens.shape == (2, 1 + 16 * 16, 1024)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, spec)
    assert out["cls"].shape == (2, 1024)


def test_wrong_files_name_the_right_one(reference, tmp_path):
    state = reference[1]
    with pytest.raises(weights.WrongWeights, match="dinov2_vitl14_pretrain.pth"):
        dinov2.load_dinov2(reference[2])  # A small net's file read as ViT-L/14: shapes differ.
    registers = str(tmp_path / "reg4.pth")
    torch.save(dict(state, register_tokens=torch.zeros(1, 4, SMALL.width)), registers)
    with pytest.raises(weights.WrongWeights, match="with registers.*dinov2_vitl14_pretrain"):
        dinov2.load_dinov2(registers, config=SMALL)
    missing = str(tmp_path / "missing.pth")
    torch.save({k: v for k, v in state.items() if k != "blocks.1.ls2.gamma"}, missing)
    with pytest.raises(weights.WrongWeights, match="blocks.1.ls2.gamma"):
        dinov2.load_dinov2(missing, config=SMALL)


def test_cache_without_published_checksum(reference, tmp_path, monkeypatch):
    """No sha256 is published: a cached file is used as is; offline, a missing one names the
    download."""
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    with pytest.raises(weights.WeightsUnavailable, match=weights.DINOV2_VITL14.url):
        dinov2.load_dinov2()
    cached = tmp_path / weights.DINOV2_VITL14.name
    cached.write_bytes(open(reference[2], "rb").read())
    _, file = dinov2.load_dinov2(config=SMALL)
    assert file == str(cached)
