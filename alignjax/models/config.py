"""Static configuration of a decoder-only causal LM (Llama / Mistral / Qwen2 family).

`LMConfig` is frozen and hashable, so it can be a static argument of `jax.jit`. Field names follow
HF's `LlamaConfig` where one exists; `from_hf_dict` / `to_hf_dict` (in `hf_io.py`) translate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ARCHITECTURES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 1000
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # default hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("default",) | ("linear", factor) |
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_scaling: tuple[Any, ...] = ("default",)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on the q, k, v projections (Qwen2; Llama's attention_bias)
    attention_out_bias: bool = False  # bias on the output projection (Llama's attention_bias; not Qwen2)
    mlp_bias: bool = False  # bias on gate, up and down projections (Llama's mlp_bias)
    sliding_window: int | None = None  # Mistral / Qwen2 sliding-window attention, None = full
    architecture: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self):
        # A list (e.g. from YAML) would make the config unhashable, so unusable as a static jit argument.
        object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} not supported; choose from {ARCHITECTURES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rope_scaling[0] not in ROPE_TYPES:
            raise ValueError(f"rope scaling {self.rope_scaling[0]!r} not supported; choose from {ROPE_TYPES}")
        n_args = {"default": 1, "linear": 2, "llama3": 5}[self.rope_scaling[0]]
        if len(self.rope_scaling) != n_args:
            raise ValueError(
                f"rope_scaling {self.rope_scaling!r} needs {n_args} entries: ('default',) | "
                "('linear', factor) | "
                "('llama3', factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError("hidden_size must be a multiple of num_heads when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    def replace(self, **kw) -> "LMConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        layer = attn + 3 * d * f + 2 * d
        if self.attention_bias:
            layer += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.attention_out_bias:
            layer += d
        if self.mlp_bias:
            layer += 2 * f + d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d
