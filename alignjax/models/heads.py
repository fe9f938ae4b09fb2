"""Scalar heads on the LM backbone: per-token values (PPO critics) and last-token rewards (reward models).

A head is a linear map of the backbone's final-norm hidden state h [B, T, D] to one scalar per token:

    head = {"kernel": [D], "bias": []}            value[b, t] = h[b, t] . kernel + bias   (float32)

A critic / reward model is a backbone plus a head in one pytree, so one optimizer and one checkpoint
cover both:

    {"backbone": <LM params as in llama.py, without "lm_head">, "head": {"kernel": [D], "bias": []}}

The backbone never computes the [B, T, V] logits (`llama.hidden_states`), so a critic costs one
backbone pass. HF's `*ForSequenceClassification` "score" layer (num_labels = 1, no bias) is this head
with bias 0 (see `alignjax.rewards.reward_model` for the import).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from alignjax.models import llama
from alignjax.models.config import LMConfig

HeadParams = dict
CriticParams = dict


def init_scalar_head(config: LMConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.0) -> HeadParams:
    """kernel ~ N(0, std^2) [D], bias 0 []. The default std 0 starts a value head at V = 0 everywhere,
    which keeps the first PPO value loss small; HF initialises reward "score" layers with std 0.02."""
    kernel = std * jax.random.normal(key, (config.hidden_size,), jnp.float32)
    return {"kernel": kernel.astype(dtype), "bias": jnp.zeros((), dtype)}


def scalar_head(head: HeadParams, hidden: jax.Array) -> jax.Array:
    """values[..., t] = hidden[..., t, :] . kernel + bias, accumulated in float32. [B, T, D] -> [B, T]."""
    chex.assert_rank(head["kernel"], 1)
    chex.assert_rank(head["bias"], 0)
    chex.assert_axis_dimension(hidden, -1, head["kernel"].shape[0])
    out = jnp.einsum("...d,d->...", hidden, head["kernel"], preferred_element_type=jnp.float32)
    return out + head["bias"].astype(jnp.float32)


def last_token_index(mask: jax.Array) -> jax.Array:
    """Index of the last real token of each row: max{t : mask[b, t] != 0}. [B, T] -> [B] int32.

    Works for left padding (gives T - 1), right padding (gives length - 1) and both at once. A row
    without any real token has no last token; it gets T - 1 (callers must not pass empty rows: the
    value read there is meaningless). Python loop reference: `max(t for t in range(T) if mask[b][t])`.
    """
    chex.assert_rank(mask, 2)
    t = mask.shape[1]
    # argmax returns the first maximum, so on the reversed row it finds the last real token.
    return (t - 1 - jnp.argmax(mask[:, ::-1].astype(bool), axis=1)).astype(jnp.int32)


def gather_last(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x[b, last_token_index(mask)[b]]: [B, T, ...] -> [B, ...]."""
    chex.assert_rank(mask, 2)
    chex.assert_equal_shape_prefix([x, mask], 2)
    idx = last_token_index(mask)
    return jnp.take_along_axis(x, idx.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]


def init_critic(
    config: LMConfig,
    key: jax.Array,
    backbone: llama.Params | None = None,
    dtype=jnp.float32,
    head_std: float = 0.0,
) -> CriticParams:
    """{"backbone", "head"} params. `backbone` defaults to a fresh `llama.init_params`; pass an LM's (or
    a reward model's) params to start a critic from them. "lm_head" is dropped because a critic never
    reads it (tied embeddings are kept: "embed" is also the input embedding)."""
    k_backbone, k_head = jax.random.split(key)
    if backbone is None:
        backbone = llama.init_params(config, k_backbone, dtype)
    backbone = {k: v for k, v in backbone.items() if k != "lm_head"}
    return {"backbone": backbone, "head": init_scalar_head(config, k_head, dtype, head_std)}


def value_forward(
    params: CriticParams,
    config: LMConfig,
    tokens: jax.Array,
    mask: jax.Array | None = None,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Per-token values V[b, t] = head(h[b, t]), h = backbone(tokens[b, :t+1]): the value of the state
    after token t. tokens, mask (1 real, 0 pad) [B, T] -> [B, T] float32 (pad positions hold garbage;
    mask them downstream). Padding and positions as in `llama.forward`."""
    chex.assert_rank(tokens, 2)
    h, _ = llama.hidden_states(params["backbone"], config, tokens, mask, positions)
    return scalar_head(params["head"], h)


def reward_forward(
    params: CriticParams,
    config: LMConfig,
    tokens: jax.Array,
    mask: jax.Array | None = None,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Sequence score r[b] = head(h[b, last real token]): tokens, mask [B, T] -> [B] float32.

    The last real token is `last_token_index(mask)`, so left and right padding give the same score
    (positions default to cumsum(mask) - 1, the same for both)."""
    chex.assert_rank(tokens, 2)
    if mask is None:
        mask = jnp.ones(tokens.shape, jnp.int32)
    h, _ = llama.hidden_states(params["backbone"], config, tokens, mask, positions)
    return scalar_head(params["head"], gather_last(h, mask))
