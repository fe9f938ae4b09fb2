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

from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from alignjax.models.bert import SentenceEncoder, pad_encodings, sentence_embedding


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
