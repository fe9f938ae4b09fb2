"""CheckpointStore: round trip of a pytree with optax state types, JSON metadata, fallback on damage."""

import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax.checkpoint import CheckpointMismatchError, CheckpointStore


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
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="can be restored"):
        CheckpointStore(tmp_path).restore(_tree())


# --------------------------------------------------------------------------- checksums and damage
def _random_tree(seed):
    """A leaf of random bytes is incompressible: the zstd-compressed OCDBT file stores it verbatim, so
    a flipped byte in the file is a flipped byte in the array."""
    rng = np.random.default_rng(seed)
    return {"w": rng.integers(0, 256, (64, 64), dtype=np.uint8), "step": np.int32(seed)}


def _file_holding(step_dir: pathlib.Path, raw: bytes) -> tuple[pathlib.Path, int]:
    """The array file of a step holding `raw` verbatim, and where."""
    for f in sorted((step_dir / "state").rglob("*")):
        if f.is_file() and (at := f.read_bytes().find(raw)) >= 0:
            return f, at
    raise AssertionError(f"no file of {step_dir} holds the array's bytes")


def _flip_inside_w(tmp_path, step):
    w = _random_tree(step)["w"]
    f, at = _file_holding(tmp_path / str(step), w.tobytes()[1024:1088])
    data = bytearray(f.read_bytes())
    for i in range(at + 8, at + 12):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def test_flipped_bytes_load_silently_in_orbax_and_the_checksum_catches_them(tmp_path):
    """Why checkpoints carry checksums: Orbax restores the altered file without an error, with other
    numbers (read here target-less, as any Orbax user would); the store refuses the step, names the
    leaf, and falls back to the previous one."""
    import orbax.checkpoint as ocp

    store = CheckpointStore(tmp_path, max_to_keep=3)
    store.save(1, _random_tree(1), {"s": 1})
    store.save(2, _random_tree(2), {"s": 2})
    _flip_inside_w(tmp_path, 2)
    silent = ocp.StandardCheckpointer().restore(pathlib.Path(tmp_path, "2", "state").absolute())
    assert np.asarray(silent["w"]).shape == (64, 64)
    assert np.asarray(silent["w"]).tobytes() != _random_tree(2)["w"].tobytes()
    refused = r"step 2 .* is damaged \(ChecksumError: leaf \['w'\] .*falling back to step 1"
    with pytest.warns(UserWarning, match=refused):
        out = CheckpointStore(tmp_path).restore(_random_tree(0))
    assert out.step == 1 and out.metadata == {"s": 1}
    _assert_bitwise_equal(out.tree, _random_tree(1))


def test_no_good_checkpoint_names_every_step_and_its_reason(tmp_path):
    store = CheckpointStore(tmp_path, max_to_keep=3)
    store.save(1, _random_tree(1))
    store.save(2, _random_tree(2))
    _flip_inside_w(tmp_path, 1)
    pathlib.Path(tmp_path, "2", "metadata", "metadata").unlink()
    with pytest.warns(UserWarning) as caught, \
            pytest.raises(RuntimeError, match=r"step 2: FileNotFoundError.*; step 1: ChecksumError"):
        CheckpointStore(tmp_path).restore(_random_tree(0))
    said = [str(w.message) for w in caught]
    assert any("step 2" in m and "falling back to step 1" in m for m in said)
    assert any("step 1" in m and "no older step is left" in m for m in said)


def test_step_metadata_file_is_not_needed_when_the_data_checks_out(tmp_path):
    """Orbax's per-step _CHECKPOINT_METADATA (timestamps) is not read by a restore: a step without it
    restores whole, its checksums verified (no fallback needed)."""
    store = CheckpointStore(tmp_path, max_to_keep=3)
    store.save(1, _random_tree(1))
    store.save(2, _random_tree(2))
    pathlib.Path(tmp_path, "2", "_CHECKPOINT_METADATA").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = CheckpointStore(tmp_path).restore(_random_tree(0))
    assert out.step == 2
    _assert_bitwise_equal(out.tree, _random_tree(2))


def test_another_config_is_refused_by_fingerprint_even_with_other_shapes(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, _random_tree(1), {"fingerprint": "aaaa"})
    other = {"w": np.zeros((8, 8), np.float32), "step": np.int32(0)}
    with pytest.raises(CheckpointMismatchError, match=r"fingerprint aaaa, this run bbbb"):
        CheckpointStore(tmp_path).restore(other, fingerprint="bbbb")
    # the same config restores; a checkpoint without a fingerprint restores with a warning
    assert CheckpointStore(tmp_path).restore(_random_tree(0), fingerprint="aaaa").step == 1
    store.save(2, _random_tree(2), {})
    with pytest.warns(UserWarning, match="step 2 .* holds no config fingerprint"):
        assert CheckpointStore(tmp_path).restore(_random_tree(0), fingerprint="aaaa").step == 2


def test_checksums_follow_the_dtype_a_restore_hands_back(tmp_path):
    """float64 leaves come back as float32 without x64: the checksum is taken of that canonical array,
    so a healthy checkpoint of a float64 host tree is not mistaken for a damaged one."""
    tree = {"x": np.linspace(0.0, 1.0, 7)}  # float64
    CheckpointStore(tmp_path).save(1, tree)
    out = CheckpointStore(tmp_path).restore({"x": np.zeros(7)})
    assert out.step == 1
    np.testing.assert_array_equal(out.tree["x"], tree["x"].astype(np.float32))


_SAVE_PEAK = """
import sys, numpy as np
from alignjax.checkpoint import CheckpointStore
from alignjax.report import rss_bytes
tree = {f"w{i}": np.random.default_rng(i).standard_normal((32, 1024, 256), np.float32) for i in range(8)}
before = rss_bytes()
with CheckpointStore(sys.argv[1]) as store:
    store.save(1, tree)
print((rss_bytes("VmHWM") - before) / sum(x.nbytes for x in tree.values()))
"""


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="peak RSS is read from /proc")
def test_a_save_writes_host_arrays_in_place(tmp_path):
    """Saving a 256 MiB NumPy tree raises the process's peak resident memory by less than a quarter of
    the tree, in a fresh process (VmHWM). Orbax's default NumPy handler deep-copies every host array
    before writing it: 1.00x the tree (measured on 2 GiB; 0.00x in place)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _SAVE_PEAK, str(tmp_path / "ck")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown = float(proc.stdout.strip().splitlines()[-1])
    assert grown < 0.25, f"the save raised the peak by {grown:.2f}x the tree"
