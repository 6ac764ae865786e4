"""Device mesh, logical-axis rules and multi-host start-up.

One mesh with axes ('data', 'fsdp', 'model') is built from `config.mesh`. Parameters carry
logical axis names ('embed', 'mlp', 'heads', 'codebook', ...) in their flax metadata;
`config.sharding_rules` maps each logical name to mesh axes. A logical axis whose size does not
divide evenly over its mesh axes is replicated instead, so tiny CPU models run on any mesh.
Batches are sharded over ('data', 'fsdp').
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.runtime.rules import DEFAULT_RULES  # noqa: F401  (re-exported)

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Environment variables that tell us we are one of several processes.
_MULTIPROCESS_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
)


def _env_says_multiprocess() -> bool:
    for name in _MULTIPROCESS_ENV:
        value = os.environ.get(name)
        if not value:
            continue
        if name == "TPU_WORKER_HOSTNAMES":
            if "," in value:
                return True
        elif name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
            if value.isdigit() and int(value) > 1:
                return True
        else:
            return True
    return False


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts jax.distributed when this is one process of several; a no-op otherwise."""
    explicit = coordinator_address is not None
    if not explicit and not _env_says_multiprocess():
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU-only processes (tests, laptops) need a collectives backend to talk to each other.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if explicit:
        kwargs = dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Fills in the one -1 entry of {'data': .., 'fsdp': .., 'model': ..}."""
    unknown = [k for k in shape if k not in MESH_AXES]
    if unknown:
        raise ConfigError(f"config.mesh has unknown axes {unknown}; valid axes: {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ConfigError(f"config.mesh {dict(shape)}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % known:
            raise ConfigError(
                f"config.mesh {dict(shape)} does not divide {num_devices} devices; "
                "change the fixed axis sizes"
            )
        sizes[free[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"config.mesh {dict(shape)} needs {math.prod(sizes)} devices but {num_devices} "
            "are present; set one axis to -1 to use the rest"
        )
    return tuple(sizes)


def make_mesh(shape: Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    sizes = resolve_mesh_shape(shape, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_mesh_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]],
) -> P:
    """Maps logical axis names to a PartitionSpec, replicating axes that do not divide."""
    if not logical:
        return P()
    rule_map = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape, strict=True):
        target = rule_map.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if not axes or dim % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _variable_names(variable) -> tuple | None:
    metadata = variable.get_metadata()
    return metadata.get("out_sharding") or metadata.get("sharding_names")


def param_shardings(state: nnx.State, mesh: Mesh, rules) -> dict:
    """Pure-dict tree of NamedShardings for an (abstract) nnx.State, from logical names."""

    def one(variable):
        value = variable.get_value()
        spec = logical_to_mesh_spec(_variable_names(variable), value.shape, mesh, rules)
        return NamedSharding(mesh, spec)

    shardings = jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.State(shardings).to_pure_dict() if isinstance(shardings, nnx.State) else shardings


def shardings_like(tree, reference: dict, mesh: Mesh):
    """Shardings for a tree (optimizer state, EMA, ...) whose leaves mirror `reference`.

    A leaf whose key path ends with the key path of a reference leaf of the same shape gets that
    leaf's sharding (optax's mu/nu mirror the params); everything else is replicated.
    """
    by_path = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(reference)[0]:
        by_path[_plain_path(path)] = sharding
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        keys = _plain_path(path)
        for start in range(len(keys)):
            sharding = by_path.get(keys[start:])
            if sharding is not None and len(sharding.spec) <= len(np.shape(leaf)):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def _plain_path(path) -> tuple:
    keys = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                keys.append(getattr(entry, attr))
                break
    # nnx.Variable nodes add a trailing 'value' attribute; it carries no meaning here.
    if keys and keys[-1] == "value":
        keys.pop()
    return tuple(keys)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_parallelism(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_sizes(mesh: Mesh, sizes: Mapping[str, int]) -> None:
    """Every global batch must split evenly over the data x fsdp devices; names the config key."""
    parallel = batch_parallelism(mesh)
    for name, size in sizes.items():
        if size % parallel:
            raise ConfigError(
                f"config.{name}={size} must be a multiple of the data x fsdp mesh size {parallel}"
            )


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """Turns this process's slice of the batch into global arrays sharded over the batch axes."""
    return {
        key: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)), value)
        for key, value in batch.items()
    }


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in process-local order."""
    parts = {}
    for shard in array.addressable_shards:  # Replicas (model axis) share a start: keep one.
        parts.setdefault(shard.index[0].start or 0, shard)
    return np.concatenate([np.asarray(parts[k].data) for k in sorted(parts)])
