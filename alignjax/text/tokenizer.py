"""HF tokenizers loaded from a local folder, batch padding to [B, L] arrays, and response decoding.

    tok = load_tokenizer("path/to/model")                   # tokenizer.json (or AutoTokenizer files)
    ids, mask = tok.pad_batch(tok.encode_batch(texts))       # [B, L] int32, right-padded
    texts = tok.decode_responses(out.tokens, out.mask)       # cut at EOS, no special tokens left

The backend is always a `tokenizers.Tokenizer` (Rust, no torch). `encode` never adds special tokens:
BOS and templates are placed explicitly (see `templates.TokenTemplate`), so no post-processor can
silently prepend a BOS (the GPO authors' judge read the BOS token's probability that way). The folder's
Jinja chat template, if any, is kept as text (`chat_template`) for `TokenTemplate.from_chat`.
`transformers` is only a fallback for folders without tokenizer.json, and never with remote code.

    check_players_agree({"defender.checkpoint=/a": folder_tokens("/a"), ...})   # same vocab, pad, EOS
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from alignjax.config import InputError

SPECIAL_NAMES = ("bos", "eos", "pad", "unk")


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the ids of its special tokens.

    Attributes: backend (tokenizers.Tokenizer, padding/truncation disabled); bos_id, eos_id, pad_id,
    unk_id (int or None); special_ids (frozenset of every id registered as special, plus those four);
    chat_template (the folder's Jinja chat template: a string, a {name: template} dict, or None).
    """

    def __init__(self, backend, bos_id=None, eos_id=None, pad_id=None, unk_id=None, chat_template=None):
        backend.no_padding()  # some tokenizer.json files pad to a fixed length (MiniLM pads to 128)
        backend.no_truncation()
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        registered = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        named = {i for i in (bos_id, eos_id, pad_id, unk_id) if i is not None}
        self.special_ids = frozenset(registered | named)
        self.chat_template = chat_template

    def __repr__(self):
        return (f"TextTokenizer(vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, unk={self.unk_id})")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def special_tokens(self) -> dict[str, str]:
        """{"bos_token": "<s>", ...} for the special ids that are set (what chat templates read)."""
        ids = {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "unk": self.unk_id}
        return {f"{k}_token": self.backend.id_to_token(i) for k, i in ids.items() if i is not None}

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` (no special tokens added, except BOS when asked)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but the tokenizer has no BOS; pass bos= to load_tokenizer")
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not one string")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def pad_batch(
        self,
        seqs: Sequence[Sequence[int]],
        max_len: int | None = None,
        side: str = "right",
        truncation: str = "error",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pad token lists to (tokens [B, L] int32, mask [B, L] int32), L = max_len or the longest.

        side: "right" (content, the input of `TokenTemplate.fill`) or "left" (prompts for `sample`).
        truncation: what to do with a sequence longer than max_len: "error" (default; no silent loss),
        "left" (keep the last max_len tokens) or "right" (keep the first max_len)."""
        if side not in ("left", "right") or truncation not in ("error", "left", "right"):
            raise ValueError(f"side: left|right, truncation: error|left|right; got {side}, {truncation}")
        if self.pad_id is None:
            raise ValueError("the tokenizer has no pad token; pass pad= to load_tokenizer")
        longest = max((len(s) for s in seqs), default=0)
        length = longest if max_len is None else max_len
        tokens = np.full((len(seqs), max(length, 1)), self.pad_id, np.int32)
        mask = np.zeros_like(tokens)
        for b, s in enumerate(seqs):
            s = list(s)
            if len(s) > length:
                if truncation == "error":
                    raise ValueError(f"sequence {b} has {len(s)} tokens > max_len={length} "
                                     "(pass truncation='left' or 'right' to cut it)")
                s = s[-length:] if truncation == "left" else s[:length]
            if not s:
                continue
            sl = slice(tokens.shape[1] - len(s), None) if side == "left" else slice(0, len(s))
            tokens[b, sl], mask[b, sl] = s, 1
        return tokens, mask

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_responses(self, tokens, mask, eos_id: int | Sequence[int] | None = None) -> list[str]:
        """Texts of generated blocks. tokens, mask [B, N] -> B strings.

        Per row: keep masked-in tokens, cut at the first EOS (`eos_id`, default the tokenizer's),
        drop every special id, decode, and remove any special token's literal text that the pieces
        might still spell (e.g. "</s>"), so judges and diversity rewards never see it."""
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise ValueError(f"tokens and mask must both be [B, N], got {tokens.shape} and {mask.shape}")
        eos = {self.eos_id} if eos_id is None else ({eos_id} if isinstance(eos_id, int) else set(eos_id))
        eos.discard(None)
        literals = [self.backend.id_to_token(i) for i in sorted(self.special_ids)]
        texts = []
        for row, m in zip(tokens, mask, strict=True):
            ids = [int(i) for i in row[m.astype(bool)]]
            stop = next((k for k, i in enumerate(ids) if i in eos), len(ids))
            text = self.decode([i for i in ids[:stop] if i not in self.special_ids])
            for lit in literals:
                if lit:
                    text = text.replace(lit, "")
            texts.append(text)
        return texts


def _special_from_files(folder: pathlib.Path) -> dict[str, str | int]:
    """Special tokens named in tokenizer_config.json / special_tokens_map.json (strings) or, failing
    those, the model's config.json / generation_config.json (ids)."""
    found: dict[str, str | int] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if not f.exists():
            continue
        data = _read_json(f)
        for s in SPECIAL_NAMES:
            v = data.get(f"{s}_token")
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and s not in found:
                found[s] = v
    for name in ("generation_config.json", "config.json"):
        f = folder / name
        if not f.exists():
            continue
        data = _read_json(f)
        for s in SPECIAL_NAMES:
            v = data.get(f"{s}_token_id")
            if isinstance(v, list):  # several EOS ids (Llama 3): the first is the canonical one
                v = v[0] if v else None
            if isinstance(v, int) and s not in found:
                found[s] = v
    return found


def _read_json(f: pathlib.Path) -> dict:
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{f}: expected a JSON object, got {type(data).__name__}")
    return data


def _chat_template_from_files(folder: pathlib.Path) -> str | dict[str, str] | None:
    """The chat template as transformers saves it: chat_template.jinja (newer), else tokenizer_config.json's
    "chat_template" (a string, or a list of {"name", "template"}), else chat_template.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    for name in ("tokenizer_config.json", "chat_template.json"):
        f = folder / name
        if not f.exists():
            continue
        t = json.loads(f.read_text()).get("chat_template")
        if isinstance(t, list):
            t = {d["name"]: d["template"] for d in t}
        if t:
            return t
    return None


def load_tokenizer(
    path: str | os.PathLike,
    bos: str | int | None = None,
    eos: str | int | None = None,
    pad: str | int | None = None,
    unk: str | int | None = None,
) -> TextTokenizer:
    """Load the tokenizer of a local HF folder (nothing is downloaded).

    Reads `tokenizer.json` with the `tokenizers` library; without one, falls back to
    `transformers.AutoTokenizer` (e.g. a sentencepiece `tokenizer.model`) and uses its Rust backend.
    Special tokens: the bos/eos/pad/unk arguments (a token string or an id) override what the folder's
    tokenizer_config.json / special_tokens_map.json / config.json name. Missing ones are None. The
    folder's chat template, if any, becomes `chat_template`.
    """
    import tokenizers

    from alignjax.models.gguf_io import gguf_file_of
    from alignjax.worlds.real_data import package_path

    path = package_path(path)  # `package:<pkg>/<file>`: a file shipped in an installed package
    gguf_file = gguf_file_of(path)
    if gguf_file is not None:
        return _gguf_tokenizer(gguf_file, bos, eos, pad, unk)
    folder = pathlib.Path(path)
    if folder.is_file() and folder.name.endswith(".json"):
        folder, tok_file = folder.parent, folder
    else:
        tok_file = folder / "tokenizer.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    if tok_file.exists():
        backend = tokenizers.Tokenizer.from_file(str(tok_file))
    else:
        try:
            import transformers

            # local files only, and no code from the folder (trust_remote_code stays False)
            auto = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                              trust_remote_code=False)
        except Exception as e:  # transformers raises several types for a folder it cannot read
            raise FileNotFoundError(
                f"{folder} has no tokenizer.json and transformers.AutoTokenizer could not load it: {e}"
            ) from e
        backend = getattr(auto, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"the tokenizer in {folder} has no `tokenizers` backend ({type(auto).__name__})")
    found = _special_from_files(folder)
    given = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    ids = {}
    for s in SPECIAL_NAMES:
        v = given[s] if given[s] is not None else found.get(s)
        if isinstance(v, str):
            i = backend.token_to_id(v)
            if i is None:
                source = "argument" if given[s] is not None else folder
                raise ValueError(f"{s} token {v!r} (from {source}) is not in the vocabulary")
            v = i
        if v is not None and not 0 <= v < backend.get_vocab_size(with_added_tokens=True):
            raise ValueError(f"{s} id {v} is outside the vocabulary")
        ids[s] = v
    return TextTokenizer(backend, ids["bos"], ids["eos"], ids["pad"], ids["unk"],
                         chat_template=_chat_template_from_files(folder))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _gguf_tokenizer(gguf_file: pathlib.Path, bos, eos, pad, unk) -> TextTokenizer:
    """The vocabulary, special tokens and chat template a GGUF file carries, read by transformers
    (`AutoTokenizer.from_pretrained(folder, gguf_file=...)`, local files only; needs `gguf`)."""
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    import transformers

    try:
        auto = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                          local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises several types for a file it cannot read
        raise FileNotFoundError(f"{gguf_file}: transformers could not read its tokenizer: {e}") from e
    backend = getattr(auto, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"the tokenizer in {gguf_file} has no `tokenizers` backend ({type(auto).__name__})")
    given = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    ids = {}
    for s in SPECIAL_NAMES:
        v = given[s] if given[s] is not None else getattr(auto, f"{s}_token", None)
        if isinstance(v, str):
            i = backend.token_to_id(v)
            if i is None:
                raise ValueError(f"{s} token {v!r} (from {gguf_file}) is not in the vocabulary")
            v = i
        ids[s] = v
    template = auto.chat_template if isinstance(auto.chat_template, str) else None
    return TextTokenizer(backend, ids["bos"], ids["eos"], ids["pad"], ids["unk"], chat_template=template)


def folder_tokens(path: str | os.PathLike) -> dict:
    """What a model folder states about its tokens: {"vocab": {token: id} or None, "pad": id, "eos": id}
    from its tokenizer files when it has any (`load_tokenizer`), else from its config.json (ids only;
    None where unstated)."""
    from alignjax.models.gguf_io import gguf_file_of
    from alignjax.worlds.real_data import package_path

    path = package_path(path)
    if gguf_file_of(path) is not None:  # a GGUF carries its vocabulary and special tokens
        tok = load_tokenizer(path)
        return {"vocab": tok.backend.get_vocab(with_added_tokens=True), "pad": tok.pad_id, "eos": tok.eos_id}
    folder = pathlib.Path(path)
    if any((folder / n).exists() for n in _TOKENIZER_FILES):
        tok = load_tokenizer(folder)
        return {"vocab": tok.backend.get_vocab(with_added_tokens=True), "pad": tok.pad_id, "eos": tok.eos_id}
    found = _special_from_files(folder)
    ids = {k: v if isinstance(v, int) else None for k, v in found.items()}
    return {"vocab": None, "pad": ids.get("pad"), "eos": ids.get("eos")}


def check_players_agree(sources: dict[str, dict]) -> None:
    """Raise InputError when the sources ({"defender.checkpoint=/a": folder_tokens(...), ...}) disagree
    on the pad or EOS id, or hold different vocabularies (ids that are None, or vocabularies a source
    does not state, are not compared). The attacker's prompt tokens are the defender's input and one
    pad / EOS id ends and masks both players' samples, so the players must share one tokenizer."""
    why = "Both players must use one tokenizer (the attacker's prompts are the defender's input)"
    for name in ("pad", "eos"):
        stated = {src: t[name] for src, t in sources.items() if t.get(name) is not None}
        if len(set(stated.values())) > 1:
            each = "; ".join(f"{v} in {src}" for src, v in stated.items())
            raise InputError(f"the players' tokenizers disagree on the {name.upper()} id: {each}. {why}")
    vocabs = [(src, t["vocab"]) for src, t in sources.items() if t.get("vocab") is not None]
    for src, v in vocabs[1:]:
        first, v0 = vocabs[0]
        if v != v0:
            differ = len(set(v.items()) ^ set(v0.items()))
            raise InputError(f"the players' tokenizers differ: {src} and {first} map {differ} token/id "
                             f"pair(s) differently ({len(v)} vs {len(v0)} tokens). {why}")
