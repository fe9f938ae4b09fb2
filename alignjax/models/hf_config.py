"""HF config.json <-> `LMConfig` for the Llama family (Llama, Mistral, Qwen2), without torch.

transformers 5 writes `rope_parameters` {rope_type, rope_theta, factor, ...}; older configs write
`rope_theta` + `rope_scaling` {type | rope_type, factor, ...}. Both are read. Rope types default,
linear and llama3 are supported; others (dynamic, yarn, longrope, ...) raise, as do unsupported
architectures (GPT-2: learned positions, LayerNorm, GELU MLP, fused qkv).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from alignjax.models.config import LMConfig

CAUSAL_LM_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SEQ_CLS_ARCHITECTURES = {
    "LlamaForSequenceClassification": "llama",
    "MistralForSequenceClassification": "mistral",
    "Qwen2ForSequenceClassification": "qwen2",
}
_CAUSAL_LM_CLASS = {v: k for k, v in CAUSAL_LM_ARCHITECTURES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as (or written from) an alignjax model."""


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, tuple[Any, ...]]:
    """(rope_theta, LMConfig.rope_scaling) from either config style."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"rope_parameters / rope_scaling must be a mapping, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"per-layer-type rope parameters {sorted(params)} are not supported")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise CheckpointError(f"partial_rotary_factor={partial} is not supported (only full rotary)")
    if kind == "default":
        return theta, ("default",)
    if kind == "linear":
        return theta, ("linear", float(params["factor"]))
    if kind == "llama3":
        old_len = params.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        return theta, (
            "llama3",
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            int(old_len),
        )
    raise CheckpointError(f"rope type {kind!r} is not supported; supported: default, linear, llama3")


def _sliding_window_from_hf(cfg: dict[str, Any], family: str, num_layers: int) -> int | None:
    """One sliding window for all layers (Mistral), or none. Qwen2 may slide only the layers from
    max_window_layers on; a mix of sliding and full layers is not supported."""
    if family == "llama":
        return None
    window = cfg.get("sliding_window")
    if family == "qwen2":
        if not cfg.get("use_sliding_window", False):
            window = None
        layer_types = cfg.get("layer_types") or [
            "sliding_attention"
            if window is not None and i >= cfg.get("max_window_layers", 28)
            else "full_attention"
            for i in range(num_layers)
        ]
        kinds = set(layer_types)
        if kinds == {"full_attention"}:
            return None
        if kinds != {"sliding_attention"}:
            raise CheckpointError(f"mixed sliding/full attention layers {layer_types} are not supported")
    return None if window is None else int(window)


def config_from_hf(cfg: dict[str, Any]) -> tuple[LMConfig, str]:
    """LMConfig and the HF architecture class name from a config.json mapping."""
    archs = cfg.get("architectures") or []
    known = {**CAUSAL_LM_ARCHITECTURES, **SEQ_CLS_ARCHITECTURES}
    if len(archs) != 1 or archs[0] not in known:
        raise CheckpointError(f"unsupported architecture {archs!r}; supported: {sorted(known)}")
    arch = archs[0]
    family = known[arch]
    model_type = cfg.get("model_type", family)
    if model_type != family:
        raise CheckpointError(f"architecture {arch} with model_type {model_type!r} is inconsistent")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"hidden_act {act!r} is not supported (only silu)")
    num_layers = int(cfg["num_hidden_layers"])
    rope_theta, rope_scaling = _rope_from_hf(cfg)

    def one_id(x):  # Llama 3 lists several EOS ids; LMConfig keeps the first (the sampler takes its own)
        return x[0] if isinstance(x, list) and x else x

    num_heads = int(cfg["num_attention_heads"])
    config = LMConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=cfg.get("head_dim"),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        # Missing key: resolved from the weights (lm_head present or not) by the loader.
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2" or (family == "llama" and bool(cfg.get("attention_bias", False))),
        attention_out_bias=family == "llama" and bool(cfg.get("attention_bias", False)),
        mlp_bias=family == "llama" and bool(cfg.get("mlp_bias", False)),
        sliding_window=_sliding_window_from_hf(cfg, family, num_layers),
        architecture=family,
        bos_token_id=one_id(cfg.get("bos_token_id")),
        eos_token_id=one_id(cfg.get("eos_token_id")),
        pad_token_id=one_id(cfg.get("pad_token_id")),
    )
    return config, arch


def config_to_hf(config: LMConfig, dtype=jnp.float32, architecture: str | None = None) -> dict[str, Any]:
    """config.json mapping for transformers (5.x style `rope_parameters` plus the legacy `rope_theta` /
    `rope_scaling` keys, so older transformers read it too)."""
    family = config.architecture
    if family != "llama" and (config.attention_out_bias or config.mlp_bias):
        raise CheckpointError(f"{family} has no output-projection or MLP biases in HF; cannot export")
    if family == "qwen2" and not config.attention_bias:
        raise CheckpointError("HF Qwen2 always has q/k/v biases; export with attention_bias=True")
    if family == "mistral" and config.attention_bias:
        raise CheckpointError("HF Mistral has no attention biases; cannot export attention_bias=True")
    if family == "llama" and config.attention_bias != config.attention_out_bias:
        raise CheckpointError("HF Llama's attention_bias covers q, k, v and o together; set both or neither")
    if family == "llama" and config.sliding_window is not None:
        raise CheckpointError("HF Llama has no sliding window; export as mistral instead")
    rope = {"rope_type": config.rope_scaling[0], "rope_theta": config.rope_theta}
    if config.rope_scaling[0] == "linear":
        rope["factor"] = config.rope_scaling[1]
    elif config.rope_scaling[0] == "llama3":
        f, lo, hi, old = config.rope_scaling[1:]
        rope.update(factor=f, low_freq_factor=lo, high_freq_factor=hi, original_max_position_embeddings=old)
    out = {
        "architectures": [architecture or _CAUSAL_LM_CLASS[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "dtype": jnp.dtype(dtype).name,
        "torch_dtype": jnp.dtype(dtype).name,
    }
    if config.rope_scaling[0] != "default":
        out["rope_scaling"] = dict(rope)
    if family == "llama":
        out["attention_bias"] = config.attention_bias
        out["mlp_bias"] = config.mlp_bias
    elif family == "mistral":
        out["sliding_window"] = config.sliding_window
    else:
        out["use_sliding_window"] = config.sliding_window is not None
        out["sliding_window"] = config.sliding_window
        out["max_window_layers"] = 0
        kind = "full_attention" if config.sliding_window is None else "sliding_attention"
        out["layer_types"] = [kind] * config.num_layers
    return out
