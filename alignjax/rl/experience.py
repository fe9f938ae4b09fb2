"""Experience of one PPO batch: log-probs, reference log-probs, values, per-token rewards, GAE.

Sequence layout. A rollout row is [prompt (left-padded, length P) | response (right-padded, length N)].
Response token t (at sequence position P + t) is predicted from position P + t - 1, so the networks
run on the first P + N - 1 tokens and we read the last N positions:

    logp_t = log softmax(logits[P + t - 1])[y_t]        V_t = value(h[P + t - 1]),  t = 0..N-1

V_t is the value of the state "prompt + y_<t", before y_t is chosen. Prompt and padding tokens are
masked everywhere (`response_mask` is 1 on the response up to and including EOS, contiguous from t = 0).

Per-token rewards (the scalar score s of the judge sits on the last response token, and every
response token pays a KL penalty to the frozen reference policy):

    r_t = -beta * KL_t + [t == last] * s,       KL_t = estimator(logp_t, logp_ref_t)   (kernels.py)

then GAE(gamma, lambda) gives advantages A_t and returns R_t = A_t + V_t, and the advantages are
whitened over all response tokens of the (global) batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp

from alignjax.models import heads, llama, precision
from alignjax.models.config import LMConfig
from alignjax.rl import kernels
from alignjax.rl.state import RewardMoments


class Rollout(NamedTuple):
    """A batch of sampled episodes. prompt_tokens, prompt_mask [B, P] (left-padded); response_tokens,
    response_mask [B, N] (right-padded; mask 1 up to and including EOS); scores [B] float32 (the
    scalar reward of each episode, e.g. the judge's P(safe))."""

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    response_tokens: jax.Array
    response_mask: jax.Array
    scores: jax.Array


class Experience(NamedTuple):
    """Everything the PPO epochs need, per response token [B, N] (0 where masked), plus the inputs."""

    prompt_tokens: jax.Array  # [B, P]
    prompt_mask: jax.Array  # [B, P]
    response_tokens: jax.Array  # [B, N]
    response_mask: jax.Array  # [B, N]
    logprobs: jax.Array  # log pi_old(y_t | ...), the policy that sampled (current params)
    ref_logprobs: jax.Array  # log pi_ref(y_t | ...)
    values: jax.Array  # V_old(s_t)
    kl: jax.Array  # KL_t estimate used in the penalty
    rewards: jax.Array  # r_t
    advantages: jax.Array  # A_t (whitened when configured)
    returns: jax.Array  # R_t = A_t + V_t (from the raw advantages)


@dataclasses.dataclass(frozen=True)
class LlamaPlayerModels:
    """How a player's networks run: a Llama policy and a Llama-backbone critic (`heads.py` layout
    {"backbone", "head"}). Hashable, so it can be a static jit argument. Any object with the same two
    methods can replace it (e.g. another architecture).

    Both methods take tokens, mask [B, S] and return only the last `n_last` positions, so the LM head
    (the [B, S, V] matmul) runs on the response positions only.

    compute_dtype ("float32" | "bfloat16"): the floating params are cast to it before the forward, so
    float32 master params train with a bfloat16 forward/backward (the gradient flows back through the
    cast to the params' dtype; `alignjax.models.precision`). Outputs are float32 either way.
    remat ("none" | "full" | "dots"): rematerialisation of each layer in the backward pass
    (`precision.remat_policy`). The defaults leave float32 params bitwise as before.
    """

    policy_config: LMConfig
    critic_config: LMConfig | None = None  # default: same architecture as the policy
    compute_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        precision.dtype_of(self.compute_dtype)
        precision.remat_policy(self.remat)

    def compute_params(self, params: Any) -> Any:
        """`params` with floating leaves in the compute dtype (what the forward sees; for samplers)."""
        return precision.cast_floating(params, precision.dtype_of(self.compute_dtype))

    def policy_logits(self, params: Any, tokens: jax.Array, mask: jax.Array, n_last: int) -> jax.Array:
        """[B, S] -> logits [B, n_last, V] float32 of the last n_last positions."""
        params = self.compute_params(params)
        h, _ = llama.hidden_states(params, self.policy_config, tokens, mask, remat=self.remat)
        return llama.lm_logits(params, self.policy_config, h[:, -n_last:]).astype(jnp.float32)

    def critic_values(self, params: Any, tokens: jax.Array, mask: jax.Array, n_last: int) -> jax.Array:
        """[B, S] -> values [B, n_last] float32 of the last n_last positions (per-token value head)."""
        config = self.critic_config or self.policy_config
        params = self.compute_params(params)
        h, _ = llama.hidden_states(params["backbone"], config, tokens, mask, remat=self.remat)
        return heads.scalar_head(params["head"], h[:, -n_last:]).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Static PPO hyper-parameters (hashable). Defaults follow the authors' script where it has one.

    kl_coef: beta of the per-token penalty -beta * KL_t; kl_estimator: a name in kernels.KL_ESTIMATORS.
    gamma, lam: GAE. clip_ratio: PPO epsilon (None = unclipped policy-gradient loss). value_clip:
    clip of V around V_old (None = plain squared error). entropy_coef: bonus on the mean token entropy.
    epochs x num_minibatches: the optimisation passes over a batch (per device, B must be divisible by
    num_minibatches). whiten_advantages: global masked whitening of A. advantage_clip: clip A after
    whitening. reward_scaling: "none" | "scale" (s / running std) | "normalize" ((s - mean) / std),
    running moments kept in PlayerState. reward_clip: clip the (scaled) score to [-c, c].
    temperature: divide logits by it in every log-prob. PPO is on-policy only when this is the
    temperature the tokens were sampled at: the game derives it from the player's SamplingConfig and
    rejects a different value (game.step.GameConfig); None = 1.0 when used alone.
    loss_aggregation: "token_mean" (mean over all response tokens of the batch) or
    "seq_mean" (mean over tokens of each sequence, then over sequences).
    fuse_experience: with epochs = num_minibatches = 1, take the old log-probs and values from the
    update's own policy and critic forwards (their stop-gradient values; the parameters are the same),
    so an update runs 3 forwards + 2 backwards instead of 5 forwards + 2 backwards. Equal to the
    separate experience up to float rounding (ratio exactly 1 instead of 1 +- 1e-7). False: separate.
    """

    epochs: int = 1
    num_minibatches: int = 1
    clip_ratio: float | None = 0.2
    value_clip: float | None = 0.2
    value_coef: float = 1.0
    entropy_coef: float = 0.0
    kl_coef: float = 0.01
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    advantage_clip: float | None = None
    reward_scaling: Literal["none", "scale", "normalize"] = "none"
    reward_clip: float | None = None
    temperature: float | None = None
    loss_aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    fuse_experience: bool = True

    @property
    def single_pass(self) -> bool:
        """One optimiser step whose forwards also give the experience (see fuse_experience)."""
        return self.fuse_experience and self.epochs * self.num_minibatches == 1

    @property
    def logprob_temperature(self) -> float:
        """The temperature of every log-prob PPO computes (1.0 when unset)."""
        return 1.0 if self.temperature is None else self.temperature

    def __post_init__(self):
        if self.epochs < 1 or self.num_minibatches < 1:
            raise ValueError(
                f"epochs and num_minibatches must be >= 1, got {self.epochs}, {self.num_minibatches}"
            )
        if self.kl_estimator not in kernels.KL_ESTIMATORS:
            raise ValueError(
                f"unknown kl_estimator {self.kl_estimator!r}; choose from {sorted(kernels.KL_ESTIMATORS)}"
            )
        if self.reward_scaling not in ("none", "scale", "normalize"):
            raise ValueError(
                f"reward_scaling must be 'none', 'scale' or 'normalize', got {self.reward_scaling!r}"
            )
        if self.loss_aggregation not in ("token_mean", "seq_mean"):
            raise ValueError(
                f"loss_aggregation must be 'token_mean' or 'seq_mean', got {self.loss_aggregation!r}"
            )
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("clip_ratio", "value_clip", "advantage_clip", "reward_clip"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {v}")


def check_rollout(rollout: Rollout) -> None:
    """chex shape/dtype checks of a rollout (runs at trace time, so errors name the wrong field)."""
    chex.assert_rank([rollout.prompt_tokens, rollout.prompt_mask], 2)
    chex.assert_rank([rollout.response_tokens, rollout.response_mask], 2)
    chex.assert_rank(rollout.scores, 1)
    b, p = rollout.prompt_tokens.shape
    n = rollout.response_tokens.shape[1]
    chex.assert_shape(rollout.prompt_mask, (b, p))
    chex.assert_shape(rollout.response_tokens, (b, n))
    chex.assert_shape(rollout.response_mask, (b, n))
    chex.assert_shape(rollout.scores, (b,))
    chex.assert_type([rollout.prompt_tokens, rollout.response_tokens], int)
    chex.assert_type(rollout.scores, float)
    if p < 1:
        raise ValueError(
            "prompts must hold at least one position (the response's first token is predicted from it)"
        )


def model_inputs(prompt_tokens, prompt_mask, response_tokens, response_mask) -> tuple[jax.Array, jax.Array]:
    """tokens, mask [B, P + N - 1]: the sequence without its last token (nothing is predicted from it)."""
    tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1)[:, :-1].astype(jnp.int32)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)[:, :-1].astype(jnp.int32)
    return tokens, mask


def _chunked(fn, batch: tuple, num_chunks: int):
    """Apply fn to [B, ...] arrays in num_chunks sequential slices (bounds memory like a minibatch)."""
    if num_chunks == 1:
        return fn(*batch)
    b = batch[0].shape[0]
    split = jax.tree.map(lambda x: x.reshape((num_chunks, b // num_chunks) + x.shape[1:]), batch)
    out = jax.lax.map(lambda xs: fn(*xs), split)
    return jax.tree.map(lambda x: x.reshape((b,) + x.shape[2:]), out)


def update_reward_moments(moments: RewardMoments, scores: jax.Array, axis_name: str | None) -> RewardMoments:
    """Merge this (global) batch's mean/var into the running moments (Chan et al.'s parallel formula)."""
    ones = jnp.ones_like(scores)
    n = kernels.masked_count(ones, axis_name)
    mean = kernels.masked_mean(scores, ones, axis_name)
    var = kernels.masked_var(scores, ones, False, axis_name)
    total = moments.count + n
    delta = mean - moments.mean
    new_mean = moments.mean + delta * n / total
    m2 = moments.var * moments.count + var * n + jnp.square(delta) * moments.count * n / total
    return RewardMoments(mean=new_mean, var=m2 / total, count=total)


def scale_scores(
    scores: jax.Array, moments: RewardMoments, cfg: PPOConfig, axis_name: str | None
) -> tuple[jax.Array, RewardMoments]:
    """Optional reward scaling by running moments (updated with this batch first), then clipping."""
    if cfg.reward_scaling != "none":
        moments = update_reward_moments(moments, scores, axis_name)
        # unbiased std of everything seen so far; 1 until two scores exist
        std = jnp.sqrt(moments.var * moments.count / jnp.maximum(moments.count - 1.0, 1.0))
        std = jnp.where(moments.count > 1, std, 1.0)
        if cfg.reward_scaling == "normalize":
            scores = (scores - moments.mean) / (std + 1e-8)
        else:
            scores = scores / (std + 1e-8)
    if cfg.reward_clip is not None:
        scores = jnp.clip(scores, -cfg.reward_clip, cfg.reward_clip)
    return scores, moments


def per_token_rewards(
    scores: jax.Array, kl: jax.Array, response_mask: jax.Array, kl_coef: float
) -> jax.Array:
    """r_t = -kl_coef * KL_t + s on the last response token; 0 where masked. scores [B], kl/mask [B, N]."""
    chex.assert_rank(scores, 1)
    chex.assert_equal_shape([kl, response_mask])
    m = response_mask.astype(bool)
    last = heads.last_token_index(response_mask)
    at_last = jnp.arange(kl.shape[1])[None, :] == last[:, None]
    r = -kl_coef * kl + jnp.where(at_last, scores[:, None], 0.0)
    return jnp.where(m, r, 0.0)


def response_logprobs(
    models: Any, params: Any, tokens: jax.Array, mask: jax.Array, response_tokens: jax.Array, cfg: PPOConfig
) -> jax.Array:
    """log pi(y_t | ...) [B, N] float32 of the response tokens [B, N], at cfg's temperature, from
    `model_inputs`' tokens, mask [B, P + N - 1]."""
    logits = models.policy_logits(params, tokens, mask, response_tokens.shape[1])
    return kernels.token_logprobs(logits, response_tokens, cfg.logprob_temperature)


def experience_forwards(
    policy_params: Any, critic_params: Any, ref_params: Any, rollout: Rollout, *, models: Any, cfg: PPOConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The three forwards of the experience, no gradients: (logp, ref_logp, values), each [B, N] float32
    (unmasked). They run in cfg.num_minibatches sequential chunks, which bounds memory like a minibatch."""
    n = rollout.response_tokens.shape[1]
    inputs = (rollout.prompt_tokens, rollout.prompt_mask, rollout.response_tokens, rollout.response_mask)

    def forward_chunk(pt, pm, rt, rm):
        tokens, tmask = model_inputs(pt, pm, rt, rm)
        logp = response_logprobs(models, policy_params, tokens, tmask, rt, cfg)
        ref_logp = response_logprobs(models, ref_params, tokens, tmask, rt, cfg)
        return logp, ref_logp, models.critic_values(critic_params, tokens, tmask, n)

    return jax.lax.stop_gradient(_chunked(forward_chunk, inputs, cfg.num_minibatches))


def compute_experience(
    policy_params: Any,
    critic_params: Any,
    ref_params: Any,
    rollout: Rollout,
    *,
    models: Any,
    cfg: PPOConfig,
    reward_moments: RewardMoments | None = None,
    axis_name: str | None = None,
) -> tuple[Experience, dict[str, jax.Array], RewardMoments]:
    """Experience of a rollout batch (no gradients). Returns (experience, metrics, new reward moments).

    Under pmap each device passes its slice of the batch; whitening, reward moments and metrics are
    global over `axis_name`. Forward passes run in cfg.num_minibatches sequential chunks.
    = `experience_from_forwards` of `experience_forwards`.
    """
    check_rollout(rollout)
    if rollout.response_tokens.shape[0] % cfg.num_minibatches:
        raise ValueError(
            f"batch size per device {rollout.response_tokens.shape[0]} is not divisible by "
            f"num_minibatches={cfg.num_minibatches}"
        )
    logp, ref_logp, values = experience_forwards(
        policy_params, critic_params, ref_params, rollout, models=models, cfg=cfg
    )
    return experience_from_forwards(
        rollout, logp, ref_logp, values, cfg=cfg, reward_moments=reward_moments, axis_name=axis_name
    )


def experience_from_forwards(
    rollout: Rollout,
    logp: jax.Array,
    ref_logp: jax.Array,
    values: jax.Array,
    *,
    cfg: PPOConfig,
    reward_moments: RewardMoments | None = None,
    axis_name: str | None = None,
) -> tuple[Experience, dict[str, jax.Array], RewardMoments]:
    """The experience from the forwards' outputs logp, ref_logp, values [B, N] (masked here): KL, per-token
    rewards, GAE, whitening. Pass values without gradients (a single-pass update passes stop_gradient
    copies of its own forwards). Returns (experience, metrics, new reward moments).

    Metrics: score_mean, kl_ref (mean over sequences of sum_t (logp - logp_ref)), kl_penalty_token
    (token mean of the penalty's estimator), value_mean, advantage_mean (before whitening),
    return_mean, reward_token_mean, response_length, empty_responses (rows with no response token:
    their score cannot be placed and they carry no gradient).
    """
    check_rollout(rollout)
    if reward_moments is None:
        reward_moments = RewardMoments.create()
    b, n = rollout.response_tokens.shape
    chex.assert_shape([logp, ref_logp, values], (b, n))
    mask = rollout.response_mask.astype(jnp.float32)
    logp, ref_logp, values = logp * mask, ref_logp * mask, values * mask

    kl = kernels.kl_estimate(logp, ref_logp, cfg.kl_estimator) * mask
    scores, new_moments = scale_scores(rollout.scores.astype(jnp.float32), reward_moments, cfg, axis_name)
    rewards = per_token_rewards(scores, kl, rollout.response_mask, cfg.kl_coef)
    advantages, returns = kernels.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    raw_advantages = advantages
    if cfg.whiten_advantages:
        advantages = kernels.masked_whiten(advantages, mask, axis_name=axis_name)
    if cfg.advantage_clip is not None:
        advantages = jnp.clip(advantages, -cfg.advantage_clip, cfg.advantage_clip) * mask

    ones = jnp.ones((b,), jnp.float32)
    lengths = jnp.sum(mask, axis=1)
    metrics = {
        "score_mean": kernels.masked_mean(rollout.scores.astype(jnp.float32), ones, axis_name),
        "kl_ref": kernels.masked_mean(jnp.sum((logp - ref_logp) * mask, axis=1), ones, axis_name),
        "kl_penalty_token": kernels.masked_mean(kl, mask, axis_name),
        "value_mean": kernels.masked_mean(values, mask, axis_name),
        "advantage_mean": kernels.masked_mean(raw_advantages, mask, axis_name),
        "return_mean": kernels.masked_mean(returns, mask, axis_name),
        "reward_token_mean": kernels.masked_mean(rewards, mask, axis_name),
        "response_length": kernels.masked_mean(lengths, ones, axis_name),
        "empty_responses": kernels.masked_sum((lengths == 0).astype(jnp.float32), ones, axis_name),
    }
    exp = Experience(
        prompt_tokens=rollout.prompt_tokens,
        prompt_mask=rollout.prompt_mask,
        response_tokens=rollout.response_tokens,
        response_mask=rollout.response_mask,
        logprobs=logp,
        ref_logprobs=ref_logp,
        values=values,
        kl=kl,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
    )
    return exp, metrics, new_moments
