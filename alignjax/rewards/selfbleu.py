"""Self-BLEU of new prompts against a history of prompts: a plain-Python reference and a jittable
array implementation over token ids.

BLEU (NLTK `sentence_bleu` with `SmoothingFunction().method1`, which `fast_bleu` also computes) of a
hypothesis h against references R, with uniform weights 1/n over the orders k = 1..n:

    m_k   = sum_g min(cnt_h(g), max_{r in R} cnt_r(g))      clipped k-gram matches
    d_k   = max(1, |h| - k + 1)                             hypothesis k-grams (at least 1)
    p_k   = m_k / d_k  if m_k > 0  else  epsilon / d_k       (method1, epsilon = 0.1)
    BP    = 1 if |h| > r* else exp(1 - r* / |h|)             r* = closest reference length
                                                            (ties -> the shorter one)
    BLEU_n(h, R) = 0 if m_1 = 0 else BP * exp(sum_{k<=n} log(p_k) / n)

Self-BLEU of h against a history X averages over the orders n in {2, 3, 4, 5}, in one of two forms:

    "per_reference"   (GPO authors' code): mean_{x in X} mean_n BLEU_n(h, {x})
    "multi_reference" (curiosity-driven red-teaming code): mean_n BLEU_n(h, X)

An empty history gives 0 (nothing to be similar to).

The array form (`self_bleu`) equals the reference on token-id sequences. Its algorithm avoids the
O(B * C * L^2) pairwise n-gram comparison:

1. Every k-gram of the B new prompts gets an exact id in [0, B*L): the position of its code in a
   sorted array (`searchsorted`), where the code of a k-gram is the pair (id of its (k-1)-gram
   prefix, id of its last token), so ids are built order by order without hashing (no collisions).
   A history k-gram that does not occur among the new prompts gets the id NONE = B*L.
2. min(a, b) = #{t >= 1 : t <= a and t <= b}, so with the key (g, t) "the t-th occurrence of k-gram
   g in a sentence", clipped matches are a set intersection:
       sum_g min(cnt_h(g), cnt_x(g)) = |keys(h) ∩ keys(x)|
       sum_g min(cnt_h(g), max_x cnt_x(g)) = |keys(h) ∩ (∪_x keys(x))|.
   Keys of the new prompts get ids in [0, B*L) the same way.
3. per_reference: a 0/1 table M[key, b] ("prompt b has this key"); for a history entry x,
   m_k(b, x) = sum_j M[key(x, j), b], a gather of B-wide rows: O(C * L * B) work per order.
   multi_reference: a count per key of the history entries holding it (a scatter-add, O(C * L)).
4. The history is processed in chunks with `lax.scan` (memory bounded by the chunk), masked by the
   valid entries, so the cost is flat in how full a fixed-capacity buffer is.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from alignjax.rewards.history import length_mask

FORMS = ("per_reference", "multi_reference")
DEFAULT_ORDERS = (2, 3, 4, 5)
EPSILON = 0.1  # NLTK SmoothingFunction().method1 default
_INT_MAX = int(jnp.iinfo(jnp.int32).max)


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown Self-BLEU form {form!r}; choose from {FORMS}")


def _check_orders(orders: Sequence[int]) -> tuple[int, ...]:
    orders = tuple(int(n) for n in orders)
    if not orders or min(orders) < 1:
        raise ValueError(f"BLEU orders must be a non-empty tuple of integers >= 1, got {orders}")
    return orders


# ----------------------------------------------------------------------------------------------
# Plain-Python reference (the oracle the array implementation is tested against).
# ----------------------------------------------------------------------------------------------


def _ngram_counts(tokens: Sequence, k: int) -> Counter:
    return Counter(tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1))


def sentence_bleu_method1(
    hypothesis: Sequence, references: Sequence[Sequence], max_order: int, epsilon: float = EPSILON
) -> float:
    """BLEU_n(h, R) with uniform weights 1/n over orders 1..n and method1 smoothing (module doc).

    Equal to `nltk.translate.bleu_score.sentence_bleu(references, hypothesis, weights=(1/n,)*n,
    smoothing_function=SmoothingFunction().method1)`. Tokens may be any hashable items.
    """
    if not references:
        raise ValueError("BLEU needs at least one reference")
    numerators, denominators = [], []
    for k in range(1, max_order + 1):
        hyp = _ngram_counts(hypothesis, k)
        max_ref: Counter = Counter()
        for ref in references:
            for gram, c in _ngram_counts(ref, k).items():
                max_ref[gram] = max(max_ref[gram], c)
        numerators.append(sum(min(c, max_ref[gram]) for gram, c in hyp.items()))
        denominators.append(max(1, sum(hyp.values())))
    if numerators[0] == 0:
        return 0.0
    hyp_len = len(hypothesis)
    ref_len = min((len(r) for r in references), key=lambda n: (abs(n - hyp_len), n))
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    precisions = [(m if m > 0 else epsilon) / d for m, d in zip(numerators, denominators, strict=True)]
    return bp * math.exp(math.fsum(math.log(p) / max_order for p in precisions))


def self_bleu_reference(
    hypothesis: Sequence,
    history: Sequence[Sequence],
    form: str = "per_reference",
    orders: Sequence[int] = DEFAULT_ORDERS,
    epsilon: float = EPSILON,
) -> float:
    """Self-BLEU of one hypothesis against a history of token sequences (module doc); 0 if empty."""
    _check_form(form)
    orders = _check_orders(orders)
    if len(history) == 0:
        return 0.0
    if form == "multi_reference":
        return math.fsum(sentence_bleu_method1(hypothesis, history, n, epsilon) for n in orders) / len(orders)
    total = math.fsum(sentence_bleu_method1(hypothesis, [ref], n, epsilon) for ref in history for n in orders)
    return total / (len(history) * len(orders))


# ----------------------------------------------------------------------------------------------
# Array implementation (jittable).
# ----------------------------------------------------------------------------------------------


def _lookup(sorted_codes: jax.Array, queries: jax.Array, ok: jax.Array, none: int) -> jax.Array:
    """Index of the first occurrence of each query in `sorted_codes`, or `none` if absent / not ok."""
    idx = jnp.searchsorted(sorted_codes, queries, side="left")
    hit = sorted_codes[jnp.minimum(idx, sorted_codes.shape[0] - 1)] == queries
    return jnp.where(ok & hit, idx, none).astype(jnp.int32)


def _shift_left(x: jax.Array, s: jax.Array, fill: int) -> jax.Array:
    """x[:, i + s], `fill` past the end. x: [R, L]; s: a (possibly traced) int."""
    length = x.shape[1]
    idx = jnp.arange(length) + s
    return jnp.where(idx < length, jnp.take(x, jnp.minimum(idx, length - 1), axis=1), fill)


def _occurrence_rank(ids: jax.Array, ok: jax.Array) -> jax.Array:
    """rank[r, i] = #{j < i : ok[r, j] and ids[r, j] == ids[r, i]}. ids, ok: [R, L] -> [R, L] int32."""
    length = ids.shape[1]
    earlier = jnp.arange(length)[None, :] < jnp.arange(length)[:, None]  # [i, j]: j < i
    same = (ids[:, :, None] == ids[:, None, :]) & ok[:, None, :] & earlier[None]
    return jnp.sum(same, axis=-1, dtype=jnp.int32)


class _HypTables(NamedTuple):
    """Sorted codes of the new prompts' k-grams and keys (steps 1-2 of the module doc).

    Orders k = 2..K run as one `lax.scan` (the arrays of every order have the same shape), which keeps
    compile time flat in K."""

    unigram_sorted: jax.Array  # [B*L] sorted token ids (invalid positions: INT_MAX)
    pair_sorted: jax.Array  # [K-1, B*L] sorted (prefix id, last token id) codes of orders 2..K
    key_sorted: jax.Array  # [K, B*L] sorted (k-gram id, occurrence rank) codes
    key_ids: jax.Array  # [K, B, L] key id at each position (none where no k-gram starts)
    valid: jax.Array  # [K, B, L] bool, position i starts a k-gram
    none: int  # B*L, the id of "absent from the new prompts"
    key_width: int  # rank multiplier of key codes, max(L, Lr)


def _key_codes(g, ok, key_width):
    return jnp.where(ok, g * key_width + _occurrence_rank(g, ok), _INT_MAX)


def _build_tables(tokens, lengths, max_order, key_width) -> _HypTables:
    b, length = tokens.shape
    none = b * length
    pos = jnp.arange(length)[None, :]

    def keys_for(g, ok):
        keys = _key_codes(g, ok, key_width)
        sorted_keys = jnp.sort(keys.reshape(-1))
        return sorted_keys, _lookup(sorted_keys, keys, ok, none)

    ok1 = pos < lengths[:, None]
    codes1 = jnp.where(ok1, tokens, _INT_MAX)
    unigram_sorted = jnp.sort(codes1.reshape(-1))
    g1 = _lookup(unigram_sorted, codes1, ok1, none)
    key_sorted1, key_ids1 = keys_for(g1, ok1)

    def order(g, k):
        ok = pos + k <= lengths[:, None]
        codes = jnp.where(ok, g * (none + 1) + _shift_left(g1, k - 1, none), _INT_MAX)
        sorted_codes = jnp.sort(codes.reshape(-1))
        g = _lookup(sorted_codes, codes, ok, none)
        return g, (sorted_codes, *keys_for(g, ok), ok)

    _, (pair_sorted, key_sorted, key_ids, valid) = jax.lax.scan(order, g1, jnp.arange(2, max_order + 1))
    return _HypTables(
        unigram_sorted=unigram_sorted,
        pair_sorted=pair_sorted,
        key_sorted=jnp.concatenate([key_sorted1[None], key_sorted]),
        key_ids=jnp.concatenate([key_ids1[None], key_ids]),
        valid=jnp.concatenate([ok1[None], valid]),
        none=none,
        key_width=key_width,
    )


def _ref_key_ids(t: _HypTables, ref_tokens, ref_lengths):
    """Key ids [K, R, Lr] of history sentences (none where the key is absent from the new prompts)."""
    none = t.none
    ok1 = length_mask(ref_lengths, ref_tokens.shape[1]).astype(bool)
    g1 = _lookup(t.unigram_sorted, jnp.where(ok1, ref_tokens, _INT_MAX), ok1, none)

    def key_ids(g, key_sorted):
        found = g != none
        return _lookup(key_sorted, jnp.where(found, _key_codes(g, found, t.key_width), 0), found, none)

    def order(g, xs):
        k, pair_sorted, key_sorted = xs
        nxt = _shift_left(g1, k - 1, none)
        ok = (g != none) & (nxt != none)
        g = _lookup(pair_sorted, jnp.where(ok, g * (none + 1) + nxt, 0), ok, none)
        return g, key_ids(g, key_sorted)

    max_order = t.key_sorted.shape[0]
    _, rest = jax.lax.scan(order, g1, (jnp.arange(2, max_order + 1), t.pair_sorted, t.key_sorted[1:]))
    return jnp.concatenate([key_ids(g1, t.key_sorted[0])[None], rest])


def _bleu_from_counts(clipped, hyp_len, ref_len, orders, epsilon):
    """BLEU averaged over `orders` from clipped counts [K, ...], hyp_len and ref_len broadcastable."""
    hyp_len = hyp_len.astype(jnp.float32)
    ref_len = ref_len.astype(jnp.float32)
    logp = []
    for k in range(clipped.shape[0]):
        den = jnp.maximum(1.0, hyp_len - k)
        m = clipped[k].astype(jnp.float32)
        logp.append(jnp.log(jnp.where(m > 0, m, epsilon) / den))
    # hyp_len = 0 implies m_1 = 0, hence BLEU 0; the guard only keeps the division finite.
    log_bp = jnp.where(hyp_len > ref_len, 0.0, 1.0 - ref_len / jnp.maximum(hyp_len, 1.0))
    total = 0.0
    for n in orders:
        total = total + jnp.exp(log_bp + sum(logp[:n]) / n)
    return jnp.where(clipped[0] > 0, total / len(orders), 0.0)


def self_bleu(
    tokens: jax.Array,
    lengths: jax.Array,
    ref_tokens: jax.Array,
    ref_lengths: jax.Array,
    ref_mask: jax.Array,
    *,
    form: str = "per_reference",
    orders: Sequence[int] = DEFAULT_ORDERS,
    exclude: jax.Array | None = None,
    chunk_size: int = 256,
    epsilon: float = EPSILON,
) -> jax.Array:
    """Self-BLEU [B] of B new token sequences against the valid entries of a history (module doc).

    Args:
      tokens: [B, L] int32 token ids, right-padded; the first `lengths[b]` are the sentence. Ids
        must be < 2**31 - 1 (the padding value is never read).
      lengths: [B] int32 in [0, L] (values outside are clipped to it).
      ref_tokens: [C, Lr] int32 history token ids, right-padded; ref_lengths: [C] int32.
      ref_mask: [C] bool, the valid history entries (e.g. `history.valid_mask(h)`).
      form: "per_reference" or "multi_reference" (static).
      orders: the BLEU orders n averaged over (static), default (2, 3, 4, 5).
      exclude: optional [B] int32 index of one history entry to leave out for each new sentence
        (-1, or any index outside [0, C): none); evaluation uses it to drop self-matches.
      chunk_size: history entries per `lax.scan` step (bounds memory at about
        chunk_size * Lr * B floats per order).

    Returns: [B] float32; 0 for a sentence with no valid history entry to compare with.
    """
    _check_form(form)
    orders = _check_orders(orders)
    chex.assert_rank([tokens, lengths, ref_tokens, ref_lengths, ref_mask], [2, 1, 2, 1, 1])
    b, length = tokens.shape
    c, ref_width = ref_tokens.shape
    chex.assert_shape(lengths, (b,))
    chex.assert_shape([ref_lengths, ref_mask], (c,))
    chex.assert_type([tokens, ref_tokens], int)
    if exclude is None:
        exclude = jnp.full((b,), -1, jnp.int32)
    chex.assert_shape(exclude, (b,))
    none = b * length
    key_width = max(length, ref_width)
    if (none + 1) ** 2 > _INT_MAX or none * key_width > _INT_MAX:
        raise ValueError(
            f"B * L = {none} new-prompt positions is too many for int32 k-gram codes "
            "(need (B*L+1)^2 < 2^31); score the new prompts in smaller batches"
        )
    max_order = max(orders)
    # A length past the row would count padding as words; clip so that it cannot (lengths are traced).
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, length)
    ref_lengths = jnp.clip(ref_lengths.astype(jnp.int32), 0, ref_width)
    ref_mask = ref_mask.astype(bool)
    exclude = exclude.astype(jnp.int32)
    tables = _build_tables(tokens.astype(jnp.int32), lengths, max_order, key_width)

    chunk = max(1, min(chunk_size, c))
    n_chunks = -(-c // chunk)
    pad = n_chunks * chunk - c
    xs = (
        jnp.pad(ref_tokens.astype(jnp.int32), ((0, pad), (0, 0))).reshape(n_chunks, chunk, ref_width),
        jnp.pad(ref_lengths, (0, pad)).reshape(n_chunks, chunk),
        jnp.pad(ref_mask, (0, pad)).reshape(n_chunks, chunk),
        jnp.arange(n_chunks * chunk, dtype=jnp.int32).reshape(n_chunks, chunk),
    )

    args = (tables, xs, lengths, exclude, orders, epsilon)
    if form == "per_reference":
        return _per_reference(*args)
    return _multi_reference(*args, ref_tokens.astype(jnp.int32), ref_lengths, ref_mask)


def _per_reference(tables, xs, lengths, exclude, orders, epsilon) -> jax.Array:
    """Mean over valid history entries of sentence-BLEU against each entry alone: [B]."""
    b, length = tables.key_ids.shape[1:]
    none, max_order = b * length, tables.key_ids.shape[0]
    # M[k, key, b] = 1 iff new sentence b holds key; row `none` stays 0 (absent keys match nothing).
    cols = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
    table = jax.vmap(lambda kid, ok: jnp.zeros((none + 1, b), jnp.float32).at[kid, cols].max(ok))(
        tables.key_ids, tables.valid.astype(jnp.float32)
    )  # [K, B*L + 1, B]
    order_idx = jnp.arange(max_order)[:, None, None]

    def body(carry, x):
        r_tok, r_len, r_ok, r_idx = x
        kids = _ref_key_ids(tables, r_tok, r_len)  # [K, R, Lr]
        clipped = jnp.sum(table[order_idx, kids], axis=2)  # [K, R, B]
        bleu = _bleu_from_counts(clipped, lengths[None, :], r_len[:, None], orders, epsilon)  # [R, B]
        pair = r_ok[:, None] & (r_idx[:, None] != exclude[None, :])
        total, count = carry
        return (total + jnp.sum(jnp.where(pair, bleu, 0.0), axis=0), count + jnp.sum(pair, axis=0)), None

    init = (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32))
    (total, count), _ = jax.lax.scan(body, init, xs)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def _multi_reference(tables, xs, lengths, exclude, orders, epsilon, ref_tokens, ref_lengths, ref_mask):
    """Sentence-BLEU against all valid history entries at once (clipped counts over the set): [B]."""
    b, length = tables.key_ids.shape[1:]
    none, max_order = b * length, tables.key_ids.shape[0]
    c, ref_width = ref_tokens.shape
    # multi_reference: count, for each key of the new prompts, the valid history entries holding it,
    # and track the closest history length per new sentence (ties -> shorter), encoded as one int.
    len_code = ref_width + 1

    def body(carry, x):
        r_tok, r_len, r_ok, r_idx = x
        kids = _ref_key_ids(tables, r_tok, r_len)  # [K, R, Lr]
        counts, best = carry
        w = jnp.broadcast_to(r_ok[None, :, None], kids.shape).astype(jnp.int32)
        counts = jax.vmap(lambda cnt, kid, wk: cnt.at[kid].add(wk))(counts, kids, w)
        pair = r_ok[:, None] & (r_idx[:, None] != exclude[None, :])  # [R, B]
        code = jnp.abs(r_len[:, None] - lengths[None, :]) * len_code + r_len[:, None]
        best = jnp.minimum(best, jnp.min(jnp.where(pair, code, _INT_MAX), axis=0))
        return (counts, best), None

    init = (jnp.zeros((max_order, none + 1), jnp.int32), jnp.full((b,), _INT_MAX, jnp.int32))
    (counts, best), _ = jax.lax.scan(body, init, xs)
    # The left-out entry's own keys must not count: subtract them where that entry is valid.
    safe_ex = jnp.clip(exclude, 0, c - 1)
    ex_valid = (exclude >= 0) & (exclude < c) & ref_mask[safe_ex]  # out of range: nothing left out
    ex_kids = _ref_key_ids(tables, ref_tokens[safe_ex], ref_lengths[safe_ex])  # [K, B, Lr]
    kid_h = tables.key_ids  # [K, B, L]
    in_ex = jnp.any(kid_h[..., None] == ex_kids[:, :, None, :], axis=-1) & ex_valid[None, :, None]
    held = jnp.take_along_axis(counts, kid_h.reshape(max_order, -1), axis=1).reshape(kid_h.shape)
    clipped = jnp.sum((held - in_ex.astype(jnp.int32) > 0) & tables.valid, axis=2)  # [K, B]
    has_ref = best < _INT_MAX
    bleu = _bleu_from_counts(clipped, lengths, jnp.where(has_ref, best % len_code, 0), orders, epsilon)
    return jnp.where(has_ref, bleu, 0.0)
