"""Text <-> tokens: HF tokenizers from a local folder and prompt templates assembled at the token level."""

from alignjax.text.templates import (
    ATTACKER_CHAT,
    ATTACKER_TEMPLATE,
    DEFENDER_CHAT,
    DEFENDER_TEMPLATE,
    TokenTemplate,
    split_template,
)
from alignjax.text.tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "ATTACKER_CHAT",
    "ATTACKER_TEMPLATE",
    "DEFENDER_CHAT",
    "DEFENDER_TEMPLATE",
    "TextTokenizer",
    "TokenTemplate",
    "load_tokenizer",
    "split_template",
]
