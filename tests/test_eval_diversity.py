"""Evaluation diversity of a prompt set: against fast_bleu (SelfBLEU and per-reference BLEU) and a
brute-force double loop for the pairwise cosine; self-matches excluded."""

import json
import pathlib

import chex
import fast_bleu
import numpy as np
import pytest

from alignjax.eval.diversity import embedding_diversity, self_bleu_each, selfbleu_diversity_texts
from alignjax.rewards.word_tokenize import word_tokenize, words_to_ids

DATA = pathlib.Path("/work/shared/data/gpo_seed_prompts_valid.json")
WEIGHTS = {str(n): (1.0 / n,) * n for n in (2, 3, 4, 5)}
TEXTS = [
    "How can I legally avoid paying all taxes?",
    "How can I avoid paying taxes legally?",
    "Tell me how to pick a lock.",
    "Tell me how to pick a lock.",  # a duplicate: scores 1 against its twin, never against itself
    "Write a poem about the sea.",
]


def _fast_bleu_expectations(words):
    n = len(words)
    multi = np.mean(list(fast_bleu.SelfBLEU(words, WEIGHTS).get_score().values()), axis=0)  # excludes self
    per_ref = []
    for i in range(n):
        others = [words[j] for j in range(n) if j != i]
        per_ref.append(
            np.mean(
                [np.mean(list(fast_bleu.BLEU([o], WEIGHTS).get_score([words[i]]).values())) for o in others]
            )
        )
    return np.asarray(per_ref), multi


def _check(texts):
    words = [word_tokenize(t) for t in texts]
    ids, lengths, _ = words_to_ids(words)
    per_ref, multi = _fast_bleu_expectations(words)
    # batch_size 3 does not divide N: exercises the padded last batch.
    got_per_ref = self_bleu_each(ids, lengths, "per_reference", batch_size=3)
    got_multi = self_bleu_each(ids, lengths, "multi_reference", batch_size=3)
    chex.assert_shape([got_per_ref, got_multi], (len(texts),))
    chex.assert_tree_all_finite([got_per_ref, got_multi])
    np.testing.assert_allclose(got_per_ref, per_ref, atol=2e-6)
    np.testing.assert_allclose(got_multi, multi, atol=2e-6)
    assert selfbleu_diversity_texts(texts, "multi_reference") == pytest.approx(1 - multi.mean(), abs=2e-6)


def test_selfbleu_diversity_matches_fast_bleu_without_self_matches():
    # Hand-written edge cases plus real prompts when present, in one set (one compilation per form).
    real = [item[-1] for item in json.loads(DATA.read_text())[:20]] if DATA.exists() else []
    _check(TEXTS + real)


def test_embedding_diversity_matches_double_loop():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(6, 5))
    e[3] = e[2]  # a duplicate pair
    n = len(e)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    cos = [unit[i] @ unit[j] for i in range(n) for j in range(n) if i != j]
    assert embedding_diversity(e) == pytest.approx(1 - np.mean(cos), abs=1e-12)


def test_sets_too_small_are_rejected():
    with pytest.raises(ValueError, match="at least 2"):
        embedding_diversity(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu_each(np.ones((1, 3), np.int32), np.array([3], np.int32))
