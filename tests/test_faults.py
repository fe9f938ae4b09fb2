"""Reliability (docs/reliability.md): kills anywhere, damaged checkpoints, a file system that says no.

Every run below is compared with an independent reference, an uninterrupted run of the same loop:
its final state bitwise, its metrics.jsonl record by record (without the wall time of a step).

- Fault trials through the CLI (tools/faults.py, what `make faults` runs ten times): the tiny
  synthetic game killed with SIGKILL in the middle of a checkpoint save, its resume killed in the
  middle of a chunk, the second resume finishing; final GameState, metrics, results and export equal
  the uninterrupted run's.
- Kills at exact points of an Orbax save (a subprocess that SIGKILLs itself from inside Orbax: this
  is test code standing in for the OS): before the rename that commits the step (its temporary folder
  is left) and after it (the older steps not yet deleted).
- Damaged checkpoints through `run_loop`: truncated, deleted and altered array files, missing Orbax
  metadata: the run warns naming the step and the reason and resumes from the previous step; a
  checkpoint of another config is refused before its arrays are read.
- Full disk: a writer that raises OSError(ENOSPC) at the N-th write (in process, every Python-level
  file write under the run folder: metrics.jsonl and Orbax's JSON and commit files), and a real full
  tmpfs where this machine lets the test mount one (TensorStore's own writes fail there).
- A run folder that cannot be written (a read-only tmpfs, or chmod when not root).
"""

import builtins
import contextlib
import errno
import importlib.util
import io
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest
from test_game_resume import FakeState, fake_init, fake_step

from alignjax.checkpoint import CheckpointStore, CheckpointWriteError
from alignjax.game.loop import LoopConfig, RunFolderError, kept_metric_lines, read_metrics, run_loop

# TensorStore's event loop, torn down after a failed or damaged read, reports to sys.unraisablehook.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
ROOT = pathlib.Path(__file__).resolve().parent.parent
CFG = LoopConfig(total_steps=6, chunk_size=2, tensorboard=False, max_to_keep=10)


def _load_tool():
    spec = importlib.util.spec_from_file_location("faults_tool", ROOT / "tools" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _metrics_wo_time(run_dir):
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted fake run, every checkpoint kept (the last complete one of a failed run is
    compared with the reference's checkpoint of the same step)."""
    d = tmp_path_factory.mktemp("ref")
    final = run_loop(fake_step, fake_init(), CFG, d)
    return d, final


def _reference_step(reference, step):
    d, _ = reference
    return CheckpointStore(d / "checkpoints").restore(jax.tree.map(np.asarray, fake_init()), step=step).tree


def _assert_resumes_to_reference(reference, run_dir, cfg=CFG):
    ref_dir, ref_final = reference
    final = run_loop(fake_step, fake_init(), cfg, run_dir)
    assert _bits(final) == _bits(ref_final)
    assert _metrics_wo_time(run_dir) == _metrics_wo_time(ref_dir)


# ------------------------------------------------------------------------------ fault trials, CLI
def test_cli_killed_mid_save_then_mid_chunk_resumes_identical(tmp_path):
    """Two kills of `python -m alignjax.cli` (the tool's tiny game), each resumed with resume=: the
    first in the middle of the save at step 4, the second in the middle of the resumed run's first
    chunk. The finished folder equals an uninterrupted run's (tools/faults.py `differences`)."""
    tool = _load_tool()
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like `make faults`
    env = tool.environment(base)
    ref = tool.reference(tmp_path, env)
    occ = tool.occurrences(ref)
    save_step, save_s = occ["save"][1]
    assert save_step == 4
    cwd = tmp_path / "trial"
    first = tool.run_cli(cwd, env, kill=tool.Kill("save", occurrence=1, delay=0.3 * save_s, step=4),
                         log=tmp_path / "first.log")
    assert first.killed_at is not None and first.rc == -9, (tmp_path / "first.log").read_text()[-3000:]
    assert tool.phase_at(first, first.killed_at) == "save @ step 4"
    rel = first.run_dir
    left = tool.disk_after_kill(cwd, rel)
    chunk_s = min(s for _, s in occ["chunk"][1:])  # a chunk after the first one's compile
    second = tool.run_cli(cwd, env, extra=(f"resume={rel}",), log=tmp_path / "second.log",
                          kill=tool.Kill("chunk", occurrence=0, delay=0.3 * chunk_s))
    assert second.killed_at is not None and second.rc == -9, (tmp_path / "second.log").read_text()[-3000:]
    assert tool.phase_at(second, second.killed_at).startswith("chunk")
    third = tool.run_cli(cwd, env, extra=(f"resume={rel}",), log=tmp_path / "third.log")
    assert third.rc == 0, (tmp_path / "third.log").read_text()[-3000:]
    assert tool.differences(ref.cwd, ref.run_dir, cwd, rel) == [], f"after the first kill: {left}"
    assert not [p for p in (cwd / rel / "checkpoints").iterdir() if "tmp" in p.name]


# -------------------------------------------------------------------- kills at exact points of a save
KILL_IN_ORBAX = {
    # step 6's files are written; the rename that commits its folder never happens
    "before_commit": ("orbax.checkpoint._src.path.atomicity", "AtomicRenameTemporaryPath", "finalize",
                      "self.get_final().name == '6'"),
    # step 6 is committed; the deletion of step 4 (beyond max_to_keep=1) never happens
    "after_commit": ("orbax.checkpoint._src.path.deleter", "StandardCheckpointDeleter", "delete_steps",
                     "4 in list(args[0])"),
}


@pytest.mark.parametrize("where", sorted(KILL_IN_ORBAX))
def test_sigkill_inside_an_orbax_save_resumes_bitwise(reference, tmp_path, where):
    module, cls, name, when = KILL_IN_ORBAX[where]
    script = textwrap.dedent(f"""
        import importlib, os, signal, sys
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
        from test_game_resume import fake_init, fake_step
        from alignjax.game.loop import LoopConfig, run_loop
        cls = getattr(importlib.import_module({module!r}), {cls!r})
        original = getattr(cls, {name!r})
        def die_there(self, *args, **kwargs):
            if {when}:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kwargs)
        setattr(cls, {name!r}, die_there)
        run_loop(fake_step, fake_init(), LoopConfig(total_steps=6, chunk_size=2, tensorboard=False,
                                                    max_to_keep=1), {str(tmp_path)!r})
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-3000:]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    if where == "before_commit":  # max_to_keep=1: step 4 alone, and step 6's unfinished folder
        assert "4" in names and "6" not in names
        assert any(n.startswith("6.orbax-checkpoint-tmp") for n in names)
    else:  # step 6 committed, step 4 not yet deleted
        assert {"4", "6"} <= set(names)
    _assert_resumes_to_reference(reference, tmp_path, LoopConfig(total_steps=6, chunk_size=2,
                                                                  tensorboard=False, max_to_keep=1))
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]


def test_a_metrics_line_cut_by_a_kill_is_dropped_and_garbage_inside_is_named():
    lines = '{"step": 0, "x": 1.0}\n{"step": 1, "x": 2.0}\n{"step": 2, "x": 3.0}\n{"step": 3, "x"'
    assert kept_metric_lines(lines, 2) == ['{"step": 0, "x": 1.0}', '{"step": 1, "x": 2.0}']
    assert kept_metric_lines(lines, 9) == lines.split("\n")[:3]  # the cut line is gone whatever the step
    with pytest.raises(ValueError, match="metrics.jsonl, line 2: not a JSON record"):
        kept_metric_lines('{"step": 0}\n{"st\n{"step": 1}\n', 5)


# ----------------------------------------------------------------------------- damaged checkpoints
def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The OCDBT data files of a step (which of them a restore reads depends on the tree: all are hit)."""
    return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")


def _truncate(step_dir):
    for f in _array_files(step_dir):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete_manifest(step_dir):
    (step_dir / "state" / "manifest.ocdbt").unlink()


def _delete_arrays(step_dir):
    for f in _array_files(step_dir):
        f.unlink()


def flip(f: pathlib.Path, at: int | None = None, n: int = 4):
    """Invert n bytes of file f from offset `at` (default: its middle)."""
    data = bytearray(f.read_bytes())
    at = len(data) // 2 if at is None else at
    for i in range(at, at + n):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def _flip(step_dir):
    for f in _array_files(step_dir):
        flip(f)


def _no_orbax_tree_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def _no_metadata_item(step_dir):
    (step_dir / "metadata" / "metadata").unlink()


DAMAGE = {"array files truncated": _truncate, "OCDBT manifest deleted": _delete_manifest,
          "array files deleted": _delete_arrays, "bytes flipped in the array files": _flip,
          "Orbax _METADATA missing": _no_orbax_tree_metadata, "metadata item missing": _no_metadata_item}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_with_a_warning_and_resumes_bitwise(reference, tmp_path, damage):
    run_loop(fake_step, fake_init(), LoopConfig(total_steps=4, chunk_size=2, tensorboard=False), tmp_path)
    DAMAGE[damage](tmp_path / "checkpoints" / "4")
    falls_back = r"checkpoint step 4 in .* is damaged \(.+\); falling back to step 2"
    with pytest.warns(UserWarning, match=falls_back):
        _assert_resumes_to_reference(reference, tmp_path)
    assert (tmp_path / "checkpoints" / "4.damaged-0").is_dir()  # kept for inspection


def test_a_checkpoint_of_another_config_is_refused_before_its_arrays_are_read(tmp_path):
    """Another experiment's checkpoint whose arrays would not even fit this run's state: the error is
    the config fingerprint (naming both), not a damaged-step fallback; a damaged newest step of that
    run does not change it."""
    run_loop(fake_step, fake_init(), LoopConfig(total_steps=4, chunk_size=2, tensorboard=False), tmp_path,
             metadata={"fingerprint": "aaaa"})
    other = fake_init()._replace(hist=np.zeros((32, 3), np.int32))  # a bigger history: other shapes
    with pytest.raises(ValueError, match="another config .fingerprint aaaa, this run bbbb"):
        run_loop(fake_step, other, CFG, tmp_path, metadata={"fingerprint": "bbbb"})
    _delete_manifest(tmp_path / "checkpoints" / "4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="another config .fingerprint aaaa, this run bbbb"):
            run_loop(fake_step, other, CFG, tmp_path, metadata={"fingerprint": "bbbb"})
    assert isinstance(other, FakeState)


# ------------------------------------------------------------------------------------------ full disk
REAL_OPEN = builtins.open


class FullDisk:
    """Counts every Python-level write to a file under `root`; from the `n`-th on they raise
    OSError(ENOSPC), as a disk that fills up then would (a full disk stays full). n=None only counts
    and records the paths."""

    def __init__(self, root: pathlib.Path, n: int | None):
        self.root, self.n, self.paths = str(root), n, []

    def open(self, file, mode="r", *args, **kwargs):
        f = REAL_OPEN(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and os.path.abspath(str(file)).startswith(self.root):
            return _Counted(f, self, str(file))
        return f

    def count(self, path):
        self.paths.append(path)
        if self.n is not None and len(self.paths) >= self.n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


class _Counted:
    def __init__(self, f, disk, path):
        self._f, self._disk, self._path = f, disk, path

    def write(self, data):
        self._disk.count(self._path)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


@contextlib.contextmanager
def _patched(monkeypatch, disk):
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", disk.open)
        m.setattr(io, "open", disk.open)
        yield


def _first_write(paths, after: str, pattern: str) -> int:
    """1 + the index of the first write whose path contains `pattern`, after one containing `after`."""
    start = next(i for i, p in enumerate(paths) if after in p)
    return 1 + next(i for i, p in enumerate(paths) if i > start and pattern in p)


@pytest.mark.parametrize("target,error", [
    ("metrics line after step 2", RunFolderError),
    ("metadata item of step 4", CheckpointWriteError),
    ("commit marker of step 4", CheckpointWriteError),
])
def test_disk_full_at_the_nth_write_stops_keeps_the_last_checkpoint_and_resumes(
        reference, tmp_path, monkeypatch, target, error):
    counting = FullDisk(tmp_path / "count", None)
    with _patched(monkeypatch, counting):
        run_loop(fake_step, fake_init(), CFG, tmp_path / "count")
    committed_2 = "2.orbax-checkpoint-tmp/commit_success.txt"
    n = {"metrics line after step 2": _first_write(counting.paths, committed_2, "metrics.jsonl"),
         "metadata item of step 4": _first_write(counting.paths, committed_2,
                                                 "4.orbax-checkpoint-tmp/metadata"),
         "commit marker of step 4": _first_write(counting.paths, "4.orbax-checkpoint-tmp/state",
                                                 "4.orbax-checkpoint-tmp/commit_success.txt")}[target]
    run_dir = tmp_path / "run"
    with _patched(monkeypatch, FullDisk(run_dir, n)), pytest.raises(error) as stop:
        run_loop(fake_step, fake_init(), CFG, run_dir)
    message = str(stop.value)
    assert stop.value.errno == errno.ENOSPC and "No space left on device" in message
    assert "step 4" in message and "last complete checkpoint is step 2" in message, message
    store = CheckpointStore(run_dir / "checkpoints")
    assert store.all_steps() == [2]
    kept = store.restore(jax.tree.map(np.asarray, fake_init())).tree
    assert _bits(kept) == _bits(_reference_step(reference, 2))
    store.close()
    _assert_resumes_to_reference(reference, run_dir)  # space is back


def _mount_tmpfs(path: pathlib.Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@contextlib.contextmanager
def _tmpfs(path: pathlib.Path, size: str = "8m"):
    if not _mount_tmpfs(path, size):
        pytest.skip("mounting a tmpfs is not permitted here (the in-process ENOSPC tests still run)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _fill(folder: pathlib.Path, leave_bytes: int) -> pathlib.Path:
    """Fill the file system of `folder` with a ballast file, then give back `leave_bytes`."""
    ballast = folder / "ballast"
    # Unbuffered: a buffered file would still hold the block that did not fit and fail again on close.
    with REAL_OPEN(ballast, "wb", buffering=0) as f:
        block = os.urandom(1 << 16)
        try:
            while f.write(block):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.truncate(ballast, max(0, ballast.stat().st_size - leave_bytes))
    return ballast


def test_a_really_full_disk_stops_the_run_and_it_resumes_once_space_is_back(reference, tmp_path):
    with _tmpfs(tmp_path / "mnt") as mnt:
        run_dir = mnt / "run"
        run_loop(fake_step, fake_init(), LoopConfig(total_steps=2, chunk_size=2, tensorboard=False,
                                                    max_to_keep=10), run_dir)
        ballast = _fill(mnt, leave_bytes=16 << 10)  # room for the metric lines, not for a checkpoint
        with pytest.raises(CheckpointWriteError) as stop:
            run_loop(fake_step, fake_init(), CFG, run_dir)
        assert stop.value.errno == errno.ENOSPC
        assert "step 4" in str(stop.value) and "last complete checkpoint is step 2" in str(stop.value)
        ballast.unlink()
        _assert_resumes_to_reference(reference, run_dir)


def test_a_read_only_run_folder_stops_before_running_and_resumes_once_writable(reference, tmp_path):
    root = os.geteuid() == 0
    where = tmp_path / "mnt"
    with (_tmpfs(where) if root else contextlib.nullcontext(where)):
        where.mkdir(exist_ok=True)
        run_dir = where / "run"
        run_loop(fake_step, fake_init(), LoopConfig(total_steps=2, chunk_size=2, tensorboard=False,
                                                    max_to_keep=10), run_dir)
        if root:  # root writes through permission bits: a read-only mount says no to root too
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, timeout=30)
        else:
            run_dir.chmod(0o555)
        with pytest.raises(RunFolderError, match="cannot be written .*nothing was run") as stop:
            run_loop(fake_step, fake_init(), CFG, run_dir)
        assert stop.value.errno in (errno.EROFS, errno.EACCES)
        if root:
            subprocess.run(["mount", "-o", "remount,rw", str(where)], check=True, timeout=30)
        else:
            run_dir.chmod(0o755)
        assert CheckpointStore(run_dir / "checkpoints").all_steps() == [2]
        _assert_resumes_to_reference(reference, run_dir)
