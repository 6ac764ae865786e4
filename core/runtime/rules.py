"""The default logical-axis sharding rules, without JAX: configs import them (core/runtime/mesh.py
applies them)."""

# Logical axis -> mesh axes. FSDP shards the model width, tensor parallelism the MLP/heads.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("codebook", None),
    ("kv", None),
    ("patch", None),
)
