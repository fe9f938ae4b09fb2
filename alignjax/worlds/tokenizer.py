"""The synthetic world's word-level tokenizer (an HF `tokenizers` model, saved like any HF tokenizer)."""

from __future__ import annotations

import json
import pathlib

from tokenizers import Tokenizer, models, pre_tokenizers, processors

from alignjax.worlds import grammar as G


def build_tokenizer(words: list[str]) -> Tokenizer:
    """WordLevel tokenizer over `words` (special tokens first: <pad>=0 <s>=1 </s>=2 <unk>=3), splitting
    on whitespace and punctuation; `encode(text)` prepends <s> as Llama tokenizers do."""
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(G.SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", G.BOS_ID)]
    )
    return tok


def save_tokenizer(tok: Tokenizer, folder: pathlib.Path) -> None:
    """tokenizer.json plus the config files `transformers.AutoTokenizer.from_pretrained` needs."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 256,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


