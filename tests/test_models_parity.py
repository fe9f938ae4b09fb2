"""Parity of alignjax's Llama-family forward with HF transformers PyTorch on tiny random checkpoints.

Reference: transformers 5 `*ForCausalLM` in float32 on CPU (tests/hf_fixtures.py), called with
position_ids = cumsum(mask) - 1 when rows are left-padded (HF generate's convention).
"""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.models import hf_io, llama, load_pretrained, save_pretrained
from tests.hf_fixtures import (
    hf_logits,
    hf_positions,
    load_hf_model,
    make_tiny_hf_checkpoint,
    random_left_padded,
)

LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "llama_gqa": dict(family="llama"),
    "llama_mha_tied": dict(family="llama", num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(family="llama", rope_parameters=LLAMA3),
    "linear_rope": dict(
        family="llama", rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}
    ),
    "llama_biases": dict(family="llama", attention_bias=True, mlp_bias=True),
    "mistral_window": dict(family="mistral", sliding_window=5),
    # head_dim != hidden_size / num_heads (as Mistral-Nemo): q/k/v are [D, H*hd] with H*hd = 2D.
    "mistral_head_dim": dict(family="mistral", sliding_window=None, head_dim=32),
    "qwen2_bias": dict(family="qwen2"),
    "qwen2_tied": dict(family="qwen2", tie_word_embeddings=True, num_key_value_heads=1),
}
B, T = 4, 12
TOL = 1e-4


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for name, opts in CASES.items():
        path = make_tiny_hf_checkpoint(root, **opts)
        out[name] = (path, load_hf_model(path))
    return out


@pytest.fixture(scope="module")
def batch():
    tokens, mask = random_left_padded(np.random.default_rng(0), B, T, 1000, min_len=3)
    return tokens, mask


def _real_max_diff(a, b, mask):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)[mask.astype(bool)]))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf_with_and_without_left_padding(ckpts, batch, case):
    path, hf = ckpts[case]
    tokens, mask = batch
    model = load_pretrained(path)
    logits = model.forward(model.params, jnp.asarray(tokens), jnp.asarray(mask))
    chex.assert_shape(logits, (B, T, model.config.vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    ours = np.asarray(logits)
    ref = hf_logits(hf, tokens, mask)
    assert ours.shape == (B, T, 1000) and ours.dtype == np.float32
    # Row 0 is unpadded; the others are left-padded: compare real-token positions only.
    assert np.std(ref[0]) > 0.5, "random checkpoint gives near-constant logits: the test would be vacuous"
    assert _real_max_diff(ours[:1], ref[:1], mask[:1]) <= TOL
    assert _real_max_diff(ours, ref, mask) <= TOL
    # Without a mask (same shape, so no recompilation), forward(params, tokens) equals HF unpadded.
    full = np.random.default_rng(1).integers(3, 1000, size=(B, T)).astype(np.int32)
    plain = model.forward(model.params, jnp.asarray(full))
    chex.assert_shape(plain, (B, T, model.config.vocab_size))
    chex.assert_type(plain, jnp.float32)
    plain = np.asarray(plain)
    np.testing.assert_allclose(plain, hf_logits(hf, full), atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "case,explicit_positions,per_layer", [("llama_gqa", True, False), ("mistral_window", False, True)]
)
def test_kv_cache_prefill_chunk_then_decode_matches_hf(ckpts, batch, case, explicit_positions, per_layer):
    """Prefill P left-padded tokens into a cache with spare slots, feed a chunk of 2 tokens, then the
    rest one at a time; every step's logits must equal HF's no-cache logits of the whole sequence.
    Positions are either passed (HF's cumsum(mask) - 1) or left to the cache-aware default; the
    weights are stacked or per layer (`unstack_layers`, as the sampler holds them)."""
    path, hf = ckpts[case]
    tokens, mask = batch
    model = load_pretrained(path)
    cfg = model.config
    params = llama.unstack_layers(model.params) if per_layer else model.params
    p, chunk = 6, 2
    ref = hf_logits(hf, tokens, mask)
    step = jax.jit(llama.forward, static_argnums=1)
    cache = llama.init_cache(cfg, B, T + 3)
    out = step(params, cfg, jnp.asarray(tokens[:, :p]), jnp.asarray(mask[:, :p]), None, cache)
    chex.assert_shape(out.logits, (B, p, cfg.vocab_size))
    chex.assert_type(out.logits, jnp.float32)
    chex.assert_shape(out.hidden, (B, p, cfg.hidden_size))
    chex.assert_trees_all_equal_shapes_and_dtypes(out.cache, cache)
    chex.assert_shape(out.cache.index, ())
    chex.assert_type(out.cache.index, jnp.int32)
    m = mask[:, :p].astype(bool)
    assert np.max(np.abs(np.asarray(out.logits) - ref[:, :p])[m]) <= TOL
    cache = out.cache
    pos = hf_positions(mask)  # rows may still be padding after the prefill: feed the true mask
    t = p
    while t < T:
        n = chunk if t == p else 1
        sl = slice(t, t + n)
        out = step(
            params,
            cfg,
            jnp.asarray(tokens[:, sl]),
            jnp.asarray(mask[:, sl]),
            jnp.asarray(pos[:, sl]) if explicit_positions else None,
            cache,
        )
        chex.assert_shape(out.logits, (B, n, cfg.vocab_size))
        chex.assert_type(out.logits, jnp.float32)
        chex.assert_shape(out.hidden, (B, n, cfg.hidden_size))
        chex.assert_trees_all_equal_shapes_and_dtypes(out.cache, cache)
        cache, t = out.cache, t + n
        real = mask[:, sl].astype(bool)
        assert np.max(np.abs(np.asarray(out.logits) - ref[:, sl])[real]) <= TOL
    assert int(cache.index) == T
    with pytest.raises(ValueError, match="KV cache of 3 slots"):
        llama.forward(model.params, cfg, jnp.asarray(tokens[:, :4]), cache=llama.init_cache(cfg, B, 3))


@pytest.mark.parametrize("case", ["llama_biases", "qwen2_tied"])
def test_per_layer_params_match_hf(ckpts, batch, case):
    """`unstack_layers` (one buffer per layer, the layers unrolled instead of scanned) gives HF's logits."""
    path, hf = ckpts[case]
    tokens, mask = batch
    model = load_pretrained(path)
    per_layer = llama.unstack_layers(model.params)
    assert len(per_layer["layers"]) == model.config.num_layers
    assert llama.unstack_layers(per_layer) is per_layer
    out = llama.forward(per_layer, model.config, jnp.asarray(tokens), jnp.asarray(mask))
    chex.assert_shape(out.logits, (B, T, model.config.vocab_size))
    chex.assert_type(out.logits, jnp.float32)
    chex.assert_shape(out.hidden, (B, T, model.config.hidden_size))
    assert out.cache is None
    assert _real_max_diff(out.logits, hf_logits(hf, tokens, mask), mask) <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_hf_autograd(ckpts, batch, case):
    """d/dparams of sum(logits * R) over the real positions of left-padded rows equals torch autograd's
    through HF's model: checks every backward, attention's own (`llama._attention_core`) included,
    with GQA, sliding windows, biases, tied embeddings and a head_dim other than D / H."""
    import torch

    path, hf = ckpts[case]
    tokens, mask = batch
    model = load_pretrained(path)
    cfg = model.config
    weights = np.random.default_rng(2).normal(size=(B, T, cfg.vocab_size)) * mask[..., None]

    def loss(params):
        logits = llama.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)).logits
        return jnp.sum(logits * jnp.asarray(weights, jnp.float32))

    grads = jax.jit(jax.grad(loss))(model.params)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, model.params)
    chex.assert_tree_all_finite(grads)
    ours = hf_io.backbone_to_hf(grads, cfg, prefix="model.")
    if not cfg.tie_word_embeddings:
        ours["lm_head.weight"] = np.asarray(grads["lm_head"]).T

    hf.zero_grad(set_to_none=True)
    logits = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(hf_positions(mask), dtype=torch.long)).logits  # fmt: skip
    (logits * torch.tensor(weights, dtype=torch.float32)).sum().backward()
    want = {name: p.grad.double().numpy() for name, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad(set_to_none=True)
    assert sorted(ours) == sorted(want)
    for name, ref in want.items():
        scale = np.max(np.abs(ref))
        assert scale > 1e-6, f"{name}: zero reference gradient, the check would be vacuous"
        np.testing.assert_allclose(ours[name] / scale, ref / scale, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_export_round_trips_and_hf_loads_it(ckpts, batch, case, tmp_path):
    path, hf = ckpts[case]
    tokens, mask = batch
    model = load_pretrained(path)
    out = save_pretrained(model.params, model.config, tmp_path / "export")
    again = load_pretrained(out)
    assert again.config == model.config
    flat_a, tree_a = jax.tree_util.tree_flatten(model.params)
    flat_b, tree_b = jax.tree_util.tree_flatten(again.params)
    assert tree_a == tree_b
    for a, b in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # transformers reads the export (AutoModelForCausalLM) and computes the original model's logits.
    hf2 = load_hf_model(out)
    assert type(hf2).__name__ == type(hf).__name__
    np.testing.assert_array_equal(hf_logits(hf2, tokens, mask), hf_logits(hf, tokens, mask))


def test_bf16_forward_is_close_to_fp32_reference(ckpts, batch):
    path, hf = ckpts["llama_gqa"]
    tokens, mask = batch
    model = load_pretrained(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(model.params))
    logits = model.forward(model.params, jnp.asarray(tokens), jnp.asarray(mask))
    chex.assert_shape(logits, (B, T, model.config.vocab_size))
    chex.assert_type(logits, jnp.float32)  # documented float32 whatever the params' dtype
    chex.assert_tree_all_finite(logits)
    ours = np.asarray(logits)
    ref = hf_logits(hf, tokens, mask)
    assert ours.dtype == np.float32 and np.all(np.isfinite(ours))
    real = mask.astype(bool)
    err = np.abs(ours - ref)[real]
    scale = np.abs(ref[real]).max()
    # bf16 keeps ~3 significant digits; 2 layers of rounding stay well inside 5% of the logit range.
    assert err.max() <= 0.05 * scale, (err.max(), scale)
    assert np.mean(np.argmax(ours, -1)[real] == np.argmax(ref, -1)[real]) > 0.9


def test_bf16_checkpoint_loads_exactly(tmp_path, batch):
    import torch

    path = make_tiny_hf_checkpoint(tmp_path, family="qwen2", dtype="bfloat16", seed=3)
    hf = load_hf_model(path)  # upcast to float32 by from_pretrained(dtype=float32)
    model = load_pretrained(path, dtype=jnp.float32)
    sd = {k: v.to(torch.float32).numpy() for k, v in hf.state_dict().items()}
    np.testing.assert_array_equal(
        np.asarray(model.params["layers"]["wq"][1]), sd["model.layers.1.self_attn.q_proj.weight"].T
    )
    tokens, mask = batch
    ours = np.asarray(model.forward(model.params, jnp.asarray(tokens), jnp.asarray(mask)))
    assert _real_max_diff(ours, hf_logits(hf, tokens, mask), mask) <= TOL
    # Exported in bf16 again, the file holds the same bf16 tensors.
    out = save_pretrained(
        load_pretrained(path, dtype=jnp.bfloat16).params, model.config, tmp_path / "bf16_export"
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf2 = load_hf_model(out)
    np.testing.assert_array_equal(hf_logits(hf2, tokens, mask), hf_logits(hf, tokens, mask))


def test_legacy_rope_scaling_keys(ckpts, batch, tmp_path):
    """Configs written by transformers 4 keep rope_theta + rope_scaling {"type": ...} at the top level."""
    import shutil

    path, hf = ckpts["llama3_rope"]
    legacy = tmp_path / "legacy"
    shutil.copytree(path, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    (legacy / "config.json").write_text(json.dumps(cfg))
    config, _ = hf_io.config_from_hf(cfg)
    assert config.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 16)
    tokens, mask = batch
    model = load_pretrained(legacy)
    ours = np.asarray(model.forward(model.params, jnp.asarray(tokens), jnp.asarray(mask)))
    assert _real_max_diff(ours, hf_logits(hf, tokens, mask), mask) <= TOL
