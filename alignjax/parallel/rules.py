"""Partition rules of the Llama-family parameters, and the shardings of a whole state pytree.

A leaf is named by the last dict key on its path (`layers/wq`, an Adam moment `.../mu/layers/wq` and
a critic's `backbone/layers/wq` are all "wq"), so optimizer states follow their params and critics
follow their policies with one table. Layer weights carry the stacked layer axis L first (unsplit).

    name                 shape            spec
    embed                [V, D]           (TENSOR, FSDP)
    lm_head              [D, V]           (FSDP, TENSOR)
    wq, wk, wv           [L, D, H*hd]     (None, FSDP, TENSOR)     bq, bk, bv  [L, H*hd]  (None, TENSOR)
    wo                   [L, H*hd, D]     (None, TENSOR, FSDP)
    w_gate, w_up         [L, D, F]        (None, FSDP, TENSOR)     b_gate, b_up [L, F]    (None, TENSOR)
    w_down               [L, F, D]        (None, TENSOR, FSDP)
    critic head kernel   [D]              (FSDP,)
    norms, other biases, scalars, counters, histories, keys: replicated

FSDP splits the hidden size D (so each device stores 1/fsdp of every matrix and its Adam moments);
TENSOR splits heads, the MLP width and the vocabulary (Megatron's column / row split). A dimension
that the axis size does not divide stays unsplit on that axis (`layout.check_model_fits_layout`
rejects the cases that matter first: heads, KV heads, hidden and MLP sizes). With a leading seed
axis (vmapped seeds), every spec gets a leading None.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignjax.parallel.axes import FSDP, TENSOR

_COL = (None, FSDP, TENSOR)  # [L, D, out]: input dim over FSDP, output dim over TENSOR
_ROW = (None, TENSOR, FSDP)  # [L, in, D]
_BIAS = (None, TENSOR)

LLAMA_RULES: dict[str, tuple] = {
    "embed": (TENSOR, FSDP),
    "lm_head": (FSDP, TENSOR),
    "wq": _COL, "wk": _COL, "wv": _COL, "w_gate": _COL, "w_up": _COL,
    "wo": _ROW, "w_down": _ROW,
    "bq": _BIAS, "bk": _BIAS, "bv": _BIAS, "b_gate": _BIAS, "b_up": _BIAS,
    "kernel": (FSDP,),  # the critic's value head [D]
}


def _leaf_name(path) -> str | None:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(names[-1]) if names else None


def partition_spec(path, shape: tuple[int, ...], mesh_shape: dict[str, int],
                   leading_none: int = 0) -> PartitionSpec:
    """The PartitionSpec of one leaf (see the module table). `leading_none` extra leading axes
    (a seed axis) stay unsplit; a dimension its axis does not divide stays unsplit."""
    rule = LLAMA_RULES.get(_leaf_name(path))
    body = shape[leading_none:]
    if rule is None or len(rule) != len(body):
        return PartitionSpec()
    spec = [ax if ax is None or (mesh_shape.get(ax, 1) > 1 and dim % mesh_shape[ax] == 0) else None
            for ax, dim in zip(rule, body, strict=True)]
    spec = [None] * leading_none + [ax if ax is None or mesh_shape.get(ax, 1) > 1 else None for ax in spec]
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def state_shardings(tree: Any, mesh: Mesh, seed_axis: Any = None) -> Any:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the rules.

    seed_axis: None, or a pytree prefix of `tree` with 0 where a leaf has a leading seed axis (the
    loop's `seed_axes`) and None where it has not."""
    mesh_shape = dict(mesh.shape)

    def one(path, x, lead=0):
        return NamedSharding(mesh, partition_spec(path, tuple(np.shape(x)), mesh_shape, lead))

    if seed_axis is None:
        return jax.tree_util.tree_map_with_path(one, tree)
    # seed_axis is a prefix (one entry per top-level field): broadcast it to the leaves
    leads = jax.tree.map(lambda a, sub: jax.tree.map(lambda _: 0 if a is not None else None, sub),
                         seed_axis, tree, is_leaf=lambda a: a is None)
    return jax.tree_util.tree_map_with_path(
        lambda path, x, lead: one(path, x, 1 if lead == 0 else 0), tree, leads)


def bytes_per_device(tree: Any, shardings: Any = None) -> int:
    """Bytes one device stores of `tree`: the largest per-device total over the mesh.

    From the arrays' own shards (`addressable_shards`) when `shardings` is None, else from the given
    shardings applied to the leaves' shapes (ShapeDtypeStructs suffice: nothing is allocated)."""
    totals: dict[Any, int] = {}
    if shardings is None:
        for x in jax.tree.leaves(tree):
            for s in x.addressable_shards:
                totals[s.device] = totals.get(s.device, 0) + s.data.nbytes
        return max(totals.values(), default=0)
    for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        shard = sh.shard_shape(tuple(x.shape))
        nbytes = int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        for dev in sh.device_set:
            totals[dev] = totals.get(dev, 0) + nbytes
    return max(totals.values(), default=0)
