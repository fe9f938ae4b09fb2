"""RL core: pure functional PPO and SFT steps for LLM players (jittable, pmappable over "data")."""

from alignjax.rl.experience import (
    Experience,
    LlamaPlayerModels,
    PPOConfig,
    Rollout,
    compute_experience,
    per_token_rewards,
)
from alignjax.rl.kernels import (
    KL_ESTIMATORS,
    entropy_from_logits,
    gae,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    token_logprobs,
)
from alignjax.rl.ppo import (
    NonFiniteError,
    make_ppo_update,
    nonfinite_report,
    ppo_epochs,
    ppo_update,
    raise_if_nonfinite,
)
from alignjax.rl.sft import SFTBatch, make_sft_step, sft_loss, sft_step
from alignjax.rl.state import (
    OptimizerConfig,
    PlayerState,
    RewardMoments,
    SFTState,
    current_lr,
    make_optimizer,
    make_player_state,
    make_schedule,
)

__all__ = [
    "KL_ESTIMATORS",
    "Experience",
    "LlamaPlayerModels",
    "NonFiniteError",
    "OptimizerConfig",
    "PPOConfig",
    "PlayerState",
    "RewardMoments",
    "Rollout",
    "SFTBatch",
    "SFTState",
    "compute_experience",
    "current_lr",
    "entropy_from_logits",
    "gae",
    "kl_estimate",
    "make_optimizer",
    "make_player_state",
    "make_ppo_update",
    "make_schedule",
    "make_sft_step",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "nonfinite_report",
    "per_token_rewards",
    "ppo_epochs",
    "ppo_update",
    "raise_if_nonfinite",
    "sft_loss",
    "sft_step",
    "token_logprobs",
]
