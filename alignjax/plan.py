"""The memory plan (`plan=true`): what one device holds for a layout, from the compiled game chunk.

    make experiment NAME=real_llama7b_gpo_div ARGS="plan=true parallel.data=1 parallel.fsdp=16 <paths>"
    make experiment NAME=default ARGS="plan=true parallel.mode=mesh parallel.fsdp=8"

The game is built abstractly (the real setting's `build(weights="abstract")`: every model's weights
are initialisers of its config.json's shapes under `jax.eval_shape`, so a config-only folder will do
and no safetensors file is read; the synthetic world is built for real, it is small) and its state and
consts become ShapeDtypeStructs carrying the layout's shardings (`parallel.state_shardings`, for the
consts too, as `run_loop` places them: an LM judge is split like a policy). The loop's own chunk
(`game.loop.mesh_chunk` of `game.step.make_play_step`) is lowered on the layout's mesh and compiled,
nothing runs. Per device:

    parameters   the trained policies and critics                    (parallel.bytes_per_device)
    optimizer    their AdamW states (two moments each, + counters)
    frozen       the references (state), the judge and the embedder (consts)
    other        histories, counters, keys, the seed prompts
    compiled     XLA's memory_analysis(): arguments, outputs, aliased (donated) bytes, temporaries,
                 generated code
    peak         arguments + temporaries + outputs not aliased to an argument

and which accelerators it fits (16 / 32 / 80 / 95 / 141 GB). The chunk is the run's first one
(`loop.chunk_size` steps): the scan carries the state and stacks only the scalar metrics, so the
temporaries are the same for every length >= 2, but a chunk of one step compiles without the loop
and XLA reuses more buffers (7B, fsdp 16: 70.2 GB of temporaries at length 1, 96.6 GB at 2 and at
10), so planning at length 1 would under-state a run's memory.

The mesh needs as many devices as the layout names. A process that already sees that many devices
plans on them (its own backend); otherwise (the CLI has started JAX on this machine's devices) the
plan runs in a child process, `python -m alignjax.plan RUN_DIR` with the config as YAML on stdin, on
that many fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N). Figures measured
by XLA's CPU compiler: a TPU or GPU compile of the same program fuses and schedules differently, so
read the temporaries as an estimate; the state figures are exact.

Degrees that do not fit the model or the batch are rejected before anything compiles, by
`parallel.make_layout` and `parallel.check_model_fits_layout`, with their own messages.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np

from alignjax import parallel
from alignjax.config import ConfigError

# (name, memory in GB = 1e9 bytes) of one device
ACCELERATORS = (("TPU v5e", 16), ("TPU v4", 32), ("H100", 80), ("TPU v5p", 95), ("H200", 141))
GB = 1e9
CHILD_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
_ERROR = "alignjax.plan error: "  # how the child reports a rejected input to the parent


def device_count(par: parallel.ParallelConfig) -> int:
    """The devices of the layout: data x fsdp x tensor (data 0 = 1). Raises ConfigError (the cli's one
    `error:` line) where the layout leaves the count to the machine (fsdp 0) or is not a mesh."""
    if par.mode != "mesh":
        raise ConfigError("plan=true compiles the mesh layout: set parallel.mode=mesh (a pmap layout over D "
                         "devices holds per device what mesh data D x fsdp 1 x tensor 1 holds)")
    if par.fsdp == 0:
        raise ConfigError("plan=true needs the device count: parallel.fsdp=0 means 'all devices there are'; "
                         "set parallel.fsdp (and parallel.data, parallel.tensor)")
    return max(par.data, 1) * par.fsdp * par.tensor


def run(cfg, run_dir) -> dict:
    """Plan `cfg`'s layout (here or in a child process on fake devices); write `plan.json` and
    `plan.md` into run_dir, print the tables, return the plan."""
    from alignjax.experiment import check_config

    check_config(cfg)  # missing paths and options fail here, before any child starts
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    n = device_count(cfg.parallel)
    if jax.device_count() == n:
        plan = measure(cfg)
        write(plan, run_dir)
    else:
        plan = _in_child(cfg, n, run_dir)
    print(markdown(plan))
    print(f"[alignjax] memory plan: {run_dir / 'plan.md'}")
    return plan


def _in_child(cfg, n: int, run_dir: pathlib.Path) -> dict:
    """`python -m alignjax.plan run_dir` on n fake CPU devices; its stderr is passed through and a
    rejected input comes back as the ValueError the child raised."""
    from alignjax.config import dump_yaml

    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    # Nothing runs: the CPU machine code need not be optimised (LLVM's passes are most of the compile
    # time; buffer assignment, and so memory_analysis(), happens before them and is the same).
    fast = [f for f in CHILD_XLA_FLAGS if f.split("=")[0] not in {g.split("=")[0] for g in flags}]
    env["XLA_FLAGS"] = " ".join(flags + fast + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    print(f"[alignjax] planning on {n} fake CPU devices in a child process", file=sys.stderr, flush=True)
    child = subprocess.Popen([sys.executable, "-m", "alignjax.plan", str(run_dir)], stdin=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    child.stdin.write(dump_yaml(cfg))
    child.stdin.close()
    tail = collections.deque(maxlen=40)
    for line in child.stderr:
        sys.stderr.write(line)
        tail.append(line)
    if child.wait() != 0:
        errors = [ln[len(_ERROR):].strip() for ln in tail if ln.startswith(_ERROR)]
        if errors:
            raise ValueError(errors[-1])
        raise RuntimeError(f"the plan's child process failed (exit {child.returncode}):\n{''.join(tail)}")
    return json.loads((run_dir / "plan.json").read_text())


def abstract(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of the leaves of `tree` (arrays or structs), with `shardings` if given."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def build_abstract(cfg):
    """The setting's Built with ShapeDtypeStruct state and consts (real: no weights read)."""
    from alignjax.settings import get_setting

    setting = get_setting(cfg.setting)
    if cfg.setting == "real":
        return setting.build(cfg, progress=False, axis_name=None, weights="abstract")
    built = setting.build(cfg, progress=False, axis_name=None)  # the synthetic world is small
    return dataclasses.replace(built, state=abstract(built.state), consts=abstract(built.consts))


def _count(tree) -> int:
    return int(sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree)))


def chunk_length(cfg) -> int:
    """The steps of the run's first chunk (what `run_loop` compiles first): loop.chunk_size, or fewer
    when the run is shorter."""
    return max(min(cfg.loop.chunk_size, cfg.loop.total_steps), 1)


def measure(cfg, length: int | None = None) -> dict:
    """Build abstractly, lower and compile the game chunk (`length` steps, default the run's
    `chunk_length`) on `cfg.parallel`'s mesh over this process's devices; the plan as a JSON-able
    dict."""
    from alignjax.game.loop import mesh_chunk
    from alignjax.game.step import make_play_step

    length = chunk_length(cfg) if length is None else length
    t = [time.perf_counter()]
    layout = parallel.make_layout(cfg.parallel)
    built = build_abstract(cfg)
    spec = built.spec
    players = {"defender": spec.defender.models.policy_config, "attacker": spec.attacker.models.policy_config}
    parallel.check_model_fits_layout(layout, cfg.game.batch_size, players)
    t.append(time.perf_counter())
    state_sh = parallel.state_shardings(built.state, layout.mesh)
    consts_sh = parallel.state_shardings(built.consts, layout.mesh)
    state, consts = abstract(built.state, state_sh), abstract(built.consts, consts_sh)
    with jax.set_mesh(layout.mesh):
        lowered = mesh_chunk(make_play_step(spec), length, layout).lower(state, consts)
    t.append(time.perf_counter())
    cpu = time.process_time()  # CPU seconds of all threads: comparable on a machine others share
    compiled = lowered.compile()
    t.append(time.perf_counter())
    cpu = time.process_time() - cpu
    ma = compiled.memory_analysis()

    s, c = built.state, built.consts
    groups = {  # (trees, their shardings)
        "parameters": [(s.defender.policy_params, state_sh.defender.policy_params),
                       (s.defender.critic_params, state_sh.defender.critic_params),
                       (s.attacker.policy_params, state_sh.attacker.policy_params),
                       (s.attacker.critic_params, state_sh.attacker.critic_params)],
        "optimizer": [(s.defender.policy_opt_state, state_sh.defender.policy_opt_state),
                      (s.defender.critic_opt_state, state_sh.defender.critic_opt_state),
                      (s.attacker.policy_opt_state, state_sh.attacker.policy_opt_state),
                      (s.attacker.critic_opt_state, state_sh.attacker.critic_opt_state)],
        "frozen": [(s.defender_ref, state_sh.defender_ref), (s.attacker_ref, state_sh.attacker_ref),
                   (c.judge, consts_sh.judge), (c.embed_params, consts_sh.embed_params)],
        "other": [(s.step, state_sh.step), (s.rng, state_sh.rng), (s.history, state_sh.history),
                  (s.cursor, state_sh.cursor), (s.defender.step, state_sh.defender.step),
                  (s.defender.reward_moments, state_sh.defender.reward_moments),
                  (s.attacker.step, state_sh.attacker.step),
                  (s.attacker.reward_moments, state_sh.attacker.reward_moments),
                  (c.seed_tokens, consts_sh.seed_tokens), (c.seed_mask, consts_sh.seed_mask)],
    }
    per_device = {k: parallel.bytes_per_device([tree for tree, _ in v], [sh for _, sh in v])
                  for k, v in groups.items()}
    total = parallel.bytes_per_device((s, c), (state_sh, consts_sh))
    if sum(per_device.values()) != total:  # every leaf of the state and the consts in one group
        raise AssertionError(f"the plan's groups {per_device} do not add up to the state + consts {total}")
    per_device["state_and_consts"] = total
    compiled_bytes = {"arguments": int(ma.argument_size_in_bytes), "outputs": int(ma.output_size_in_bytes),
                      "aliased": int(ma.alias_size_in_bytes), "temporaries": int(ma.temp_size_in_bytes),
                      "generated_code": int(ma.generated_code_size_in_bytes)}
    peak = compiled_bytes["arguments"] + compiled_bytes["temporaries"] + max(
        compiled_bytes["outputs"] - compiled_bytes["aliased"], 0)
    g = cfg.game
    models = {name: {"parameters": _count(tree), "layers": lm.num_layers, "hidden": lm.hidden_size,
                     "vocab": lm.vocab_size}
              for name, tree, lm in (("defender", s.defender.policy_params, players["defender"]),
                                     ("attacker", s.attacker.policy_params, players["attacker"]))}
    if cfg.setting == "real" and c.judge is not None:  # None: real.judge.kind=refusal, no model
        models["judge"] = {"parameters": _count(c.judge.params), "layers": c.judge.config.num_layers,
                           "hidden": c.judge.config.hidden_size, "vocab": c.judge.config.vocab_size}
    if c.embed_params is not None:
        models["embedder"] = {"parameters": _count(c.embed_params)}
    return {
        "setting": cfg.setting,
        "layout": {"data": int(layout.mesh.shape["data"]), "fsdp": int(layout.mesh.shape["fsdp"]),
                   "tensor": int(layout.mesh.shape["tensor"]), "devices": len(layout.devices),
                   "describe": layout.describe()},
        "game": {"batch_size": g.batch_size, "attacker_new_tokens": spec.cfg.attacker_sampling.max_new_tokens,
                 "defender_new_tokens": spec.cfg.defender_sampling.max_new_tokens,
                 "prompt_source": g.prompt_source, "schedule": g.schedule.mode,
                 "precision": dataclasses.asdict(cfg.precision), "remat": cfg.remat,
                 "embedder": cfg.embedder.kind},
        "models": models,
        "per_device_bytes": per_device,
        "compiled_bytes": compiled_bytes,
        "peak_bytes": peak,
        "fits": fits(peak),
        "chunk_length": length,
        "seconds": {"build": t[1] - t[0], "lower": t[2] - t[1], "compile": t[3] - t[2], "compile_cpu": cpu},
        "machine": {"backend": jax.default_backend(), "device": str(layout.devices[0].device_kind),
                    "cpu": cpu_model(), "jax": jax.__version__},
    }


def fits(peak: int) -> list[dict]:
    """One row per accelerator: its memory, peak / memory, and whether the peak fits."""
    return [{"accelerator": name, "gb": gb, "fraction": peak / (gb * GB), "fits": peak <= gb * GB}
            for name, gb in ACCELERATORS]


def cpu_model() -> str:
    from alignjax.backend import cpu_model as model

    return model()


def _gb(b: int) -> str:
    return f"{b / GB:.2f}"


def _count_str(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _models_str(models: dict) -> str:
    def one(name, m):
        shape = f" ({m['layers']} layers, D {m['hidden']}, V {m['vocab']})" if "layers" in m else ""
        return f"{name} {_count_str(m['parameters'])} parameters{shape}"

    return ", ".join(one(k, v) for k, v in models.items())


def markdown(plan: dict) -> str:
    """The plan's tables (per-device bytes, compiled sizes, accelerators) as Markdown."""
    lay, game, pd, cb = plan["layout"], plan["game"], plan["per_device_bytes"], plan["compiled_bytes"]
    sec, mach, prec = plan["seconds"], plan["machine"], game["precision"]
    if plan["setting"] == "real":
        source = "no model weights read, only config.json shapes"
        if game["embedder"] == "minilm":
            source += "; the MiniLM embedder loaded from its package"
    else:
        source = "the synthetic world's small players built for real, then abstracted"
    lines = [
        f"# Memory plan: {plan['setting']} setting, {lay['describe']} ({lay['devices']} devices)", "",
        f"Batch {game['batch_size']}, {game['attacker_new_tokens']} / {game['defender_new_tokens']} new "
        f"tokens (attacker / defender), prompt source {game['prompt_source']}, schedule {game['schedule']}; "
        f"params {prec['params']}, compute {prec['compute']}, remat {game['remat']}, embedder "
        f"{game['embedder']}. Models: {_models_str(plan['models'])}.", "",
        f"The game chunk compiled from ShapeDtypeStructs ({source}) on {lay['devices']} {mach['backend']} "
        f"devices ({mach['cpu']}; jax {mach['jax']}): build {sec['build']:.1f} s, lower "
        f"{sec['lower']:.1f} s, compile {sec['compile']:.1f} s ({sec['compile_cpu']:.0f} CPU s). Chunk "
        f"length {plan['chunk_length']} (loop.chunk_size; temporaries are the same for any length >= 2). "
        "GB = 1e9 bytes.", "",
        "| per device | bytes | GB |", "|---|---:|---:|",
    ]
    rows = [("parameters (policies + critics, trained)", pd["parameters"]),
            ("optimizer states (AdamW)", pd["optimizer"]),
            ("frozen models (references; judge, embedder: consts)", pd["frozen"]),
            ("other (histories, counters, keys, seed prompts)", pd["other"]),
            ("= state + consts", pd["state_and_consts"]),
            ("compiled: arguments", cb["arguments"]), ("compiled: outputs", cb["outputs"]),
            ("compiled: aliased (donated state)", cb["aliased"]),
            ("compiled: temporaries", cb["temporaries"]),
            ("compiled: generated code", cb["generated_code"]),
            ("**peak estimate** = arguments + temporaries + outputs not aliased", plan["peak_bytes"])]
    lines += [f"| {name} | {b:,} | {_gb(b)} |" for name, b in rows]
    lines += ["", "| accelerator | memory | peak / memory | fits |", "|---|---:|---:|---|"]
    lines += [f"| {r['accelerator']} | {r['gb']} GB | {100 * r['fraction']:.0f}% | "
              f"{'yes' if r['fits'] else 'no'} |" for r in plan["fits"]]
    return "\n".join(lines) + "\n"


def summary_markdown(plans: list[dict]) -> str:
    """One row per plan (layouts side by side), GB per device."""
    lines = ["| layout | devices | parameters | optimizer | frozen | other | arguments | temporaries | "
             "peak | compile s (CPU s) | fits |", "|---|---:|" + "---:|" * 7 + "---:|---|"]
    for p in plans:
        pd, cb = p["per_device_bytes"], p["compiled_bytes"]
        ok = ", ".join(r["accelerator"] for r in p["fits"] if r["fits"]) or "none"
        cells = [pd["parameters"], pd["optimizer"], pd["frozen"], pd["other"], cb["arguments"],
                 cb["temporaries"], p["peak_bytes"]]
        lines.append(f"| {p['setting']}: {p['layout']['describe']} | {p['layout']['devices']} | "
                     + " | ".join(_gb(c) for c in cells)
                     + f" | {p['seconds']['compile']:.0f} ({p['seconds']['compile_cpu']:.0f}) | {ok} |")
    return "\n".join(lines) + "\n"


def write(plan: dict, run_dir: pathlib.Path) -> None:
    (run_dir / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    (run_dir / "plan.md").write_text(markdown(plan))


def main(argv=None) -> int:
    """Child process: `python -m alignjax.plan RUN_DIR` < config.yaml (the experiment's Config).
    `python -m alignjax.plan --collect RUN_DIR...`: the summary table of several plans, then each plan."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--collect":
        plans = [json.loads((pathlib.Path(d) / "plan.json").read_text()) for d in argv[1:]]
        print("# Memory plans\n\nWritten by `python -m alignjax.plan --collect` from each run folder's "
              "plan.json (alignjax/plan.py). GB per device (1e9 bytes); peak = arguments + temporaries + "
              "outputs not aliased; fits: the accelerators whose memory holds the peak.\n")
        print(summary_markdown(plans))
        for p in plans:
            print("#" + markdown(p))  # one heading level down
        return 0
    from alignjax import experiment
    from alignjax.config import build_config

    (run_dir,) = argv
    cfg = build_config(experiment.Config, yaml.safe_load(sys.stdin.read()))
    try:
        plan = measure(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad degrees, missing inputs: the parent re-raises
        print(f"{_ERROR}{e}".replace("\n", " "), file=sys.stderr)
        return 2
    write(plan, pathlib.Path(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
