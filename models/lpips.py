"""LPIPS v0.1 with the VGG16 trunk, as the `lpips` package computes it.

Inputs in [-1, 1] (NHWC) are shifted and scaled per channel, passed through torchvision's VGG16
features; at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 each feature map is unit-normalised
over channels (eps 1e-10), the squared difference is weighted per channel by the calibrated 1x1
conv (no bias), averaged over space and summed over layers. Weights: torchvision's
`vgg16-397923af.pth` (trunk) and the package's `v0.1/vgg.pth` (calibration), via core.weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from visual_tokenizers.core import weights as weights_lib

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# (output channels of each 3x3 conv) per stage; a 2x2 max-pool precedes every stage but the first.
STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
PRECISION = jax.lax.Precision.HIGHEST  # A metric: no reduced-precision matmuls.


def _torchvision_indices() -> list[int]:
    """Index of each conv inside torchvision's vgg16().features (convs, ReLUs and pools)."""
    indices, i = [], 0
    for s, stage in enumerate(STAGES):
        if s:
            i += 1  # The max-pool.
        for _ in stage:
            indices.append(i)
            i += 2  # Conv then ReLU.
    return indices


class LPIPS(nnx.Module):
    """`lpips(x, y) -> [B]` distances for float NHWC images in [-1, 1]."""

    def __init__(self, precision=PRECISION):
        # Training losses may pass jax.lax.Precision.DEFAULT (bf16 passes on TPU/GPU).
        self.precision = precision
        kernels, biases, cin = [], [], 3
        for stage in STAGES:
            for cout in stage:
                kernels.append(nnx.Param(jnp.zeros((3, 3, cin, cout), jnp.float32)))
                biases.append(nnx.Param(jnp.zeros((cout,), jnp.float32)))
                cin = cout
        self.kernels, self.biases = nnx.List(kernels), nnx.List(biases)
        self.lins = nnx.List([nnx.Param(jnp.zeros((s[-1],), jnp.float32)) for s in STAGES])

    def features(self, x) -> list[jax.Array]:
        """The five relu*_* maps of the VGG16 trunk for already scaled input."""
        outputs, k = [], 0
        for s, stage in enumerate(STAGES):
            if s:
                x = jax.lax.reduce_window(
                    x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
                )
            for _ in stage:
                x = jax.lax.conv_general_dilated(
                    x,
                    self.kernels[k][...],
                    (1, 1),
                    ((1, 1), (1, 1)),
                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                    precision=self.precision,
                )
                x = jax.nn.relu(x + self.biases[k][...])
                k += 1
            outputs.append(x)
        return outputs

    def __call__(self, x, y):
        batch = x.shape[0]
        both = jnp.concatenate([x, y], 0).astype(jnp.float32)
        both = (both - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        total = jnp.zeros((batch,), jnp.float32)
        for lin, feats in zip(self.lins, self.features(both), strict=True):
            feats = feats / (jnp.sqrt(jnp.sum(feats**2, -1, keepdims=True)) + 1e-10)
            diff = (feats[:batch] - feats[batch:]) ** 2
            total += jnp.mean(
                jnp.einsum("bhwc,c->bhw", diff, lin[...], precision=self.precision), (1, 2)
            )
        return total


def from_torch_states(
    vgg: dict, lins: dict, what: str = "LPIPS weights", precision=PRECISION
) -> LPIPS:
    """Builds LPIPS from torchvision's vgg16 state dict and the lpips `vgg.pth` state dict."""
    model = LPIPS(precision)
    cin = 3
    convs = [c for stage in STAGES for c in stage]
    for k, (index, cout) in enumerate(zip(_torchvision_indices(), convs, strict=True)):
        w = weights_lib.require(vgg, f"features.{index}.weight", (cout, cin, 3, 3), what)
        b = weights_lib.require(vgg, f"features.{index}.bias", (cout,), what)
        model.kernels[k][...] = jnp.asarray(w.transpose(2, 3, 1, 0), jnp.float32)
        model.biases[k][...] = jnp.asarray(b, jnp.float32)
        cin = cout
    for k, stage in enumerate(STAGES):
        w = weights_lib.require(lins, f"lin{k}.model.1.weight", (1, stage[-1], 1, 1), what)
        model.lins[k][...] = jnp.asarray(w.reshape(-1), jnp.float32)
    return model


def load_lpips(
    vgg_path: str | None = None, lpips_path: str | None = None, precision=PRECISION
) -> tuple[LPIPS, dict]:
    """(model, {'vgg16': path, 'lpips': path}) from explicit files or the weights cache."""
    vgg_file = weights_lib.fetch(weights_lib.VGG16, vgg_path or None)
    lin_file = weights_lib.fetch(weights_lib.LPIPS_VGG, lpips_path or None)
    vgg = weights_lib.flatten_state_dict(weights_lib.load_pth(vgg_file))
    lins = weights_lib.flatten_state_dict(weights_lib.load_pth(lin_file))
    model = from_torch_states(vgg, lins, f"LPIPS weights {vgg_file}, {lin_file}", precision)
    return model, {"vgg16": vgg_file, "lpips": lin_file}
