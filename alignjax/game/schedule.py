"""Who learns at step t: the stage schedule of the game, a pure function of the step counter.

Because the stage is computed from the step counter alone (never from host-side mutable state), a
run resumed from a checkpoint at any step takes exactly the same stages as an uninterrupted one.

Stages (int32 codes, compared inside traced code):

    DEFEND = 0   the defender gets a PPO update on r(x, y) = P_safe
    ATTACK = 1   the attacker gets a PPO update on P_unsafe + k * R_div; its prompts join the history
    BOTH   = 2   both players update on the same rollout (the simultaneous variant)

Modes:

    alternating   N_def defend steps, then N_att attack steps, repeated; defender first (spec section 2)
    simultaneous  every step is BOTH
    defend_only   every step is DEFEND (RLHF, Paraphrase baselines)
    attack_only   every step is ATTACK (RLHF-attacker baselines, frozen defender)

Presets: "paper" (N_def, N_att) = (200, 400); "authors_code" = (400, 200); "custom" takes the
config's own n_def / n_att (the small synthetic runs scale the stages down).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import numpy as np

DEFEND, ATTACK, BOTH = 0, 1, 2
STAGE_NAMES = ("defend", "attack", "both")
PRESETS = {"paper": (200, 400), "authors_code": (400, 200)}


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    mode: Literal["alternating", "simultaneous", "defend_only", "attack_only"] = "alternating"
    preset: Literal["paper", "authors_code", "custom"] = "custom"
    n_def: int = 20  # defend steps per round (used when preset == "custom")
    n_att: int = 20  # attack steps per round (used when preset == "custom")

    def __post_init__(self):
        n_def, n_att = self.lengths
        if self.mode == "alternating" and (n_def < 1 or n_att < 1):
            raise ValueError(f"alternating schedule needs n_def >= 1 and n_att >= 1, got {n_def}/{n_att}")

    @property
    def lengths(self) -> tuple[int, int]:
        """(N_def, N_att) after applying the preset."""
        return PRESETS.get(self.preset, (self.n_def, self.n_att))


def stage_at(step, cfg: ScheduleConfig):
    """Stage code of step `step` (0-based count of finished steps). Works on Python ints, NumPy and
    traced jnp int arrays alike: alternating = DEFEND if step mod (N_def + N_att) < N_def else ATTACK."""
    xp = jnp if not isinstance(step, (int, np.integer, np.ndarray)) else np
    if cfg.mode == "simultaneous":
        return xp.full(xp.shape(step), BOTH, xp.int32) if xp.ndim(step) else xp.int32(BOTH)
    if cfg.mode == "defend_only":
        return xp.full(xp.shape(step), DEFEND, xp.int32) if xp.ndim(step) else xp.int32(DEFEND)
    if cfg.mode == "attack_only":
        return xp.full(xp.shape(step), ATTACK, xp.int32) if xp.ndim(step) else xp.int32(ATTACK)
    n_def, n_att = cfg.lengths
    return xp.where(step % (n_def + n_att) < n_def, DEFEND, ATTACK).astype(xp.int32)


def stages_of(cfg: ScheduleConfig) -> tuple[int, ...]:
    """The stages a mode can take, in code order (static: what the compiled step must branch over)."""
    return {"alternating": (DEFEND, ATTACK), "simultaneous": (BOTH,), "defend_only": (DEFEND,),
            "attack_only": (ATTACK,)}[cfg.mode]


def round_at(step, cfg: ScheduleConfig):
    """Round index (one defend stage + one attack stage) of step `step`; 0 for non-alternating modes."""
    if cfg.mode != "alternating":
        return step * 0
    n_def, n_att = cfg.lengths
    return step // (n_def + n_att)


def stage_boundaries(total_steps: int, cfg: ScheduleConfig) -> list[tuple[int, int, int]]:
    """Host-side list of (start, end, stage) segments covering [0, total_steps), for plots/logs."""
    stages = np.asarray(stage_at(np.arange(total_steps), cfg))
    out, start = [], 0
    for t in range(1, total_steps + 1):
        if t == total_steps or stages[t] != stages[start]:
            out.append((start, t, int(stages[start])))
            start = t
    return out
