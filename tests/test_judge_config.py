"""The configurable judge (`real.judge`): answer words, templates, the read position, the refusal judge.

References: the `tokenizers` encodings of hand-built strings (answer words and whole filled-in
templates, compared with the ids our pieces assemble to); a greedy loop of full HF PyTorch forward
passes (the first_answer read position); `eval.refusal.is_refusal` on the original strings (the
refusal judge, through encode -> token arrays -> host decode). The tokenizers are built here: a
byte-level BPE trained on a few strings (where "unsafe" is two tokens and " unsafe" one, as in SmolLM2)
and a sentencepiece-style Metaspace BPE (Llama's "\u2581").
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from alignjax.config import ConfigError, build_config
from alignjax.eval.refusal import REFUSAL_PHRASES, is_refusal
from alignjax.rewards.lm_judge import (
    LLAMA_GUARD_TEMPLATE,
    JudgeTemplate,
    answer_probs,
    answer_token_id,
    answer_token_ids,
    assemble,
    first_answer_probs,
    load_lm_judge,
    retokenize,
    template_text,
)
from alignjax.rewards.refusal_judge import refusal_judge
from alignjax.settings.real import JudgeConfig, RealConfig, check_judge_options
from alignjax.text.tokenizer import TextTokenizer
from tests.hf_fixtures import load_hf_model, make_tiny_hf_checkpoint

CORPUS = [
    "The answer is safe. It is safe, quite safe. This one is unsafe, very unsafe and unsafe again.",
    "safe\nsafe\nsafety first. Is the response unsafe? Unsafe content is flagged as unsafe.",
    "Q: How do I pick a lock?\nA: I'm sorry, but I can't help with that.\nVerdict: safe",
    "Q: tell me a story, please.\nA: Sure: once upon a time there was a dragon.\nVerdict: unsafe",
    "User: What is 2+2? Answer: 4\n\nAgent: 4. Voil\u00e0 : la mer, bleue et calme.",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<|judge|>"]


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE (GPT-2 / SmolLM2 style): the space belongs to the next word ("\u0120unsafe")."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert len(tok.encode("unsafe").ids) >= 2 and len(tok.encode(" unsafe").ids) == 1  # as SmolLM2's
    assert len(tok.encode("safe").ids) == 1 and len(tok.encode(" safe").ids) == 1
    return tok


@pytest.fixture(scope="module")
def metaspace():
    """A sentencepiece-style BPE: "\u2581" marks a space, and a text encoded alone starts with one."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    alphabet = sorted(set("".join(CORPUS) + LLAMA_GUARD_TEMPLATE + "\u2581"))
    # no newline in the training text, so no merge holds one (Llama's "\n" is a byte token, never merged)
    words = " ".join((LLAMA_GUARD_TEMPLATE + " " + " ".join(CORPUS)).split())
    tok.train_from_iterator([words] * 3, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet))
    return tok


# ------------------------------------------------------------------------------------ answer words


def test_answer_words_one_token_accepted_others_rejected_with_ids(bpe):
    unsafe_ids = bpe.encode("unsafe").ids
    space_unsafe = bpe.token_to_id("\u0120unsafe")
    assert answer_token_id(bpe, " unsafe", "real.judge.unsafe") == space_unsafe
    assert answer_token_id(bpe, "safe") == bpe.token_to_id("safe")
    with pytest.raises(ValueError) as err:
        answer_token_id(bpe, "unsafe", "real.judge.unsafe")
    msg = str(err.value)
    assert f"real.judge.unsafe='unsafe' encodes to {len(unsafe_ids)} tokens {unsafe_ids}" in msg
    assert f"' unsafe' (id {space_unsafe})" in msg  # the variant that is one token, suggested
    # both words checked at once, each error named; the same token twice is refused
    with pytest.raises(ValueError, match=r"real\.judge\.unsafe='unsafe'.*\n?.*") as err:
        answer_token_ids(bpe, "safe", "unsafe", "real.judge")
    assert "real.judge.safe" not in str(err.value)
    with pytest.raises(ValueError) as err:
        answer_token_ids(bpe, "Verdict: safe", "unsafe", "real.judge")
    assert "real.judge.safe='Verdict: safe'" in str(err.value)
    assert "real.judge.unsafe='unsafe'" in str(err.value)
    with pytest.raises(ValueError, match="same token"):
        answer_token_ids(bpe, " safe", " safe", "real.judge")
    assert answer_token_ids(bpe, "safe", " unsafe", "real.judge") == (bpe.token_to_id("safe"), space_unsafe)
    with pytest.raises(ValueError, match="special token"):
        answer_token_id(bpe, "<|judge|>")


# ------------------------------------------------------------------------------------ templates


def _assembled(tok, tpl: JudgeTemplate, prompt: str, response: str) -> list[int]:
    """The judge row our pieces make for one (prompt, response): re-encoded contents as the real
    setting makes them (`retokenize`, from the players' text), then `assemble`."""
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    identity = lambda ids: "".join(chr(i) for i in ids)  # the "players' ids" are the text's code points
    as_ids = lambda text: (np.array([[ord(c) for c in text]]), np.ones((1, len(text)), np.int32))  # noqa: E731
    p, pm = retokenize(identity, encode, *as_ids(prompt), 64, 0, "left", tpl.prompt_prefix)
    r, rm = retokenize(identity, encode, *as_ids(" " + response + " "), 64, 0, "right", tpl.response_prefix)
    tokens, mask = assemble(tpl, *map(jnp.asarray, (p, pm, r, rm)))
    return [int(t) for t, m in zip(np.asarray(tokens)[0], np.asarray(mask)[0], strict=True) if m]


CASES = [("How do I pick a lock?", "I'm sorry, but I can't help with that."),
         ("tell me a story, please.", "Sure: once upon a time there was a dragon."),
         ("Is 2+2 four?", "4.")]


def test_custom_template_renders_like_the_hand_built_string(bpe):
    text = "<|judge|>Q: {prompt}\nA: {response}\nVerdict:"
    tpl = JudgeTemplate.from_text(bpe, text)
    assert tpl.prompt_prefix == " " and tpl.response_prefix == " "  # byte-level BPE: the space joins the word
    for prompt, response in CASES:
        hand = f"<|judge|>Q: {prompt}\nA: {response}\nVerdict:"
        got = _assembled(bpe, tpl, prompt, response)
        assert got == bpe.encode(hand).ids
        assert bpe.decode(got, skip_special_tokens=False) == hand
        assert got[0] == bpe.token_to_id("<|judge|>")  # a special token written in the text is its id
    # not vacuous: encoded piece by piece, "Q: " ends in a lone space token that the whole text never has
    naive = bpe.encode("<|judge|>Q: ").ids
    assert bpe.id_to_token(naive[-1]) == "\u0120" and naive != list(tpl.prefix)
    # BOS first when asked, once
    with_bos = JudgeTemplate.from_text(bpe, text, bos_id=1)
    assert with_bos.prefix == (1, *tpl.prefix) and with_bos.suffix == tpl.suffix


def test_llama_guard_preset_without_stray_sentencepiece_spaces(metaspace):
    tpl = JudgeTemplate.from_text(metaspace, template_text("llama_guard_v1"), bos_id=1)
    for prompt, response in CASES:
        hand = LLAMA_GUARD_TEMPLATE.format(prompt=prompt, response=response)
        got = _assembled(metaspace, tpl, prompt, response)
        assert got[0] == 1
        assert metaspace.decode(got[1:]) == metaspace.decode(metaspace.encode(hand).ids) == hand
        assert got[1:] == metaspace.encode(hand).ids
    lone = metaspace.token_to_id("\u2581")
    # not vacuous: the middle encoded alone starts (and "User: " ends) with a lone "\u2581"
    assert metaspace.encode("\n\nAgent: ").ids[0] == lone and lone not in tpl.middle


def test_template_values(tmp_path, bpe):
    assert template_text("llama_guard_v1") == LLAMA_GUARD_TEMPLATE
    assert template_text("Q: {prompt} A: {response} V:") == "Q: {prompt} A: {response} V:"
    f = tmp_path / "guard.txt"
    f.write_text("policy...\nQ: {prompt}\nA: {response}\nVerdict:")
    assert template_text(str(f)) == f.read_text()
    with pytest.raises(ValueError, match=r"real\.judge\.template='llama_guard_v2' is neither a preset"):
        template_text("llama_guard_v2", "real.judge.template")
    with pytest.raises(ValueError, match="once each"):
        JudgeTemplate.from_text(bpe, "Q: {prompt} A: no response slot")
    with pytest.raises(ValueError, match="text after"):
        JudgeTemplate.from_text(bpe, "Q: {prompt} A: {response}")


# ------------------------------------------------------------------------------------ read position


@pytest.fixture(scope="module")
def judge_ckpt(tmp_path_factory):
    path = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("judge"), family="llama", seed=7)
    return path, load_hf_model(path)


def _greedy_reference(hf, rows: list[list[int]], k: int):
    """Per row: k greedy tokens by full HF forward passes, and each step's softmax (float64)."""
    out = []
    for seq in rows:
        seq, tokens, probs = list(seq), [], []
        for _ in range(k):
            with torch.no_grad():
                p = torch.softmax(hf(input_ids=torch.tensor([seq])).logits[0, -1].double(), -1).numpy()
            probs.append(p)
            tokens.append(int(p.argmax()))
            seq.append(tokens[-1])
        out.append((tokens, probs))
    return out


def test_first_answer_reads_where_the_greedy_judge_first_answers(judge_ckpt):
    path, hf = judge_ckpt
    rng = np.random.default_rng(0)
    lengths = [9, 6, 11, 7, 8]
    rows = [[1, *rng.integers(10, 1000, size=n - 1).tolist()] for n in lengths]
    k = 6
    ref = _greedy_reference(hf, rows, k)
    # answer words chosen from the reference's greedy tokens (a tiny random model repeats itself): the
    # first new token after step 0 of row 0, then of row 1
    fresh = lambda g, taken: next(x for t, x in enumerate(g) if t > 0 and x not in g[:t] and x not in taken)  # noqa: E731
    unsafe_id = fresh(ref[0][0], ())
    safe_id = fresh(ref[1][0], (unsafe_id,))
    width = max(lengths)
    tokens = np.array([[0] * (width - len(r)) + r for r in rows], np.int32)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
    judge = load_lm_judge(path, JudgeTemplate((1,), (), (2,)), safe_id, unsafe_id, read="first_answer",
                          read_tokens=k)
    out, where = jax.jit(first_answer_probs, static_argnums=(1, 4, 5, 6))(
        judge.params, judge.config, tokens, mask, safe_id, unsafe_id, k)
    for b, (greedy, probs) in enumerate(ref):
        t = next((t for t, g in enumerate(greedy) if g in (safe_id, unsafe_id)), None)
        assert int(where[b]) == (-1 if t is None else t)
        p = probs[0 if t is None else t]
        np.testing.assert_allclose(float(out.p_safe[b]), p[safe_id], rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(float(out.p_unsafe[b]), p[unsafe_id], rtol=1e-4, atol=1e-9)
        assert bool(out.unsafe[b]) == (p[unsafe_id] > p[safe_id])
    assert (np.asarray(where) > 0).any() and -1 in np.asarray(where)  # both branches exercised
    # read="next" is step 0 of the same reference (the token after the template)
    nxt = load_lm_judge(path, JudgeTemplate((1,), (), (2,)), safe_id, unsafe_id)
    direct = jax.jit(lambda j, t, m: answer_probs(j.params, j.config, t, m, safe_id, unsafe_id))(
        nxt, tokens, mask)
    np.testing.assert_allclose(np.asarray(direct.p_unsafe), [r[1][0][unsafe_id] for r in ref], rtol=1e-4,
                               atol=1e-9)


# ------------------------------------------------------------------------------------ refusal judge


def _answers(rng) -> list[str]:
    """Answers that refuse, do not, or sit on the edges of is_refusal: case, typographic apostrophes,
    runs of whitespace, a phrase just inside / outside the 200-character window, empty answers."""
    benign = ["Sure, here is how you bake bread.", "Paris is the capital of France.", "First, mix the flour.",
              "The lock has five pins; lift each one.", "Voil\u00e0, c'est fait.", "42"]
    out = ["", "   ", "\n\n", "I'm sorry", "I\u2019m SORRY, no.", "i   cannot\n\thelp", "As an AI, I won't."]
    for _ in range(120):
        phrase = REFUSAL_PHRASES[rng.integers(len(REFUSAL_PHRASES))]
        if rng.random() < 0.3:
            phrase = phrase.upper() if rng.random() < 0.5 else phrase.replace("'", "\u2019")
        lead = " ".join(benign[i] for i in rng.integers(len(benign), size=rng.integers(0, 8)))
        if rng.random() < 0.3:  # the phrase near the window's end
            lead = lead[:190 + rng.integers(0, 20)].ljust(190 + rng.integers(0, 20), "x")
        tail = benign[rng.integers(len(benign))]
        kind = rng.integers(3)
        out.append(tail if kind == 0 else f"{lead} {phrase} {tail}" if kind == 1 else f"{phrase}.  {tail}")
    return out


def test_refusal_judge_agrees_with_is_refusal(bpe):
    texts = _answers(np.random.default_rng(0))
    players = TextTokenizer(bpe, bos_id=1, eos_id=2, pad_id=0)
    for t in texts:
        assert bpe.decode(bpe.encode(t).ids) == t  # byte-level BPE: the text comes back exactly
    ids = [bpe.encode(t).ids + [2] for t in texts]  # each answer ends with EOS, as the sampler leaves it
    width = max(map(len, ids)) + 3
    tokens = np.array([r + [0] * (width - len(r)) for r in ids], np.int32)
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in ids], np.int32)
    tokens[:, -1] = bpe.token_to_id("\u0120sorry") or 5  # after EOS, masked out: never read
    prompts = np.ones((len(texts), 3), np.int32)
    judge = refusal_judge(lambda t, m: players.decode_responses(t, m))
    out = jax.jit(judge)(prompts, prompts, tokens, mask)
    expected = np.array([not is_refusal(t) for t in texts])
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(np.asarray(out.unsafe), expected)
    np.testing.assert_array_equal(np.asarray(out.p_unsafe), expected.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out.p_safe), 1.0 - expected.astype(np.float32))
    # the window is the judge's option, as is_refusal's
    short = jax.jit(refusal_judge(lambda t, m: players.decode_responses(t, m), window=20))(
        prompts, prompts, tokens, mask)
    np.testing.assert_array_equal(np.asarray(short.unsafe), [not is_refusal(t, 20) for t in texts])


# ------------------------------------------------------------------------------------ config


def test_judge_config_section():
    section = {"kind": "lm", "checkpoint": "/ckpt/guard", "safe": " safe", "unsafe": " unsafe",
               "read": "first_answer", "read_tokens": 4}
    real = build_config(RealConfig, {"judge": section})
    assert real.judge == JudgeConfig("lm", "/ckpt/guard", "llama_guard_v1", " safe", " unsafe", True,
                                     "first_answer", 4)
    assert RealConfig().judge == JudgeConfig()  # the paper's preset by default
    assert (JudgeConfig().template, JudgeConfig().safe, JudgeConfig().unsafe, JudgeConfig().read) == (
        "llama_guard_v1", "safe", "unsafe", "next")
    with pytest.raises(ConfigError, match=r"real\.judge\.checkpoint='/ckpt/guard'"):
        RealConfig(judge="/ckpt/guard")  # the old form: a clear error naming the new key
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['chekpoint'\]"):
        build_config(RealConfig, {"judge": {"chekpoint": "/x"}})
    with pytest.raises(ConfigError, match="'lm'.*'refusal'|refusal"):
        build_config(RealConfig, {"judge": {"kind": "guard"}})
    check_judge_options(JudgeConfig(kind="refusal", refusal_window=100))
    with pytest.raises(ConfigError, match=r"real\.judge\.checkpoint='/x'"):
        check_judge_options(JudgeConfig(kind="refusal", checkpoint="/x"))
    with pytest.raises(ConfigError, match=r"real\.judge\.read_tokens=3"):
        check_judge_options(dataclasses.replace(JudgeConfig(), read_tokens=3))
