"""Decoder-only causal LM of the Llama family as a pure function over a parameter pytree.

Parameters (layers stacked on a leading axis L so the depth is one `lax.scan`, which keeps compile
time flat in depth; `unstack_layers` gives the per-layer form a decode loop wants, see there):

    embed        [V, D]
    layers/attn_norm [L, D]      layers/wq [L, D, Hq*hd]   layers/wk, wv [L, D, Hkv*hd]
    layers/bq    [L, Hq*hd]      layers/bk, bv [L, Hkv*hd]  (only when config.attention_bias)
    layers/wo    [L, Hq*hd, D]   layers/bo [L, D]           (only when config.attention_out_bias)
    layers/mlp_norm [L, D]
    layers/w_gate, w_up [L, D, F]  layers/w_down [L, F, D]
    layers/b_gate, b_up [L, F]     layers/b_down [L, D]     (only when config.mlp_bias)
    final_norm   [D]
    lm_head      [D, V]          (absent when config.tie_word_embeddings; then logits = h @ embed.T)

Attention runs in "slot" space: the KV cache has S slots; a call with T tokens writes slots
[index, index + T). Query t (slot index + t) may attend key slot s iff `valid[b, s]` and
s <= index + t (and index + t - s < sliding_window when set). Without a cache the T tokens are
their own slots 0..T-1. Left padding is handled by `attn_mask` (0 = pad) and by `positions`
(default: cumsum(attn_mask) - 1 plus the real tokens already in the cache, so the first real token
of every row has position 0, as HF does).
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from alignjax.models.config import LMConfig
from alignjax.models.precision import maybe_remat, remat_policy

Params = dict


class KVCache(NamedTuple):
    """Preallocated key/value cache. k, v: tuples of L arrays [B, Hkv, S, hd] (one per layer);
    valid: [B, S] bool; index: [] int32 (the next slot to write; equal for all rows because prompts
    are left-padded to a common length).

    The layout is what keeps a decode step from copying the cache (XLA on CPU, 134M benchmark):
    - one buffer per layer, not one stacked [L, ...] array: XLA's dot cannot read a slice of a larger
      buffer in place, so a layer's slice of a stacked cache (by `lax.scan` or by index) was copied
      out on every step; separate buffers are read where they lie and written in place.
    - head-major [B, Hkv, S, hd], not [B, S, Hkv, hd]: attention contracts over hd and S with (B, Hkv)
      as batch dimensions, which XLA's dot wants leading; sequence-major made every step transpose a
      copy of each layer's cache (20-40 ms of a ~130 ms step at S = 191).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array


class LMOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    hidden: jax.Array  # [B, T, D] final-norm hidden states (input of the LM / value / reward heads)
    cache: KVCache | None


def init_cache(config: LMConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache of `max_len` slots (see `KVCache` for the layout)."""
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        valid=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )


def init_params(config: LMConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random normal(0, std) weights, ones for the norms, zeros for biases (HF's init)."""
    d, f, v, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers
    hq, hkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    shapes = {
        "wq": (L, d, hq * hd),
        "wk": (L, d, hkv * hd),
        "wv": (L, d, hkv * hd),
        "wo": (L, hq * hd, d),
        "w_gate": (L, d, f),
        "w_up": (L, d, f),
        "w_down": (L, f, d),
    }
    keys = jax.random.split(key, len(shapes) + 2)
    layers = {
        n: (std * jax.random.normal(k, s)).astype(dtype)
        for (n, s), k in zip(shapes.items(), keys[: len(shapes)], strict=True)
    }
    layers["attn_norm"] = jnp.ones((L, d), dtype)
    layers["mlp_norm"] = jnp.ones((L, d), dtype)
    if config.attention_bias:
        layers["bq"] = jnp.zeros((L, hq * hd), dtype)
        layers["bk"] = jnp.zeros((L, hkv * hd), dtype)
        layers["bv"] = jnp.zeros((L, hkv * hd), dtype)
    if config.attention_out_bias:
        layers["bo"] = jnp.zeros((L, d), dtype)
    if config.mlp_bias:
        layers["b_gate"] = jnp.zeros((L, f), dtype)
        layers["b_up"] = jnp.zeros((L, f), dtype)
        layers["b_down"] = jnp.zeros((L, d), dtype)
    params = {
        "embed": (std * jax.random.normal(keys[-2], (v, d))).astype(dtype),
        "layers": layers,
        "final_norm": jnp.ones((d,), dtype),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = (std * jax.random.normal(keys[-1], (d, v))).astype(dtype)
    return params


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back (as HF does)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rope_inv_freq(config: LMConfig) -> jax.Array:
    """Inverse frequencies [hd/2] of rotary embeddings, with HF's linear and llama3 scaling rules."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    kind = config.rope_scaling[0]
    if kind == "linear":
        inv_freq = inv_freq / config.rope_scaling[1]
    elif kind == "llama3":
        factor, low_ff, high_ff, old_len = config.rope_scaling[1:5]
        low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x [B, T, H, hd] by angles positions[b, t] * inv_freq (HF's rotate_half convention)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention(q, k, v, mask):
    """Grouped-query attention. q [B,T,Hq,hd], k/v [B,Hkv,S,hd], mask [B,T,S] bool -> [B,T,Hq,hd].

    softmax(q k^T / sqrt(hd)) in float32; masked logits get the dtype minimum (not -inf) so a fully
    masked query row (a left-pad position) stays finite."""
    b, t, hq, hd = q.shape
    hkv = k.shape[1]
    q = q.reshape(b, t, hkv, hq // hkv, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, hq, hd)


def _layer(config: LMConfig, inv_freq, positions, mask, h, lp, cache_kv, index):
    b, t, _ = h.shape
    hq, hkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    x = rms_norm(h, lp["attn_norm"], config.rms_norm_eps)
    q, k, v = x @ lp["wq"], x @ lp["wk"], x @ lp["wv"]
    if config.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = apply_rope(q.reshape(b, t, hq, hd), positions, inv_freq)
    # Keys / values head-major [B, Hkv, T, hd], the layout of the cache (see KVCache).
    k = apply_rope(k.reshape(b, t, hkv, hd), positions, inv_freq).transpose(0, 2, 1, 3)
    v = v.reshape(b, t, hkv, hd).transpose(0, 2, 1, 3)
    if cache_kv is None:
        attn, new_kv = attention(q, k, v, mask), None
    else:
        # This layer's own cache buffers [B, Hkv, S, hd]: written in place, then attended over whole.
        ck, cv = cache_kv
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, index, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, index, 0))
        attn = attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask)
        new_kv = (ck, cv)
    attn = attn.reshape(b, t, hq * hd)
    out = attn @ lp["wo"]
    if config.attention_out_bias:
        out = out + lp["bo"]
    h = h + out
    x = rms_norm(h, lp["mlp_norm"], config.rms_norm_eps)
    gate, up = x @ lp["w_gate"], x @ lp["w_up"]
    if config.mlp_bias:
        gate, up = gate + lp["b_gate"], up + lp["b_up"]
    down = (jax.nn.silu(gate) * up) @ lp["w_down"]
    if config.mlp_bias:
        down = down + lp["b_down"]
    return h + down, new_kv


def unstack_layers(params: Params) -> Params:
    """`params` with `layers` as a tuple of L per-layer dicts (the same names, without the L axis).

    For decode loops: XLA's CPU dot cannot read a slice of a stacked [L, ...] weight in place, so a
    layer loop over stacked weights copies every layer's weights out on every step (measured on the
    134M decode: 1.4-2.5x the time of the matmuls themselves). Unstack once before the loop (one copy
    of the layer weights, which then lives as long as the loop); `hidden_states` and `forward` take
    either form.
    """
    layers = params["layers"]
    if isinstance(layers, tuple | list):
        return params
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(operator.itemgetter(i), layers) for i in range(n))}


def default_positions(attn_mask: jax.Array) -> jax.Array:
    """Positions of left-padded rows: cumsum(mask) - 1, clipped at 0 for the pads."""
    return jnp.maximum(jnp.cumsum(attn_mask.astype(jnp.int32), axis=-1) - 1, 0)


def hidden_states(
    params: Params,
    config: LMConfig,
    tokens: jax.Array,
    attn_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    *,
    remat: str = "none",
) -> tuple[jax.Array, KVCache | None]:
    """The backbone without the LM head: final-norm hidden states [B, T, D] (and the updated cache).

    Same arguments as `forward`. Value and reward heads (heads.py) read these, so critics never pay
    for the [B, T, V] logits; `params["lm_head"]` is not read and may be absent.
    """
    chex.assert_rank(tokens, 2)
    remat_policy(remat)  # an unknown name fails here, also on the cached path that ignores it
    b, t = tokens.shape
    if attn_mask is None:
        attn_mask = jnp.ones((b, t), jnp.int32)
    chex.assert_shape(attn_mask, (b, t))
    if positions is None:
        positions = default_positions(attn_mask)
        if cache is not None:
            # Continue each row's count: the real tokens already in the cache come first.
            positions = positions + jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None]
    chex.assert_shape(positions, (b, t))
    key_ok = attn_mask.astype(bool)

    if cache is None:
        q_slot = jnp.arange(t)
        k_slot = jnp.arange(t)
        valid = key_ok
        index = 0
    else:
        chex.assert_shape(cache.valid, (b, None))
        if not len(cache.k) == len(cache.v) == config.num_layers:
            raise ValueError(f"the cache has {len(cache.k)} layers, the model {config.num_layers}")
        chex.assert_shape(
            [*cache.k, *cache.v], (b, config.num_kv_heads, cache.valid.shape[1], config.head_dim)
        )
        if t > cache.valid.shape[1]:
            raise ValueError(f"{t} tokens do not fit a KV cache of {cache.valid.shape[1]} slots")
        index = cache.index
        q_slot = index + jnp.arange(t)
        k_slot = jnp.arange(cache.valid.shape[1])
        valid = jax.lax.dynamic_update_slice(cache.valid, key_ok, (0, index))
    allowed = k_slot[None, :] <= q_slot[:, None]
    if config.sliding_window is not None:
        allowed &= q_slot[:, None] - k_slot[None, :] < config.sliding_window
    mask = allowed[None] & valid[:, None, :]  # [B, T, S]

    inv_freq = rope_inv_freq(config)
    h = params["embed"][tokens]

    layer = lambda h, lp, kv: _layer(config, inv_freq, positions, mask, h, lp, kv, index)
    layers = params["layers"]
    new_cache = None
    if cache is None and not isinstance(layers, tuple | list):
        # remat checkpoints one layer: the backward keeps its input h (and, for "dots", its projection
        # outputs) per layer and recomputes the rest. Inside scan prevent_cse is not needed.
        body = maybe_remat(lambda h, lp: (layer(h, lp, None)[0], None), remat, prevent_cse=False)
        h, _ = jax.lax.scan(body, h, layers)
    else:
        # Unrolled over the layers, so each reads its own cache buffers (see KVCache). Stacked weights
        # are sliced here, a copy per call: decode loops pass `unstack_layers(params)` instead.
        layers = unstack_layers(params)["layers"]
        if cache is None:
            unrolled = maybe_remat(lambda h, lp: layer(h, lp, None)[0], remat)
            for lp in layers:
                h = unrolled(h, lp)
        else:
            ks, vs = [], []
            for lp, ck, cv in zip(layers, cache.k, cache.v, strict=True):
                h, (ck, cv) = layer(h, lp, (ck, cv))
                ks.append(ck)
                vs.append(cv)
            new_cache = KVCache(tuple(ks), tuple(vs), valid, (index + t).astype(jnp.int32))
    h = rms_norm(h, params["final_norm"], config.rms_norm_eps)
    return h, new_cache


def lm_logits(params: Params, config: LMConfig, hidden: jax.Array) -> jax.Array:
    """logits = hidden @ lm_head (or @ embed.T when tied), accumulated in float32: [..., D] -> [..., V]."""
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("...d,dv->...v", hidden, head, preferred_element_type=jnp.float32)


def forward(
    params: Params,
    config: LMConfig,
    tokens: jax.Array,
    attn_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    *,
    remat: str = "none",
) -> LMOutput:
    """Logits of a causal LM.

    Args:
      params: the parameter pytree, layers stacked (module docstring) or per layer (`unstack_layers`).
      tokens: [B, T] int32.
      attn_mask: [B, T] (1 real token, 0 padding); default all ones.
      positions: [B, T] int32 rotary positions; default: the number of real tokens before each one,
        i.e. `default_positions(attn_mask)` plus, with a cache, the count of valid cache slots
        (HF's `cumsum(mask) - 1` over the whole sequence, for left-padded prefill and decode alike).
      cache: optional `KVCache` (`init_cache`); the T tokens are written at slots
        [cache.index, cache.index + T), in place when the cache is donated or carried by a loop.
        The caller must keep cache.index + T <= S (the cache length): a traced index cannot be
        checked, and `dynamic_update_slice` would clamp the write onto earlier slots.
      remat: rematerialisation of each layer in the backward pass without a cache, "none" | "full" |
        "dots" (`alignjax.models.precision`); the forward values are the same. Ignored with a cache.

    Returns: `LMOutput(logits [B, T, V] float32, hidden [B, T, D], cache or None)`.
    """
    h, new_cache = hidden_states(params, config, tokens, attn_mask, positions, cache, remat=remat)
    return LMOutput(lm_logits(params, config, h), h, new_cache)
