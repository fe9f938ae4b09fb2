"""Multi-host start-up on JAX's own runtime (`jax.distributed.initialize`), from the config or the
environment, before anything touches a device.

    parallel: {mode: mesh, fsdp: 16, coordinator: "10.0.0.2:8476", num_processes: 4, process_id: 0}

or the same through the environment (what a launcher sets on every host; the config wins):

    ALIGNJAX_COORDINATOR=10.0.0.2:8476 ALIGNJAX_NUM_PROCESSES=4 ALIGNJAX_PROCESS_ID=<i>

`coordinator: auto` calls `jax.distributed.initialize()` with no arguments: on a Cloud TPU VM slice
(and under SLURM / Open MPI) JAX finds the coordinator and the process ids itself, so every host runs
the same command line. On CPU the cross-process collectives go through gloo (used by the tests: two
processes on localhost with 4 fake devices each). After start-up the mesh spans every process's
devices (`layout.make_layout`), each process places and saves only its own shards, and process 0
writes the logs.
"""

from __future__ import annotations

import os

import jax

ENV = {"coordinator": "ALIGNJAX_COORDINATOR", "num_processes": "ALIGNJAX_NUM_PROCESSES",
       "process_id": "ALIGNJAX_PROCESS_ID"}


def settings(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> dict | None:
    """The start-up settings from the config's values, else the environment; None for one process."""
    coordinator = coordinator or os.environ.get(ENV["coordinator"], "")
    num_processes = num_processes or int(os.environ.get(ENV["num_processes"], "0") or 0)
    if process_id < 0:
        process_id = int(os.environ.get(ENV["process_id"], "-1") or -1)
    if not coordinator:
        if num_processes > 1:
            raise ValueError(f"parallel.num_processes={num_processes} needs parallel.coordinator (host:port, "
                             f"or 'auto' on a TPU slice) or ${ENV['coordinator']}")
        return None
    if coordinator == "auto":
        return {}
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"parallel.coordinator={coordinator!r} needs num_processes >= 1 and "
                         f"0 <= process_id < num_processes, got num_processes={num_processes} "
                         f"process_id={process_id} (config or ${ENV['num_processes']} / "
                         f"${ENV['process_id']})")
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
               timeout_s: int = 300) -> bool:
    """Start JAX's distributed runtime when the settings ask for several processes; returns whether it
    did. Must run before the first device use. Checks the process count the coordinator reports."""
    kw = settings(coordinator, num_processes, process_id)
    if kw is None:
        return False
    if jax.distributed.is_initialized():
        return True
    if (os.environ.get("JAX_PLATFORMS") or "cpu").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw, initialization_timeout=timeout_s)
    want = kw.get("num_processes")
    if want is not None and jax.process_count() != want:
        raise ValueError(f"parallel.num_processes={want} but the coordinator reports {jax.process_count()} "
                         "processes")
    return True


def is_primary() -> bool:
    """Whether this process writes the run's logs and reports (process 0)."""
    return jax.process_index() == 0
