"""What evaluation and the settings need from a world: the `World` protocol, and the players' types.

A world is where the game is played with an exact referee: the synthetic red-teaming world
(`worlds.synthetic.SyntheticWorld`) is the one implementation today. `alignjax.eval` is written
against this protocol only, so a new world (another grammar, another judge) plugs into the same
evaluation without touching `eval/`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax

from alignjax.models.config import LMConfig
from alignjax.rewards.judge import JudgeOutput, Scores


class Player(NamedTuple):
    params: dict
    config: LMConfig


class Players(NamedTuple):
    attacker: Player
    defender: Player


class World(Protocol):
    """The world API used by `alignjax.eval` and the synthetic setting (arrays [B, ...] int32)."""

    cfg: Any  # the world's config; `helpfulness_weight` is read by the defender's reward
    eos_id: int
    pad_id: int
    max_prompt_len: int  # widest bare prompt of the grammar
    max_attack_len: int  # attacker generation length (prompt + EOS)
    max_response_len: int
    compliance_opener_ids: Any  # first tokens that open a compliant answer
    refusal_opener_ids: Any  # first tokens that open a refusal
    tables: Any  # the referee's weights (travel in GameConsts.judge)

    def prompts(self, split: str) -> list: ...  # grammar prompts with .text, .harmful, .framing, .topic
    def seed_prompts(self, split: str = "seeds") -> tuple[jax.Array, jax.Array]: ...
    def encode(self, texts, length: int | None = None, side: str = "left"): ...
    def decode(self, tokens, mask) -> list[str]: ...
    def parse(self, text: str) -> Any: ...  # the grammar's analysis, or None
    def defender_inputs(self, tokens, mask) -> tuple[jax.Array, jax.Array]: ...
    def attacker_inputs(self, tokens, mask) -> tuple[jax.Array, jax.Array]: ...
    def judge(self, x, x_mask, y, y_mask) -> JudgeOutput: ...
    def referee(self, tables, x, x_mask, y, y_mask) -> Scores: ...
    def class_p_unsafe(self, x, x_mask, compliant) -> jax.Array: ...  # judge P(unsafe) per answer class
    def prompt_labels(self, tokens, mask) -> tuple[jax.Array, jax.Array]: ...  # (harmful, benign)
    def is_compliant(self, tokens, mask) -> jax.Array: ...
    def defender_reward(self, x, x_mask, y, y_mask) -> jax.Array: ...
    def generate(self, params, lm_cfg, tokens, mask, key, max_new_tokens: int,
                 temperature: float = 1.0, greedy: bool = False): ...
