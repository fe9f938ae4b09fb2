"""Rewards of the game: the judge interface, diversity against a history, the attacker's reward."""

from alignjax.rewards import history
from alignjax.rewards.attacker_reward import (
    AttackerReward,
    AttackerRewardConfig,
    Similarity,
    attacker_reward,
    similarity_to_history,
)
from alignjax.rewards.embedding import cosine_to_history, make_retokenizer, make_token_embedder
from alignjax.rewards.history import History
from alignjax.rewards.judge import Judge, JudgeOutput
from alignjax.rewards.selfbleu import FORMS, self_bleu, self_bleu_reference, sentence_bleu_method1
from alignjax.rewards.word_tokenize import word_tokenize, words_to_ids

__all__ = [
    "FORMS",
    "AttackerReward",
    "AttackerRewardConfig",
    "History",
    "Similarity",
    "Judge",
    "JudgeOutput",
    "attacker_reward",
    "cosine_to_history",
    "history",
    "make_retokenizer",
    "make_token_embedder",
    "self_bleu",
    "self_bleu_reference",
    "sentence_bleu_method1",
    "similarity_to_history",
    "word_tokenize",
    "words_to_ids",
]
