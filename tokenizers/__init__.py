"""Tokenizers: quantizers (one family per file) and the encoder -> quantizer -> decoder model."""

from flax import nnx

# Parameters carry logical axis names only; core/runtime/mesh.py turns them into shardings when the
# jitted init places them on the mesh, so variables must not try to shard themselves eagerly.
nnx.use_eager_sharding(False)
