"""Small pure RL kernels: masked statistics, advantage whitening, KL estimators, GAE, log-probs.

Every statistic takes an optional `axis_name`: inside `jax.pmap(..., axis_name="data")` the sums and
counts are `lax.psum`-ed over that axis, so means, variances and whitening are global over the whole
batch (every device sees the same numbers a single device would see on the concatenated batch).
Masks are 1 for tokens that count (response tokens) and 0 for prompt and padding tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from alignjax.parallel import psum


def masked_sum(x: jax.Array, mask: jax.Array, axis_name: str | None = None) -> jax.Array:
    """sum_i x_i m_i over all elements (and over devices when `axis_name` is given) -> []."""
    chex.assert_equal_shape([x, mask])
    return psum(jnp.sum(jnp.where(mask.astype(bool), x, 0.0)), axis_name)


def masked_count(mask: jax.Array, axis_name: str | None = None) -> jax.Array:
    """Number of unmasked elements, global over `axis_name` -> [] float32."""
    return psum(jnp.sum(mask.astype(jnp.float32)), axis_name)


def masked_mean(x: jax.Array, mask: jax.Array, axis_name: str | None = None) -> jax.Array:
    """mean = sum(x m) / max(sum(m), 1), global over `axis_name` -> []. An all-masked input gives 0."""
    return masked_sum(x, mask, axis_name) / jnp.maximum(masked_count(mask, axis_name), 1.0)


def masked_var(
    x: jax.Array, mask: jax.Array, unbiased: bool = False, axis_name: str | None = None
) -> jax.Array:
    """Two-pass masked variance sum(m (x - mean)^2) / (n - ddof), ddof = 1 if `unbiased` else 0 -> []."""
    mean = masked_mean(x, mask, axis_name)
    n = masked_count(mask, axis_name)
    ss = masked_sum(jnp.square(x - mean), mask, axis_name)
    return ss / jnp.maximum(n - (1.0 if unbiased else 0.0), 1.0)


def masked_whiten(
    x: jax.Array,
    mask: jax.Array,
    shift_mean: bool = True,
    unbiased: bool = False,
    eps: float = 1e-8,
    axis_name: str | None = None,
) -> jax.Array:
    """Whitening over the unmasked elements: y = (x - mean) / sqrt(var + eps) (+ mean if not shift_mean).

    mean and var are the masked (global, with `axis_name`) statistics; masked positions of y are 0.
    Shapes: x, mask [...] -> y [...].
    """
    mean = masked_mean(x, mask, axis_name)
    var = masked_var(x, mask, unbiased, axis_name)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return jnp.where(mask.astype(bool), y, 0.0)


# ---------------------------------------------------------------------------------------------------
# KL estimators of KL(pi || pi_ref) from the log-probs of tokens sampled from pi (Schulman, "Approximating
# KL divergence", 2020). With log r = logp_ref - logp (so r = pi_ref / pi):
#   k1 = -log r = logp - logp_ref                       unbiased, high variance, can be negative
#   k2 = (log r)^2 / 2                                  biased, low variance, >= 0
#   k3 = (r - 1) - log r                                unbiased, low variance, >= 0
#   low_var_kl = clip(k3 with log r clipped to [-20, 20], -10, 10)   (verl's clamp, for stability)
#   abs = |logp - logp_ref|
# ---------------------------------------------------------------------------------------------------


def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k1 = logp - logp_ref (per token)."""
    return logp - ref_logp


def kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k2 = (logp - logp_ref)^2 / 2 (per token)."""
    return 0.5 * jnp.square(logp - ref_logp)


def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k3 = exp(logp_ref - logp) - 1 - (logp_ref - logp) (per token); expm1 keeps it exact near 0."""
    log_r = ref_logp - logp
    return jnp.expm1(log_r) - log_r


def kl_low_var(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k3 with log r = logp_ref - logp clamped to [-20, 20] and the result clamped to [-10, 10]."""
    log_r = jnp.clip(ref_logp - logp, -20.0, 20.0)
    return jnp.clip(jnp.expm1(log_r) - log_r, -10.0, 10.0)


def kl_abs(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """|logp - logp_ref| (per token)."""
    return jnp.abs(logp - ref_logp)


KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "low_var_kl": kl_low_var,
    "abs": kl_abs,
}


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token KL estimate selected by name (one of `KL_ESTIMATORS`). logp, ref_logp [B, N] -> [B, N]."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose from {sorted(KL_ESTIMATORS)}")
    chex.assert_equal_shape([logp, ref_logp])
    return KL_ESTIMATORS[estimator](logp, ref_logp)


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the response tokens, as a reverse `lax.scan` over time.

    With m_t the mask (1 on the response, contiguous from t = 0; the episode ends after the last
    unmasked token, so V after it is 0):

        delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} A_{t+1}          (A_N = V_N = 0)
        R_t     = A_t + V_t                                        (returns, the critic's target)

    Args: rewards, values, mask [B, N]. Returns (advantages [B, N], returns [B, N]), 0 where masked.
    """
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, values, mask])
    m = mask.astype(rewards.dtype)
    next_m = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
    next_v = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1) * next_m
    deltas = rewards + gamma * next_v - values

    def step(adv_next, xs):
        delta_t, next_m_t = xs
        adv = delta_t + gamma * lam * next_m_t * adv_next
        return adv, adv

    _, adv_rev = jax.lax.scan(step, jnp.zeros_like(rewards[:, 0]), (deltas.T, next_m.T), reverse=True)
    advantages = adv_rev.T * m
    returns = (advantages + values) * m
    return advantages, returns


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / temperature)[token]: logits [B, N, V], tokens [B, N] -> [B, N] float32."""
    chex.assert_rank(logits, 3)
    chex.assert_shape(tokens, logits.shape[:2])
    logits = logits.astype(jnp.float32) / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse


def entropy_from_logits(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """H = -sum_v p_v log p_v with p = softmax(logits / temperature): [B, N, V] -> [B, N] float32."""
    logits = logits.astype(jnp.float32) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
