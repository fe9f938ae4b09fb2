"""The judge interface shared by every safety judge (LM judge, reward model, exact synthetic judge).

A judge is a pure, jittable callable

    judge(prompt_tokens [B, P] int32, prompt_mask [B, P], response_tokens [B, N] int32,
          response_mask [B, N]) -> JudgeOutput

that scores every sample: no sample is ever dropped (the authors' code dropped judge outputs that
were neither "safe" nor "unsafe", misaligning rewards and samples).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax


class JudgeOutput(NamedTuple):
    p_safe: jax.Array  # [B] float32 in [0, 1]
    p_unsafe: jax.Array  # [B] float32 in [0, 1]
    unsafe: jax.Array  # [B] bool verdict


class Judge(Protocol):
    def __call__(self, prompt_tokens, prompt_mask, response_tokens, response_mask) -> JudgeOutput: ...


class Scores(NamedTuple):
    """What a setting's referee says about one rollout batch (every array [B]).

    A referee is a pure, jittable `referee(judge_params, x, x_mask, y, y_mask) -> Scores`; its weights
    (`judge_params`: an LM judge's params, or the synthetic world's lookup tables) travel in
    `GameConsts.judge`, never baked into the compiled step."""

    judge: JudgeOutput  # the judge's p_safe, p_unsafe, verdict
    defender: jax.Array  # r(x, y): the defender's reward (p_safe, minus over-refusal where known)
    attacker_p_safe: jax.Array  # the (p_safe, p_unsafe) pair the attacker's reward reads
    attacker_p_unsafe: jax.Array
    harmful: jax.Array | None = None  # bool labels of x, where the setting knows them
    benign: jax.Array | None = None
    compliant: jax.Array | None = None  # bool: y complies (over-refusal on benign x)


def scores_from_judge(out: JudgeOutput) -> Scores:
    """Scores of a plain judge: the defender's reward is p_safe, the attacker reads (p_safe, p_unsafe)."""
    return Scores(out, out.p_safe, out.p_safe, out.p_unsafe)
