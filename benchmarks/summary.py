"""The machine-readable summary of `make bench`: each benchmark records its headline figures here and
`benchmarks/run_all.py` writes them, with the machine's description, to `runs/bench/<stamp>/bench.json`.

API (plain module state, one run per process):

    from benchmarks import summary
    summary.record("generate_tok_s", 259.5)      # any JSON value; a later record of a key replaces it
    summary.figures()                            # {key: value} recorded so far (a copy)
    summary.machine()                            # processor, cores, load average now, jax version, backend
    summary.write(path, machine=..., ran=[...])  # writes {"machine": ..., "ran": [...], "figures": ...}
    summary.load(path)                           # the dict that `write` wrote

Keys used by the benchmarks: generate_tok_s, generate_hf_tok_s, generate_speedup_vs_hf,
decode_step_over_floor (bench_generate); ppo_speedup_vs_torch (bench_ppo); selfbleu_speedup
(bench_selfbleu); game_steps_per_s, game_host_share (a fraction of the run's wall time) and
game_phase_ms (bench_game). Recording outside `make bench` is harmless: nothing is written unless
`write` is called.
"""

from __future__ import annotations

import json
import os
import pathlib

_FIGURES: dict = {}


def record(key: str, value) -> None:
    """Remember one figure under `key` (a later record of the same key replaces it)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a figure's key must be a non-empty string, got {key!r}")
    json.dumps(value)  # fail here, at the benchmark that recorded it, not at the end of the run
    _FIGURES[key] = value


def figures() -> dict:
    return dict(_FIGURES)


def clear() -> None:
    _FIGURES.clear()


def processor() -> str:
    """The processor's model name (alignjax.backend.cpu_model: /proc/cpuinfo's first 'model name')."""
    from alignjax.backend import cpu_model

    return cpu_model()


def machine() -> dict:
    """The processor, core count and load average now, and JAX's version and backend."""
    info = {"processor": processor(), "cores": os.cpu_count(), "load_average": list(os.getloadavg())}
    try:
        import jax

        info["jax_version"] = jax.__version__
        info["backend"] = jax.default_backend()
    except Exception as err:  # noqa: BLE001 - a summary without JAX still says what ran
        info["jax_version"] = info["backend"] = f"unavailable ({type(err).__name__})"
    return info


def write(path, machine: dict, ran: list, figures_: dict | None = None) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"machine": machine, "ran": list(ran), "figures": dict(_FIGURES if figures_ is None else figures_)}
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return path


def load(path) -> dict:
    return json.loads(pathlib.Path(path).read_text())
