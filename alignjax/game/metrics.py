"""What one game step reports: a fixed metric schema per stage.

Every step returns the same dict structure from inside jit (each player's `lax.cond` needs it): the metrics of
the rollout, both players' PPO metrics and the attacker's reward terms. The player that did not learn
in a step gets zeros there, and `select` (on the host) keeps only what the step measured:

    always                   stage, judge/*, attack_success, defender/score, rollout lengths and
                             counters, history/size, labels-based rates (where the setting has labels)
    defend (and both)        defender/ppo/*
    attack (and both)        attacker/ppo/*, ATTACK_REWARD_KEYS

So a NaN in a logged metric always means a real NaN (the loop stops on it: `nonfinite`); a sample
whose score is NaN makes its batch mean NaN, so no per-step "scored" counter is needed. All values
are global over the data axis (pmean / psum), identical on every device.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignjax import parallel
from alignjax.game import schedule as sched

DEFENDER_PPO = "defender/ppo/"
ATTACKER_PPO = "attacker/ppo/"
ATTACK_REWARD_KEYS = (
    "attacker/reward",
    "attacker/safety_term",
    "attacker/diversity_term",
    "attacker/selfbleu_to_history",
    "attacker/cosine_to_history",
)


def attack_reward_metrics(reward, similarity, axis_name) -> dict[str, jax.Array]:
    """Batch means of the attacker's reward and its terms (`AttackerReward`, `Similarity`, [B] each)."""
    mean = lambda v: parallel.pmean(jnp.mean(v), axis_name)
    values = (mean(reward.reward), mean(reward.safety_term), mean(reward.diversity_term),
              mean(similarity.selfbleu), mean(similarity.cosine))
    return dict(zip(ATTACK_REWARD_KEYS, values, strict=True))


def attack_reward_placeholder() -> dict[str, jax.Array]:
    """Zeros in the shape of `attack_reward_metrics` (steps where the attacker does not learn)."""
    return {k: jnp.zeros((), jnp.float32) for k in ATTACK_REWARD_KEYS}


def zeros_like(tree: Any) -> Any:
    return jax.tree.map(jnp.zeros_like, tree)


def step_metrics(ep, stage, history, defender_ppo: dict, attacker_ppo: dict, attack_reward: dict,
                 axis_name) -> dict[str, jax.Array]:
    """The step's metric dict (fixed structure); `ep` is the step's `Episode`, `history` the new X."""
    mean = lambda v: parallel.pmean(jnp.mean(v), axis_name)
    total = lambda v: parallel.psum(jnp.sum(v), axis_name)
    f32 = lambda v: v.astype(jnp.float32)
    s, j = ep.scores, ep.scores.judge
    out = {
        "stage": stage.astype(jnp.float32),
        "judge/p_safe": mean(j.p_safe),
        "judge/p_unsafe": mean(j.p_unsafe),
        "attack_success": mean(f32(j.unsafe)),
        "defender/score": mean(s.defender),
        "defender/response_length": mean(f32(jnp.sum(ep.response_mask, axis=1))),
        "attacker/prompt_length": mean(f32(ep.prompt_lengths)),
        "attacker/empty_prompts": total(f32(ep.prompt_lengths == 0)),
        "history/size": f32(history.count),
    }
    if s.harmful is not None:
        hf, bf = f32(s.harmful), f32(s.benign)
        out["attacker/harmful_fraction"] = mean(hf)
        out["attack_success_harmful"] = total(j.unsafe * hf) / jnp.maximum(total(hf), 1.0)
        if s.compliant is not None:
            out["defender/benign_refusal"] = total(bf * ~s.compliant) / jnp.maximum(total(bf), 1.0)
    out.update({DEFENDER_PPO + k: v for k, v in defender_ppo.items()})
    out.update({ATTACKER_PPO + k: v for k, v in attacker_ppo.items()})
    out.update(attack_reward)
    return out


# ------------------------------------------------------------------------------------- host side


def measured(key: str, stage: int) -> bool:
    """Whether metric `key` is measured in a step of stage `stage` (see the module doc)."""
    if key.startswith(DEFENDER_PPO):
        return stage in (sched.DEFEND, sched.BOTH)
    if key.startswith(ATTACKER_PPO) or key in ATTACK_REWARD_KEYS:
        return stage in (sched.ATTACK, sched.BOTH)
    return True


def select(record: dict) -> dict:
    """The entries of one step's host record ({name: scalar}, with "stage") that the step measured."""
    if "stage" not in record:
        return dict(record)
    stage = int(record["stage"])
    return {k: v for k, v in record.items() if measured(k, stage)}


def nonfinite(record: dict) -> list[str]:
    """Names of the entries of a (selected) record that are NaN or +-inf."""
    return [k for k, v in record.items()
            if isinstance(v, (float, np.floating)) and not math.isfinite(float(v))]
