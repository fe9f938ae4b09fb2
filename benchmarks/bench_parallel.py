"""The game under a mesh against pmap, on 8 fake CPU devices (alignjax/parallel).

    python -m benchmarks.run_all bench_parallel           # or: make bench
    BENCH_PARALLEL_STEPS=8 python -m benchmarks.run_all bench_parallel

Plays the tiny game of tests/test_parallel.py (batch 16, 2 PPO epochs x 2 minibatches) in three
layouts: pmap over 8 devices (data parallel, replicated state), mesh data 8 (the same parallelism
through jit + NamedSharding) and mesh data 2 x fsdp 4 (sharded state). Each layout first runs one
chunk (compilation), then BENCH_PARALLEL_STEPS steps in chunks of 2 whose wall time is measured
(the loop's per-chunk host work included: metric logging and an Orbax save per chunk). Prints
steps/s of each and the ratio to pmap. Runs in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 so that `make bench`'s other benchmarks keep one
device.
"""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = "BENCH_PARALLEL_CHILD"


def child():
    import copy
    import pathlib
    import tempfile
    import time

    import jax

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
    from test_game import random_players
    from test_parallel import CFG

    from alignjax import backend, parallel
    from alignjax import experiment as E
    from alignjax.config import build_config
    from alignjax.game.loop import run_loop
    from alignjax.game.step import make_play_step
    from alignjax.settings.synthetic import SyntheticSetting
    from alignjax.worlds.synthetic import SyntheticWorld

    steps = int(os.environ.get("BENCH_PARALLEL_STEPS", "8"))
    spec = copy.deepcopy(CFG)
    spec["loop"].update(total_steps=2 + steps, chunk_size=2, max_to_keep=2)
    cfg = build_config(E.Config, spec)
    players = random_players(SyntheticWorld(cfg.world))
    layouts = {"pmap, data 8": parallel.ParallelConfig("pmap", 8),
               "mesh, data 8": parallel.ParallelConfig("mesh", 8, 1, 1),
               "mesh, data 2 x fsdp 4": parallel.ParallelConfig("mesh", 2, 4, 1)}
    rates = {}
    for name, pcfg in layouts.items():
        layout = parallel.make_layout(pcfg)
        built = SyntheticSetting().build(cfg, progress=False, players=players,
                                         axis_name=None if layout.is_mesh else "data")
        step_fn = make_play_step(built.spec)
        with tempfile.TemporaryDirectory() as tmp:
            warm = E.dataclasses.replace(cfg.loop, total_steps=2)
            run_loop(step_fn, built.state, warm, tmp, consts=built.consts, layout=layout)  # compile
            t0 = time.perf_counter()
            run_loop(step_fn, built.state, cfg.loop, tmp, consts=built.consts, layout=layout)
            rates[name] = steps / (time.perf_counter() - t0)
    base = rates["pmap, data 8"]
    print(f"\ntiny game, batch {cfg.game.batch_size}, {steps} timed steps in chunks of 2, "
          f"{jax.device_count()} fake CPU devices")
    for name, r in rates.items():
        print(f"  {name:24s} {r:6.2f} steps/s   {r / base:5.2f}x pmap")
    print(f"  machine: {backend.cpu_model()}, {os.cpu_count()} logical cores, load average "
          f"{os.getloadavg()[0]:.2f}")


def main():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", **{CHILD: "1"})
    subprocess.run([sys.executable, __file__], env=env, check=True)


if __name__ == "__main__":
    child() if os.environ.get(CHILD) else main()
