"""Decoder-only causal LMs of the Llama family (Llama, Mistral, Qwen2) as pure functions over pytrees,
value / reward heads on their hidden states, and HF checkpoint import / export."""

from alignjax.models.config import LMConfig
from alignjax.models.heads import (
    gather_last,
    init_critic,
    init_scalar_head,
    last_token_index,
    reward_forward,
    scalar_head,
    value_forward,
)
from alignjax.models.hf_io import CheckpointError, Pretrained, load_pretrained, save_pretrained
from alignjax.models.llama import (
    KVCache,
    LMOutput,
    forward,
    hidden_states,
    init_cache,
    init_params,
    lm_logits,
)
from alignjax.models.precision import PrecisionConfig, cast_floating, remat_policy

__all__ = [
    "CheckpointError",
    "KVCache",
    "LMConfig",
    "LMOutput",
    "PrecisionConfig",
    "Pretrained",
    "cast_floating",
    "forward",
    "gather_last",
    "hidden_states",
    "init_cache",
    "init_critic",
    "init_params",
    "init_scalar_head",
    "last_token_index",
    "lm_logits",
    "load_pretrained",
    "remat_policy",
    "reward_forward",
    "save_pretrained",
    "scalar_head",
    "value_forward",
]
