"""A small convnet that classifies `builtin:shapes` images: the offline quality signal.

It never sees Inception weights, so CPU-only runs can still judge generated or reconstructed
shapes: `shapes_accuracy` (does the image show the intended class?) and `shapes_fd` (Fréchet
distance between its penultimate features of two image sets). These are NOT FID.

Layout: 2x2 stride-2 patch stem; 3x3 convs that widen, each followed by a 2x2 max-pool;
`final_convs` more 3x3 convs at the last size; BatchNorm + ReLU throughout; a global max-pool
(position-invariant: it learnt far faster than a flatten head); one hidden layer (the features)
and the class logits. Input is uint8 NHWC; other sizes are resized to `image_size` first, so one
classifier serves every resolution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ShapesClassifier(nnx.Module):
    def __init__(
        self,
        *,
        num_classes: int = 10,
        widths: tuple[int, ...] = (16, 32, 64),
        final_convs: int = 1,
        hidden: int = 128,
        image_size: int = 32,
        bn_momentum: float = 0.9,
        seed: int = 0,
    ):
        rngs = nnx.Rngs(seed)
        self.image_size = image_size
        self.stem = nnx.Conv(3, widths[0], (2, 2), strides=2, padding="VALID", rngs=rngs)
        norms = [nnx.BatchNorm(widths[0], momentum=bn_momentum, rngs=rngs)]
        convs = []
        channels = list(zip(widths[:-1], widths[1:], strict=True))
        channels += [(widths[-1], widths[-1])] * final_convs
        for cin, cout in channels:
            convs.append(nnx.Conv(cin, cout, (3, 3), rngs=rngs))
            norms.append(nnx.BatchNorm(cout, momentum=bn_momentum, rngs=rngs))
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.pooled = len(widths) - 1  # Convs followed by a 2x2 max-pool; the rest keep size.
        self.hidden = nnx.Linear(widths[-1], hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def _prepare(self, images):
        x = jnp.asarray(images, jnp.float32)
        if x.shape[1:3] != (self.image_size, self.image_size):
            shape = (x.shape[0], self.image_size, self.image_size, x.shape[3])
            x = jax.image.resize(x, shape, "bilinear", antialias=True)
        x = x / 127.5 - 1.0
        # Removing each image's mean colour: the classes do not depend on it, and the random
        # backgrounds otherwise dominate the first layer's input.
        return x - x.mean(axis=(1, 2), keepdims=True)

    def features(self, images, train: bool = False):
        """Penultimate features [B, hidden] of uint8 NHWC images."""
        x = self._prepare(images)
        x = jax.nn.relu(self.norms[0](self.stem(x), use_running_average=not train))
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms[1:], strict=True)):
            x = jax.nn.relu(norm(conv(x), use_running_average=not train))
            if i < self.pooled:
                x = nnx.max_pool(x, (2, 2), (2, 2))
        return jax.nn.relu(self.hidden(x.max(axis=(1, 2))))

    def __call__(self, images, train: bool = False):
        """Class logits [B, num_classes]."""
        return self.head(self.features(images, train))

    def features_and_logits(self, images):
        """Both outputs of one inference pass: {'features', 'logits'}."""
        feats = self.features(images)
        return {"features": feats, "logits": self.head(feats)}
