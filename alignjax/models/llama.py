"""Decoder-only causal LM of the Llama family as a pure function over a parameter pytree.

Parameters (layers stacked on a leading axis L so the depth is one `lax.scan`, which keeps compile
time flat in depth):

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
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from alignjax.models.config import LMConfig

Params = dict


class KVCache(NamedTuple):
    """Preallocated key/value cache. k, v: [L, B, S, Hkv, hd]; valid: [B, S] bool; index: [] int32
    (the next slot to write; equal for all rows because prompts are left-padded to a common length)."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array


class LMOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    hidden: jax.Array  # [B, T, D] final-norm hidden states (input of the LM / value / reward heads)
    cache: KVCache | None


def init_cache(config: LMConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
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
    """Grouped-query attention. q [B,T,Hq,hd], k/v [B,S,Hkv,hd], mask [B,T,S] bool -> [B,T,Hq,hd].

    softmax(q k^T / sqrt(hd)) in float32; masked logits get the dtype minimum (not -inf) so a fully
    masked query row (a left-pad position) stays finite."""
    b, t, hq, hd = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq, hd)


def _decode_attention(q, k_new, v_new, ck, cv, mask, index):
    """Attention of one new token over the cache before its write plus itself.

    q [B, 1, Hq, hd], k_new / v_new [B, 1, Hkv, hd], ck / cv [B, S, Hkv, hd] (slot `index` not yet
    written), mask [B, 1, S] (slot `index` = the new token). Same result as `attention` over the
    updated cache: one softmax over {cache slots allowed by mask, s != index} and the new key (if
    allowed). Reading the old cache avoids materialising an updated copy of each layer's slice."""
    b, _, hq, hd = q.shape
    hkv = ck.shape[2]
    scale = 1.0 / math.sqrt(hd)
    neg = jnp.finfo(jnp.float32).min
    q4 = q.reshape(b, hkv, hq // hkv, hd)
    slots = jnp.arange(ck.shape[1])
    cache_ok = mask[:, 0, :] & (slots != index)[None]  # [B, S]
    s_cache = (
        jnp.einsum("bkgd,bskd->bkgs", q4, ck.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    )
    s_cache = jnp.where(cache_ok[:, None, None, :], s_cache, neg)  # [B, Hkv, G, S]
    self_ok = jax.lax.dynamic_index_in_dim(mask[:, 0, :], index, axis=1, keepdims=True)[:, :, None]  # [B,1,1]
    s_self = jnp.einsum("bkgd,bkd->bkg", q4, k_new[:, 0].astype(q.dtype), preferred_element_type=jnp.float32)
    s_self = jnp.where(self_ok, s_self * scale, neg)  # [B, Hkv, G]
    m = jnp.maximum(jnp.max(s_cache, axis=-1), s_self)
    e_cache = jnp.exp(s_cache - m[..., None])
    e_self = jnp.exp(s_self - m)
    z = jnp.sum(e_cache, axis=-1) + e_self
    out = jnp.einsum(
        "bkgs,bskd->bkgd", e_cache.astype(q.dtype), cv.astype(q.dtype), preferred_element_type=jnp.float32
    )
    out = (out + e_self[..., None] * v_new[:, 0, :, None, :].astype(jnp.float32)) / z[..., None]
    return out.astype(q.dtype).reshape(b, 1, hq, hd)


def _layer(config: LMConfig, inv_freq, positions, mask, h, lp, cache_kv, index):
    b, t, _ = h.shape
    hq, hkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    x = rms_norm(h, lp["attn_norm"], config.rms_norm_eps)
    q, k, v = x @ lp["wq"], x @ lp["wk"], x @ lp["wv"]
    if config.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = apply_rope(q.reshape(b, t, hq, hd), positions, inv_freq)
    k = apply_rope(k.reshape(b, t, hkv, hd), positions, inv_freq)
    v = v.reshape(b, t, hkv, hd)
    if cache_kv is None:
        attn, new_kv = attention(q, k, v, mask), None
    else:
        # cache_kv is this layer's cache [B, S, Hkv, hd] as it was before the call; it is only read here.
        # The new keys / values are returned and written into the [L, ...] cache after the layer scan,
        # with one in-place update of the donated buffer (writing inside the scan made XLA copy it).
        ck, cv = cache_kv
        if t == 1:
            attn = _decode_attention(q, k, v, ck, cv, mask, index)
        else:
            k_all = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            attn = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask)
        new_kv = (k.astype(ck.dtype), v.astype(cv.dtype))
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
) -> tuple[jax.Array, KVCache | None]:
    """The backbone without the LM head: final-norm hidden states [B, T, D] (and the updated cache).

    Same arguments as `forward`. Value and reward heads (heads.py) read these, so critics never pay
    for the [B, T, V] logits; `params["lm_head"]` is not read and may be absent.
    """
    chex.assert_rank(tokens, 2)
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
        chex.assert_shape(
            [cache.k, cache.v],
            (config.num_layers, b, cache.valid.shape[1], config.num_kv_heads, config.head_dim),
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

    def body(h, xs):
        lp, kv = xs
        h, new_kv = _layer(config, inv_freq, positions, mask, h, lp, kv, index)
        return h, new_kv

    kv_in = None if cache is None else (cache.k, cache.v)
    h, kv_new = jax.lax.scan(body, h, (params["layers"], kv_in))  # kv_new: [L, B, T, Hkv, hd] each
    h = rms_norm(h, params["final_norm"], config.rms_norm_eps)
    new_cache = None
    if cache is not None:
        new_k = jax.lax.dynamic_update_slice(cache.k, kv_new[0], (0, 0, index, 0, 0))
        new_v = jax.lax.dynamic_update_slice(cache.v, kv_new[1], (0, 0, index, 0, 0))
        new_cache = KVCache(new_k, new_v, valid, (index + t).astype(jnp.int32))
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
) -> LMOutput:
    """Logits of a causal LM.

    Args:
      tokens: [B, T] int32.
      attn_mask: [B, T] (1 real token, 0 padding); default all ones.
      positions: [B, T] int32 rotary positions; default: the number of real tokens before each one,
        i.e. `default_positions(attn_mask)` plus, with a cache, the count of valid cache slots
        (HF's `cumsum(mask) - 1` over the whole sequence, for left-padded prefill and decode alike).
      cache: optional `KVCache`; the T tokens are written at slots [cache.index, cache.index + T).
        The caller must keep cache.index + T <= S (the cache length): a traced index cannot be
        checked, and `dynamic_update_slice` would clamp the write onto earlier slots.

    Returns: `LMOutput(logits [B, T, V] float32, hidden [B, T, D], cache or None)`.
    """
    h, new_cache = hidden_states(params, config, tokens, attn_mask, positions, cache)
    return LMOutput(lm_logits(params, config, h), h, new_cache)
