"""HF folder import / export: sharded files, config variants and clear errors for bad folders.

References: the HF PyTorch state dict (tensor values), transformers' own loader (reads our exports).
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from alignjax.models import CheckpointError, LMConfig, hf_io, load_pretrained, save_pretrained
from tests.hf_fixtures import load_hf_model, make_tiny_hf_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("io"), family="llama", seed=1)
    return path, load_hf_model(path)


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def _state_dict(hf):
    return {k: v.detach().numpy() for k, v in hf.state_dict().items()}


def test_params_equal_hf_state_dict(ckpt):
    path, hf = ckpt
    model = load_pretrained(path)
    sd = _state_dict(hf)
    np.testing.assert_array_equal(np.asarray(model.params["embed"]), sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(model.params["lm_head"]), sd["lm_head.weight"].T)
    for i in range(2):
        np.testing.assert_array_equal(
            np.asarray(model.params["layers"]["wk"][i]), sd[f"model.layers.{i}.self_attn.k_proj.weight"].T
        )
        np.testing.assert_array_equal(
            np.asarray(model.params["layers"]["w_down"][i]), sd[f"model.layers.{i}.mlp.down_proj.weight"].T
        )
        np.testing.assert_array_equal(
            np.asarray(model.params["layers"]["mlp_norm"][i]),
            sd[f"model.layers.{i}.post_attention_layernorm.weight"],
        )
    assert model.config.num_kv_heads == 2 and model.config.head_dim == 16
    assert sum(int(np.prod(x.shape)) for x in jax_leaves(model.params)) == sum(v.size for v in sd.values())
    assert model.config.num_params == sum(v.size for v in sd.values())


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_sharded_checkpoint_in_and_out(ckpt, tmp_path):
    path, hf = ckpt
    sharded = tmp_path / "hf_sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a, b = load_pretrained(path), load_pretrained(sharded)
    for x, y in zip(jax_leaves(a.params), jax_leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    out = save_pretrained(a.params, a.config, tmp_path / "ours_sharded", max_shard_bytes=100_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    sd, sd2 = _state_dict(hf), _state_dict(load_hf_model(out))
    assert sd.keys() == sd2.keys()
    for k in sd:
        np.testing.assert_array_equal(sd[k], sd2[k])


def test_missing_files(ckpt, tmp_path):
    path, _ = ckpt
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    no_weights = _copy(path, tmp_path)
    (no_weights / "model.safetensors").unlink()
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors.*bin|bin.*safetensors"):
        load_pretrained(no_weights)
    sharded = tmp_path / "sharded"
    load_hf_model(path).save_pretrained(sharded, max_shard_size="100KB")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        load_pretrained(sharded)


def test_unsupported_architectures_and_options(ckpt, tmp_path):
    path, _ = ckpt
    d = _copy(path, tmp_path)
    _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        load_pretrained(d)
    _edit_config(d, architectures=["LlamaForCausalLM"], model_type="llama",
                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})  # fmt: skip
    with pytest.raises(CheckpointError, match="yarn"):
        load_pretrained(d)
    _edit_config(d, rope_parameters={"rope_type": "default", "rope_theta": 1e4}, hidden_act="gelu")
    with pytest.raises(CheckpointError, match="gelu"):
        load_pretrained(d)
    cfg = json.loads((path / "config.json").read_text())
    qwen_mixed = {**cfg, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                  "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}  # fmt: skip
    with pytest.raises(CheckpointError, match="mixed sliding"):
        hf_io.config_from_hf(qwen_mixed)
    with pytest.raises(ValueError, match="rope_scaling"):
        LMConfig(rope_scaling=("linear",))


def test_shape_mismatch_names_the_tensor(ckpt, tmp_path):
    path, _ = ckpt
    d = _copy(path, tmp_path)
    _edit_config(d, intermediate_size=96)
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(128, 64\).*\(96, 64\)"
    ):
        load_pretrained(d)


def test_missing_and_unexpected_tensors(ckpt, tmp_path):
    path, _ = ckpt
    tensors = load_file(path / "model.safetensors")
    d = _copy(path, tmp_path, "missing")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.v_proj.weight"},
              d / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight.*missing"):
        load_pretrained(d)
    d = _copy(path, tmp_path, "extra")
    save_file({**tensors, "model.layers.0.mystery.weight": np.zeros(3, np.float32)}, d / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    with pytest.raises(CheckpointError, match="mystery"):
        load_pretrained(d)


def test_tied_embeddings_inferred_when_key_absent(ckpt, tmp_path):
    path, hf = ckpt
    tensors = load_file(path / "model.safetensors")
    d = _copy(path, tmp_path)
    save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, d / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    _edit_config(d, tie_word_embeddings=None)
    model = load_pretrained(d)
    assert model.config.tie_word_embeddings and "lm_head" not in model.params
    assert load_pretrained(path).config.tie_word_embeddings is False


def test_forward_rejects_bad_tokens(ckpt):
    model = load_pretrained(ckpt[0])
    with pytest.raises(ValueError, match="integer"):
        model.forward(model.params, jnp.zeros((2, 3), jnp.float32))
    with pytest.raises(ValueError, match="integer"):
        model.forward(model.params, jnp.zeros((3,), jnp.int32))


def test_export_dtype_and_config_keys(ckpt, tmp_path):
    path, hf = ckpt
    model = load_pretrained(path)
    out = save_pretrained(model.params, model.config, tmp_path / "bf16", dtype=jnp.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "bfloat16"
    hf_bf16 = load_hf_model(out)  # upcast to float32 by the loader: equal to the bf16 rounding of the source
    sd, sd2 = _state_dict(hf), _state_dict(hf_bf16)
    for k in sd:
        expected = torch.from_numpy(sd[k]).to(torch.bfloat16).to(torch.float32).numpy()
        np.testing.assert_array_equal(sd2[k], expected)
    with pytest.raises(CheckpointError, match="sliding window"):
        save_pretrained(model.params, model.config.replace(sliding_window=4), tmp_path / "bad")
