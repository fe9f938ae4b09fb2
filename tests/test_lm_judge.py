"""LM judge: our P(safe)/P(unsafe) equal a direct HF PyTorch softmax on the same assembled sequence.

References: HF `LlamaForCausalLM` run row by row on the unpadded sequence built by plain list
concatenation; a `tokenizers` WordLevel tokenizer that prepends BOS (the authors' bug); a Python loop
for re-tokenisation.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from alignjax.rewards.judge import JudgeOutput
from alignjax.rewards.lm_judge import (
    JudgeTemplate,
    LMJudge,
    answer_token_id,
    assemble,
    load_lm_judge,
    renormalised,
    retokenizing_judge,
)
from tests.hf_fixtures import load_hf_model, make_tiny_hf_checkpoint

WORDS = ["<pad>", "<s>", "</s>", "safe", "unsafe", "[INST]", "[/INST]", "User:", "Agent:", "how", "to",
         "make", "a", "cake", "bomb", "sorry", "no", "here", "is"]  # fmt: skip
TEMPLATE = JudgeTemplate(prefix=(1, 5, 7), middle=(8,), suffix=(6,))
SAFE, UNSAFE = 3, 4


def check_judge_output(out, b):
    """JudgeOutput as documented: p_safe, p_unsafe [B] float32 (finite), unsafe [B] bool."""
    chex.assert_shape([out.p_safe, out.p_unsafe, out.unsafe], (b,))
    chex.assert_type([out.p_safe, out.p_unsafe], jnp.float32)
    chex.assert_type(out.unsafe, jnp.bool_)
    chex.assert_tree_all_finite([out.p_safe, out.p_unsafe])


@pytest.fixture(scope="module")
def judge_ckpt(tmp_path_factory):
    path = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("judge"), family="llama", seed=5)
    return path, load_hf_model(path)


def _word_tokenizer(prepend_bos: bool) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    if prepend_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _batch(rng, b=5, p=6, n=7, vocab=1000):
    """Left-padded prompts, right-padded responses (one empty-ish row: a 1-token response)."""
    p_len = rng.integers(1, p + 1, size=b)
    r_len = rng.integers(1, n + 1, size=b)
    pm = (np.arange(p)[None] >= (p - p_len)[:, None]).astype(np.int32)
    rm = (np.arange(n)[None] < r_len[:, None]).astype(np.int32)
    pt = np.where(pm == 1, rng.integers(10, vocab, (b, p)), 0).astype(np.int32)
    rt = np.where(rm == 1, rng.integers(10, vocab, (b, n)), 0).astype(np.int32)
    return pt, pm, rt, rm


def _hf_probs(hf, template, pt, pm, rt, rm):
    """Row by row, the sequence built with list concatenation, HF softmax of the last logits (float64)."""
    out = []
    for b in range(pt.shape[0]):
        seq = (list(template.prefix) + [int(t) for t in pt[b][pm[b] == 1]] + list(template.middle)
               + [int(t) for t in rt[b][rm[b] == 1]] + list(template.suffix))  # fmt: skip
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([seq])).logits[0, -1].double()
        out.append(torch.softmax(logits, -1).numpy())
    return np.stack(out)


def test_judge_probabilities_equal_hf_softmax(judge_ckpt):
    path, hf = judge_ckpt
    judge = load_lm_judge(path, TEMPLATE, SAFE, UNSAFE)
    pt, pm, rt, rm = _batch(np.random.default_rng(0))
    out = judge(pt, pm, rt, rm)
    check_judge_output(out, 5)
    assert isinstance(out, JudgeOutput) and out.p_safe.shape == (5,) and out.unsafe.dtype == jnp.bool_
    ref = _hf_probs(hf, TEMPLATE, pt, pm, rt, rm)
    # The probabilities of 2 tokens out of 1000 are small: compare relatively (logits agree to ~1e-5).
    assert ref[:, [SAFE, UNSAFE]].max() < 0.1
    np.testing.assert_allclose(np.asarray(out.p_safe), ref[:, SAFE], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(np.asarray(out.p_unsafe), ref[:, UNSAFE], rtol=1e-4, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(out.unsafe), ref[:, UNSAFE] > ref[:, SAFE])
    # Full-softmax probabilities (not renormalised); the renormalised pair sums to one.
    assert np.all(np.asarray(out.p_safe + out.p_unsafe) < 1.0)
    ren = renormalised(out)
    check_judge_output(ren, 5)
    chex.assert_trees_all_close(ren.p_safe + ren.p_unsafe, jnp.ones(5), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(ren.p_unsafe), ref[:, UNSAFE] / (ref[:, SAFE] + ref[:, UNSAFE]), rtol=1e-4
    )


def test_assemble_matches_list_concatenation():
    rng = np.random.default_rng(1)
    pt, pm, rt, rm = _batch(rng)
    pm[2, -2] = 0  # a hole inside a row is dropped too, the order of the rest kept
    tokens, mask = assemble(TEMPLATE, *map(jnp.asarray, (pt, pm, rt, rm)), pad_id=0)
    length = len(TEMPLATE.prefix) + 6 + len(TEMPLATE.middle) + 7 + len(TEMPLATE.suffix)
    assert tokens.shape == mask.shape == (5, length)
    chex.assert_shape([tokens, mask], (5, length))
    for b in range(5):
        seq = (list(TEMPLATE.prefix) + list(pt[b][pm[b] == 1]) + list(TEMPLATE.middle)
               + list(rt[b][rm[b] == 1]) + list(TEMPLATE.suffix))  # fmt: skip
        np.testing.assert_array_equal(np.asarray(tokens[b]), [0] * (length - len(seq)) + seq)
        np.testing.assert_array_equal(np.asarray(mask[b]), [0] * (length - len(seq)) + [1] * len(seq))


def test_judge_is_a_pytree_usable_inside_jit(judge_ckpt):
    path, _ = judge_ckpt
    judge = load_lm_judge(path, TEMPLATE, SAFE, UNSAFE)
    leaves = jax.tree_util.tree_leaves(judge)
    assert len(leaves) == len(jax.tree_util.tree_leaves(judge.params))
    pt, pm, rt, rm = _batch(np.random.default_rng(2))

    @jax.jit
    def step(j, *xs):
        return j(*xs).p_unsafe

    np.testing.assert_allclose(
        np.asarray(step(judge, pt, pm, rt, rm)), np.asarray(judge(pt, pm, rt, rm).p_unsafe)
    )


def test_answer_ids_ignore_a_prepended_bos():
    """The authors' bug: encode("safe")[0] is BOS when the tokenizer prepends it. Ours is not fooled."""
    tok = _word_tokenizer(prepend_bos=True)
    assert tok.encode("safe").ids[0] == 1  # the buggy lookup reads BOS
    assert answer_token_id(tok, "safe") == SAFE
    assert answer_token_id(tok, "unsafe") == UNSAFE
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    assert hf_tok.encode("safe")[0] == 1
    assert answer_token_id(hf_tok, "unsafe") == UNSAFE
    with pytest.raises(ValueError, match="2 tokens"):
        answer_token_id(tok, "safe unsafe")
    with pytest.raises(ValueError, match="special"):
        answer_token_id(tok, "<s>")


def test_template_from_text_and_bos_guard(judge_ckpt):
    tok = _word_tokenizer(prepend_bos=True)
    t = JudgeTemplate.from_text(tok, "[INST] User: {prompt} Agent: {response} [/INST]", bos_id=1)
    assert t == TEMPLATE
    path, _ = judge_ckpt
    judge = load_lm_judge(path, t, SAFE, UNSAFE)
    with pytest.raises(ValueError, match="BOS"):
        LMJudge(judge.params, judge.config, t, safe_id=tok.encode("safe").ids[0], unsafe_id=UNSAFE)
    with pytest.raises(ValueError, match="vocabulary"):
        LMJudge(judge.params, judge.config, t, safe_id=SAFE, unsafe_id=10**6)


def test_retokenizing_judge_matches_direct_judge(judge_ckpt):
    """Players' vocabulary = judge's ids shifted by +100: decode/encode through text on the host must give
    the same scores as the judge called on the judge's own ids."""
    path, _ = judge_ckpt
    judge = load_lm_judge(path, TEMPLATE, SAFE, UNSAFE)
    pt, pm, rt, rm = _batch(np.random.default_rng(3), vocab=800)
    decode = lambda ids: " ".join(f"w{i - 100}" for i in ids)
    encode = lambda text: [int(w[1:]) for w in text.split()]
    wrapped = jax.jit(retokenizing_judge(judge, decode, encode, prompt_len=8, response_len=9))
    out = wrapped(
        jnp.asarray(np.where(pm == 1, pt + 100, 0)), pm, jnp.asarray(np.where(rm == 1, rt + 100, 0)), rm
    )
    direct = judge(pt, pm, rt, rm)
    check_judge_output(out, 5)
    check_judge_output(direct, 5)
    np.testing.assert_allclose(np.asarray(out.p_unsafe), np.asarray(direct.p_unsafe), atol=1e-6)
    too_short = jax.jit(retokenizing_judge(judge, decode, encode, prompt_len=2, response_len=9))
    with pytest.raises(Exception, match="out_len"):
        jax.block_until_ready(too_short(jnp.asarray(pt + 100), jnp.ones_like(pm), jnp.asarray(rt + 100), rm))


def test_renormalised_is_finite_when_both_probabilities_underflow():
    out = JudgeOutput(jnp.array([0.0, 0.2]), jnp.array([0.0, 0.6]), jnp.array([False, True]))
    ren = renormalised(out)
    check_judge_output(ren, 2)
    np.testing.assert_allclose(np.asarray(ren.p_safe), [0.5, 0.25], atol=1e-7)
    np.testing.assert_allclose(np.asarray(ren.p_unsafe), [0.5, 0.75], atol=1e-7)


def test_retokenize_overflow_quotes_the_row_and_the_callers_hint():
    """A re-encoding longer than its slot stops with the row's text and what the user can change."""
    from alignjax.rewards.lm_judge import retokenize

    decode = lambda ids: " ".join(f"w{i}" for i in ids)
    encode = lambda text: [ord(c) for c in text]  # one judge token per character: finer than the players'
    tokens, mask = np.array([[5, 6, 7]]), np.ones((1, 3), np.int32)
    with pytest.raises(ValueError, match=r"row 0 \('w5 w6 w7'...\) re-encodes to 8 judge tokens > out_len=6: "
                                         r"raise real.judge.reencode_tokens"):
        retokenize(decode, encode, tokens, mask, 6, 0, "right",
                   overflow_hint="raise real.judge.reencode_tokens")
    out, out_mask = retokenize(decode, encode, tokens, mask, 8, 0, "right")  # exactly fits: kept whole
    assert out[0].tolist() == [ord(c) for c in "w5 w6 w7"] and out_mask[0].tolist() == [1] * 8
