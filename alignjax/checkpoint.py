"""A generic Orbax checkpoint store for any pytree plus a JSON metadata dict, with the fault rules.

It knows nothing of the game: `save(step, tree, metadata)` writes one step folder holding two items,
`state` (the pytree, via `PyTreeSave`, uncompressed) and `metadata` (a JSON dict, e.g. the resolved
config and its fingerprint). `restore(target)` reads the newest step that restores cleanly into the
structure of `target`; restoring *into a target* keeps NamedTuple / optax state types (a target-less
restore would hand back plain dicts).

Fault rules (docs/reliability.md):

- A kill during a save leaves nothing a restore would take for a checkpoint: Orbax writes the step
  into `<step>.orbax-checkpoint-tmp-*` and renames it when complete; such leftovers are deleted when
  the next store opens the folder.
- Every save records a SHA-256 of each leaf's bytes (with its dtype and shape) in the metadata item,
  and a restore recomputes them: flipped bytes in an array file can decode to wrong numbers without
  any error from Orbax or TensorStore (tests/test_checkpoint.py shows one), so only the checksum sees
  them. Leaves too large or too spread out to copy to the host (see `save`) carry none.
- A damaged step (a file truncated or deleted, a checksum that differs, unreadable metadata) is
  skipped with a `UserWarning` naming the step and the reason, and the previous step is tried; when
  none is left a `NoGoodCheckpointError` lists every step and why.
- A step whose metadata names another config fingerprint is never restored: `CheckpointMismatchError`
  (never a fallback: an older step of the same folder came from the same other config).
- A save that fails (a full disk, a read-only folder) raises `CheckpointWriteError` naming the step,
  the reason and the last complete step, which is left as it was.

Layout on disk:

    <directory>/<step>/state/...        the pytree (OCDBT / zarr)
    <directory>/<step>/metadata/...     metadata JSON (the caller's dict + "_checksums")
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_lib
import hashlib
import os
import pathlib
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from alignjax import faults

HOST_COPY_BELOW_BYTES = 1 << 30  # save() writes smaller single-process trees from a host copy
CHECKSUMS = "_checksums"  # metadata key of the per-leaf digests (hidden from `Restored.metadata`)


class Restored(NamedTuple):
    step: int
    tree: Any
    metadata: dict


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a run with another config: never restored, never skipped."""


class ChecksumError(ValueError):
    """A restored leaf's bytes differ from those the save recorded (the files were altered)."""


class NoGoodCheckpointError(RuntimeError):
    """Every step in the folder is damaged."""


class CheckpointWriteError(OSError):
    """A save failed (full disk, read-only folder, ...); the last complete step is intact."""


def _abstract(tree, shardings=None):
    """ShapeDtypeStruct leaves with the given shardings (restored as global arrays in that layout; each
    process reads its shards), or whole on this process's first device. A target sharding is always
    given: a checkpoint written sharded (mesh mode, any device count) then restores onto any layout."""
    whole = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x, sh=whole):
        x = np.asarray(x) if not isinstance(x, jax.Array | jax.ShapeDtypeStruct) else x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    if shardings is None:
        return jax.tree.map(leaf, tree)
    return jax.tree.map(leaf, tree, shardings)


def _spans_devices(x) -> bool:
    return isinstance(x, jax.Array) and len(x.sharding.device_set) > 1


def release_freed_memory() -> None:
    """Hand the heap pages freed by a save back to the OS (glibc `malloc_trim(0)`; a no-op elsewhere).
    Orbax and TensorStore free their write buffers, but glibc keeps the pages in its arenas, so
    without this each save of a large state left a few hundred MB resident for the rest of the run."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def leaf_digest(x: np.ndarray) -> str:
    """SHA-256 over a host array's dtype, shape and bytes (C order): equal digests, equal bits. The
    dtype is JAX's canonical one (float64 is float32 without x64), the one a restore hands back."""
    x = np.ascontiguousarray(x, dtype=jax.dtypes.canonicalize_dtype(np.asarray(x).dtype))
    h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    h.update(x.reshape(-1).view(np.uint8))
    return h.hexdigest()


def tree_digests(tree) -> dict[str, str | None]:
    """{leaf path: digest} for the host NumPy leaves of `tree`; None for device arrays (not hashed)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): (leaf_digest(x) if isinstance(x, np.ndarray | np.generic) else None)
            for path, x in flat}


def _reason(e: BaseException) -> str:
    """A one-line reason for a warning: the exception type and the first line of its message (Orbax
    and TensorStore errors repeat whole JSON specs after it)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _errno_of(e: BaseException) -> int | None:
    """The errno behind a write failure: an OSError's own, or one named in a wrapped error's text
    (TensorStore reports ENOSPC inside a ValueError)."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno:
            return err.errno
    text = str(e)
    for code in (errno_lib.ENOSPC, errno_lib.EROFS, errno_lib.EACCES, errno_lib.EDQUOT):
        if os.strerror(code) in text:
            return code
    return None


def _registry():
    """Orbax's standard type handlers, but NumPy arrays are written in place. Orbax deep-copies host
    arrays before writing them by default, against a caller who changes them while an async save is
    in flight; `save` blocks until the write is done, so that copy only raised the peak by the whole
    state (a 2 GiB NumPy tree: 1.00x the tree over the save, 0.00x without the copy, and 7 s against
    13 s)."""
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(*[(t, th.get_type_handler(t)) for t in th.supported_types()])
    registry.add(np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False), override=True, ignore_warnings=True)
    return registry


class CheckpointStore:
    """Thin wrapper over `ocp.CheckpointManager` (one item pytree + one JSON item per step).

    Args:
      directory: folder of the step subfolders (created if missing).
      max_to_keep: how many most recent steps to keep (None keeps all). Keep at least 2, so a
        damaged latest step has a predecessor to fall back to.
    """

    def __init__(self, directory, max_to_keep: int | None = 3):
        self.directory = pathlib.Path(directory).absolute()
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self._manager = ocp.CheckpointManager(
            self.directory,
            # cleanup_tmp_directories: a save cut short by a kill leaves `<step>.orbax-checkpoint-tmp-*`
            # behind; never a checkpoint, it is deleted here (before the next save).
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 cleanup_tmp_directories=True),
            # Uncompressed: zstd chunks cost a second host copy of the state while a save is in flight
            # (peak 1.93x against 1.00x the tree for a 2 GiB NumPy tree) and saved about 10% of disk on
            # float weights. Restores read either format (the codec is in the array metadata). Host
            # arrays are written in place, not deep-copied first (`_registry`).
            item_handlers={"state": ocp.PyTreeCheckpointHandler(use_compression=False,
                                                                type_handler_registry=_registry()),
                           "metadata": ocp.JsonCheckpointHandler()},
        )

    # ----------------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------- write
    def save(self, step: int, tree, metadata: dict | None = None) -> None:
        """Write `tree` and `metadata` as step `step` and block until it is on disk.

        Leaves are fetched to host NumPy first when this process holds all of them and the tree is
        smaller than `HOST_COPY_BELOW_BYTES` (Orbax writes a few large host arrays much faster than
        many device shards: 0.5 s against 2-3 s for the tiny game on 8 fake devices). Otherwise arrays
        that span several devices (a mesh-sharded state) are written as they lie, each process its
        own shards, and no host copy of the state is made. Either way the checkpoint holds global
        arrays and does not depend on the device layout. Host leaves get a checksum in the metadata.

        Raises `CheckpointWriteError` when the write fails; the step's temporary folder is never
        renamed into place, so earlier steps stay the newest complete ones."""
        leaves = jax.tree.leaves(tree)
        small = sum(np.asarray(x).nbytes if not isinstance(x, jax.Array) else x.nbytes for x in leaves) \
            < HOST_COPY_BELOW_BYTES
        local = all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves)
        fetch = lambda x: np.asarray(jax.device_get(x))
        as_host = small and local
        host_tree = jax.tree.map(lambda x: fetch(x) if as_host or not _spans_devices(x) else x, tree)
        meta = dict(metadata or {})
        meta[CHECKSUMS] = {"algorithm": "sha256(dtype, shape, bytes)", "leaves": tree_digests(host_tree)}
        last = self.latest_step()
        with faults.phase("save", step):
            try:
                self._manager.save(
                    int(step),
                    args=ocp.args.Composite(
                        state=ocp.args.PyTreeSave(host_tree),
                        metadata=ocp.args.JsonSave(meta),
                    ),
                    force=True,
                )
                self._manager.wait_until_finished()
            except Exception as e:  # noqa: BLE001 -- any failure to write is reported the same way
                code = _errno_of(e)
                where = (f"step {last} in {self.directory}" if last is not None
                         else "none (this was the first save)")
                reason = os.strerror(code) if code else _reason(e)
                msg = (f"could not write checkpoint step {step} to {self.directory} ({reason}); the run "
                       f"stops here. The last complete checkpoint is {where}: free space or make the folder "
                       "writable, then resume the run")
                raise (CheckpointWriteError(code, msg) if code else CheckpointWriteError(msg)) from e
        release_freed_memory()
        if int(step) not in self.all_steps():  # Orbax logs (not raises) some commit failures
            raise CheckpointWriteError(f"checkpoint step {step} in {self.directory} was not committed "
                                       "(see the Orbax log above); the run stops here")

    # -------------------------------------------------------------------- read
    def read_metadata(self, step: int) -> dict:
        """The metadata item of step `step` (checksums included); raises when it cannot be read."""
        out = self._manager.restore(int(step), args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        meta = out["metadata"]
        if not isinstance(meta, dict):
            raise ValueError(f"metadata of step {step} is {type(meta).__name__}, not a JSON object")
        return meta

    def restore_step(self, step: int, target, shardings=None, fingerprint: str | None = None) -> Restored:
        """Restore exactly step `step` into the structure/dtypes of `target` (raises on damage); with
        `shardings` (a pytree of them, like target) as global arrays in that layout.

        Raises `CheckpointMismatchError` when `fingerprint` is given and the step's metadata names
        another one, `ChecksumError` when a leaf's bytes differ from those saved, and whatever Orbax
        raises for missing or unreadable files."""
        meta = self.read_metadata(step)
        theirs = meta.get("fingerprint")
        if fingerprint is not None and theirs is not None and theirs != fingerprint:
            raise CheckpointMismatchError(
                f"checkpoint {step} in {self.directory} was written by a run with another config "
                f"(fingerprint {theirs}, this run {fingerprint}); give the run its own folder or resume "
                "it with the config it was started with")
        if fingerprint is not None and theirs is None:
            warnings.warn(f"checkpoint step {step} in {self.directory} holds no config fingerprint "
                          "(written before fingerprints existed): its config is not checked", stacklevel=3)
        abstract = _abstract(target, shardings)
        out = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
                metadata=ocp.args.JsonRestore(),
            ),
        )
        tree = out["state"] if shardings is not None else jax.tree.map(np.asarray, out["state"])
        # PyTreeRestore keeps the target's treedef (NamedTuples, optax states); verify it anyway,
        # a silently different structure would make a resumed run diverge.
        if jax.tree.structure(tree) != jax.tree.structure(target):
            raise ValueError(f"checkpoint step {step} in {self.directory} has a different tree structure")
        self._verify(step, tree, meta.get(CHECKSUMS))
        return Restored(int(step), tree, {k: v for k, v in meta.items() if k != CHECKSUMS})

    def _verify(self, step: int, tree, saved: dict | None) -> None:
        """Compare the restored leaves with the digests the save recorded (leaves saved without one,
        and checkpoints written before checksums existed, are not checked)."""
        if not saved:
            return
        expected = saved.get("leaves", {})
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        for path, x in flat:
            name = jax.tree_util.keystr(path)
            want = expected.get(name)
            if want is None:
                continue
            if not isinstance(x, np.ndarray) and not (isinstance(x, jax.Array) and x.is_fully_addressable):
                continue
            if leaf_digest(np.asarray(jax.device_get(x))) != want:
                raise ChecksumError(f"leaf {name} of checkpoint step {step} does not match the checksum "
                                    "recorded when it was saved (its files were altered after the save)")

    def restore(self, target, step: int | None = None, shardings=None,
                fingerprint: str | None = None) -> Restored | None:
        """Restore the newest good step (or exactly `step` when given) into `target`'s structure.

        Returns None when the folder holds no checkpoint. A damaged step is skipped with a
        `UserWarning` naming it and the reason; if none can be restored, `NoGoodCheckpointError`
        lists them all. A step of another config (`fingerprint`) raises `CheckpointMismatchError`."""
        if step is not None:
            return self.restore_step(step, target, shardings, fingerprint)
        steps = self.all_steps()
        if not steps:
            return None
        failures = []
        for i, s in enumerate(reversed(steps)):
            try:
                return self.restore_step(s, target, shardings, fingerprint)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 -- any read failure means "damaged", try older
                failures.append((s, e))
                older = steps[-2 - i] if i + 1 < len(steps) else None
                then = f"falling back to step {older}" if older is not None else "no older step is left"
                warnings.warn(f"checkpoint step {s} in {self.directory} is damaged ({_reason(e)}); {then}",
                              stacklevel=2)
        listing = "; ".join(f"step {s}: {_reason(e)}" for s, e in failures)
        raise NoGoodCheckpointError(
            f"no checkpoint in {self.directory} can be restored ({listing}). Move the checkpoints folder "
            "aside to start the run again from step 0") from failures[-1][1]

    def quarantine_after(self, step: int) -> list[pathlib.Path]:
        """Rename step folders newer than `step` (damaged ones a restore skipped) to
        `<step>.damaged-<n>`, so the run can write those steps again while the bad files stay
        available for inspection. Returns the new paths."""
        moved = []
        for s in self.all_steps():
            if s > step:
                src = self.directory / str(s)
                n = 0
                while (dst := self.directory / f"{s}.damaged-{n}").exists():
                    n += 1
                src.rename(dst)
                moved.append(dst)
        self._manager.reload()
        return moved

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
