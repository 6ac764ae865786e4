"""Networks without training logic: encoders/decoders, generators, evaluation nets."""

from flax import nnx

# See tokenizers/__init__.py: sharding comes from logical axis names, applied by
# core/runtime/mesh.py.
nnx.use_eager_sharding(False)
