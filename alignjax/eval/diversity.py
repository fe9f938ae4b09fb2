"""Diversity of a set G of prompts (evaluation metrics, spec section 4).

    lexical  = 1 - mean_{i in G} SelfBLEU(x_i ; G \\ {x_i})
    semantic = 1 - mean_{i != j} cos(phi(x_i), phi(x_j))

Each prompt is compared with the OTHER prompts only: the authors' evaluation also compared each
prompt with itself, which inflates Self-BLEU (a self-match scores 1). SelfBLEU is the module-doc
definition of `alignjax.rewards.selfbleu` (orders 2..5, method1 smoothing) in either form:
"per_reference" (average BLEU against each other prompt, as the authors' code) or "multi_reference"
(all the others at once, as fast_bleu's SelfBLEU and the curiosity-driven red-teaming code).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from alignjax.rewards.selfbleu import DEFAULT_ORDERS, self_bleu
from alignjax.rewards.word_tokenize import tokenize_all, words_to_ids


@partial(jax.jit, static_argnames=("form", "orders", "chunk_size"))
def _leave_one_out(tokens, lengths, all_tokens, all_lengths, index, *, form, orders, chunk_size):
    return self_bleu(
        tokens, lengths, all_tokens, all_lengths, jnp.ones(all_lengths.shape, bool),
        form=form, orders=orders, exclude=index, chunk_size=chunk_size,
    )  # fmt: skip


def self_bleu_each(
    tokens: np.ndarray,
    lengths: np.ndarray,
    form: str = "per_reference",
    orders: Sequence[int] = DEFAULT_ORDERS,
    batch_size: int = 64,
    chunk_size: int = 256,
) -> np.ndarray:
    """SelfBLEU [N] of each prompt against the other N - 1 (token ids [N, L], lengths [N])."""
    tokens, lengths = np.asarray(tokens, np.int32), np.asarray(lengths, np.int32)
    chex.assert_rank([tokens, lengths], [2, 1])
    n = tokens.shape[0]
    chex.assert_shape(lengths, (n,))
    if n < 2:
        raise ValueError(f"Self-BLEU of a set needs at least 2 prompts, got {n}")
    batch = min(batch_size, n)
    out = np.zeros((n,), np.float32)
    all_tokens, all_lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    for start in tqdm(range(0, n, batch), desc="self-bleu", disable=n <= batch):
        idx = np.arange(start, start + batch)
        real = idx < n
        # Pad the last batch with copies of row 0 so every call has one compiled shape.
        rows = np.where(real, idx, 0)
        scores = _leave_one_out(
            jnp.asarray(tokens[rows]), jnp.asarray(lengths[rows]), all_tokens, all_lengths,
            jnp.asarray(rows, jnp.int32), form=form, orders=tuple(orders), chunk_size=chunk_size,
        )  # fmt: skip
        out[idx[real]] = np.asarray(scores)[real]
    return out


def selfbleu_diversity(
    tokens: np.ndarray,
    lengths: np.ndarray,
    form: str = "per_reference",
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> float:
    """1 - mean SelfBLEU of each prompt against the others (token ids [N, L], lengths [N])."""
    return float(1.0 - np.mean(self_bleu_each(tokens, lengths, form, orders)))


def selfbleu_diversity_texts(
    texts: Sequence[str], form: str = "per_reference", orders: Sequence[int] = DEFAULT_ORDERS
) -> float:
    """`selfbleu_diversity` on word tokens (`word_tokenize`) of texts, the usual BLEU setting."""
    ids, lengths, _ = words_to_ids(tokenize_all(texts))
    return selfbleu_diversity(ids, lengths, form, orders)


def mean_pairwise_cosine(embeddings: np.ndarray) -> float:
    """mean_{i != j} cos(e_i, e_j) of embeddings [N, E] (N >= 2)."""
    e = np.asarray(embeddings, np.float64)
    chex.assert_rank(e, 2)
    n = e.shape[0]
    if n < 2:
        raise ValueError(f"pairwise cosine needs at least 2 embeddings, got {n}")
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    total = np.sum(e.sum(axis=0) ** 2)  # sum over all i, j of e_i . e_j
    self_pairs = np.sum(e * e)
    return float((total - self_pairs) / (n * (n - 1)))


def embedding_diversity(embeddings: np.ndarray) -> float:
    """1 - mean pairwise cosine (self-pairs excluded) of embeddings [N, E]."""
    return 1.0 - mean_pairwise_cosine(embeddings)
