"""The FID Inception: InceptionV3 as pytorch-fid runs it (a port of the 2015 TF graph).

Differences from torchvision's InceptionV3, all reproduced here: 1008 output classes; in
Mixed_5b-d, 6b-e and 7b the pool branch averages without counting the zero padding; in Mixed_7c
the pool branch is a 3x3 max-pool. Every conv is conv (no bias) + BatchNorm (eps 1e-3) + ReLU.

Two feature pipelines feed the same network (`PIPELINES`, chosen with `preprocess(images,
pipeline)`); they differ only in how uint8 images become the 299x299 input:
- "adm": the ADM evaluator (guided-diffusion evaluations/evaluator.py) and the original TF FID,
  i.e. the 2015 TF graph's own ResizeBilinear (TF1, align_corners=False, no half-pixel centres)
  on [0, 255], then (x - 128) / 128. torch-fidelity's FeatureExtractorInceptionV3 reimplements
  exactly this; ADM reference batches (mu, sigma, mu_s, sigma_s) were made with it.
- "pytorch_fid": pytorch-fid's: [0, 1], torch bilinear (half-pixel centres, no antialias), 2x - 1.

`FIDInception(x)` returns 'pool' (2048-d pool3: FID, precision/recall, KID), 'logits' (1008,
pool3 @ W without the fc bias, as the original IS code, ADM and torch-fidelity's
`logits_unbiased` compute them: Inception Score) and 'spatial' (ADM's sFID features).
Weights come from pytorch-fid's file via `load_fid_inception`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visual_tokenizers.core import weights as weights_lib
from visual_tokenizers.core.errors import ConfigError

PIPELINES = ("adm", "pytorch_fid")
INPUT_SIZE = 299
BN_EPS = 1e-3
# FID must not depend on an accelerator's default reduced-precision matmuls.
PRECISION = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- preprocessing


@functools.cache
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's bilinear interpolation (align_corners=False, no antialias).

    Source coordinate (i + 0.5) * in/out - 0.5, clamped below at 0; the upper neighbour is
    clamped to the last pixel. Downscaling therefore samples, as torch does, without a low-pass.
    """
    # float32 arithmetic, as torch computes the source index for float32 images.
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + 0.5) * scale - 0.5, 0).astype(
        np.float32
    )
    return _interpolation_matrix(src, in_size)


def _interpolation_matrix(src: np.ndarray, in_size: int) -> np.ndarray:
    """[out, in] linear interpolation at float32 source coordinates `src` (>= 0): the lower
    neighbour floor(src), the upper one clamped to the last pixel."""
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo).astype(np.float32)
    matrix = np.zeros((len(src), in_size), np.float32)
    np.add.at(matrix, (np.arange(len(src)), lo), np.float32(1) - frac)
    np.add.at(matrix, (np.arange(len(src)), hi), frac)
    return matrix


@functools.cache
def tf1_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of TF1's ResizeBilinear (align_corners=False, half_pixel_centers=False).

    TensorFlow's kernel (tensorflow/core/kernels/resize_bilinear_op.cc,
    compute_interpolation_weights with LegacyScaler; scale from image_resizer_state.h,
    CalculateResizeScale = float(in) / out): source in = float32(i) * scale, no half-pixel
    offset; lower = floor(in), upper = min(ceil(in), in - 1), lerp = in - floor(in). Here upper
    is lower + 1 (clamped), which gives the same weights (lerp is 0 when in is whole), as
    torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x does. An input already 299 wide
    maps each pixel to itself (scale 1): the graph resizes anyway, a no-op.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) * scale).astype(np.float32)
    return _interpolation_matrix(src, in_size)


def _resize(x, matrix_fn):
    rows = matrix_fn(x.shape[1], INPUT_SIZE)
    cols = matrix_fn(x.shape[2], INPUT_SIZE)
    return jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols, precision=PRECISION)


def preprocess(images_uint8, pipeline: str = "pytorch_fid") -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 [B, 299, 299, 3], the network input of `pipeline`.

    "pytorch_fid": [0, 1], torch bilinear, then 2x - 1 (pytorch-fid's InceptionV3.forward).
    "adm": float32 [0, 255] (ADM's evaluator feeds batch.astype(np.float32) to the graph's
    ExpandDims:0), TF1 bilinear, then (x - 128) / 128 (the graph's Sub 128 and Mul 1/128, exact
    in float32; torch-fidelity writes (x - 128) / 128). Neither clamps: bilinear weights are
    convex, so values stay in range.
    """
    if pipeline == "pytorch_fid":
        x = _resize(jnp.asarray(images_uint8, jnp.float32) / 255.0, bilinear_matrix)
        return 2.0 * x - 1.0
    if pipeline == "adm":
        x = _resize(jnp.asarray(images_uint8, jnp.float32), tf1_bilinear_matrix)
        return (x - 128.0) / 128.0
    raise ConfigError(f"unknown Inception feature pipeline {pipeline!r}; use one of {PIPELINES}")


# ----------------------------------------------------------------------------- layers


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nnx.Module):
    """conv (no bias) + inference BatchNorm (eps 1e-3) + ReLU; torch names conv.*, bn.*."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        kh, kw = _pair(kernel)
        self.stride, self.padding = _pair(stride), _pair(padding)
        # Zeros: real values always come from a weights file (see load_fid_inception).
        self.kernel = nnx.Param(jnp.zeros((kh, kw, cin, cout), jnp.float32))
        self.scale = nnx.Param(jnp.ones((cout,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.mean = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.var = nnx.Param(jnp.ones((cout,), jnp.float32))

    def __call__(self, x):
        (ph, pw) = self.padding
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...],
            window_strides=self.stride,
            padding=((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=PRECISION,
        )
        gain = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
        return jax.nn.relu(y * gain + (self.bias[...] - self.mean[...] * gain))

    def torch_weights(self, state: dict, prefix: str, what: str) -> dict:
        """This layer's arrays from a torch state dict (OIHW kernels become HWIO)."""
        kh, kw, cin, cout = self.kernel.shape
        kernel = weights_lib.require(state, f"{prefix}.conv.weight", (cout, cin, kh, kw), what)
        bn = {k: weights_lib.require(state, f"{prefix}.bn.{k}", (cout,), what) for k in _BN}
        return {
            "kernel": kernel.transpose(2, 3, 1, 0),
            "scale": bn["weight"],
            "bias": bn["bias"],
            "mean": bn["running_mean"],
            "var": bn["running_var"],
        }


_BN = ("weight", "bias", "running_mean", "running_var")


def max_pool(x, size=3, stride=2, padding=0):
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), pads
    )


def avg_pool_valid_only(x):
    """3x3 stride-1 average that ignores the zero padding (TF's, count_include_pad=False)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pads)
    return total / count


# ----------------------------------------------------------------------------- blocks


class InceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int):
        self.branch1x1 = BasicConv(cin, 64, 1)
        self.branch5x5_1 = BasicConv(cin, 48, 1)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(cin, pool_features, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_valid_only(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nnx.Module):
    def __init__(self, cin: int):
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool(x)], -1)


class InceptionC(nnx.Module):
    def __init__(self, cin: int, c7: int):
        self.branch1x1 = BasicConv(cin, 192, 1)
        self.branch7x7_1 = BasicConv(cin, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(cin, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            bd = layer(bd)
        bd = self.branch7x7dbl_5(bd)
        bp = self.branch_pool(avg_pool_valid_only(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nnx.Module):
    def __init__(self, cin: int):
        self.branch3x3_1 = BasicConv(cin, 192, 1)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([b3, b7, max_pool(x)], -1)


class InceptionE(nnx.Module):
    """Mixed_7b (average pool, padding not counted) or Mixed_7c (max pool: the FID quirk)."""

    def __init__(self, cin: int, max_pool_branch: bool):
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv(cin, 320, 1)
        self.branch3x3_1 = BasicConv(cin, 384, 1)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(cin, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], -1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], -1)
        pooled = max_pool(x, 3, 1, 1) if self.max_pool_branch else avg_pool_valid_only(x)
        return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], -1)


# ----------------------------------------------------------------------------- network

NUM_CLASSES = 1008
POOL_DIM = 2048
# ADM's sFID features (guided-diffusion evaluations/evaluator.py): the graph tensor
# FID_SPATIAL_NAME = "mixed_6/conv:0", sliced `spatial[..., :7]`, reshaped [N, -1] in TF's NHWC
# order: [17, 17, 7] -> 2023. Which layer that is:
# - the TF graph names its blocks mixed, mixed_1, ..., mixed_10 = Mixed_5b, 5c, 5d, 6a, 6b, 6c,
#   6d, 6e, 7a, 7b, 7c; torch-fidelity's utils/util_convert_inception_weights.py maps
#   "mixed_6/conv/conv2d_params" and "mixed_6/conv/batchnorm" to Mixed_6d.branch1x1 (the 1x1
#   branch, concatenated first: the block output's first 192 channels are that branch).
# - After BN and ReLU: in that graph the scope mixed_6/conv holds conv2d_params, Conv2D and
#   batchnorm/* (graph dumps that read gname + "/Conv2D", gname + "/batchnorm/gamma"), so the op
#   named mixed_6/conv itself is the layer's last op, the ReLU that feeds the concat. This is
#   read from the graph's naming, not from running the graph (no TF here); a direct check:
#   every entry of an ADM reference batch's mu_s is >= 0 after a ReLU.
SPATIAL_BLOCK = "6d"
SPATIAL_CHANNELS = 7


class FIDInception(nnx.Module):
    """299x299 input (see `preprocess`) -> {'pool': [B, 2048], 'logits': [B, 1008] (unbiased),
    'spatial': [B, 2023] (ADM's sFID features)}."""

    def __init__(self):
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)
        # Only the fc weight: the original IS code, ADM and torch-fidelity use pool3 @ W; the
        # file's fc.bias is never read.
        self.fc_kernel = nnx.Param(jnp.zeros((POOL_DIM, NUM_CLASSES), jnp.float32))

    def __call__(self, x) -> dict:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x)))
        x = max_pool(x)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
            if name == SPATIAL_BLOCK:  # First channels of the block = its branch1x1 (see above).
                spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        pool = x.mean(axis=(1, 2))
        logits = jnp.dot(pool, self.fc_kernel[...], precision=PRECISION)
        return {"pool": pool, "logits": logits, "spatial": spatial}


def from_torch_state(state: dict, what: str = "FID Inception weights") -> FIDInception:
    """Builds the network from a torchvision-named state dict (pytorch-fid's file layout)."""
    net = nnx.eval_shape(FIDInception)  # Shapes only: nothing is allocated twice.
    graphdef, abstract = nnx.split(net)
    values = {}
    for path, module in nnx.iter_modules(net):
        if isinstance(module, BasicConv):
            prefix = ".".join(str(p) for p in path)
            for key, value in module.torch_weights(state, prefix, what).items():
                values[(*path, key)] = jnp.asarray(value, jnp.float32)
    fc_w = weights_lib.require(state, "fc.weight", (NUM_CLASSES, POOL_DIM), what)
    values[("fc_kernel",)] = jnp.asarray(fc_w.T, jnp.float32)
    flat = abstract.flat_state()
    missing = [p for p, _ in flat if tuple(p) not in values]
    if missing:
        raise KeyError(f"{what}: no weights for {missing[:3]}")
    pure = {}
    for path, _ in flat:
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = values[tuple(path)]
    nnx.replace_by_pure_dict(abstract, pure)
    return nnx.merge(graphdef, abstract)


def load_fid_inception(path: str | None = None) -> tuple[FIDInception, str]:
    """(network, weights file path): pytorch-fid's weights from `path` or the cache."""
    file = weights_lib.fetch(weights_lib.FID_INCEPTION, path or None)
    state = weights_lib.flatten_state_dict(weights_lib.load_pth(file))
    return from_torch_state(state, f"FID Inception weights {file}"), file
