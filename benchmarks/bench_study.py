"""Seeds as one vmapped program against separate runs (alignjax/study.py, `vmap: true` vs `false`).

    python -m benchmarks.run_all bench_study           # or: make bench
    BENCH_STUDY_STEPS=40 BENCH_STUDY_SEEDS=5 python -m benchmarks.run_all bench_study

Runs the game part of one arm (`experiments/<BENCH_STUDY_EXPERIMENT>.yaml`, default `default`) for
BENCH_STUDY_SEEDS seeds x BENCH_STUDY_STEPS steps both ways, in one process after a warm-up that
builds (caches) the SFT'd players: separate = `experiment.run` per seed, vmapped =
`experiment.run_seeds`. Each timing includes its compilations, evaluations, checkpoints and export,
as a study pays them. Prints the wall seconds of both, their ratio, and the machine.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time

from alignjax import backend, experiment
from alignjax.cli import load_experiment


def _machine() -> str:
    return f"{backend.cpu_model()}, {os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.2f}"


def main():
    name = os.environ.get("BENCH_STUDY_EXPERIMENT", "default")
    steps = int(os.environ.get("BENCH_STUDY_STEPS", "20"))
    n_seeds = int(os.environ.get("BENCH_STUDY_SEEDS", "3"))
    chunk = min(steps, 20)
    cfgs = [load_experiment(name, [f"seed={s}", f"loop.total_steps={steps}", f"loop.chunk_size={chunk}",
                                   "loop.tensorboard=false"])[1] for s in range(n_seeds)]
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        experiment.run(cfgs[0], root / "warmup" / "r", progress=False)  # builds the player cache
        t0 = time.perf_counter()
        for c in cfgs:
            experiment.run(c, root / f"sep{c.seed}" / "r", progress=False)
        separate = time.perf_counter() - t0
        t0 = time.perf_counter()
        experiment.run_seeds(cfgs, [root / f"vm{c.seed}" / "r" for c in cfgs], root / "group", progress=False)
        vmapped = time.perf_counter() - t0
    print(f"\n{name}: {n_seeds} seeds x {steps} steps (chunks of {chunk}), whole runs incl. compile and "
          "evaluations")
    print(f"  separate runs : {separate:7.1f} s")
    print(f"  vmapped seeds : {vmapped:7.1f} s   ({separate / vmapped:.2f}x faster)")
    print(f"  machine: {_machine()}")


if __name__ == "__main__":
    main()
