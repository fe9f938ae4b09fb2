"""Numeric precision of the players (master weights vs compute dtype) and rematerialisation policies.

Mixed precision keeps two dtypes apart:

    params  the dtype the parameters and, with them, the AdamW moments are stored in (the master copy)
    compute the dtype the forward / backward runs in: the floating params are cast to it on entry

    y = f(cast(theta, compute))         d loss / d theta = cast(d loss / d cast(theta), params)

The cast is an ordinary op, so autodiff carries the gradient back through it to the params' dtype, and
optax keeps its moments in that dtype too. With params float32 and compute bfloat16, an update of a
weight w is applied as w + u in float32 (a relative resolution of 2^-24) rather than in bfloat16
(2^-8): at lr 5e-7 and |w| ~ 0.02, |u| / |w| ~ 2.5e-5 is rounded away in bfloat16 but not in float32.

"auto" compute picks bfloat16 on accelerators (GPU/TPU matmul units run it at several times the f32
rate) and float32 on CPU (XLA's CPU backend emulates bf16 dots, which are no faster, and the tests'
reference numerics are float32). The old behaviour, before master weights, is params = compute =
bfloat16 (`PrecisionConfig.legacy_bf16()`).

Rematerialisation (`jax.checkpoint`) trades compute for memory in the backward pass: a layer's
intermediate activations are recomputed from its input instead of being stored from the forward.

    "none"  store every residual of every layer (fastest, the most memory)
    "full"  store only each layer's input h [B, T, D]; recompute the whole layer in the backward
    "dots"  also store the outputs of matmuls without batch dimensions (the q/k/v/o and MLP
            projections, x @ W); recompute the cheap elementwise ops and the attention einsums
            (which have batch dimensions B, H), whose [B, H, T, S] scores dominate at long T
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
COMPUTE_CHOICES = ("auto", *DTYPES)
ACCELERATOR_PLATFORMS = ("gpu", "tpu", "cuda", "rocm")
REMAT_POLICIES = ("none", "full", "dots")


def dtype_of(name: str) -> Any:
    """The jnp dtype named `name` ("float32" or "bfloat16"); ValueError listing the valid names."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    """params: storage dtype of parameters and optimizer moments ("float32" | "bfloat16").
    compute: dtype of the forward/backward ("auto" | "float32" | "bfloat16"); "auto" is resolved per
    platform by `resolve`. Hashable (a static jit argument)."""

    params: str = "float32"
    compute: str = "auto"

    def __post_init__(self):
        if self.params not in DTYPES:
            raise ValueError(f"precision.params must be one of {sorted(DTYPES)}, got {self.params!r}")
        if self.compute not in COMPUTE_CHOICES:
            raise ValueError(
                f"precision.compute must be one of {list(COMPUTE_CHOICES)}, got {self.compute!r}"
            )

    @classmethod
    def legacy_bf16(cls) -> PrecisionConfig:
        """The behaviour before master weights: params, Adam moments and compute all in bfloat16. At
        learning rates ~1e-6 most updates are below bfloat16's resolution and are rounded away."""
        return cls(params="bfloat16", compute="bfloat16")

    def resolve(self, platform: str) -> PrecisionConfig:
        """This config with "auto" compute made concrete: bfloat16 on "gpu" / "tpu" / "cuda" / "rocm",
        float32 on "cpu" (e.g. `platform = jax.default_backend()`)."""
        if self.compute != "auto":
            return self
        p = platform.lower()
        if p in ACCELERATOR_PLATFORMS:
            return dataclasses.replace(self, compute="bfloat16")
        if p == "cpu":
            return dataclasses.replace(self, compute="float32")
        raise ValueError(f"unknown platform {platform!r}; expected 'cpu' or one of {ACCELERATOR_PLATFORMS}")

    @property
    def params_dtype(self) -> Any:
        return dtype_of(self.params)

    @property
    def compute_dtype(self) -> Any:
        """The compute dtype; call `resolve` first when compute is "auto"."""
        if self.compute == "auto":
            raise ValueError('compute is "auto": call resolve(platform) first')
        return dtype_of(self.compute)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """`tree` with every floating leaf cast to `dtype`; integer/bool leaves and leaves already of that
    dtype are returned as they are (no astype, so the default float32 path adds no op to the graph)."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


def remat_policy(name: str) -> Any:
    """The `jax.checkpoint` policy of a remat name (module docstring).

    "none" -> None (the caller does not checkpoint at all); "full" -> None (checkpoint with JAX's
    default: save nothing but the inputs); "dots" ->
    `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`. "none" and "full" both return None:
    tell them apart by name (`maybe_remat` does), not by the policy.
    """
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose from {list(REMAT_POLICIES)}")
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None


def maybe_remat(fn: Any, name: str, *, prevent_cse: bool = True) -> Any:
    """`fn` itself for remat "none", else `jax.checkpoint(fn, policy=remat_policy(name))`.

    Inside `lax.scan` pass prevent_cse=False: the scan already keeps XLA from merging the forward and
    the recomputation, and the extra optimisation barriers would only cost speed."""
    policy = remat_policy(name)
    if name == "none":
        return fn
    return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse)
