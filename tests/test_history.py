"""History ring buffer: compared with a plain Python deque(maxlen=C) fed row by row."""

from collections import deque

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.rewards import history as hist


def _rows(h):
    """The valid entries, oldest first, as (tokens tuple, length, embedding tuple)."""
    c = h.capacity
    count, pointer = int(h.count), int(h.pointer)
    order = range(count) if count < c else [(pointer + i) % c for i in range(c)]
    return [
        (
            tuple(np.asarray(h.tokens[i]).tolist()),
            int(h.lengths[i]),
            tuple(np.asarray(h.embeddings[i]).tolist()),
        )
        for i in order
    ]


def _check_types(h, c, length, e):
    chex.assert_shape(
        [h.tokens, h.lengths, h.embeddings, h.count, h.pointer], [(c, length), (c,), (c, e), (), ()]
    )
    chex.assert_type(
        [h.tokens, h.lengths, h.embeddings, h.count, h.pointer],
        [jnp.int32] * 2 + [jnp.float32] + [jnp.int32] * 2,
    )


def test_init_is_empty_with_the_given_sizes_and_pad():
    h = hist.init(3, 4, 2)
    _check_types(h, 3, 4, 2)
    assert h.capacity == 3
    chex.assert_trees_all_equal(
        tuple(h), (np.zeros((3, 4), np.int32), np.zeros(3, np.int32), np.zeros((3, 2), np.float32), 0, 0)
    )
    np.testing.assert_array_equal(np.asarray(hist.valid_mask(h)), [False] * 3)
    chex.assert_trees_all_equal(hist.init(2, 3, 1, pad_id=7).tokens, np.full((2, 3), 7, np.int32))
    _check_types(hist.init(1, 1, 1), 1, 1, 1)  # the smallest sizes are valid
    for sizes in ((0, 3, 2), (3, 0, 2), (3, 2, 0)):
        with pytest.raises(
            ValueError, match=r"history sizes must be >= 1, got capacity=\d+, max_len=\d+, embed_dim="
        ):
            hist.init(*sizes)


def test_add_converts_dtypes_and_a_capacity_of_one_keeps_the_last_row():
    h = hist.init(1, 2, 2)
    h = jax.jit(hist.add)(
        h,
        np.array([[1, 2], [3, 4], [5, 6]], np.int64),
        np.array([2, 1, 2], np.int64),
        np.arange(6, dtype=np.float64).reshape(3, 2),
        np.array([1, 1, 0], np.int32),  # an int mask: the last row is not added
    )
    _check_types(h, 1, 2, 2)
    chex.assert_trees_all_equal(tuple(h), (np.array([[3, 4]]), np.array([1]), np.array([[2.0, 3.0]]), 1, 0))
    h = jax.jit(hist.add)(
        h, jnp.array([[9, 9]]), jnp.array([1]), jnp.ones((1, 2), jnp.bfloat16), jnp.array([True])
    )
    _check_types(h, 1, 2, 2)
    chex.assert_trees_all_equal(tuple(h), (np.array([[9, 9]]), np.array([1]), np.ones((1, 2)), 1, 0))


def test_add_matches_deque_including_wraparound_and_masked_rows():
    rng = np.random.default_rng(0)
    c, length, e = 5, 3, 2
    h = hist.init(c, length, e)
    add = jax.jit(hist.add)
    model = deque(maxlen=c)
    for batch in (3, 1, 4, 2, 7, 0):  # 7 > C: only the last C added rows survive
        tokens = rng.integers(0, 100, (batch, length)).astype(np.int32)
        lengths = rng.integers(0, length + 1, batch).astype(np.int32)
        emb = rng.normal(size=(batch, e)).astype(np.float32)
        mask = rng.random(batch) < 0.7
        h = add(h, tokens, lengths, emb, mask)
        for i in range(batch):
            if mask[i]:
                model.append((tuple(tokens[i].tolist()), int(lengths[i]), tuple(emb[i].tolist())))
        _check_types(h, c, length, e)
        assert int(h.count) == len(model)
        assert _rows(h) == list(model)
        np.testing.assert_array_equal(np.asarray(hist.valid_mask(h)), np.arange(c) < len(model))


def test_history_is_a_pytree_and_checks_shapes():
    h = hist.init(4, 3, 2)
    assert len(jax.tree.leaves(h)) == 5
    with pytest.raises(AssertionError):
        hist.add(
            h,
            jnp.zeros((2, 4), jnp.int32),
            jnp.zeros((2,), jnp.int32),
            jnp.zeros((2, 2)),
            jnp.ones((2,), bool),
        )
    for bad in (
        (jnp.zeros((2, 3, 1), jnp.int32), jnp.zeros((2,)), jnp.zeros((2, 2)), jnp.ones((2,), bool)),  # rank
        (jnp.zeros((2, 3), jnp.int32), jnp.zeros((3,)), jnp.zeros((2, 2)), jnp.ones((2,), bool)),
        (jnp.zeros((2, 3), jnp.int32), jnp.zeros((2,)), jnp.zeros((2, 2)), jnp.ones((3,), bool)),
        (jnp.zeros((2, 3), jnp.int32), jnp.zeros((2,)), jnp.zeros((2, 3)), jnp.ones((2,), bool)),
        (jnp.zeros((2, 3), jnp.int32), jnp.zeros((2,)), jnp.zeros((3, 2)), jnp.ones((2,), bool)),
    ):
        with pytest.raises(AssertionError):
            hist.add(h, *bad)


def test_prompt_lengths_drops_final_eos_only():
    eos = 2
    tokens = jnp.array([[5, 6, 2, 0], [5, 6, 7, 8], [2, 0, 0, 0], [0, 0, 0, 0]], jnp.int32)
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], jnp.int32)
    for fn in (hist.prompt_lengths, jax.jit(hist.prompt_lengths, static_argnums=2)):
        for m in (mask, mask.astype(bool)):
            with_eos, without = fn(tokens, m, eos), fn(tokens, m)
            chex.assert_shape([with_eos, without], (4,))
            chex.assert_type([with_eos, without], jnp.int32)
            chex.assert_trees_all_equal((with_eos, without), (np.array([2, 4, 0, 0]), np.array([3, 4, 1, 0])))
    with pytest.raises(AssertionError):
        hist.prompt_lengths(tokens[0], mask[0], eos)
    with pytest.raises(AssertionError):
        hist.prompt_lengths(tokens, mask[:, :3], eos)


def test_history_survives_an_orbax_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    h = hist.init(4, 3, 2)
    h = hist.add(
        h,
        jnp.arange(15, dtype=jnp.int32).reshape(5, 3),
        jnp.array([3, 2, 1, 3, 0]),
        jnp.ones((5, 2)),
        jnp.ones((5,), bool),
    )
    mngr = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True))
    mngr.save(0, args=ocp.args.StandardSave(h))
    mngr.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), h)
    restored = hist.History(*mngr.restore(0, args=ocp.args.StandardRestore(abstract)))
    for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
