"""FD-DINOv2 input preparation against the sources' own transforms: dgm-eval's torchvision
pipeline on PIL images (default) and EDM2's torch antialiased resize; the position-embedding
resampling weights against torch's interpolate."""

import jax
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as TF

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.models import bicubic, dinov2

# Square shrink, wide, tall (Pillow 13 resizes rows first), enlarge, already 224.
SIZES = [(256, 256), (200, 300), (517, 100), (64, 48), (224, 224)]
_preprocess = jax.jit(dinov2.preprocess, static_argnames="resize")  # Faster than op by op.


def _image(size, seed):
    """Smooth content plus noise: both the low-pass and the rounding matter."""
    rng = np.random.default_rng(seed)
    h, w = size
    ramp = np.add.outer(np.linspace(0, 200, h), np.linspace(0, 55, w))[..., None]
    return np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def test_pil_preprocess_matches_dgm_eval():
    """dgm-eval's DINOv2Encoder.transform (clean_resize=False): Resize((224, 224), BICUBIC) on
    the PIL image, ToTensor, Normalize(ImageNet mean, std). Pillow's rounding is reproduced, so
    the match is to float32 rounding."""
    reference = TF.Compose([TF.Resize((224, 224), TF.InterpolationMode.BICUBIC), TF.ToTensor()])
    normalize = TF.Normalize(dinov2.MEAN, dinov2.STD)
    for seed, size in enumerate(SIZES):
        image = _image(size, seed)
        expected = normalize(reference(PIL.Image.fromarray(image))).permute(1, 2, 0).numpy()
        got = np.asarray(_preprocess(image[None]))[0]
        assert got.shape == (224, 224, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=str(size))


def test_pass_order_follows_pillow():
    """The tall image is resized rows first, as Pillow 13 does; columns first would differ."""
    image = _image((517, 100), 2)[None]
    assert bicubic.pil_vertical_first((517, 100), (224, 224))
    assert not bicubic.pil_vertical_first((200, 300), (224, 224))
    cols_first = jax.jit(lambda x: bicubic._pil_pass(bicubic._pil_pass(x, 2, 224), 1, 224))
    cols_first = cols_first(image.astype(np.int32))
    expected = np.asarray(PIL.Image.fromarray(image[0]).resize((224, 224), PIL.Image.BICUBIC))
    ours = jax.jit(bicubic.pil_resize_uint8, static_argnums=1)(image, (224, 224))
    assert np.array_equal(np.asarray(ours)[0], expected)
    assert not np.array_equal(np.asarray(cols_first)[0], expected)


def test_torch_preprocess_matches_edm2():
    """EDM2 calculate_metrics.py DINOv2Detector, resize_mode='torch' (its default)."""
    mean = torch.tensor(dinov2.MEAN).reshape(1, -1, 1, 1)
    std = torch.tensor(dinov2.STD).reshape(1, -1, 1, 1)
    for seed, size in enumerate(SIZES):
        image = _image(size, seed)[None]
        x = torch.tensor(image).permute(0, 3, 1, 2).to(torch.float32)
        x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)
        expected = ((x / 255 - mean) / std).permute(0, 2, 3, 1).numpy()
        got = np.asarray(_preprocess(image, resize="torch"))
        # float32 sums in another order: measured <= 6e-5 (1 uint8 level is 1.7e-2 here).
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=str(size))
    with pytest.raises(ConfigError, match="resize"):
        dinov2.preprocess(image, resize="bilinear")


@pytest.mark.parametrize("grid", [16, 5, 37, 40])
def test_position_resampling_weights_match_torch(grid):
    """hub: bicubic without antialias at scale_factor (g + 0.1) / 37 (the trained grid as is);
    timm: bicubic with antialias to the output size (resample_abs_pos_embed)."""
    pos = torch.randn(1, 6, 37, 37)
    hub = dinov2.pos_resample_matrix(37, grid, "hub")
    timm = dinov2.pos_resample_matrix(37, grid, "timm")
    apply = lambda m: np.einsum("ih,chw,jw->cij", m, pos[0].numpy(), m)  # noqa: E731
    scale = float(grid + 0.1) / 37
    expected = F.interpolate(pos, scale_factor=(scale, scale), mode="bicubic")[0].numpy()
    if grid == 37:
        expected = pos[0].numpy()  # The hub returns its embeddings untouched at 518 px.
    np.testing.assert_allclose(apply(hub), expected, atol=1e-5)
    expected = F.interpolate(pos, size=(grid, grid), mode="bicubic", antialias=True)[0].numpy()
    np.testing.assert_allclose(apply(timm), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="position"):
        dinov2.pos_resample_matrix(37, grid, "bilinear")
