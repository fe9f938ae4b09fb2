"""CheckpointStore: round trip of a pytree with optax state types, JSON metadata, fallback on damage."""

import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax.checkpoint import CheckpointStore


def _tree(offset=0.0):
    params = {"w": jnp.arange(12.0).reshape(3, 4) + offset, "b": jnp.full((4,), offset, jnp.bfloat16)}
    tx = optax.adamw(1e-3)
    opt = tx.init(params)
    return {"params": params, "opt": opt, "rng": jax.random.PRNGKey(7), "step": np.int32(3 + offset)}


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_keeps_types_values_and_metadata(tmp_path):
    tree = _tree(1.0)
    with CheckpointStore(tmp_path / "ck") as store:
        assert store.restore(tree) is None  # empty folder: nothing to resume
        store.save(5, tree, {"config": {"lr": 1e-3}, "note": "x"})
    with CheckpointStore(tmp_path / "ck") as store:  # a fresh process would see the same
        out = store.restore(_tree(0.0))
    assert out.step == 5 and out.metadata == {"config": {"lr": 1e-3}, "note": "x"}
    # optax's NamedTuple states must survive (a target-less restore gives plain dicts)
    assert type(out.tree["opt"][0]).__name__ == "ScaleByAdamState"
    _assert_bitwise_equal(out.tree, jax.tree.map(np.asarray, tree))


def test_keeps_latest_and_restores_exact_step(tmp_path):
    store = CheckpointStore(tmp_path, max_to_keep=2)
    for s in (1, 2, 3):
        store.save(s, _tree(float(s)), {"s": s})
    assert store.all_steps() == [2, 3]
    out = store.restore(_tree(), step=2)
    assert out.metadata == {"s": 2} and float(out.tree["params"]["w"][0, 0]) == 2.0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore's loop teardown
@pytest.mark.parametrize("damage", ["delete_metadata", "garble_data"])
def test_damaged_latest_falls_back_with_warning(tmp_path, damage):
    store = CheckpointStore(tmp_path, max_to_keep=3)
    store.save(1, _tree(1.0), {"s": 1})
    store.save(2, _tree(2.0), {"s": 2})
    step_dir = pathlib.Path(tmp_path, "2", "state")
    if damage == "delete_metadata":
        (step_dir / "_METADATA").unlink()
    else:
        for f in step_dir.rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(b"not an array")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = CheckpointStore(tmp_path).restore(_tree())
    assert out.step == 1 and out.metadata == {"s": 1}
    _assert_bitwise_equal(out.tree, jax.tree.map(np.asarray, _tree(1.0)))
    assert any("step 2" in str(w.message) for w in caught)


def test_unfinished_temporary_save_is_ignored(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, _tree(1.0))
    # What a process killed during a save leaves: a temporary folder never renamed to its step.
    (pathlib.Path(tmp_path) / "2.orbax-checkpoint-tmp-1234").mkdir()
    assert CheckpointStore(tmp_path).all_steps() == [1]
    assert CheckpointStore(tmp_path).restore(_tree()).step == 1


def test_all_steps_damaged_raises(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, _tree(1.0))
    (pathlib.Path(tmp_path) / "1" / "state" / "_METADATA").unlink()
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="could be restored"):
        CheckpointStore(tmp_path).restore(_tree())
