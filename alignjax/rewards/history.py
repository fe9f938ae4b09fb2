"""Fixed-capacity ring buffer of the attacker's past prompts, a pytree that lives in the game state.

GPO's diversity rewards compare each new attacker prompt with the history X of prompts the attacker
wrote before (spec section 4). Shapes must be static under jit and the cost of a step must not grow
with the run, so X is a ring buffer of capacity C: once full, the oldest entries are overwritten,
and a validity mask (`valid_mask`) tells the reward functions which rows hold a prompt. The buffer
is a plain NamedTuple of arrays, so Orbax checkpoints it with the rest of the game state.

Prompts are stored right-padded: row c holds `tokens[c, :lengths[c]]` (without EOS: see
`prompt_lengths`), and `embeddings[c]` its sentence embedding.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


class History(NamedTuple):
    tokens: jax.Array  # [C, L] int32, right-padded prompt token ids
    lengths: jax.Array  # [C] int32, tokens of each prompt (0 for an empty slot)
    embeddings: jax.Array  # [C, E] float32 sentence embeddings (L2-normalised by the embedder)
    count: jax.Array  # [] int32, valid entries, min(prompts added, C)
    pointer: jax.Array  # [] int32, next slot to write (the oldest entry once full)

    @property
    def capacity(self) -> int:
        return self.tokens.shape[0]


def init(capacity: int, max_len: int, embed_dim: int, pad_id: int = 0) -> History:
    """An empty history of `capacity` prompts of at most `max_len` tokens."""
    if capacity < 1 or max_len < 1 or embed_dim < 1:
        raise ValueError(
            f"history sizes must be >= 1, got capacity={capacity}, max_len={max_len}, embed_dim={embed_dim}"
        )
    return History(
        tokens=jnp.full((capacity, max_len), pad_id, jnp.int32),
        lengths=jnp.zeros((capacity,), jnp.int32),
        embeddings=jnp.zeros((capacity, embed_dim), jnp.float32),
        count=jnp.zeros((), jnp.int32),
        pointer=jnp.zeros((), jnp.int32),
    )


def valid_mask(history: History) -> jax.Array:
    """[C] bool, True for the slots that hold a prompt.

    Slots are filled in order 0, 1, ... and overwritten only once all are full, so the valid ones
    are exactly the first `count`."""
    return jnp.arange(history.capacity) < history.count


def add(
    history: History, tokens: jax.Array, lengths: jax.Array, embeddings: jax.Array, mask: jax.Array
) -> History:
    """Append the rows of a batch where `mask` is set, in batch order, overwriting the oldest entries.

    Args:
      tokens: [B, L] int32 right-padded prompts (L = the history's max_len).
      lengths: [B] int32.
      embeddings: [B, E] float32.
      mask: [B] bool; False rows are not added (e.g. padding rows of a batch).

    If more than C rows are added at once, only the last C are kept (what C sequential appends would
    leave), so the writes never collide.
    """
    c, length = history.tokens.shape
    chex.assert_rank([tokens, lengths, embeddings, mask], [2, 1, 2, 1])
    b = tokens.shape[0]
    chex.assert_shape(tokens, (b, length))
    chex.assert_shape([lengths, mask], (b,))
    chex.assert_shape(embeddings, (b, history.embeddings.shape[1]))
    mask = mask.astype(bool)
    rank = jnp.cumsum(mask.astype(jnp.int32)) - 1  # position of each added row among the added
    n_new = jnp.sum(mask.astype(jnp.int32))
    keep = mask & (rank >= n_new - c)
    # Rows not kept get index C, which `mode="drop"` discards.
    slot = jnp.where(keep, (history.pointer + rank) % c, c)
    return History(
        tokens=history.tokens.at[slot].set(tokens.astype(jnp.int32), mode="drop"),
        lengths=history.lengths.at[slot].set(lengths.astype(jnp.int32), mode="drop"),
        embeddings=history.embeddings.at[slot].set(embeddings.astype(history.embeddings.dtype), mode="drop"),
        count=jnp.minimum(history.count + n_new, c).astype(jnp.int32),
        pointer=((history.pointer + n_new) % c).astype(jnp.int32),
    )


def prompt_lengths(tokens: jax.Array, mask: jax.Array, eos_id: int | None = None) -> jax.Array:
    """Length [B] of right-padded sampled prompts, excluding a final EOS token.

    The sampler keeps EOS in the response (mask 1); the authors' code let `</s>` leak into the
    prompts it scored for diversity, so it is cut here. tokens, mask: [B, N]; the mask must be a
    prefix (ones then zeros), as the sampler produces.
    """
    chex.assert_rank([tokens, mask], 2)
    chex.assert_equal_shape([tokens, mask])
    n = jnp.sum(mask.astype(jnp.int32), axis=1)
    if eos_id is None:
        return n
    last = jnp.take_along_axis(tokens, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
    return n - ((n > 0) & (last == eos_id)).astype(jnp.int32)


def length_mask(lengths: jax.Array, width: int) -> jax.Array:
    """[B, width] int32 mask of right-padded rows: 1 at positions t < lengths[b]."""
    chex.assert_rank(lengths, 1)
    return (jnp.arange(width)[None, :] < lengths[:, None]).astype(jnp.int32)
