"""Loader of real seed prompts for the game with real LLMs.

Format (the GPO authors' `ppo_data/*.json`): a JSON list of items, each a list of strings (a dialogue);
the last string of an item is the question used as a seed prompt. The path is always an argument
(the data is not shipped with alignjax).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np


class SeedDataError(ValueError):
    pass


def load_seed_prompts(
    path, max_items: int | None = None, dedupe: bool = False, strip: bool = True
) -> list[str]:
    """The seed questions of a JSON file in the authors' format (see module doc), in file order.

    Raises SeedDataError naming the first malformed item (not a non-empty list of strings, or an empty
    question). `dedupe` keeps the first occurrence of each question; `max_items` truncates after that."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"seed prompt file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SeedDataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise SeedDataError(f"{path}: expected a JSON list of lists of strings, got {type(data).__name__}")
    out, seen = [], set()
    for i, item in enumerate(data):
        if not isinstance(item, list) or not item or not all(isinstance(s, str) for s in item):
            raise SeedDataError(f"{path}: item {i} must be a non-empty list of strings, got {item!r:.80}")
        q = item[-1].strip() if strip else item[-1]
        if not q.strip():
            raise SeedDataError(f"{path}: item {i} has an empty question")
        if dedupe:
            if q in seen:
                continue
            seen.add(q)
        out.append(q)
    return out[:max_items] if max_items is not None else out


def encode_seed_prompts(tokenizer, texts, max_len: int, pad_id: int):
    """Left-padded token ids of texts with an HF `tokenizers.Tokenizer` (no special tokens), truncated to
    the LAST max_len tokens (the question's end is where its content is). (tokens, mask) int32 [N, L]."""
    toks = np.full((len(texts), max_len), pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    for i, t in enumerate(texts):
        ids = tokenizer.encode(t, add_special_tokens=False).ids[-max_len:]
        if ids:
            toks[i, max_len - len(ids) :] = ids
            mask[i, max_len - len(ids) :] = 1
    return toks, mask
