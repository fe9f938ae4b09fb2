"""The host driver: chunks of `lax.scan`-ed steps under `jax.pmap` or a mesh `jax.jit`, Orbax saves,
exact resume, logs.

The loop is generic over the step function; the game plugs `game.step.play_step` into it.

State protocol: the state is a pytree (NamedTuple) with two fields the loop reads,

    step  [] int32     number of finished steps (the loop increments it; stages are a function of it)
    rng   [2] uint32   the run's base PRNG key (raw key; never split in place)

and `step_fn(state, key, consts) -> (state, metrics)` runs one step on its share of the batch. The key
of step t is `keys.step_key(rng, t)`, the same on every device and a pure function of the step
counter, so a resumed run draws exactly the keys an uninterrupted run draws.

Two layouts (alignjax.parallel; `layout` argument, default pmap over all local devices):

- pmap: the chunk is `jax.pmap`-ed over DATA; the step function was built with axis_name "data"
  (it reduces with collectives); every device holds the whole state. The state is placed on the
  devices once (`replicate_on_devices`, leaf by leaf) and stays there: each chunk donates its input
  buffers to its outputs, only the metrics are fetched, and the evaluation hook and Orbax read replica 0
  through host views of the device buffers (`first_replica`: no copy on the CPU).
- mesh: the chunk is one `jax.jit` whose state is sharded by `parallel.rules` (constrained at entry and
  exit, so every chunk compiles once and keeps the layout); the step function was built with
  axis_name None. The state stays on the devices between chunks (its buffers are donated to the next
  chunk), only the metrics are fetched, and Orbax saves the sharded arrays (each process its shards).

One chunk = `lax.scan(step_fn)` over K steps; between chunks, on the host:

    1. fetch the chunk's metrics [K] and append them to `metrics.jsonl` + TensorBoard;
    2. call `on_chunk_end(step, state)` (evaluation hooks; extra scalars are logged too);
    3. save the state with `CheckpointStore` (Orbax) under `<run_dir>/checkpoints/<step>`.

Seeds as one program (`seed_dirs`, used by studies): the state carries a leading seed axis on every
leaf but `step` (shared: all seeds are at the same step, so the per-player conds stay real branches), the
chunk is `jax.vmap`-ed over that axis, and seed i's metrics go to `seed_dirs[i]/metrics.jsonl`. Each
seed computes what it would compute alone; the compiled program differs, so over a long run the
seeds drift from separate runs in the last bits (the game is chaotic).

Resume: `run_loop` on a run folder that holds checkpoints restores the newest one that reads back
cleanly and whose checksums match (a damaged latest step falls back to the previous one with a warning
naming the step and the reason; a checkpoint of another config fingerprint is refused), drops the
metric lines after it (they belong to a chunk that was not saved; a line cut by a kill goes too) and
continues. Since the state holds everything (parameters, optimizer states, histories, counters, key)
and the per-step keys depend only on the step counter, the final state is bitwise identical to that
of an uninterrupted run, wherever the previous process was killed (tools/faults.py measures it).

A run folder that cannot be written stops the run with a `RunFolderError` (checked before anything is
compiled, and on every metrics write; a checkpoint write raises `checkpoint.CheckpointWriteError`),
naming the step, the reason and the last complete checkpoint, which stays intact. The phases `chunk`,
`eval` and `save` print markers for the fault trials when ALIGNJAX_FAULT_PHASE asks (alignjax/faults.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Any, Callable

import chex
import jax
import numpy as np
from tqdm.auto import tqdm

from alignjax import faults, parallel
from alignjax.checkpoint import CheckpointStore, release_freed_memory
from alignjax.game import keys
from alignjax.game import metrics as game_metrics


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    total_steps: int = 100  # number of game steps (PPO updates of the learning player(s))
    chunk_size: int = 10  # steps per scanned + pmapped chunk; a checkpoint is written after each
    max_to_keep: int = 2  # checkpoints kept (>= 2 so a damaged latest one has a fallback)
    tensorboard: bool = True
    check_replicas: bool = False  # after each chunk, verify the state is bitwise equal on all devices

    def __post_init__(self):
        if self.total_steps < 0 or self.chunk_size < 1:
            raise ValueError(
                f"need total_steps >= 0 and chunk_size >= 1, got {self.total_steps}/{self.chunk_size}"
            )


def make_chunk_fn(step_fn: Callable, length: int) -> Callable:
    """`chunk(state, consts) -> (state, metrics[K])`: `lax.scan` of `length` steps."""

    def chunk(state, consts):
        def body(state, _):
            key = keys.step_key(state.rng, state.step)
            new_state, metrics = step_fn(state, key, consts)
            chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
            new_state = _with_step(new_state, state.step + 1)
            metrics = dict(metrics, step=state.step)
            return new_state, metrics

        return jax.lax.scan(body, state, None, length=length)

    return chunk


def _with_step(state, step):
    return state._replace(step=step) if hasattr(state, "_replace") else state.replace(step=step)


@functools.lru_cache(maxsize=16)
def pmapped_chunk(step_fn: Callable, length: int, devices: tuple,
                  seed_axis_of: type | None = None) -> Callable:
    """The compiled chunk for (step_fn, length, devices), cached so that several runs in one process
    (a resumed run, tests) reuse one compilation. `seed_axis_of`: the state's NamedTuple type when the
    state (but `step`) and the consts carry a leading seed axis; the chunk is then vmapped over it."""
    chunk = _seed_vmapped(make_chunk_fn(step_fn, length), seed_axis_of)
    return jax.pmap(chunk, axis_name=parallel.DATA, devices=list(devices), in_axes=(0, None),
                    donate_argnums=0)


@functools.lru_cache(maxsize=16)
def mesh_chunk(step_fn: Callable, length: int, layout: parallel.Layout,
               seed_axis_of: type | None = None) -> Callable:
    """The chunk as one `jax.jit` over `layout.mesh` (cached like `pmapped_chunk`). The state is
    constrained to `parallel.state_shardings` at entry and exit (so outputs keep the inputs' layout
    and the next chunk reuses the compilation), the metrics are replicated, the state's buffers are
    donated. Call it under `jax.set_mesh(layout.mesh)` (the step constrains its batch to BATCH)."""
    chunk = _seed_vmapped(make_chunk_fn(step_fn, length), seed_axis_of)
    prefix = seed_axes(seed_axis_of) if seed_axis_of is not None else None

    def sharded(state, consts):
        shardings = parallel.state_shardings(state, layout.mesh, prefix)
        state = jax.lax.with_sharding_constraint(state, shardings)
        state, metrics = chunk(state, consts)
        metrics = jax.lax.with_sharding_constraint(metrics, layout.replicated())
        return jax.lax.with_sharding_constraint(state, shardings), metrics

    return jax.jit(sharded, donate_argnums=0)


def _seed_vmapped(chunk: Callable, seed_axis_of: type | None) -> Callable:
    if seed_axis_of is None:
        return chunk
    axes = seed_axes(seed_axis_of)
    return jax.vmap(chunk, in_axes=(axes, 0), out_axes=(axes, 0))


def seed_axes(state_type: type):
    """vmap axes of a seed-stacked NamedTuple state: 0 on every field but `step` (None: shared)."""
    return state_type(**{f: None if f == "step" else 0 for f in state_type._fields})


def stack_seeds(states: list):
    """Per-seed states (all at the same step) -> one state with a leading seed axis (but `step`)."""
    steps = {int(s.step) for s in states}
    if len(steps) != 1:
        raise ValueError(f"seed-stacked states must share their step, got {sorted(steps)}")
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)
    return _with_step(stacked, np.asarray(states[0].step))


def unstack_seeds(state, i: int):
    """Seed i's state out of a seed-stacked one."""
    return _with_step(jax.tree.map(lambda x: x[i], _with_step(state, None)), state.step)


class RunFolderError(OSError):
    """The run folder cannot be written (read-only, full disk, permissions): the run stops with a
    message naming what failed, the step and the last complete checkpoint, which is left intact."""


def _write_failure(what: str, path, e: OSError, step: int | None, store: CheckpointStore | None):
    """A RunFolderError for an OSError met while writing `what` (the step it happened at, the last
    complete checkpoint and how to go on)."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    at = f"step {step}: " if step is not None else ""
    last = store.latest_step() if store is not None else None
    kept = (f"the last complete checkpoint is step {last} in {store.directory}" if last is not None
            else "no checkpoint was written yet")
    msg = (f"{at}cannot write {what} {path} ({reason}); the run stops here and {kept}. Free space or make "
           "the folder writable, then resume the run")
    return RunFolderError(e.errno, msg) if e.errno else RunFolderError(msg)


def kept_metric_lines(text: str, resume_step: int, path="metrics.jsonl") -> list[str]:
    """The lines of a metrics log that a run resumed at `resume_step` keeps: those of steps before it.

    Lines at or after it come from a chunk that was never saved. A last line without its newline was
    cut by a kill or a full disk in the middle of a write: it is dropped. Any other line that is not
    JSON is damage the loop cannot explain: a ValueError names it."""
    lines = text.split("\n")
    kept = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            record = json.loads(ln)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: a write that never finished
                continue
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({e.msg}); move the file aside "
                             "or repair the line to resume") from e
        if record.get("step", 0) < resume_step:
            kept.append(ln)
    return kept


class MetricLog:
    """Per-step scalars to `metrics.jsonl` (one JSON object per line) and optionally TensorBoard."""

    def __init__(self, run_dir: pathlib.Path, resume_step: int, tensorboard: bool, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled  # multi-host: only process 0 writes
        self._file = self._tb = None
        if not enabled:
            return
        try:
            if self.path.exists():
                # Lines after the restored checkpoint come from a chunk that was never saved: drop them
                # so the log equals that of an uninterrupted run. Rewritten through a temporary file
                # and a rename, so a kill here leaves the old log or the new one, never half of one.
                kept = kept_metric_lines(self.path.read_text(), resume_step, self.path)
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(ln + "\n" for ln in kept))
                os.replace(tmp, self.path)
            self._file = open(self.path, "a")
        except OSError as e:
            raise _write_failure("the metrics log", self.path, e, resume_step, None) from e
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step makes TensorBoard discard events at or after the resume step.
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)

    def write(self, record: dict):
        """Append one record of scalars as written (the loop stops after writing a chunk whose
        records hold a non-finite value; its checkpoint is not written, and a resume drops the lines)."""
        if not self.enabled:
            return
        record = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()
                  if np.ndim(v) == 0}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def flush(self):
        if not self.enabled:
            return
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        """Close the files; a failure here (the buffer could not be flushed to a full disk) is only
        printed, so that it never hides the error that stopped the run."""
        if not self.enabled:
            return
        for f in (self._file, self._tb):
            try:
                if f is not None:
                    f.close()
            except Exception as e:  # noqa: BLE001
                tqdm.write(f"[alignjax] could not close {self.path.parent}'s logs: {e}")


def read_metrics(run_dir) -> list[dict]:
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def run_loop(
    step_fn: Callable,
    init_state: Any,
    cfg: LoopConfig,
    run_dir,
    metadata: dict | None = None,
    on_chunk_end: Callable[[int, Any], dict | None] | None = None,
    before_save: Callable[[int, Any], None] | None = None,
    desc: str = "game",
    consts: Any = None,
    seed_dirs: list | None = None,
    layout: parallel.Layout | None = None,
):
    """Run (or resume) the chunked loop until `cfg.total_steps`; return the final state (pmap: host
    NumPy; mesh: the sharded device arrays).

    Args:
      step_fn: `(state, key, consts) -> (state, metrics dict of scalars)`: under pmap per device with
        collectives over "data" inside; under a mesh on the global batch (axis_name None).
      init_state: the state at step 0 (host or device arrays); also the restore target, so its
        structure and dtypes define the checkpoint layout.
      run_dir: the run folder; checkpoints go to `run_dir/checkpoints`.
      consts: read-only pytree passed to every step on every device (broadcast, not checkpointed:
        the seed prompts, an embedder's params).
      metadata: JSON-able dict saved with each checkpoint (e.g. the resolved config).
      on_chunk_end: optional `(step, host_state) -> dict` called after each chunk; returned scalars
        are logged at that step (evaluation of the current players). With `seed_dirs` it returns a
        list of dicts, one per seed (or None).
      before_save: test hook `(step, host_state)` called just before a save; raising in it
        simulates a process killed after the chunk ran but before its checkpoint was written.
      seed_dirs: S folders when `init_state` (a NamedTuple) and `consts` are seed-stacked
        (`stack_seeds`): the chunk is vmapped over seeds and seed i's metrics go to seed_dirs[i].
      layout: `parallel.make_layout(...)`; default pmap over all local devices.
    """
    run_dir = pathlib.Path(run_dir)
    log_dirs = [pathlib.Path(d) for d in seed_dirs] if seed_dirs is not None else [run_dir]
    for d in dict.fromkeys([run_dir, *log_dirs]):  # fail now, before compiling, on a folder we cannot write
        check_writable(d)
    layout = layout or parallel.make_layout(parallel.ParallelConfig())
    seed_axis_of = type(init_state) if seed_dirs is not None else None
    shardings = None
    if layout.is_mesh:
        prefix = seed_axes(seed_axis_of) if seed_axis_of is not None else None
        shardings = parallel.state_shardings(init_state, layout.mesh, prefix)
    store = CheckpointStore(run_dir / "checkpoints", max_to_keep=cfg.max_to_keep)
    logs, bar = [], None
    try:
        state, start = _restore_or_init(store, init_state, (metadata or {}).get("fingerprint"), shardings)
        primary = jax.process_index() == 0
        logs = [MetricLog(d, start, cfg.tensorboard, enabled=primary) for d in log_dirs]
        consts = jax.tree.map(np.asarray, consts)
        if layout.is_mesh:  # sent once, sharded by the same rules as the state (an LM judge's weights are
            # split like a policy's; prompts and tables stay replicated); the state stays on the devices
            consts = parallel.place(consts, parallel.state_shardings(consts, layout.mesh))
        bar = tqdm(total=cfg.total_steps, initial=start, desc=desc, unit="step", dynamic_ncols=True,
                   disable=not primary)
        init_state = None  # the caller may hand over its only reference: the host copy is then freed
        if not layout.is_mesh:  # the one device copy
            state = parallel.replicate_on_devices(state, layout.devices)
        release_freed_memory()  # the build's freed host buffers (about 0.7x a real game's state) go back
        while start < cfg.total_steps:
            length = min(cfg.chunk_size, cfg.total_steps - start)
            t0 = time.perf_counter()
            with faults.phase("chunk", start):
                state, per_seed = _run_chunk(step_fn, state, consts, length, layout, cfg.check_replicas,
                                             seed_axis_of)
            seconds, start = time.perf_counter() - t0, start + length
            _log(logs, [[r | {"time/step_s": seconds / length} for r in records] for records in per_seed],
                 start, store, flush=False)
            _stop_on_nonfinite([r for records in per_seed for r in records], store)
            # pmap: replica 0 as host views of the device buffers (no copy on the CPU), for the
            # evaluation and the save; dropped before the next chunk donates those buffers
            seen = state if layout.is_mesh else parallel.first_replica(state)
            with faults.phase("eval", start):
                extra = on_chunk_end(start, seen) if on_chunk_end is not None else None
            extras = extra if seed_dirs is not None else [extra]
            extras = [[{"step": start - 1} | ex] if ex else [] for ex in extras or [None] * len(logs)]
            for ex in extras:
                _stop_on_nonfinite(ex, store)
            _log(logs, extras, start, store, flush=True)
            if before_save is not None:
                before_save(start, seen)
            store.save(start, seen, metadata)
            del seen
            bar.update(length)
            last = per_seed[0][-1]
            bar.set_postfix({k: f"{float(last[k]):.3g}" for k in _postfix_keys(last)})
    finally:
        # Closing must not hide the error that stopped the run (a full disk fails the closes too).
        if bar is not None:
            bar.close()
        for log in logs:
            log.close()
        try:
            store.close()
        except Exception as e:  # noqa: BLE001
            tqdm.write(f"[alignjax] closing the checkpoint store failed: {e}")
    return state if layout.is_mesh else parallel.first_replica(state)


def check_writable(folder: pathlib.Path) -> None:
    """Create `folder` if needed and write and delete a probe file in it: a read-only or full run
    folder stops the run before anything is compiled, with a RunFolderError saying why."""
    probe = folder / f".write-probe-{os.getpid()}-{jax.process_index()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("alignjax checks that the run folder can be written\n")
        probe.unlink()
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        msg = (f"the run folder {folder} cannot be written ({reason}); nothing was run. Give the run a "
               "writable folder with free space")
        raise (RunFolderError(e.errno, msg) if e.errno else RunFolderError(msg)) from e


def _log(logs: list[MetricLog], per_seed: list[list[dict]], step: int, store: CheckpointStore,
         flush: bool) -> None:
    """Append each seed's records to its log (and flush); a write that fails stops the run with a
    RunFolderError (a full disk, a folder turned read-only), the last checkpoint left as it was."""
    for log, records in zip(logs, per_seed, strict=True):
        try:
            for record in records:
                log.write(record)
            if flush:
                log.flush()
        except OSError as e:
            raise _write_failure("the metrics log", log.path, e, step, store) from e


def _restore_or_init(store: CheckpointStore, init_state, fingerprint: str | None = None,
                     shardings: Any = None) -> tuple[Any, int]:
    """(state, step): the newest checkpoint that reads back cleanly (damaged later ones moved aside),
    or the initial state (host NumPy; with `shardings`, restored sharded onto the mesh, whatever the
    layout that saved it). A checkpoint whose metadata holds another config `fingerprint` than this
    run's is never restored: that is an error naming both."""
    # NumPy leaves are kept as they are (no host copy of the state); device leaves are fetched
    init_state = jax.tree.map(lambda x: x if isinstance(x, np.ndarray) else np.array(jax.device_get(x)),
                              init_state)
    # The fingerprint is checked from each step's metadata before its arrays are read (a checkpoint
    # of another config may not even fit the target): CheckpointMismatchError, never a fallback.
    restored = store.restore(init_state, shardings=shardings, fingerprint=fingerprint)
    if restored is None:
        if shardings is not None:
            init_state = parallel.place(init_state, shardings)
        return init_state, int(parallel.fetch(init_state.step))
    state, start = restored.tree, restored.step
    for path in store.quarantine_after(start):
        tqdm.write(f"[alignjax] moved damaged checkpoint aside: {path}")
    if int(parallel.fetch(state.step)) != start:
        raise RuntimeError(f"checkpoint {start} in {store.directory} holds state.step="
                           f"{int(parallel.fetch(state.step))}")
    tqdm.write(f"[alignjax] resumed from {store.directory / str(start)} (step {start})")
    return state, start


def _run_chunk(step_fn, state, consts, length: int, layout: parallel.Layout, check_replicas: bool,
               seed_axis_of: type | None = None):
    """One chunk: (new state, [per seed: the steps' selected metric records]); one seed unless
    `seed_axis_of` (the state type of a seed-stacked state). Device state in (its buffers donated),
    device state out: pmap-replicated [n, ...] or sharded on the mesh."""
    if layout.is_mesh:
        with jax.set_mesh(layout.mesh):
            state, metrics = mesh_chunk(step_fn, length, layout, seed_axis_of)(state, consts)
        metrics = parallel.fetch(metrics)
    else:
        # The replicated state stays on the devices between chunks and its buffers are donated to the
        # next chunk (placed with `parallel.pmap_sharding`, so every chunk shares one compilation); only the
        # metrics come to the host.
        chunk = pmapped_chunk(step_fn, length, layout.devices, seed_axis_of)
        state, metrics = chunk(state, consts)
        if check_replicas and not all_equal_across_devices(state):
            raise RuntimeError(f"game state diverged across devices in the chunk ending at step "
                               f"{int(np.asarray(state.step.addressable_shards[0].data)[0])}")
        metrics = jax.tree.map(lambda m: np.asarray(m[0]), metrics)  # pmean'd: device 0 speaks for all
    per_seed = [metrics] if seed_axis_of is None else [
        {k: v[i] for k, v in metrics.items()} for i in range(len(next(iter(metrics.values()))))]
    records = [[game_metrics.select({k: v[t] for k, v in m.items()}) for t in range(length)]
               for m in per_seed]
    return state, records


def _postfix_keys(record: dict) -> list[str]:
    """The progress bar's figures: those the last step measured (the learner's reward, attack success)."""
    wanted = ("defender/score", "attacker/reward", "attack_success")
    return [k for k in wanted if k in record]


class NonFiniteMetricError(FloatingPointError):
    """A logged metric was NaN or inf: the run stops rather than log a number nobody can trust."""


def _stop_on_nonfinite(records: list[dict], store: CheckpointStore) -> None:
    for record in records:
        bad = game_metrics.nonfinite(record)
        if bad:
            last = store.latest_step()
            where = (f"step {last} in {store.directory}" if last is not None
                     else "none (the run had not saved yet)")
            raise NonFiniteMetricError(
                f"step {int(record.get('step', -1))}: non-finite metric(s) {bad}; the run stops here. "
                f"Last good checkpoint: {where} (the lines of this chunk are in metrics.jsonl; a resume "
                "drops them)")


def all_equal_across_devices(tree) -> bool:
    """True when every leaf of a pmap-replicated tree is bitwise equal on all devices (debug check)."""
    def same(x):
        x = np.asarray(x)
        return all(x[i].tobytes() == x[0].tobytes() for i in range(x.shape[0]))

    return all(same(x) for x in jax.tree.leaves(tree))
