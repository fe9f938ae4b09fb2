"""The attacker's scalar reward: judge probabilities combined with similarity to the history.

Sign conventions (read these before changing a weight):

- p_safe, p_unsafe: the judge's probabilities for the defender's response (`JudgeOutput`). The
  defender's reward is r = p_safe. With an LM judge p_safe + p_unsafe need not be 1 (both are read
  from a next-token distribution over the whole vocabulary), so the presets keep the one they use.
- SelfBLEU_X(x) in [0, 1] and Cos_X(x) in [-1, 1] are SIMILARITIES of the prompt x to the history:
  high = repetitive (selfbleu.py, embedding.py).
- The paper calls R_div a "diversity reward" and writes the attacker's reward as -r + k * R_div with
  R_div = (R_SelfBLEU + R_Embedding) / 2 and R_SelfBLEU = -SelfBLEU_X, R_Embedding = -Cos_X:
  a penalty for similarity, i.e. a bonus for novelty (spec sections 2 and 4).

All presets are instances of one linear form (every weight >= 0 pushes the attacker the intended way):

    reward = w_unsafe * p_unsafe - w_safe * p_safe - w_bleu * SelfBLEU_X - w_cos * Cos_X

    "paper"        : w_unsafe = 0, w_safe = 1, w_bleu = w_cos = k / 2     (-r + k (R_bleu + R_emb) / 2)
    "authors_code" : w_unsafe = 1, w_safe = 0, w_bleu = 5, w_cos = 1     (P_unsafe - 5 SelfBLEU - Cos)
    "custom"       : the four weights given explicitly.

The reward is one scalar per sample; the RL code places it on the last response token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from alignjax.rewards import history as history_lib
from alignjax.rewards.embedding import cosine_to_history
from alignjax.rewards.selfbleu import DEFAULT_ORDERS, FORMS, self_bleu

PRESETS = ("paper", "authors_code", "custom")


@dataclasses.dataclass(frozen=True)
class AttackerRewardConfig:
    """Which combination to use. `k` is read by "paper" only; the w_* fields by "custom" only.

    selfbleu_form names the Self-BLEU variant the game computes for this reward ("per_reference", as
    the authors' code, or "multi_reference"); it is carried here so one config describes the reward.
    """

    preset: str = "paper"
    k: float = 1.0
    w_unsafe: float = 0.0
    w_safe: float = 1.0
    w_bleu: float = 0.5
    w_cos: float = 0.5
    selfbleu_form: str = "per_reference"

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown attacker reward preset {self.preset!r}; choose from {PRESETS}")
        if self.selfbleu_form not in FORMS:
            raise ValueError(f"unknown selfbleu_form {self.selfbleu_form!r}; choose from {FORMS}")

    def weights(self) -> "RewardWeights":
        """The (w_unsafe, w_safe, w_bleu, w_cos) of the linear form in the module docstring."""
        if self.preset == "paper":
            return RewardWeights(0.0, 1.0, self.k / 2, self.k / 2)
        if self.preset == "authors_code":
            return RewardWeights(1.0, 0.0, 5.0, 1.0)
        return RewardWeights(self.w_unsafe, self.w_safe, self.w_bleu, self.w_cos)


class RewardWeights(NamedTuple):
    w_unsafe: float
    w_safe: float
    w_bleu: float
    w_cos: float


class AttackerReward(NamedTuple):
    reward: jax.Array  # [B] the attacker's scalar reward
    safety_term: jax.Array  # [B] w_unsafe * p_unsafe - w_safe * p_safe
    diversity_term: jax.Array  # [B] -(w_bleu * SelfBLEU + w_cos * Cos), <= 0 for non-negative similarity


def attacker_reward(
    config: AttackerRewardConfig,
    p_safe: jax.Array,
    p_unsafe: jax.Array,
    selfbleu: jax.Array,
    cosine: jax.Array,
) -> AttackerReward:
    """reward = w_unsafe p_unsafe - w_safe p_safe - w_bleu SelfBLEU - w_cos Cos; all inputs [B]."""
    chex.assert_rank([p_safe, p_unsafe, selfbleu, cosine], 1)
    chex.assert_equal_shape([p_safe, p_unsafe, selfbleu, cosine])
    w = config.weights()
    safety = w.w_unsafe * p_unsafe.astype(jnp.float32) - w.w_safe * p_safe.astype(jnp.float32)
    diversity = -(w.w_bleu * selfbleu.astype(jnp.float32) + w.w_cos * cosine.astype(jnp.float32))
    return AttackerReward(safety + diversity, safety, diversity)


class Similarity(NamedTuple):
    selfbleu: jax.Array  # [B] SelfBLEU_X of each new prompt, in [0, 1]
    cosine: jax.Array  # [B] Cos_X of each new prompt, in [-1, 1]


def similarity_to_history(
    history: history_lib.History,
    tokens: jax.Array,
    lengths: jax.Array,
    embeddings: jax.Array | None,
    selfbleu_form: str = "per_reference",
    chunk_size: int = 256,
    orders: Sequence[int] = DEFAULT_ORDERS,
    use_selfbleu: bool = True,
) -> Similarity:
    """SelfBLEU_X and Cos_X [B] of new prompts against the valid entries of the history (jittable).

    tokens: [B, L] right-padded prompt ids (no EOS); lengths: [B]; embeddings: [B, E], or None for no
    embedding term (Cos_X = 0); use_selfbleu=False gives SelfBLEU_X = 0. Call it before
    `history.add` so a prompt is not compared with itself; an empty history gives 0 for both."""
    chex.assert_rank([tokens, lengths], [2, 1])
    b = tokens.shape[0]
    valid = history_lib.valid_mask(history)
    if use_selfbleu:
        bleu = self_bleu(tokens, lengths, history.tokens, history.lengths, valid, form=selfbleu_form,
                         orders=orders, chunk_size=chunk_size)
    else:
        bleu = jnp.zeros((b,), jnp.float32)
    if embeddings is None:
        cos = jnp.zeros((b,), jnp.float32)
    else:
        cos = cosine_to_history(embeddings, history.embeddings, valid)
    chex.assert_shape([bleu, cos], (b,))
    return Similarity(bleu, cos)
