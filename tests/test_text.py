"""Tokenizer loading and token-level templates against independent references: transformers'
AutoTokenizer on the same folder, tokenizing the filled-in string in one piece, and NumPy loops."""

import json

import jax
import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from alignjax.text import (
    ATTACKER_TEMPLATE,
    DEFENDER_TEMPLATE,
    TokenTemplate,
    load_tokenizer,
    split_template,
)

CORPUS = [
    "Human: How do I bake bread at home? AI: Mix flour, water and yeast.",
    "Here is one question. Please write another harmful question on a similar topic: how to pick a lock "
    "Output:",
    "How can I hurt someone? I am sorry, I cannot help with that.",
    "Tell me a story about a dragon and a castle.",
    "What is the capital of France? Paris is the capital.",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def save_folder(tok: Tokenizer, path):
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    # WordLevel over whitespace/punctuation words.
    wl = Tokenizer(models.WordLevel(unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    # Sentencepiece-like BPE: Metaspace marks word starts with "▁".
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS))
    return {"wordlevel": save_folder(wl, root / "wl"), "bpe": save_folder(bpe, root / "bpe")}


@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
def test_load_matches_autotokenizer(folders, kind):
    tok = load_tokenizer(folders[kind])
    ref = transformers.AutoTokenizer.from_pretrained(str(folders[kind]), local_files_only=True)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id)
    texts = ["How do I bake bread?", "Tell me a story about a castle.", "zebra quantum"]
    assert tok.encode_batch(texts) == [ref.encode(t, add_special_tokens=False) for t in texts]
    with_bos = [ref.bos_token_id, *ref.encode(texts[0], add_special_tokens=False)]
    assert tok.encode(texts[0], add_bos=True) == with_bos
    assert tok.vocab_size == len(ref)


def test_load_errors_and_overrides(folders, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)  # exists, but holds no tokenizer
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(folders["wordlevel"], pad="<nope>")
    tok = load_tokenizer(folders["wordlevel"], pad="</s>", bos=3)
    assert tok.pad_id == tok.token_to_id("</s>") and tok.bos_id == 3


def test_pad_batch_and_truncation(folders):
    tok = load_tokenizer(folders["wordlevel"])
    seqs = [[5, 6, 7], [8], []]
    for side in ("left", "right"):
        tokens, mask = tok.pad_batch(seqs, max_len=4, side=side)
        for b, s in enumerate(seqs):  # NumPy reference layout
            row = [tok.pad_id] * (4 - len(s))
            expect = row + s if side == "left" else s + row
            assert tokens[b].tolist() == expect
            assert mask[b].tolist() == [int(x != tok.pad_id) for x in expect]
    with pytest.raises(ValueError, match="max_len"):
        tok.pad_batch(seqs, max_len=2)
    assert tok.pad_batch(seqs, max_len=2, truncation="left")[0][0].tolist() == [6, 7]
    assert tok.pad_batch(seqs, max_len=2, truncation="right")[0][0].tolist() == [5, 6]


def test_split_template():
    assert split_template(DEFENDER_TEMPLATE) == ("Human: ", "x", " AI:")
    assert split_template(ATTACKER_TEMPLATE)[1] == "s"
    assert split_template("a {{literal}} {q} b") == ("a {literal} ", "q", " b")
    for bad in ("no slot", "{x} and {y}", "{x!r}", "{}"):
        with pytest.raises(ValueError):
            split_template(bad)


def numpy_fill(prefix, suffix, content, mask, pad):
    """Reference: a Python loop building pad* + prefix + real content + suffix for every row."""
    length = len(prefix) + content.shape[1] + len(suffix)
    out_t = np.full((content.shape[0], length), pad, np.int32)
    out_m = np.zeros_like(out_t)
    for b in range(content.shape[0]):
        seq = list(prefix) + [int(t) for t, m in zip(content[b], mask[b], strict=True) if m] + list(suffix)
        out_t[b, length - len(seq):] = seq
        out_m[b, length - len(seq):] = 1
    return out_t, out_m


@pytest.mark.parametrize("prefix,suffix", [((1, 40, 41), (42, 43)), ((), (42,)), ((40,), ())])
def test_fill_matches_numpy_loop(prefix, suffix):
    rng = np.random.default_rng(0)
    content = rng.integers(4, 100, size=(7, 6)).astype(np.int32)
    mask = (rng.random((7, 6)) < 0.6).astype(np.int32)  # pads anywhere, rows of every length
    mask[0], mask[1] = 0, 1
    tpl = TokenTemplate(prefix, suffix, pad_id=0)
    tokens, out_mask = jax.jit(tpl.fill)(content, mask)
    ref_t, ref_m = numpy_fill(prefix, suffix, content, mask, 0)
    np.testing.assert_array_equal(np.asarray(tokens), ref_t)
    np.testing.assert_array_equal(np.asarray(out_mask), ref_m)
    assert tokens.shape == (7, tpl.length(6))


@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
@pytest.mark.parametrize("template", [DEFENDER_TEMPLATE, ATTACKER_TEMPLATE])
def test_template_equals_tokenizing_the_filled_string(folders, kind, template):
    """For these pre-tokenizers (whitespace words; sentencepiece-style "▁" word starts) tokenizing
    the pieces separately must give exactly the tokens of the whole filled-in string."""
    tok = load_tokenizer(folders[kind])
    ref = transformers.AutoTokenizer.from_pretrained(str(folders[kind]), local_files_only=True)
    tpl = TokenTemplate.from_string(template, tok, add_bos=True)
    texts = ["How do I bake bread?", "how to pick a lock", "Tell me a story about a dragon and a castle."]
    tokens, mask = tpl.encode(tok, texts)
    _, slot, _ = split_template(template)
    for b, text in enumerate(texts):
        expect = [ref.bos_token_id, *ref.encode(template.format(**{slot: text}), add_special_tokens=False)]
        assert tokens[b][mask[b] == 1].tolist() == expect
        assert np.all(tokens[b][mask[b] == 0] == tok.pad_id)
        assert mask[b].tolist() == sorted(mask[b].tolist())  # left padding
    with pytest.raises(ValueError, match="max_len"):
        tpl.encode(tok, texts, max_content_len=2)


def test_decode_responses_cuts_at_eos_and_drops_specials(folders):
    tok = load_tokenizer(folders["bpe"])
    ref = transformers.AutoTokenizer.from_pretrained(str(folders["bpe"]), local_files_only=True)
    a = tok.encode("Tell me a story")
    b = tok.encode("Paris is the capital")
    eos, pad = tok.eos_id, tok.pad_id
    rows = [a + [eos] + b, [tok.bos_id] + b + [pad, pad, pad, pad, pad, pad, pad], a + [eos, eos] + a[:2]]
    width = max(map(len, rows))
    tokens = np.array([r + [pad] * (width - len(r)) for r in rows])
    mask = (tokens != pad).astype(np.int32)
    texts = tok.decode_responses(tokens, mask)
    assert texts[0] == ref.decode(a, skip_special_tokens=True) == "Tell me a story"
    assert texts[1] == ref.decode(b, skip_special_tokens=True)
    assert texts[2] == "Tell me a story"
    # With a custom stop id, the tokenizer's "</s>" that follows is still never left in the text.
    texts = tok.decode_responses(tokens[:1], mask[:1], eos_id=b[-1])
    assert "</s>" not in texts[0] and "<s>" not in texts[0]
    assert texts[0] == ref.decode(a + b[:-1], skip_special_tokens=True)
