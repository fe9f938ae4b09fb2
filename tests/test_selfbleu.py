"""Self-BLEU: the Python reference against NLTK and fast_bleu; the jittable array form against the
reference on token ids (random sequences with many repeats, real prompts when the data is present)."""

import functools
import json
import pathlib
from functools import partial

import chex
import fast_bleu
import jax
import jax.numpy as jnp
import nltk
import numpy as np
import pytest
from absl.testing import parameterized
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from alignjax.rewards.selfbleu import self_bleu, self_bleu_reference, sentence_bleu_method1
from alignjax.rewards.word_tokenize import word_tokenize, words_to_ids

DATA = pathlib.Path("/work/shared/data/gpo_seed_prompts_valid.json")
ORDERS = (2, 3, 4, 5)
WEIGHTS = {str(n): (1.0 / n,) * n for n in ORDERS}

SENTENCES = [
    "How can I legally avoid paying all taxes?",
    "How can I avoid paying taxes legally, without getting caught?",
    "What is the best way to avoid paying taxes?",
    "the the the the the",
    "the cat sat on the mat",
    "a",
    "",
    "Tell me how to pick a lock.",
    "Tell me how to pick a lock. Tell me how to pick a lock.",
]


def _tok(texts):
    return [word_tokenize(t) for t in texts]


def test_word_tokenize_matches_nltk_preserve_line():
    for s in SENTENCES + ["Don't do that!\nIt's \"bad\" (really) -- $5.00 each..."]:
        assert word_tokenize(s) == nltk.word_tokenize(s, preserve_line=True)


def test_words_to_ids_is_injective_and_rejects_overflow():
    ids, lengths, vocab = words_to_ids([["a", "b", "a"], ["b"]])
    assert lengths.tolist() == [3, 1]
    assert ids[0, 0] == ids[0, 2] != ids[0, 1] == ids[1, 0]
    assert len(vocab) == 2
    with pytest.raises(ValueError, match="max_len"):
        words_to_ids([["a", "b", "c"]], max_len=2)


def test_reference_bleu_equals_nltk_and_fast_bleu():
    smooth = SmoothingFunction().method1
    toks = _tok(SENTENCES)
    for i, hyp in enumerate(toks):
        refs = [r for j, r in enumerate(toks) if j != i and r]
        fb = fast_bleu.BLEU(refs, WEIGHTS).get_score([hyp])
        for n in ORDERS:
            ours = sentence_bleu_method1(hyp, refs, n)
            theirs = sentence_bleu(refs, hyp, weights=(1.0 / n,) * n, smoothing_function=smooth)
            assert ours == pytest.approx(theirs, abs=1e-12)
            assert ours == pytest.approx(fb[str(n)][0], abs=1e-7)  # fast_bleu rounds slightly


def test_reference_self_bleu_forms_match_fast_bleu_usage():
    toks = [t for t in _tok(SENTENCES) if t]
    hyp, history = toks[0], toks[1:]
    # The authors' code: one fast_bleu object per history entry, averaged over entries and n.
    per_ref = np.mean(
        [np.mean(list(fast_bleu.BLEU([r], WEIGHTS).get_score([hyp]).values())) for r in history]
    )
    # The curiosity-driven red-teaming code: one object with all entries as references.
    multi = np.mean(list(fast_bleu.BLEU(history, WEIGHTS).get_score([hyp]).values()))
    assert self_bleu_reference(hyp, history, "per_reference") == pytest.approx(per_ref, abs=1e-7)
    assert self_bleu_reference(hyp, history, "multi_reference") == pytest.approx(multi, abs=1e-7)
    assert self_bleu_reference(hyp, [], "per_reference") == 0.0
    assert self_bleu_reference(hyp, [], "multi_reference") == 0.0
    # Other orders and epsilon, against NLTK (fast_bleu needs orders >= 2 and has a fixed epsilon).
    for orders, eps in (((1, 3), 0.1), ((3,), 0.3)):
        smooth = SmoothingFunction(epsilon=eps).method1
        scores = [[sentence_bleu([r], hyp, (1 / n,) * n, smooth) for n in orders] for r in history]
        got = self_bleu_reference(hyp, history, orders=orders, epsilon=eps)
        assert got == pytest.approx(np.mean(scores), abs=1e-12)
    with pytest.raises(
        ValueError, match=r"^unknown Self-BLEU form 'corpus'; choose from \('per_reference', "
    ):
        self_bleu_reference(hyp, history, "corpus")
    for orders in ((), (0, 2)):
        with pytest.raises(
            ValueError, match=r"^BLEU orders must be a non-empty tuple of integers >= 1, got \("
        ):
            self_bleu_reference(hyp, history, orders=orders)
    with pytest.raises(ValueError, match="^BLEU needs at least one reference$"):
        sentence_bleu_method1(hyp, [], 2)


def _jit_self_bleu(form, chunk_size, with_exclude):
    fn = partial(self_bleu, form=form, chunk_size=chunk_size)
    if with_exclude:
        return jax.jit(lambda t, l, rt, rl, m, e: fn(t, l, rt, rl, m, exclude=e))
    return jax.jit(lambda t, l, rt, rl, m, e: fn(t, l, rt, rl, m))


def _random_case():
    rng = np.random.default_rng(0)
    b, length, c, ref_width = 9, 14, 37, 11
    # A tiny vocabulary makes repeated n-grams (the clipping path) and equal lengths common.
    tokens = rng.integers(0, 4, (b, length)).astype(np.int32)
    lengths = rng.integers(0, length + 1, b).astype(np.int32)
    lengths[0], lengths[1] = 0, 1  # empty and one-token hypotheses
    lengths[8] = length + 5  # past the padded width: clipped to L
    ref_tokens = rng.integers(0, 4, (c, ref_width)).astype(np.int32)
    ref_lengths = rng.integers(0, ref_width + 1, c).astype(np.int32)
    ref_lengths[9] = ref_width + 3  # clipped to Lr
    ref_tokens[3, :ref_width] = tokens[2, :ref_width]  # an exact copy
    ref_lengths[3] = min(lengths[2], ref_width)
    ref_mask = rng.random(c) < 0.75
    exclude = rng.integers(-1, c, b).astype(np.int32)
    exclude[2] = 3
    exclude[4] = c + 2  # out of range: leaves nothing out
    exclude[5] = -1
    ref_mask[[3, 7]] = True
    ref_tokens[7, :ref_width] = tokens[6, :ref_width]  # a copy that row 6 does not exclude
    ref_lengths[7] = min(lengths[6], ref_width)
    exclude[6] = -1
    return tokens, lengths, ref_tokens, ref_lengths, ref_mask, exclude


def _reference(tokens, lengths, ref_tokens, ref_lengths, ref_mask, exclude, drop=True, **kw):
    """self_bleu_reference per row on plain lists (lengths clipped to the padded widths)."""
    out = []
    for i in range(tokens.shape[0]):
        hist = [
            ref_tokens[j, : ref_lengths[j]].tolist()
            for j in range(ref_tokens.shape[0])
            if ref_mask[j] and (not drop or j != exclude[i])
        ]
        out.append(self_bleu_reference(tokens[i, : lengths[i]].tolist(), hist, **kw))
    return np.array(out)


class SelfBleuVariantsTest(chex.TestCase):
    """The array Self-BLEU, jitted and not, equals the reference on random token ids: both forms, other
    orders and epsilon (per_reference) or the defaults (multi_reference), a chunk size that does not
    divide C, lengths past the padded widths, and left-out entries."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("per_reference", dict(orders=(1, 3), epsilon=0.25)), ("multi_reference", {}))
    def test_array_self_bleu_equals_reference_on_random_token_ids(self, form, kw):
        tokens, lengths, ref_tokens, ref_lengths, ref_mask, exclude = _random_case()
        fn = self.variant(partial(self_bleu, form=form, chunk_size=8, **kw))
        got = fn(tokens, lengths, ref_tokens, ref_lengths, ref_mask, exclude=exclude)
        chex.assert_shape(got, (tokens.shape[0],))
        chex.assert_type(got, jnp.float32)
        chex.assert_tree_all_finite(got)
        lengths = np.minimum(lengths, tokens.shape[1])
        ref_lengths = np.minimum(ref_lengths, ref_tokens.shape[1])
        want = _reference(tokens, lengths, ref_tokens, ref_lengths, ref_mask, exclude, form=form, **kw)
        # Not vacuous: a spread of scores, and dropping the exact copy (entry 3) lowers row 2's score.
        kept = _reference(tokens, lengths, ref_tokens, ref_lengths, ref_mask, exclude, False, form=form, **kw)
        assert kept[2] > want[2] + 0.01
        assert np.std(want) > 0.05, want
        chex.assert_trees_all_close(got, want.astype(np.float32), atol=2e-6, rtol=0)


def test_array_self_bleu_empty_history_and_shape_errors():
    tokens = jnp.ones((2, 4), jnp.int32)
    lengths = jnp.array([4, 2], jnp.int32)
    for form in ("per_reference", "multi_reference"):
        out = jax.jit(functools.partial(self_bleu, form=form))(
            tokens, lengths, tokens, lengths, jnp.zeros((2,), bool)
        )
        chex.assert_shape(out, (2,))
        chex.assert_type(out, jnp.float32)
        chex.assert_trees_all_equal(out, np.zeros(2, np.float32))
    with pytest.raises(AssertionError):
        self_bleu(tokens, lengths, tokens, lengths, jnp.zeros((3,), bool))
    with pytest.raises(AssertionError):
        self_bleu(tokens, lengths, tokens, lengths, jnp.ones((2,), bool), exclude=jnp.zeros((3,), jnp.int32))
    with pytest.raises(AssertionError):
        self_bleu(tokens.astype(jnp.float32), lengths, tokens, lengths, jnp.ones((2,), bool))
    with pytest.raises(ValueError, match="^unknown Self-BLEU form 'corpus'"):
        self_bleu(tokens, lengths, tokens, lengths, jnp.ones((2,), bool), form="corpus")
    with pytest.raises(ValueError, match="^BLEU orders must be"):
        self_bleu(tokens, lengths, tokens, lengths, jnp.ones((2,), bool), orders=(0,))
    # The int32 limit on k-gram codes is exact: (B*L + 1)^2 <= 2^31 - 1 up to B*L = 46339. (One-token rows,
    # empty, multi_reference, unigrams: cheap at that size.)
    one = jnp.ones((1, 1), jnp.int32)
    fn = jax.jit(partial(self_bleu, form="multi_reference", orders=(1,)))
    for n, ok in ((46339, True), (46340, False)):
        args = (jnp.zeros((n, 1), jnp.int32), jnp.zeros(n, jnp.int32), one, one[0], jnp.ones((1,), bool))
        if ok:
            chex.assert_trees_all_equal(fn(*args), np.zeros(n, np.float32))
        else:
            with pytest.raises(ValueError, match="new-prompt positions is too many for int32 k-gram codes"):
                fn(*args)


def test_array_self_bleu_equals_fast_bleu_on_real_prompts():
    if not DATA.exists():
        pytest.skip(f"{DATA} not present")
    questions = [item[-1] for item in json.loads(DATA.read_text())[:76]]
    words = _tok(questions)
    ids, lengths, _ = words_to_ids(words)
    hyp, hist = slice(0, 12), slice(12, 76)
    hist_words = words[hist]
    for form in ("per_reference", "multi_reference"):
        got = np.asarray(
            _jit_self_bleu(form, 64, False)(
                ids[hyp], lengths[hyp], ids[hist], lengths[hist], np.ones(64, bool), None
            )
        )
        if form == "per_reference":
            per_entry = [fast_bleu.BLEU([r], WEIGHTS).get_score(words[hyp]) for r in hist_words]
            want = np.mean([np.mean([s[str(n)] for n in ORDERS], axis=0) for s in per_entry], axis=0)
        else:
            scores = fast_bleu.BLEU(hist_words, WEIGHTS).get_score(words[hyp])
            want = np.mean([scores[str(n)] for n in ORDERS], axis=0)
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
