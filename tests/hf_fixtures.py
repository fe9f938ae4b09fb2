"""Tiny random Hugging Face checkpoints (transformers + torch on CPU) used as test oracles.

    path = make_tiny_hf_checkpoint(tmp_path, family="llama", tie_word_embeddings=True)
    hf = load_hf_model(path)                  # the PyTorch model, eval mode, float32
    logits = hf_logits(hf, tokens, mask)      # numpy [B, T, V], left padding handled as alignjax does

Families: "llama", "mistral", "qwen2". Options are HF config fields (any `LlamaConfig` /
`MistralConfig` / `Qwen2Config` keyword, e.g. rope_parameters, attention_bias, mlp_bias,
sliding_window, tie_word_embeddings, num_key_value_heads), plus:
  seq_cls=True    save a *ForSequenceClassification (num_labels=1) instead of a causal LM;
  dtype="bfloat16" save the weights in bf16;
  seed=0          torch seed of the random weights.
Every weight (norm scales and biases included) is random with a std large enough that logits are far
from uniform, so parity tests are not vacuous.
"""

from __future__ import annotations

import pathlib

import numpy as np

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
}


def make_hf_model(family: str = "llama", seq_cls: bool = False, seed: int = 0, std: float = 0.15, **options):
    """The random PyTorch model (float32, eval mode) without saving it."""
    import torch
    import transformers

    if family not in _CLASSES:
        raise ValueError(f"family {family!r} not in {sorted(_CLASSES)}")
    cfg_name, lm_name, cls_name = _CLASSES[family]
    kw = {**TINY, **options}
    if seq_cls:
        kw.setdefault("num_labels", 1)
    config = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name if seq_cls else lm_name)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model.eval()


def make_tiny_hf_checkpoint(
    tmp_path, family: str = "llama", seq_cls: bool = False, dtype: str = "float32", seed: int = 0, **options
) -> pathlib.Path:
    """Save a tiny random HF checkpoint under tmp_path/<name> and return the folder."""
    import torch

    model = make_hf_model(family, seq_cls=seq_cls, seed=seed, **options)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    tag = "_".join(f"{k}-{v}" for k, v in sorted(options.items()) if not isinstance(v, dict))
    # A running count keeps names unique when one tmp folder holds several checkpoints.
    count = len(list(pathlib.Path(tmp_path).iterdir()))
    path = pathlib.Path(tmp_path) / f"{family}{'_cls' if seq_cls else ''}_{dtype}_{seed}_{tag}_{count}"
    model.save_pretrained(path)
    return path


def load_hf_model(path, seq_cls: bool = False):
    """The PyTorch model of an HF folder, float32, eval mode."""
    import torch
    import transformers

    cls = transformers.AutoModelForSequenceClassification if seq_cls else transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def hf_positions(mask: np.ndarray) -> np.ndarray:
    """Positions alignjax uses for left-padded rows: cumsum(mask) - 1, clipped at 0 (as HF generate)."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """HF logits [B, T, V] (or [B, num_labels] for sequence classification), float64 numpy.

    With a mask, position_ids = cumsum(mask) - 1 is passed, because HF's forward otherwise counts
    pads as positions; alignjax's default positions are these."""
    import torch

    tokens = np.asarray(tokens)
    kw = {}
    if mask is not None:
        mask = np.asarray(mask)
        kw = dict(
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(hf_positions(mask), dtype=torch.long),
        )
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), **kw).logits
    return out.double().numpy()


def random_left_padded(
    rng: np.random.Generator, batch: int, length: int, vocab: int, min_len: int = 1, pad_id: int = 0
):
    """Random tokens in [3, vocab) with random left padding: (tokens [B, T] int32, mask [B, T] int32).
    Row 0 is always full length."""
    lengths = rng.integers(min_len, length + 1, size=batch)
    lengths[0] = length
    tokens = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
    mask = (np.arange(length)[None, :] >= (length - lengths)[:, None]).astype(np.int32)
    return np.where(mask == 1, tokens, pad_id).astype(np.int32), mask
