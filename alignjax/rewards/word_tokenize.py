"""Offline word tokenisation for BLEU, and the map from word lists to integer ids.

`nltk.word_tokenize(s)` first splits sentences with the punkt model, which needs a data download
that fails offline. `word_tokenize` below is NLTK's Treebank-style `NLTKWordTokenizer` applied to
the whole string, i.e. exactly `nltk.word_tokenize(s, preserve_line=True)`, with no download.

BLEU only compares words for equality, so any injective map from words to integers leaves it
unchanged: `words_to_ids` turns word lists into a padded id array [N, L] that the jittable Self-BLEU
(`alignjax.rewards.selfbleu.self_bleu`) consumes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from nltk.tokenize.destructive import NLTKWordTokenizer

_TOKENIZER = NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
    """Treebank word tokens of `text`; equal to `nltk.word_tokenize(text, preserve_line=True)`."""
    if not isinstance(text, str):
        raise TypeError(f"word_tokenize expects a str, got {type(text).__name__}")
    return _TOKENIZER.tokenize(text)


def words_to_ids(
    sentences: Sequence[Sequence[str]],
    vocab: dict[str, int] | None = None,
    max_len: int | None = None,
    pad_id: int = -1,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Right-padded word ids of tokenised sentences.

    Args:
      sentences: N word lists.
      vocab: word -> id; grown in place with new words (ids 0, 1, 2, ... in order of appearance).
      max_len: L, the padded length; default the longest sentence. A longer sentence is an error
        (never a silent truncation, which would change its BLEU).
      pad_id: value of the padding positions (never read: lengths say where a sentence ends).

    Returns: (ids [N, L] int32, lengths [N] int32, vocab).
    """
    vocab = {} if vocab is None else vocab
    lens = [len(s) for s in sentences]
    width = max(lens, default=0) if max_len is None else max_len
    if lens and max(lens) > width:
        i = int(np.argmax(lens))
        raise ValueError(f"sentence {i} has {lens[i]} words, more than max_len={width}")
    ids = np.full((len(sentences), max(width, 1)), pad_id, np.int32)
    for row, words in enumerate(sentences):
        for col, w in enumerate(words):
            ids[row, col] = vocab.setdefault(w, len(vocab))
    return ids, np.asarray(lens, np.int32), vocab


def tokenize_all(texts: Iterable[str]) -> list[list[str]]:
    """`word_tokenize` of each text."""
    return [word_tokenize(t) for t in texts]
