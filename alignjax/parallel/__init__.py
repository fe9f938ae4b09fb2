"""The one parallel layer: axis names, layouts (pmap or a device mesh), partition rules, collectives.

Everything else in alignjax names axes and moves data between devices through this package:

    axes.py         DATA, FSDP, TENSOR and BATCH = (DATA, FSDP): the names, defined once
    layout.py       ParallelConfig (`parallel: {mode, data, fsdp, tensor}`), its checks against the
                    devices, the batch and the models, mesh construction, batch constraints, placing
                    a host state on the mesh and fetching replicated results
    rules.py        partition rules of the Llama-family parameters; optimizer states follow their
                    params; per-device byte counts
    collectives.py  pmap's data parallelism: psum / pmean / all_gather / axis_index over DATA (identity
                    without an axis), shard / replicate helpers
    distributed.py  multi-host start-up (`jax.distributed.initialize` from the config or environment)

Two modes run the same pure step function (game.step.make_play_step):

- `pmap`: every device holds the whole state, the batch is split over DATA, and the step reduces
  with explicit collectives (`axis_name="data"`). For models that fit replicated.
- `mesh`: one `jax.jit` over a Mesh(data, fsdp, tensor) with NamedSharding in/out shardings; the
  state is sharded by `rules`, the batch over BATCH, buffers are donated, and GSPMD inserts the
  collectives (the step runs with `axis_name=None`, as on one device).

Randomness does not depend on the layout: a step's key is a function of (rng, step), a sampled row's
uniform of the global row index, and PPO's minibatch permutation is global; so one device, pmap over
D and any mesh compute the same game up to floating-point summation order.
"""

from alignjax.parallel.axes import BATCH, DATA, DATA_AXIS, FSDP, TENSOR
from alignjax.parallel.collectives import (
    all_gather,
    axis_index,
    axis_size,
    device_keys,
    first_replica,
    num_devices,
    pmap,
    pmap_sharding,
    pmean,
    psum,
    replicate,
    replicate_host,
    replicate_on_devices,
    shard,
    to_host,
    unreplicate,
    unshard,
)
from alignjax.parallel.layout import (
    Layout,
    ParallelConfig,
    check_model_fits_layout,
    constrain_batch,
    fetch,
    make_layout,
    place,
    row_offset,
)
from alignjax.parallel.rules import bytes_per_device, partition_spec, state_shardings

__all__ = [
    "BATCH", "DATA", "DATA_AXIS", "FSDP", "TENSOR", "Layout", "ParallelConfig", "all_gather",
    "axis_index", "axis_size", "bytes_per_device", "check_model_fits_layout", "constrain_batch",
    "device_keys", "fetch", "make_layout", "num_devices", "partition_spec", "place", "pmap", "pmean",
    "psum", "replicate", "first_replica", "pmap_sharding",
    "replicate_host", "replicate_on_devices", "row_offset", "shard", "state_shardings", "to_host",
    "unreplicate",
    "unshard",
]
