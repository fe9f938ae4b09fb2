"""GGUF (llama.cpp) files -> alignjax params, and a one-time conversion of a GGUF to an HF folder.

`hf_io.load_pretrained(path)` comes here when `path` is a `.gguf` file, or a folder holding exactly
one `.gguf` and no safetensors. Only `general.architecture == "llama"` is read (Llama 1/2/3 without
`rope_freqs`, SmolLM, TinyLlama, Mistral 7B as llama.cpp converts it: llama.cpp has no sliding window).
Tensors are read with the `gguf` package (`GGUFReader`) and dequantised to float32 by
`gguf.quants.dequantize` (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, IQ*, TQ*, ...;
whatever that function supports), then cast to the requested dtype one tensor at a time.

Layout. GGUF lists a tensor's dims innermost first (ne0 = in), so the reader's NumPy array of a
Linear is [out, in], HF's order; alignjax stores [in, out] (see `hf_io`):

    token_embd.weight        [V, D]         -> embed [V, D]
    blk.{i}.attn_q.weight    [Hq*hd, D]     -> layers/wq [L, D, Hq*hd]   (rope permutation undone)
    blk.{i}.attn_k.weight    [Hkv*hd, D]    -> layers/wk [L, D, Hkv*hd]  (rope permutation undone)
    blk.{i}.attn_v.weight    [Hkv*hd, D]    -> layers/wv
    blk.{i}.attn_output.weight [D, Hq*hd]   -> layers/wo [L, Hq*hd, D]
    blk.{i}.ffn_{gate,up}.weight [F, D]     -> layers/w_{gate,up} [L, D, F]
    blk.{i}.ffn_down.weight  [D, F]         -> layers/w_down [L, F, D]
    blk.{i}.attn_norm.weight / ffn_norm.weight [D] -> layers/attn_norm / mlp_norm [L, D]
    blk.{i}.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.bias (optional) -> layers/b*
    output_norm.weight       [D]            -> final_norm [D]
    output.weight            [V, D]         -> lm_head [D, V]   (absent: tied to token_embd)

Rope permutation. HF's rotary embedding rotates the two halves of each head (rotate_half); GGML's
rotates adjacent pairs. llama.cpp's convert_hf_to_gguf therefore reorders the rows of q and k (and
of their biases) within each head, with n_head = Hq for q and Hkv for k:

    permute(w) = w.reshape(n_head, 2, hd // 2, *rest).swapaxes(1, 2).reshape(w.shape)

i.e. GGUF row (head i, pair j, member a) = HF row (i, a, j): out[i*hd + 2j + a] = in[i*hd + a*hd/2 + j].
The inverse reads the GGUF rows as (n_head, hd/2, 2), swaps back to (n_head, 2, hd/2) and flattens
(`unpermute_rope_rows`).

Every check (architecture, metadata, tensor names, shapes and types) runs before the first tensor is
dequantised, so a bad file fails at once with a `CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from alignjax.models.config import LMConfig
from alignjax.models.hf_config import CheckpointError

# (our name in params["layers"], GGUF name under blk.{i}., transpose?)
_LAYER_TENSORS = [
    ("wq", "attn_q.weight", True),
    ("wk", "attn_k.weight", True),
    ("wv", "attn_v.weight", True),
    ("wo", "attn_output.weight", True),
    ("w_gate", "ffn_gate.weight", True),
    ("w_up", "ffn_up.weight", True),
    ("w_down", "ffn_down.weight", True),
    ("attn_norm", "attn_norm.weight", False),
    ("mlp_norm", "ffn_norm.weight", False),
]
# Optional biases, grouped by the LMConfig flag that switches them on.
_BIASES = {
    "attention_bias": [("bq", "attn_q.bias"), ("bk", "attn_k.bias"), ("bv", "attn_v.bias")],
    "attention_out_bias": [("bo", "attn_output.bias")],
    "mlp_bias": [("b_gate", "ffn_gate.bias"), ("b_up", "ffn_up.bias"), ("b_down", "ffn_down.bias")],
}
# Which rows of q / k (weights and biases) llama.cpp permuted, and with how many heads.
_PERMUTED = {"wq": "num_heads", "bq": "num_heads", "wk": "num_kv_heads", "bk": "num_kv_heads"}


def _import_gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading .gguf files needs the `gguf` package: pip install gguf==0.19.0") from e
    return gguf


# ------------------------------------------------------------------------------------------ paths


def gguf_file_of(path: str | os.PathLike) -> pathlib.Path | None:
    """The GGUF file `path` names: itself if it is a `.gguf` file, the one `.gguf` of a folder without
    safetensors, else None (an HF folder: `hf_io` reads it). Several `.gguf` files in a folder without
    safetensors raise, since which one is meant cannot be told. `package:<pkg>/<file>` names a file
    shipped in an installed package (`worlds.real_data.package_path`)."""
    from alignjax.worlds.real_data import package_path

    p = pathlib.Path(package_path(path))
    if p.suffix.lower() == ".gguf" and not p.is_dir():
        return p  # load_gguf says so if it does not exist
    if not p.is_dir():
        return None
    if (p / "model.safetensors").exists() or (p / "model.safetensors.index.json").exists():
        return None
    found = sorted(f for f in p.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())
    if len(found) > 1:
        raise CheckpointError(
            f"{p} holds {len(found)} .gguf files {[f.name for f in found]}; pass the path of one of them"
        )
    return found[0] if found else None


# ---------------------------------------------------------------------------------------- reading


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (module docstring). w: [n_head*hd, ...] -> same shape."""
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"{w.shape[0]} rows are not n_head={n_head} heads of an even head_dim")
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Meta:
    """Typed access to a GGUF's metadata, errors naming the file and the key."""

    def __init__(self, reader, path: pathlib.Path):
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
        return value

    def one(self, key: str, default: Any = None) -> Any:
        """A scalar; per-layer arrays are accepted only when all layers agree."""
        value = self.get(key, default) if default is not None else self.require(key)
        if isinstance(value, list):
            if not value or len(set(value)) != 1:
                raise CheckpointError(f"{self.path}: per-layer {key} = {value} is not supported")
            value = value[0]
        return value


def _config_from_meta(meta: _Meta, tensors: dict[str, Any]) -> LMConfig:
    path = meta.path
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported"
        )
    experts = meta.get("llama.expert_count", 0)
    if experts:
        raise CheckpointError(
            f"{path}: mixture-of-experts llama (llama.expert_count={experts}) is not supported"
        )
    d = int(meta.one("llama.embedding_length"))
    n_heads = int(meta.one("llama.attention.head_count"))
    n_kv = int(meta.one("llama.attention.head_count_kv", n_heads))
    head_dim = int(meta.one("llama.attention.key_length", d // n_heads))
    value_dim = int(meta.one("llama.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise CheckpointError(f"{path}: key_length {head_dim} != value_length {value_dim} is not supported")
    rope_dim = int(meta.one("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(
            f"{path}: llama.rope.dimension_count={rope_dim} < head_dim={head_dim} (partial rotary) "
            "is not supported"
        )
    scaling = meta.get("llama.rope.scaling.type", "none")
    factor = float(meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear", 1.0)))
    if scaling == "linear" or (scaling == "none" and factor != 1.0):
        rope_scaling: tuple[Any, ...] = ("linear", factor)
    elif scaling == "none":
        rope_scaling = ("default",)
    else:
        raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported (none, linear)")
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(
            f"{path}: has rope_freqs.weight (llama.cpp's form of Llama 3.1 rope scaling), which is not "
            "supported; convert the HF checkpoint instead"
        )
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    if len(tensors["token_embd.weight"].shape) != 2:
        raise CheckpointError(f"{path}: token_embd.weight is not a matrix")
    vocab = int(tensors["token_embd.weight"].shape[1])  # GGUF dims: (D, V)
    stated = meta.get("llama.vocab_size")
    if stated is not None and int(stated) != vocab:
        raise CheckpointError(f"{path}: llama.vocab_size={stated} but token_embd.weight has {vocab} rows")
    n_layers = int(meta.one("llama.block_count"))

    def has_all(names):
        present = [all(f"blk.{i}.{n}" in tensors for _, n in names) for i in range(n_layers)]
        if any(present) and not all(present):
            raise CheckpointError(f"{path}: biases {[n for _, n in names]} are present in some layers only")
        return all(present) and n_layers > 0

    def opt_id(key):
        v = meta.get(key)
        return None if v is None else int(v)

    return LMConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=int(meta.one("llama.feed_forward_length")),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=float(meta.one("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.one("llama.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(meta.one("llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=has_all(_BIASES["attention_bias"]),
        attention_out_bias=has_all(_BIASES["attention_out_bias"]),
        mlp_bias=has_all(_BIASES["mlp_bias"]),
        architecture="llama",
        bos_token_id=opt_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=opt_id("tokenizer.ggml.eos_token_id"),
        pad_token_id=opt_id("tokenizer.ggml.padding_token_id"),
    )


def _expected_shapes(config: LMConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> NumPy shape after dequantisation (HF's [out, in] order)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qd, kvd = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = {
        "attn_q.weight": (qd, d), "attn_k.weight": (kvd, d), "attn_v.weight": (kvd, d),
        "attn_output.weight": (d, qd),
        "ffn_gate.weight": (f, d), "ffn_up.weight": (f, d), "ffn_down.weight": (d, f),
        "attn_norm.weight": (d,), "ffn_norm.weight": (d,),
    }  # fmt: skip
    bias_shapes = {
        "attn_q.bias": (qd,), "attn_k.bias": (kvd,), "attn_v.bias": (kvd,), "attn_output.bias": (d,),
        "ffn_gate.bias": (f,), "ffn_up.bias": (f,), "ffn_down.bias": (d,),
    }  # fmt: skip
    for flag, names in _BIASES.items():
        if getattr(config, flag):
            per_layer.update({n: bias_shapes[n] for _, n in names})
    out = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not config.tie_word_embeddings:
        out["output.weight"] = (v, d)
    for i in range(config.num_layers):
        out.update({f"blk.{i}.{n}": s for n, s in per_layer.items()})
    return out


def _dequantisable(gguf, qtype) -> bool:
    """Whether `gguf.quants.dequantize` decodes `qtype` (probed on one zero block: the package has
    no public list of the types it supports)."""
    if qtype == gguf.GGMLQuantizationType.F64:
        return True  # typed float64 by GGUFReader; load_gguf casts it
    if qtype.name.startswith("I") and qtype.name[1:].isdigit():
        return False  # integer tensors (I8..I64) hold no float weights
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def _check_tensors(gguf, tensors: dict[str, Any], config: LMConfig, path: pathlib.Path) -> None:
    expected = _expected_shapes(config)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointError(f"{path}: tensors missing: {missing[:8]}{more}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        more = f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""
        raise CheckpointError(f"{path}: unexpected tensors (not a plain llama?): {extra[:8]}{more}")
    for name, shape in expected.items():
        got = tuple(int(x) for x in reversed(tensors[name].shape.tolist()))
        if got != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {got}, but the metadata implies {shape}"
            )
    verdict: dict[Any, bool] = {}
    bad: dict[str, list[str]] = {}
    for name, t in tensors.items():
        if t.tensor_type not in verdict:
            verdict[t.tensor_type] = _dequantisable(gguf, t.tensor_type)
        if not verdict[t.tensor_type]:
            bad.setdefault(t.tensor_type.name, []).append(name)
    if bad:
        what = "; ".join(
            f"{q} ({', '.join(ns[:3])}{', ...' if len(ns) > 3 else ''})" for q, ns in bad.items()
        )
        raise CheckpointError(
            f"{path}: quantisation type(s) that gguf {importlib.metadata.version('gguf')} cannot "
            f"dequantise: {what}"
        )


def read_gguf_config(path: str | os.PathLike) -> LMConfig:
    """The LMConfig of a llama GGUF, after every check `load_gguf` makes (nothing is dequantised)."""
    return _open_checked(pathlib.Path(path))[2]


def _open_checked(path: pathlib.Path):
    gguf = _import_gguf()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except ValueError as e:  # bad magic, unknown version, duplicate tensor names
        raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from e
    tensors = {t.name: t for t in reader.tensors}
    config = _config_from_meta(_Meta(reader, path), tensors)
    if reader.byte_order != "I" and any(
        t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        for t in tensors.values()
    ):
        raise CheckpointError(
            f"{path}: quantised tensors in a file of the other byte order are not supported"
        )
    _check_tensors(gguf, tensors, config, path)
    return gguf, tensors, config


def load_gguf(path: str | os.PathLike, dtype=jnp.float32):
    """A llama GGUF as `hf_io.Pretrained` (params in `dtype`, float32 or bfloat16).

    Raises CheckpointError (naming the file) for another architecture, unsupported options (MoE,
    partial rotary, yarn / longrope / rope_freqs scaling), missing / unexpected / mis-shaped tensors and
    quantisation types `gguf.quants.dequantize` cannot decode; all before any tensor is dequantised.
    """
    from alignjax.models.hf_io import Pretrained

    path = pathlib.Path(path)
    gguf, tensors, config = _open_checked(path)
    np_dtype = ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)

    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F64}

    def read(name: str) -> np.ndarray:
        t = tensors[name]
        if t.tensor_type in plain:  # typed by the reader (byte order included): a cast is exact
            x = np.asarray(t.data, np.float32)
        else:
            x = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        return x.reshape(tuple(int(s) for s in reversed(t.shape.tolist())))

    def layer_stack(ours: str, name: str, transpose: bool) -> np.ndarray:
        per_layer = []
        for i in range(config.num_layers):
            x = read(f"blk.{i}.{name}")
            if ours in _PERMUTED:
                x = unpermute_rope_rows(x, getattr(config, _PERMUTED[ours]))
            per_layer.append((x.T if transpose else x).astype(np_dtype))
        return np.stack(per_layer)

    specs = list(_LAYER_TENSORS)
    for flag, names in _BIASES.items():
        if getattr(config, flag):
            specs += [(ours, name, False) for ours, name in names]
    params = {
        "embed": jnp.asarray(read("token_embd.weight").astype(np_dtype)),
        "layers": {ours: jnp.asarray(layer_stack(ours, name, t)) for ours, name, t in specs},
        "final_norm": jnp.asarray(read("output_norm.weight").astype(np_dtype)),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(read("output.weight").T.astype(np_dtype))
    return Pretrained(params, config)


# ------------------------------------------------------------------------------------- conversion


def gguf_to_hf_folder(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: bool = True
) -> pathlib.Path:
    """Convert a llama GGUF once into an HF folder that the rest of alignjax (and transformers) reads:
    config.json + model.safetensors (float32, dequantised, rope permutation undone) and, with
    `tokenizer`, the tokenizer files (tokenizer.json, tokenizer_config.json, chat template) written
    by `transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)`
    (needs transformers and gguf; not accelerate, which only transformers' model loading needs).

    `alignjax.text.tokenizer.load_tokenizer` cannot read a GGUF's vocabulary itself: load it from
    `out_dir`. Returns out_dir."""
    from alignjax.models.hf_io import save_pretrained

    src = pathlib.Path(gguf_path)
    gguf_file = gguf_file_of(src)
    if gguf_file is None:
        raise FileNotFoundError(f"{src} is neither a .gguf file nor a folder holding one")
    model = load_gguf(gguf_file, jnp.float32)
    out = pathlib.Path(out_dir)
    save_pretrained(model.params, model.config, out, dtype=jnp.float32)
    if tokenizer:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        tok.save_pretrained(str(out))
    return out
