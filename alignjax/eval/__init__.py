"""Evaluation metrics."""

from alignjax.eval.diversity import (
    embedding_diversity,
    mean_pairwise_cosine,
    self_bleu_each,
    selfbleu_diversity,
    selfbleu_diversity_texts,
)

__all__ = [
    "embedding_diversity",
    "mean_pairwise_cosine",
    "self_bleu_each",
    "selfbleu_diversity",
    "selfbleu_diversity_texts",
]
