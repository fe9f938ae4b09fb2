"""Fault trials: kill a small synthetic game anywhere, resume it, and compare with an uninterrupted run.

    python tools/faults.py [--trials 10] [--seed 0] [--out runs/faults/<stamp>] [--keep]
    make faults FAULTS_ARGS="--trials 20"

What it does (docs/reliability.md):

1. An uninterrupted reference run of a small synthetic game through the CLI
   (`python -m alignjax.cli default <TINY_ARGS>`: 6 steps in 3 chunks, a checkpoint and a progress
   evaluation after each, the final evaluation and the HF export). With ALIGNJAX_FAULT_PHASE=all the
   run prints when it enters and leaves each phase (alignjax/faults.py); the tool records when.
   When the XLA compilation cache is still empty, one untimed run fills it (and the SFT cache) first,
   so that the reference's phase durations are those a trial will see.
2. N trials. Each draws a kill: a uniformly random time in [0, reference wall time], or a named
   phase (`chunk`, `save`, `eval`, `export`), one of its occurrences in the reference and a uniform
   fraction of that occurrence's duration. It starts the same command, sends SIGKILL at that moment
   (the tool kills; the run only prints where it is), notes what the kill left on disk, and resumes
   with the same command plus `resume=<run folder>`. A run killed before it made its checkpoints
   folder (start-up, SFT, initial evaluation) has nothing to resume: the tool starts it again.
3. The finished folder is compared with the reference's: the final GameState (every array of the
   last checkpoint, bitwise), metrics.jsonl (every record bitwise, without `time/step_s`, the wall
   time of a step), defender_members.jsonl and the exported HF files (bytes), and results.json
   without `timing` (wall seconds) and with the run folder's path replaced by `<run>` (plots and
   export paths name it).

It prints a table (trial, kill, resumed OK, identical, seconds lost) and writes it, with the raw
figures, to `<out>/faults.md` and `<out>/faults.json`; trial folders that matched are deleted
unless --keep. Exit status 0 when every trial resumed and matched. The XLA compilation cache
(`<cache>/xla-faults`, JAX's persistent cache) makes each run start in seconds; the reference and
the trials share it, so a difference it made would show as a mismatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alignjax import faults  # noqa: E402

NAME = "default"
# The tiny synthetic game (the sizes of tests/test_game.py's TINY): one run takes ~20 s on 2 cores
# once the SFT players and the XLA programs are cached.
TINY_ARGS = (
    "seed=3", "world.n_harmful_topics=4", "world.n_benign_topics=4", "world.n_heldout_topics=1",
    "world.n_eval_benign_topics=1", "world.seed_set=train_framings", "world.n_variants=1",
    "world.n_requests=1", "world.hidden_size=16", "world.intermediate_size=32", "world.num_layers=1",
    "world.num_heads=2", "world.num_kv_heads=1", "world.defender_sft_steps=5", "world.attacker_sft_steps=5",
    "world.sft_batch_size=8", "game.batch_size=8", "game.history_capacity=32", "game.schedule.n_def=1",
    "game.schedule.n_att=1", "game.attacker_sampling.max_new_tokens=6",
    "game.defender_sampling.max_new_tokens=6", "embedder.kind=bow", "embedder.dim=8", "loop.total_steps=6",
    "loop.chunk_size=2", "loop.tensorboard=false",
)
KINDS = ("random",) + faults.PHASES
MARK = re.compile(re.escape(faults.MARK) + r" (enter|leave) (\w+) (-?\d+) ([\d.]+)")
STARTED = re.compile(r"\[alignjax\] experiment \S+ -> (\S+)")
RUN_TIMEOUT_S = 900


# ------------------------------------------------------------------------------------------ running
@dataclasses.dataclass
class Run:
    """One CLI process: exit code, wall seconds, its run folder (relative to `cwd`), the phase
    markers it printed as (what, phase, step, tool-side seconds since start), and the kill if any."""

    cwd: pathlib.Path
    rc: int
    wall: float
    run_dir: str | None
    events: list
    killed_at: float | None = None


@dataclasses.dataclass(frozen=True)
class Kill:
    """When to kill: at `at` seconds after start (kind "random"), or `delay` seconds after the
    `occurrence`-th (0-based) entry into phase `kind`."""

    kind: str
    at: float = 0.0
    occurrence: int = 0
    delay: float = 0.0
    step: int = -1  # the step of that occurrence in the reference (for the table)

    def describe(self) -> str:
        if self.kind == "random":
            return f"random t={self.at:.1f} s"
        return f"mid-{self.kind} (step {self.step}, +{self.delay:.3f} s)"


def environment(base: dict | None = None, cache_dir: str | None = None) -> dict:
    """The trials' environment: this checkout importable, phase markers on, JAX's persistent
    compilation cache under the alignjax cache folder."""
    env = dict(os.environ if base is None else base)
    cache = pathlib.Path(cache_dir or env.get("ALIGNJAX_CACHE_DIR") or ROOT / "cache")
    env["ALIGNJAX_CACHE_DIR"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache / "xla-faults")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env[faults.ENV] = "all"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(cwd: pathlib.Path, env: dict, extra=(), kill: Kill | None = None, log=None) -> Run:
    """Run `python -m alignjax.cli NAME TINY_ARGS extra` in `cwd` (where it writes runs/NAME/<stamp>),
    sending SIGKILL as `kill` says; the output goes to the file `log`."""
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "alignjax.cli", NAME, *TINY_ARGS, *extra]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    events, found, seen = [], {}, threading.Event()
    out = open(log, "wb") if log else None

    def read():
        for raw in iter(proc.stdout.readline, b""):
            now = time.monotonic() - t0
            if out:
                out.write(raw)
            line = raw.decode(errors="replace")
            if m := MARK.search(line):
                events.append((m[1], m[2], int(m[3]), now))
                if kill is not None and m[1] == "enter" and m[2] == kill.kind:
                    if sum(e[0] == "enter" and e[1] == kill.kind for e in events) == kill.occurrence + 1:
                        seen.set()
            elif m := STARTED.search(line):
                found["run_dir"] = m[1]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed_at = None
    try:
        if kill is not None:
            if kill.kind == "random":
                wait = kill.at
            else:
                while not seen.wait(0.05) and proc.poll() is None:
                    pass
                wait = kill.delay if seen.is_set() else None
            if wait is not None:
                try:
                    proc.wait(timeout=max(0.0, t0 + wait - time.monotonic()) if kill.kind == "random"
                              else wait)
                except subprocess.TimeoutExpired:
                    killed_at = time.monotonic() - t0
                    os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        if out:
            out.close()
    return Run(cwd, rc, time.monotonic() - t0, found.get("run_dir"), events, killed_at)


def occurrences(run: Run) -> dict[str, list[tuple[int, float]]]:
    """{phase: [(step, seconds inside), ...]} in order, from a run's markers."""
    occ, open_ = {}, {}
    for what, name, step, t in run.events:
        if what == "enter":
            open_[name] = (step, t)
        elif name in open_:
            s, t_in = open_.pop(name)
            occ.setdefault(name, []).append((s, t - t_in))
    return occ


def phase_at(run: Run, t: float) -> str:
    """Which phase a run was in at tool time `t` (from its markers)."""
    inside = None
    for what, name, step, te in run.events:
        if te > t:
            break
        inside = (name, step) if what == "enter" else None
    return f"{inside[0]} @ step {inside[1]}" if inside else "between phases"


# ------------------------------------------------------------------------------------------ planning
# The kill comes a uniform fraction (up to this) of the reference's duration after the phase begins.
# A chunk or an evaluation of the tiny game lasts tens of milliseconds and varies from run to run by
# as much: the first half lands inside it. Nothing is written in them, so any moment inside is alike.
FRACTION = {"chunk": 0.5, "eval": 0.5, "save": 1.0, "export": 1.0}


def plan_trials(n: int, seed: int, ref: Run) -> list[Kill]:
    """n kills drawn with `random.Random(seed)`: the kind uniformly from KINDS; for a phase, one of its
    occurrences in the reference and a uniform fraction (FRACTION) of its duration; for "random", a
    uniform time within the reference's wall time."""
    rng, occ = random.Random(seed), occurrences(ref)
    plans = []
    for _ in range(n):
        kind = rng.choice([k for k in KINDS if k == "random" or occ.get(k)])
        if kind == "random":
            plans.append(Kill("random", at=rng.uniform(0.0, ref.wall)))
        else:
            i = rng.randrange(len(occ[kind]))
            step, seconds = occ[kind][i]
            delay = rng.uniform(0.0, FRACTION[kind]) * seconds
            plans.append(Kill(kind, occurrence=i, delay=delay, step=step))
    return plans


# ----------------------------------------------------------------------------------------- comparing
def final_state(run_dir: pathlib.Path) -> tuple[int, dict]:
    """(step, {leaf path: array}) of the newest checkpoint, read by Orbax without a target."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    tree = ocp.StandardCheckpointer().restore((run_dir / "checkpoints" / str(steps[-1]) / "state").absolute())
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return steps[-1], {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def metric_records(run_dir: pathlib.Path) -> list[str]:
    """metrics.jsonl as canonical JSON lines without time/* (wall time), NaN spelled out."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.dumps({k: v for k, v in json.loads(ln).items() if not k.startswith("time/")}, sort_keys=True)
            for ln in lines if ln.strip()]


def results_view(run_dir: pathlib.Path, rel: str) -> str:
    """results.json without `timing`, the run folder's path replaced by `<run>`."""
    def norm(x):
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items()}
        if isinstance(x, list):
            return [norm(v) for v in x]
        return x.replace(rel, "<run>") if isinstance(x, str) else x

    results = json.loads((run_dir / "results.json").read_text())
    results.pop("timing", None)
    results.pop("memory", None)  # peak RSS: measured, differs between any two runs
    results.pop("load_average", None)  # likewise
    return json.dumps(norm(results), sort_keys=True)


def files_of(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.is_dir() else {}


def differences(ref_cwd: pathlib.Path, ref_rel: str, cwd: pathlib.Path, rel: str) -> list[str]:
    """What differs between two finished run folders (empty: identical)."""
    a, b = ref_cwd / ref_rel, cwd / rel
    if not (b / "results.json").exists():
        return ["no results.json"]
    diffs = []
    (sa, ta), (sb, tb) = final_state(a), final_state(b)
    if sa != sb or ta.keys() != tb.keys() or any(
            ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or ta[k].tobytes() != tb[k].tobytes()
            for k in ta):
        diffs.append(f"state (step {sa} vs {sb})")
    if metric_records(a) != metric_records(b):
        diffs.append("metrics.jsonl")
    if results_view(a, ref_rel) != results_view(b, rel):
        diffs.append("results.json")
    for name in ("defender_members.jsonl",):
        if files_of(a).get(name) != files_of(b).get(name):
            diffs.append(name)
    if files_of(a / "export") != files_of(b / "export"):
        diffs.append("export/")
    return diffs


# ------------------------------------------------------------------------------------------- trials
@dataclasses.dataclass
class Trial:
    index: int
    kill: Kill
    landed: str  # where the kill landed (phase, or "run finished first")
    on_disk: str  # what the kill left in checkpoints/
    resumed: str  # "resume=", "restarted (nothing saved)", "not needed"
    resumed_ok: bool
    diffs: list
    seconds_lost: float


def disk_after_kill(cwd: pathlib.Path, rel: str | None) -> str:
    """Committed steps and leftovers in the killed run's checkpoints folder."""
    ck = cwd / rel / "checkpoints" if rel else None
    if ck is None or not ck.is_dir():
        return "no checkpoints folder"
    names = sorted(p.name for p in ck.iterdir())
    steps = sorted(int(n) for n in names if n.isdigit())
    tmp = [n.split(".")[0] for n in names if "tmp" in n]
    return f"steps {steps}" + (f", unfinished save of step {', '.join(tmp)}" if tmp else "")


def reference(out: pathlib.Path, env: dict) -> Run:
    """The uninterrupted run (after an untimed warm-up run when the XLA cache is empty)."""
    xla = pathlib.Path(env["JAX_COMPILATION_CACHE_DIR"])
    if not xla.is_dir() or not any(xla.iterdir()):
        print(f"[faults] warming the SFT and XLA caches ({xla}): one untimed run", flush=True)
        warm = run_cli(out / "warmup", env, log=out / "warmup.log")
        if warm.rc != 0:
            raise SystemExit(f"[faults] the warm-up run failed (exit {warm.rc}); see {out / 'warmup.log'}")
        shutil.rmtree(out / "warmup")
    ref = run_cli(out / "reference", env, log=out / "reference.log")
    if ref.rc != 0 or ref.run_dir is None:
        raise SystemExit(f"[faults] the reference run failed (exit {ref.rc}); see {out / 'reference.log'}")
    return ref


def run_trial(index: int, kill: Kill, out: pathlib.Path, ref: Run, env: dict) -> Trial:
    """Kill, resume, compare (see the module docstring)."""
    cwd = out / f"trial-{index:02d}"
    first = run_cli(cwd, env, kill=kill, log=cwd.with_suffix(".killed.log"))
    rel = first.run_dir
    if first.killed_at is None:
        landed, on_disk = f"run finished first (exit {first.rc})", "-"
        second, how = None, "not needed"
    else:
        landed = phase_at(first, first.killed_at)
        on_disk = disk_after_kill(cwd, rel)
        if rel is not None and (cwd / rel / "checkpoints").is_dir():
            how, extra = "resume=", (f"resume={rel}",)
        else:
            how, extra = "restarted (nothing saved)", ()
        second = run_cli(cwd, env, extra=extra, log=cwd.with_suffix(".resumed.log"))
        if how != "resume=":
            rel = second.run_dir
    last = second or first
    ok = last.rc == 0 and rel is not None and (cwd / rel / "results.json").exists()
    diffs = differences(ref.cwd, ref.run_dir, cwd, rel) if ok else ["did not finish"]
    lost = first.wall + (second.wall if second else 0.0) - ref.wall
    return Trial(index, kill, landed, on_disk, how, ok, diffs, lost)


def table(trials: list[Trial]) -> str:
    rows = ["| trial | kill | landed in | left on disk | resumed OK | identical | seconds lost |",
            "|---|---|---|---|---|---|---|"]
    for t in trials:
        rows.append(f"| {t.index} | {t.kill.describe()} | {t.landed} | {t.on_disk} | "
                    f"{'yes' if t.resumed_ok else 'NO'} ({t.resumed}) | "
                    f"{'yes' if not t.diffs else 'NO: ' + ', '.join(t.diffs)} | {t.seconds_lost:+.1f} |")
    same = sum(not t.diffs for t in trials)
    ok = sum(t.resumed_ok for t in trials)
    rows.append(f"\n{same}/{len(trials)} identical, {ok}/{len(trials)} resumed OK.")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill draws")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="default runs/faults/<stamp>")
    parser.add_argument("--keep", action="store_true", help="keep the run folders of matching trials")
    args = parser.parse_args(argv)
    t_start = time.monotonic()
    out = args.out or ROOT / "runs" / "faults" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"[faults] {args.trials} trials of `python -m alignjax.cli {NAME} <tiny game>` -> {out}",
          flush=True)
    ref = reference(out, env)
    print(f"[faults] reference: {ref.wall:.1f} s, phases {sorted(occurrences(ref))}", flush=True)
    trials = []
    for i, kill in enumerate(plan_trials(args.trials, args.seed, ref), start=1):
        t = run_trial(i, kill, out, ref, env)
        trials.append(t)
        print(f"[faults] trial {i}: {kill.describe()} -> landed in {t.landed}; "
              f"{'identical' if not t.diffs else 'DIFFERS: ' + ', '.join(t.diffs)}", flush=True)
        if not t.diffs and not args.keep:
            shutil.rmtree(out / f"trial-{i:02d}", ignore_errors=True)
    wall = time.monotonic() - t_start
    text = table(trials)
    header = (f"# Fault trials, {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n"
              f"`python tools/faults.py --trials {args.trials} --seed {args.seed}`: the tiny synthetic game "
              f"(`{NAME}` with {' '.join(TINY_ARGS)}), reference run {ref.wall:.1f} s, all trials "
              f"{wall:.0f} s wall on {os.cpu_count()} CPU cores. Compared: the final GameState (bitwise), "
              "metrics.jsonl (bitwise, without time/step_s), defender_members.jsonl and export/ (bytes), "
              "results.json (without `timing`; the run folder's path read as `<run>`).\n\n")
    (out / "faults.md").write_text(header + text)
    (out / "faults.json").write_text(json.dumps(
        {"wall_s": wall, "reference_wall_s": ref.wall, "reference_phases": occurrences(ref),
         "trials": [dataclasses.asdict(t) for t in trials]}, indent=2))
    print("\n" + text + f"\n[faults] wall time {wall:.0f} s; table in {out / 'faults.md'}", flush=True)
    return 0 if all(t.resumed_ok and not t.diffs for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
