"""Jitted autoregressive sampling from a causal LM: one prefill, then a `lax.while_loop` decode.

    out = sample(params, config, prompt, prompt_mask, key, SamplingConfig(...), eos_id, pad_id)
    out.tokens, out.mask, out.logprobs, out.policy_logprobs      # each [B, N]

The prompt [B, P] is left-padded (`prompt_mask` 1 = real token). The KV cache is preallocated for
P + N - 1 slots (N = max_new_tokens) and updated in place inside the loop, so every shape is static
and nothing is recompiled between calls with the same shapes and configs.

Per step, the next-token distribution is built from the model's logits l [B, V] exactly as HF
transformers' `generate` (5.24) orders its processors:

1. repetition penalty rho (HF `RepetitionPenaltyLogitsProcessor`): for every token already present in
   the row (real prompt tokens and generated tokens, left pads excluded as HF does), l_i <- l_i / rho
   if l_i > 0 else l_i * rho;
2. temperature tau: l <- l / tau;
3. top-k (HF `TopKLogitsWarper`): drop tokens whose logit is below the k-th largest (ties with the
   k-th are kept);
4. top-p (HF `TopPLogitsWarper`): with p = softmax(l), keep token i iff the mass of the tokens with
   strictly larger probability is < top_p (the smallest head of the sorted distribution whose mass
   reaches top_p; at least one token). Tokens tied at the boundary are kept or dropped together;
   HF's result there depends on torch.sort's unspecified order of equal values.

then draws from softmax over the kept tokens. Top-p never sorts the vocabulary (a full sort of 32k
logits took ~40 ms per step on our CPU, as long as the weight-bound forward): the threshold is found by an
exact bisection over the bit patterns of float32 probabilities (32 masked sums over [B, V]).

Greedy (`SamplingConfig.greedy`) takes argmax of the repetition-penalised logits (HF greedy
applies the repetition penalty too; temperature/top-k/top-p do not change the argmax).

Two log-probabilities are returned per generated token y_t:

- `logprobs`: log q(y_t) under the distribution the token was actually drawn from (after steps 1-4,
  renormalised over the kept tokens). In greedy mode: log-softmax of the repetition-penalised logits
  (the processors HF's greedy search applies).
- `policy_logprobs`: log pi(y_t | x, y_<t) = log_softmax(l)[y_t] of the unmodified model logits. This
  is what PPO's ratio and KL terms need (pi(y|x) under the model); it equals a teacher-forced
  forward pass on the sampled sequence up to float rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from alignjax.models.config import LMConfig
from alignjax.models.llama import hidden_states, init_cache, lm_logits, unstack_layers


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (hashable: a static argument of `jax.jit`).

    max_new_tokens: N, the length of the generated block.
    temperature: tau > 0 (1.0 = off). top_k: 0 = off. top_p: 1.0 = off, else in (0, 1).
    repetition_penalty: rho > 0 (1.0 = off; HF's semantics). greedy: argmax instead of sampling.
    The paper's setting is temperature 0.8, top_p 0.9, repetition_penalty 1.1.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r} (greedy=True for argmax)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty!r}")


class SampleOutput(NamedTuple):
    """Generated block. tokens [B, N] int32 (pad_id after EOS); logprobs [B, N] f32 under the sampling
    distribution; mask [B, N] int32 (1 for generated tokens up to and including EOS); policy_logprobs
    [B, N] f32 under the unmodified model (log_softmax of raw logits). Masked entries hold 0."""

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    policy_logprobs: jax.Array


# ----------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF's repetition penalty. logits [B, V]; seen [B, V] bool (token occurs in prompt or output).

    l_i <- l_i / rho if l_i > 0 else l_i * rho, for seen tokens only (HF: `where(l < 0, l*rho, l/rho)`)."""
    if penalty == 1.0:
        return logits
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def top_k_mask(scores: jax.Array, k: int) -> jax.Array:
    """Keep mask [B, V] of HF's top-k: scores >= the k-th largest score (ties with it are kept)."""
    k = min(k, scores.shape[-1])
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return scores >= kth


def top_p_mask(probs: jax.Array, top_p: float) -> jax.Array:
    """Keep mask [B, V] of nucleus filtering, without sorting the vocabulary.

    Token i is kept iff m(p_i) < top_p, where m(t) = sum_{j: p_j > t} p_j (the mass strictly above
    it). m is non-increasing, so the kept set is {i: p_i >= t*} with t* the smallest float32 t such
    that m(t) < top_p. Nonnegative float32 values are ordered like their int32 bit patterns, so a
    bisection over bit patterns in [0, bits(max p)] finds t* exactly in 32 masked sums; m(max p) = 0
    guarantees at least one token is kept.
    """
    bits_of = lambda x: jax.lax.bitcast_convert_type(x, jnp.int32)
    float_of = lambda x: jax.lax.bitcast_convert_type(x, jnp.float32)
    hi = bits_of(jnp.max(probs, axis=-1))  # m(hi) = 0 < top_p: invariant "m(hi) < top_p"
    lo = jnp.zeros_like(hi)

    def body(_, carry):
        lo, hi = carry
        mid = lo + (hi - lo) // 2
        mass_above = jnp.sum(jnp.where(probs > float_of(mid)[:, None], probs, 0.0), axis=-1)
        ok = mass_above < top_p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, 32, body, (lo, hi))  # 2^31 bit patterns -> 31 halvings suffice
    return probs >= float_of(hi)[:, None]


def first_argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis, first index on ties (as torch.argmax); [B, V] -> [B] int32.

    Written as max + masked min because XLA's CPU argmax is ~4x slower at V = 32k."""
    iota = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == jnp.max(x, axis=-1, keepdims=True), iota, x.shape[-1]), axis=-1)


def processed_logits(logits: jax.Array, seen: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Steps 1-4 of the module docstring. logits, seen [B, V] -> (scores [B, V] f32, keep [B, V] bool).

    scores are the penalised, temperature-scaled logits; the sampling distribution is
    softmax(scores) restricted to `keep`. In greedy mode keep is all-true (nothing is truncated)."""
    scores = apply_repetition_penalty(logits.astype(jnp.float32), seen, cfg.repetition_penalty)
    keep = jnp.ones(scores.shape, bool)
    if cfg.greedy:
        return scores, keep
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k > 0:
        keep = top_k_mask(scores, cfg.top_k)
    if cfg.top_p < 1.0:
        masked = jnp.where(keep, scores, -jnp.inf)
        keep = keep & top_p_mask(jax.nn.softmax(masked, axis=-1), cfg.top_p)
    return scores, keep


def sampling_distribution(logits: jax.Array, seen: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Log-probabilities [B, V] of the next-token distribution the sampler draws from (-inf = dropped).

    Greedy: log_softmax of the penalised logits (the point mass on its argmax is what is drawn)."""
    scores, keep = processed_logits(logits, seen, cfg)
    return jax.nn.log_softmax(jnp.where(keep, scores, -jnp.inf), axis=-1)


def _choose(logits, seen, key, cfg: SamplingConfig, row_offset=0, total_rows: int | None = None):
    """One draw. logits [B, V], seen [B, V] -> (token [B] int32, logprob [B], policy logprob [B]).

    The uniforms are drawn for all `total_rows` rows of the global batch and this call takes rows
    [row_offset, row_offset + B): a row's draw does not depend on how the batch is split."""
    b, v = logits.shape
    scores, keep = processed_logits(logits, seen, cfg)
    masked = jnp.where(keep, scores, -jnp.inf)
    top = jnp.max(masked, axis=-1, keepdims=True)
    if cfg.greedy:
        token = first_argmax(masked)
        log_z = jax.nn.logsumexp(masked, axis=-1)
    else:
        # Inverse-CDF draw: one uniform per row (Gumbel-max needs V random numbers per row, ~6x slower
        # on CPU). count(c <= u) picks i with c_{i-1} <= u < c_i, so dropped tokens (zero-width
        # intervals) are never chosen; the clamp guards u rounding up to the total mass.
        cdf = jnp.cumsum(jnp.exp(masked - top), axis=-1)
        u = jax.random.uniform(key, (total_rows or b, 1), jnp.float32)
        if total_rows is not None and total_rows != b:
            u = jax.lax.dynamic_slice_in_dim(u, row_offset, b)
        u = u * cdf[:, -1:]
        last_kept = jnp.max(jnp.where(keep, jnp.arange(v, dtype=jnp.int32), -1), axis=-1)
        token = jnp.minimum(jnp.sum(cdf <= u, axis=-1, dtype=jnp.int32), last_kept)
        log_z = top[:, 0] + jnp.log(cdf[:, -1])  # the CDF's total is the normaliser: no extra pass
    pick = lambda x: jnp.take_along_axis(x, token[:, None], axis=-1)[:, 0]
    logprob = pick(masked) - log_z
    raw = logits.astype(jnp.float32)
    policy_logprob = pick(raw) - jax.nn.logsumexp(raw, axis=-1)
    return token, logprob, policy_logprob


def _eos_tuple(eos_id) -> tuple[int, ...]:
    """None | int | sequence of ints -> a hashable tuple of Python ints (a static jit argument)."""
    if eos_id is None:
        return ()
    ids = eos_id if isinstance(eos_id, Sequence | np.ndarray) else [eos_id]
    try:
        return tuple(operator.index(e) for e in ids)
    except TypeError:
        raise TypeError(f"eos_id must be None, an int or a sequence of ints, got {eos_id!r}") from None


# ----------------------------------------------------------------------------- the sampler


def sample(
    params,
    config: LMConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    sampling_cfg: SamplingConfig,
    eos_id: int | Sequence[int] | None,
    pad_id: int,
    *,
    row_offset: jax.Array | int = 0,
    total_rows: int | None = None,
) -> SampleOutput:
    """Sample N = sampling_cfg.max_new_tokens tokens after each left-padded prompt.

    Args:
      params: model parameter pytree (alignjax.models.llama layout).
      config: `LMConfig` (static).
      prompt_tokens: [B, P] int32, left-padded. Every row needs at least one real token.
      prompt_mask: [B, P] (1 real token, 0 pad). Pads must be on the left.
      key: PRNG key (unused when greedy).
      sampling_cfg: `SamplingConfig` (static).
      eos_id: int, tuple of ints, or None (static). A row stops after emitting one of them; the EOS
        itself is part of the response (mask 1), later tokens are `pad_id` with mask 0.
      pad_id: int (static), written after EOS.
      row_offset, total_rows: when these B rows are rows [row_offset, row_offset + B) of a global
        batch of `total_rows` (static) split over devices (pmap), the random draws are those of the
        global batch's rows, so the samples do not depend on the split. Default: the whole batch.

    Returns: `SampleOutput(tokens [B, N], logprobs [B, N], mask [B, N], policy_logprobs [B, N])`.

    Generated token t of row b has rotary position n_b + t, n_b = sum(prompt_mask[b]) (the positions
    HF uses for left-padded batches). The loop stops early once every row has finished.

    Callable inside an outer `jax.jit` (the configs, eos_id and pad_id must then be Python values).
    With concrete (non-traced) masks, left padding and non-empty rows are checked on the host.
    """
    if not isinstance(sampling_cfg, SamplingConfig):
        raise TypeError(f"sampling_cfg must be a SamplingConfig, got {type(sampling_cfg).__name__}")
    try:
        pad_id = operator.index(pad_id)
    except TypeError:
        raise TypeError(f"pad_id must be an int, got {pad_id!r}") from None
    if not isinstance(prompt_mask, jax.core.Tracer):
        m = np.asarray(prompt_mask)
        if m.ndim == 2 and m.size:
            if not np.all(m[:, -1] != 0):
                raise ValueError("every prompt needs at least one real token, left-padded (mask[:, -1] == 1)")
            if np.any(np.diff(m.astype(bool).astype(np.int8), axis=-1) < 0):
                raise ValueError("prompts must be left-padded: a 0 follows a 1 in prompt_mask")
    return _sample(params, config, prompt_tokens, prompt_mask, key, sampling_cfg, _eos_tuple(eos_id), pad_id,
                   jnp.asarray(row_offset, jnp.int32), total_rows)


@functools.partial(jax.jit, static_argnames=("config", "sampling_cfg", "eos_id", "pad_id", "total_rows"))
def _sample(params, config, prompt_tokens, prompt_mask, key, sampling_cfg, eos_id, pad_id, row_offset,
            total_rows) -> SampleOutput:
    chex.assert_rank([prompt_tokens, prompt_mask], 2)
    chex.assert_equal_shape([prompt_tokens, prompt_mask])
    b, p = prompt_tokens.shape
    n_new, v = sampling_cfg.max_new_tokens, config.vocab_size
    eos = jnp.asarray(eos_id, jnp.int32).reshape(-1)
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    prompt_mask = prompt_mask.astype(jnp.int32)
    n_real = jnp.sum(prompt_mask, axis=-1)

    cache_dtype = jax.tree_util.tree_leaves(params["layers"])[0].dtype
    # One buffer per layer for the weights and the cache: a stacked [L, ...] array would be sliced
    # into a copy for every layer on every step (see llama.unstack_layers and llama.KVCache).
    params = unstack_layers(params)
    cache = init_cache(config, b, p + n_new - 1, cache_dtype)
    h, cache = hidden_states(params, config, prompt_tokens, attn_mask=prompt_mask, cache=cache)
    logits = lm_logits(params, config, h[:, -1])  # only the last position: skips B*P*V head flops

    rows = jnp.arange(b)
    # Presence of every vocabulary id in the row (prompt pads excluded, as HF's prompt_ignore_length).
    seen = jnp.zeros((b, v), bool).at[rows[:, None], prompt_tokens].max(prompt_mask.astype(bool))

    def emit(t, token, lp, plp, state):
        """Write step t's choice; finished rows get pad / mask 0; update done and presence."""
        tokens, logprobs, policy_lps, mask, done, seen = state
        live = ~done
        tokens = tokens.at[:, t].set(jnp.where(live, token, pad_id))
        logprobs = logprobs.at[:, t].set(jnp.where(live, lp, 0.0))
        policy_lps = policy_lps.at[:, t].set(jnp.where(live, plp, 0.0))
        mask = mask.at[:, t].set(live.astype(jnp.int32))
        done = done | (live & jnp.any(token[:, None] == eos[None, :], axis=-1))
        seen = seen.at[rows, token].set(True)
        return tokens, logprobs, policy_lps, mask, done, seen

    state = (
        jnp.full((b, n_new), pad_id, jnp.int32),
        jnp.zeros((b, n_new), jnp.float32),
        jnp.zeros((b, n_new), jnp.float32),
        jnp.zeros((b, n_new), jnp.int32),
        jnp.zeros((b,), bool),
        seen,
    )
    key, sub = jax.random.split(key)
    choose = functools.partial(_choose, cfg=sampling_cfg, row_offset=row_offset, total_rows=total_rows)
    token, lp, plp = choose(logits, seen, sub)
    state = emit(0, token, lp, plp, state)

    def cond(carry):
        t, _, _, _, state = carry
        return (t < n_new) & ~jnp.all(state[4])

    def body(carry):
        t, prev, cache, key, state = carry
        h, cache = hidden_states(
            params, config, prev[:, None], attn_mask=jnp.ones((b, 1), jnp.int32),
            positions=(n_real + t - 1)[:, None], cache=cache,
        )
        key, sub = jax.random.split(key)
        token, lp, plp = choose(lm_logits(params, config, h[:, 0]), state[5], sub)
        state = emit(t, token, lp, plp, state)
        return t + 1, jnp.where(state[4], pad_id, token), cache, key, state

    carry = (jnp.asarray(1, jnp.int32), token, cache, key, state)
    _, _, _, _, state = jax.lax.while_loop(cond, body, carry)
    tokens, logprobs, policy_lps, mask, _, _ = state
    return SampleOutput(tokens, logprobs, mask, policy_lps)
