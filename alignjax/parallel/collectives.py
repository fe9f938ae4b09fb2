"""pmap's data parallelism over the DATA axis, and the collectives the step functions call.

Each device holds a slice of the global batch and a replica of the state; inside the mapped
function, gradients and metrics are combined with `lax.psum` / `lax.pmean` over `DATA_AXIS`.

    step = parallel.pmap(make_ppo_update(models, cfg, axis_name=parallel.DATA_AXIS))
    state_r = parallel.replicate(state)                 # [D, ...] on D devices
    batch = parallel.shard(rollout)                     # [D, B / D, ...]
    state_r, metrics = step(state_r, parallel.replicate(ref), batch, parallel.replicate(key))
    metrics = parallel.unreplicate(metrics)             # identical on every device

`shard` splits the leading (batch) axis of every leaf into [D, B / D] in order: device d gets rows
d*B/D .. (d+1)*B/D - 1, so `unshard(shard(x)) == x`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.parallel.axes import DATA_AXIS


def num_devices(devices: Sequence[jax.Device] | None = None) -> int:
    return len(devices) if devices is not None else jax.local_device_count()


def shard(tree: Any, n: int | None = None) -> Any:
    """Split every leaf's leading axis B into [n, B / n] (n = local device count by default)."""
    n = n or jax.local_device_count()

    def split(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(
                f"cannot shard a leaf of shape {tuple(x.shape)} over {n} devices: the leading "
                f"(batch) axis must be divisible by {n}"
            )
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree.map(split, tree)


def unshard(tree: Any) -> Any:
    """Inverse of `shard`: [n, b, ...] -> [n * b, ...]."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), tree)


def replicate(tree: Any, n: int | None = None) -> Any:
    """Stack n copies of every leaf on a new leading axis [n, ...] (pmap's replicated input)."""
    n = n or jax.local_device_count()
    return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n,) + jnp.shape(x)), tree)


def unreplicate(tree: Any) -> Any:
    """The first replica of every leaf: [n, ...] -> [...]."""
    return jax.tree.map(lambda x: x[0], tree)


def to_host(tree: Any) -> Any:
    """Device arrays -> NumPy with strong dtypes (so fresh and restored states compile identically)."""
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def replicate_host(tree: Any, n: int) -> Any:
    """Host copies stacked on a leading device axis [n, ...]: pmap's replicated input, built on the
    host so that pmap places one copy per device (no device-side broadcast of the whole state)."""
    return jax.tree.map(lambda x: np.stack([x] * n), to_host(tree))


def pmean(tree: Any, axis_name: str | None = DATA_AXIS) -> Any:
    """lax.pmean over the axis, or the identity when axis_name is None (single device)."""
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def psum(tree: Any, axis_name: str | None = DATA_AXIS) -> Any:
    """lax.psum over the axis, or the identity when axis_name is None (single device)."""
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def axis_size(axis_name: str | None = DATA_AXIS):
    """Number of devices along the axis (1 when axis_name is None)."""
    return 1 if axis_name is None else jax.lax.psum(1, axis_name)


def axis_index(axis_name: str | None = DATA_AXIS):
    """This device's index along the axis (0 when axis_name is None)."""
    return 0 if axis_name is None else jax.lax.axis_index(axis_name)


def all_gather(x: Any, axis_name: str | None = DATA_AXIS) -> Any:
    """All devices' rows in device order, [b, ...] -> [n * b, ...] (identical on every device)."""
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def device_keys(key: jax.Array, n: int | None = None) -> jax.Array:
    """n independent keys [n, ...], one per device (for per-device sampling); `replicate(key)` gives
    the same key everywhere (for decisions that must agree across devices)."""
    return jax.random.split(key, n or jax.local_device_count())


def pmap(
    fn: Callable, axis_name: str = DATA_AXIS, donate_argnums: int | Sequence[int] = (), **kw
) -> Callable:
    """`jax.pmap(fn, axis_name="data")`: every argument and output carries a leading device axis."""
    return jax.pmap(fn, axis_name=axis_name, donate_argnums=donate_argnums, **kw)


def pmap_sharding(devices: tuple) -> jax.sharding.NamedSharding:
    """The sharding pmap gives its outputs ([n_devices, ...], one replica per device). The initial state
    is placed with it, so the first chunk and the ones fed the previous chunk's outputs share one
    compilation (pmap keys its cache on the inputs' shardings)."""
    mesh = jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def replicate_on_devices(tree, devices: tuple):
    """Host (or device) leaves -> pmap-replicated device arrays [n, ...], one leaf at a time: each
    device gets its copy straight from the host leaf (a broadcast view, never a stacked host copy)."""
    sharding = pmap_sharding(devices)
    n = len(devices)
    def one(x):
        x = np.asarray(x)
        return jax.device_put(x[None] if n == 1 else np.broadcast_to(x, (n, *x.shape)), sharding)

    return jax.tree.map(one, tree)


def first_replica(tree):
    """Replica 0 of a pmap-replicated device tree as host NumPy, leaf by leaf. On the CPU these are
    views of the device buffers (no copy); drop them before the next chunk, which donates the buffers
    (a live view makes XLA copy instead of reusing them)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)
