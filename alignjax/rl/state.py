"""Train-state pytrees of a player (policy + its own critic) and their optax optimizers.

`PlayerState` is one pytree: params and optimizer states of the policy and of the critic, the PPO
update counter and running reward moments. The optax transformations ride along as static
(non-pytree) fields, like Flax's `TrainState.tx`, so an update is `ppo_update(state, ...)` with no
optimizer to thread through, and checkpoints hold arrays only.

The authors' optimizer (MOSS-RLHF, which GPO forks): AdamW(b1 0.9, b2 0.95, eps 1e-6, no weight
decay), gradient clipping at global norm 1.0, and a learning-rate factor per optimizer step s with
warm-up w (`inverse_sqrt` below):

    f(s) = max(s / w, 0.1)              if s < w
         = sqrt(w / max(w, s))          otherwise          (floored at 1e-8)

Policy and critic have separate learning rates (defender 5e-7, attacker 3e-6, critic 1.5e-6).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("inverse_sqrt", "constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + global-norm clipping + a learning-rate schedule counted in optimizer steps."""

    learning_rate: float = 1e-6
    schedule: Literal["inverse_sqrt", "constant", "cosine"] = "inverse_sqrt"
    warmup_steps: int = 100
    decay_steps: int = 0  # cosine only: steps from the end of warm-up to the end of the decay
    min_lr_ratio: float = 0.0  # cosine only: final lr / peak lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.schedule!r}; choose from {SCHEDULES}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule == "cosine" and self.decay_steps <= 0:
            raise ValueError("the cosine schedule needs decay_steps > 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


def inverse_sqrt_factor(step: jax.Array, warmup_steps: int) -> jax.Array:
    """The authors' factor: max(s/w, 0.1) during warm-up, then sqrt(w / max(w, s)); >= 1e-8."""
    s = jnp.asarray(step, jnp.float32)
    w = float(max(warmup_steps, 1))
    warm = jnp.maximum(s / w, 0.1)
    decay = jnp.sqrt(w / jnp.maximum(w, s))
    factor = jnp.where(s < warmup_steps, warm, decay) if warmup_steps > 0 else decay
    return jnp.maximum(factor, 1e-8)


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the optimizer step count (optax counts from 0)."""
    lr, w = cfg.learning_rate, cfg.warmup_steps
    if cfg.schedule == "inverse_sqrt":
        return lambda count: lr * inverse_sqrt_factor(count, w)
    if cfg.schedule == "constant":
        if w == 0:
            return optax.constant_schedule(lr)
        return optax.linear_schedule(0.0, lr, w)  # stays at lr after w steps
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, max(w, 1), w + cfg.decay_steps, end_value=lr * cfg.min_lr_ratio
    )


@functools.lru_cache(maxsize=None)
def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm) then AdamW(schedule, b1, b2, eps, weight_decay).

    The lr is an injected hyperparameter so that `current_lr(opt_state)` can report it in-graph.
    Cached per config: the transformation is a static field of the state pytrees, and equal configs
    giving the identical object keeps jit from recompiling for a state built twice."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    if cfg.max_grad_norm is None:
        return optax.chain(optax.identity(), adamw)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)


def current_lr(opt_state: Any) -> jax.Array:
    """The learning rate of the last step (step 0's before any) from a `make_optimizer` state -> []."""
    return optax.tree_utils.tree_get(
        opt_state, "learning_rate", filtering=lambda _path, v: isinstance(v, jax.Array)
    )


@flax.struct.dataclass
class RewardMoments:
    """Running mean/variance of the scalar scores seen so far (Chan et al. parallel update)."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def create(cls) -> RewardMoments:
        return cls(jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32))


@flax.struct.dataclass
class PlayerState:
    """Everything that changes when a player trains (a pytree; `*_tx` are static).

    policy_params / critic_params: parameter pytrees; *_opt_state: optax states; step: [] int32 number
    of PPO updates applied so far (non-finite updates count but change nothing else);
    reward_moments: running score statistics for optional reward scaling.
    """

    policy_params: Any
    policy_opt_state: Any
    critic_params: Any
    critic_opt_state: Any
    step: jax.Array
    reward_moments: RewardMoments
    policy_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    critic_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(
        cls,
        policy_params: Any,
        critic_params: Any,
        policy_tx: optax.GradientTransformation,
        critic_tx: optax.GradientTransformation,
    ) -> PlayerState:
        """Fresh optimizer states for the given params; the critic is this player's own (jittable)."""
        return cls(
            policy_params=policy_params,
            policy_opt_state=policy_tx.init(policy_params),
            critic_params=critic_params,
            critic_opt_state=critic_tx.init(critic_params),
            step=jnp.zeros((), jnp.int32),
            reward_moments=RewardMoments.create(),
            policy_tx=policy_tx,
            critic_tx=critic_tx,
        )


def make_player_state(
    policy_params: Any,
    critic_params: Any,
    policy_opt: OptimizerConfig,
    critic_opt: OptimizerConfig,
) -> PlayerState:
    """PlayerState with AdamW optimizers built from per-network configs (separate learning rates)."""
    return PlayerState.create(
        policy_params, critic_params, make_optimizer(policy_opt), make_optimizer(critic_opt)
    )


@flax.struct.dataclass
class SFTState:
    """Supervised fine-tuning state of one LM: params, optimizer state, step; `tx` is static."""

    params: Any
    opt_state: Any
    step: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> SFTState:
        return cls(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), tx=tx)
