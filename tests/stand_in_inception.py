"""A small stand-in for the FID Inception, with the interface of trained/evaluation.py's
`inception_apply(path, mesh, pipeline)`: on 2 CPU cores one 2048-d sqrtm takes tens of seconds.
The real network is checked against pytorch-fid and torch-fidelity in test_inception*.py."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visual_tokenizers.core.evaluation import metrics


class StandInInception(nnx.Module):
    """uint8 images -> {'pool': [B, 24], 'logits': [B, 10], 'spatial': [B, 12]}; fixed seeded
    random weights. The pipelines differ in scaling and resize (as the real ones do), so a
    number computed with the wrong pipeline shows."""

    def __init__(self, pipeline="pytorch_fid"):
        rng = np.random.default_rng(0)
        self.pipeline = pipeline
        self.w = nnx.Param(jnp.asarray(rng.normal(0, 0.3, (48, 24)), jnp.float32))
        self.v = nnx.Param(jnp.asarray(rng.normal(0, 1.0, (24, 10)), jnp.float32))
        self.u = nnx.Param(jnp.asarray(rng.normal(0, 0.3, (48, 12)), jnp.float32))

    def __call__(self, images):
        adm = self.pipeline == "adm"
        x = images.astype(jnp.float32)
        x = (x - 128) / 128 if adm else x / 127.5 - 1
        x = jax.image.resize(x, (len(images), 4, 4, 3), "nearest" if adm else "area")
        x = x.reshape(len(images), -1)
        pool = jnp.tanh(x @ self.w[...])
        return {"pool": pool, "logits": pool @ self.v[...], "spatial": jnp.tanh(x @ self.u[...])}


def stand_in_inception_apply(path, mesh, pipeline="pytorch_fid"):
    """What evaluation.inception_apply returns, for the stand-in network."""
    assert path == "inception.pth"  # The configured weights path reaches the loader.
    net = StandInInception(pipeline)
    return metrics.ShardedApply(net, lambda m, x: m(x), mesh), "stand-in"


def features(images, pipeline="pytorch_fid"):
    """The stand-in's outputs computed directly (eagerly, unsharded)."""
    return jax.tree.map(np.asarray, StandInInception(pipeline)(jnp.asarray(images)))


def stand_in_dinov2_apply(path, mesh):
    """What evaluation.dinov2_apply returns, for a stand-in: 'cls' = twice the adm pool."""
    assert path == "dinov2.pth"  # The configured weights path reaches the loader.
    net = StandInInception("adm")
    return metrics.ShardedApply(net, lambda m, x: {"cls": 2 * m(x)["pool"]}, mesh), "stand-in"
