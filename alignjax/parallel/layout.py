"""Layouts: how a run places its state and batch on the devices (`parallel:` in the config).

    parallel: {mode: auto, data: 0}                      # default: resolved per machine (below)
    parallel: {mode: pmap, data: 0}                      # pmap over all local devices
    parallel: {mode: mesh, data: 2, fsdp: 4, tensor: 1}  # jit over a 2 x 4 x 1 Mesh(data, fsdp, tensor)

`mode: auto` is resolved before the config is written (`ParallelConfig.resolve`): mesh where the degrees
ask for it (fsdp != 1 or tensor > 1), on a GPU or TPU, or across several processes; pmap on a single
CPU process (the layout the committed studies were run with, bitwise).

`data: 0` means "all devices that fsdp x tensor leave". In `mesh` mode the mesh spans every process's
devices (multi-host: `parallel.distributed`), the state is sharded by `rules.state_shardings`, and
the batch rows are split over BATCH = (data, fsdp): the step calls `constrain_batch` on its inputs.
`check_model_fits_layout` rejects, before anything compiles, a mesh that does not match the devices
and degrees that do not divide the batch, the heads, the KV heads, the hidden or the MLP size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignjax.parallel.axes import BATCH, DATA, FSDP, MESH_AXES, TENSOR
from alignjax.parallel.collectives import axis_index

MODES = ("auto", "pmap", "mesh")
ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """`mode`: pmap (data parallel, replicated state), mesh (jit + NamedSharding) or auto (`resolve`
    picks one per machine). `data`, `fsdp`,
    `tensor`: the degrees (pmap: data only). One of data and fsdp may be 0: the devices the other
    degrees leave (data 0 is the default; fsdp 0 with data 0 means data 1). `coordinator`,
    `num_processes`, `process_id`: multi-host start-up (`parallel.distributed`; "" / 0 / -1 = from the
    environment, else one process)."""

    mode: Literal["auto", "pmap", "mesh"] = "auto"
    data: int = 0
    fsdp: int = 1
    tensor: int = 1
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"parallel.mode={self.mode!r}: choose one of {MODES}")
        if self.data < 0 or self.fsdp < 0 or self.tensor < 1:
            raise ValueError(f"parallel: need data >= 0, fsdp >= 0 (0 = the rest) and tensor >= 1, got "
                             f"data={self.data} fsdp={self.fsdp} tensor={self.tensor}")
        if self.num_processes < 0:
            raise ValueError(f"parallel.num_processes must be >= 0, got {self.num_processes}")
        if self.mode == "pmap" and (self.fsdp > 1 or self.tensor > 1):  # fsdp 0: "the rest", none here
            raise ValueError(f"parallel.mode=pmap is data parallel only: fsdp={self.fsdp} and "
                             f"tensor={self.tensor} need parallel.mode=mesh")

    def resolve(self, backend: str, process_count: int = 1) -> ParallelConfig:
        """`mode: auto` made explicit for this machine (an explicit pmap or mesh is kept):

        - mesh when the degrees shard the state (fsdp != 1, i.e. 0 = "the rest" or > 1, or tensor > 1);
        - mesh on a GPU or TPU backend (one jit over NamedShardings, the state donated and kept on the
          devices; pmap replicates it on every device) and across processes (a global mesh);
        - pmap on a single CPU process: the layout of the committed studies and of the resume tests
          (mesh agrees with it within 1e-5, not bitwise; tests/test_parallel.py).
        """
        if self.mode != "auto":
            return self
        shards = self.fsdp != 1 or self.tensor > 1
        mesh = shards or backend in ACCELERATOR_BACKENDS or process_count > 1
        return dataclasses.replace(self, mode="mesh" if mesh else "pmap")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A resolved layout: the config, and the pmap devices or the mesh."""

    cfg: ParallelConfig
    devices: tuple  # pmap: the local devices of the data axis; mesh: every device of the mesh
    mesh: Mesh | None = None

    @property
    def is_mesh(self) -> bool:
        return self.mesh is not None

    @property
    def batch_shards(self) -> int:
        """How many ways the batch rows are split."""
        if self.mesh is None:
            return len(self.devices)
        return self.mesh.shape[DATA] * self.mesh.shape[FSDP]

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def describe(self) -> str:
        if self.mesh is None:
            return f"pmap over {len(self.devices)} device(s)"
        return "mesh " + " x ".join(f"{a} {self.mesh.shape[a]}" for a in MESH_AXES)


def make_layout(cfg: ParallelConfig, devices: list | None = None) -> Layout:
    """The Layout of `cfg` on `devices` (pmap: the local devices; mesh: all devices of all processes).

    Raises ValueError naming the axis and the sizes when the degrees do not fit the device count. A
    `mode: auto` config is resolved here for this process's backend (`ParallelConfig.resolve`)."""
    cfg = cfg.resolve(jax.default_backend(), jax.process_count())
    if cfg.mode == "pmap":
        local = list(devices if devices is not None else jax.local_devices())
        n = cfg.data or len(local)
        if n > len(local):
            raise ValueError(f"parallel.data={n} but this process has only {len(local)} local devices")
        return Layout(cfg, tuple(local[:n]))
    devs = list(devices if devices is not None else jax.devices())
    if cfg.fsdp == 0:  # fsdp takes the devices that data (default 1) x tensor leave
        data = cfg.data or 1
        if len(devs) % (data * cfg.tensor):
            raise ValueError(f"parallel: data x tensor = {data} x {cfg.tensor} does not divide the "
                             f"{len(devs)} devices (fsdp=0 takes the rest)")
        cfg = dataclasses.replace(cfg, data=data, fsdp=len(devs) // (data * cfg.tensor))
    inner = cfg.fsdp * cfg.tensor
    if len(devs) % inner:
        raise ValueError(f"parallel: fsdp x tensor = {cfg.fsdp} x {cfg.tensor} = {inner} does not divide "
                         f"the {len(devs)} devices")
    data = cfg.data or len(devs) // inner
    if data * inner != len(devs):
        raise ValueError(f"parallel: the mesh data x fsdp x tensor = {data} x {cfg.fsdp} x {cfg.tensor} = "
                         f"{data * inner} devices, but there are {len(devs)} (set parallel.data=0 to use "
                         "all that fsdp x tensor leave)")
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh((data, cfg.fsdp, cfg.tensor), MESH_AXES, axis_types, devices=devs)
    return Layout(cfg, tuple(devs), mesh)


def check_model_fits_layout(layout: Layout, batch_size: int, model_configs: dict[str, Any]) -> None:
    """Reject degrees that do not divide what they split (before anything compiles).

    model_configs: name -> LMConfig (num_heads, num_kv_heads, hidden_size, intermediate_size)."""
    shards = layout.batch_shards
    if batch_size % shards:
        what = "data" if layout.mesh is None else \
            f"data x fsdp = {layout.mesh.shape[DATA]} x {layout.mesh.shape[FSDP]}"
        raise ValueError(f"game.batch_size={batch_size} is not divisible by the {shards} batch shards "
                         f"({what})")
    if layout.mesh is None:
        return
    fsdp, tensor = layout.mesh.shape[FSDP], layout.mesh.shape[TENSOR]
    for name, c in model_configs.items():
        for axis, degree, field in ((TENSOR, tensor, "num_heads"), (TENSOR, tensor, "num_kv_heads"),
                                    (TENSOR, tensor, "intermediate_size"), (FSDP, fsdp, "hidden_size")):
            size = getattr(c, field)
            if size % degree:
                raise ValueError(f"parallel.{axis}={degree} does not divide the {name}'s {field}={size}")


def constrain_batch(tree: Any) -> Any:
    """Split the leading (row) axis of every leaf over BATCH when tracing under a mesh (`jax.set_mesh`);
    the identity otherwise (pmap, one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH) <= set(mesh.axis_names):
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, PartitionSpec(BATCH)), tree)


def row_offset(local_rows: int, axis_name: str | None) -> jax.Array:
    """Global index of this device's first batch row: d * local_rows under pmap, 0 under jit/mesh
    (where the arrays are global)."""
    return jnp.asarray(axis_index(axis_name), jnp.int32) * local_rows


def place(tree: Any, shardings: Any) -> Any:
    """Host (NumPy) leaves -> global jax.Arrays with the given shardings. Each process passes the same
    host values and places only its addressable shards (works multi-host). Every shard is a fresh
    copy: on the CPU backend a device buffer may alias host memory, and two leaves that share one
    host array (a policy and its reference at step 0) must not share a buffer that gets donated."""
    def one(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: np.array(x[idx]))

    return jax.tree.map(one, tree, shardings)


def fetch(tree: Any) -> Any:
    """Replicated (or single-device) jax.Arrays -> host NumPy, from this process's first shard (no
    cross-host transfer; every device holds the same values)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)
