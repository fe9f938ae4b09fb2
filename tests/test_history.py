"""History ring buffer: compared with a plain Python deque(maxlen=C) fed row by row."""

from collections import deque

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
    with pytest.raises(ValueError):
        hist.init(0, 3, 2)


def test_prompt_lengths_drops_final_eos_only():
    eos = 2
    tokens = jnp.array([[5, 6, 2, 0], [5, 6, 7, 8], [2, 0, 0, 0], [0, 0, 0, 0]], jnp.int32)
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(hist.prompt_lengths(tokens, mask, eos)), [2, 4, 0, 0])
    np.testing.assert_array_equal(np.asarray(hist.prompt_lengths(tokens, mask)), [3, 4, 1, 0])


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
