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
