"""Where a real-model game step's time goes: SmolLM2-135M-Instruct as both players (experiments/real_smollm2).

    python -m benchmarks.run_all bench_game_real        # or: make bench
    ALIGNJAX_BENCH_SMALL=1 ...                          # 8 new tokens, one repeat

The real path of bench_game's profile: the phases of `game.step` (attacker sampling, defender
sampling, the judge, the diversity rewards, the experience, the PPO optimisation) jitted one by one
(bench_game.phases) on the real_smollm2 game's state, shapes and keys, each timed as the median of
repeated calls after a compiling call. A defence step runs attacker sampling, defender sampling, the
judge, the defender's experience and optimisation; an attack step replaces the last two by the
diversity rewards and the attacker's. Both players' PPO runs in a single pass (1 epoch x 1
minibatch): the experience row is the reference forward, and the optimisation row the rest of the
update (policy and critic forwards, GAE, backwards, optimiser). The scanned step itself is not timed
here (its chunk would hold a second 7 GB state in this process): the run's own per-step times are in
its metrics.jsonl (`time/step_s`), and the README's SmolLM2 block gives them.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp

try:
    from benchmarks import summary
    from benchmarks.bench_game import median_time_and_output, phase_rows, phases
except ImportError:  # run as a script, python benchmarks/bench_game_real.py
    import summary
    from bench_game import median_time_and_output, phase_rows, phases

from alignjax import backend, experiment
from alignjax.cli import load_experiment
from alignjax.game import keys
from alignjax.game import step as gs
from alignjax.rl.experience import Rollout

SMALL = bool(os.environ.get("ALIGNJAX_BENCH_SMALL"))
REPEATS = int(os.environ.get("ALIGNJAX_BENCH_REPEATS", "1" if SMALL else "3"))


def main():
    print(f"{backend.cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at the "
          f"start; jax {jax.__version__} on {jax.default_backend()}; medians of {REPEATS}", flush=True)
    overrides = ["loop.tensorboard=false"]
    if SMALL:
        overrides += ["game.attacker_sampling.max_new_tokens=8", "game.defender_sampling.max_new_tokens=8"]
    cfg = experiment.resolve(load_experiment("real_smollm2", overrides)[1])
    t0 = time.perf_counter()
    built = experiment.get_setting(cfg.setting).build(cfg, progress=False, axis_name=None)
    spec, consts, st = built.spec, jax.tree.map(jnp.asarray, built.consts), built.state
    print(f"built in {time.perf_counter() - t0:.1f} s: batch {spec.cfg.batch_size}, "
          f"{spec.cfg.attacker_sampling.max_new_tokens} / {spec.cfg.defender_sampling.max_new_tokens} new "
          f"tokens (attacker / defender), remat {cfg.remat}, {cfg.precision.compute}", flush=True)
    f = phases(spec, st, consts)
    k_play, k_def, k_att = jax.random.split(keys.step_key(st.rng, st.step), 3)
    batch, _ = gs.draw_batch(consts, st.cursor, st.rng, spec.cfg.batch_size, None)
    t = {}

    def timed(name, fn):  # the compiling call's output feeds the next phase
        t[name], out = median_time_and_output(fn, REPEATS)
        return out

    a_in, a_mask, x, x_mask = timed("attacker_sample", lambda: f["attacker_sample"](st, batch, k_play))
    d_in, d_mask, y, y_mask, x_len, x_bare = timed(
        "defender_sample", lambda: f["defender_sample"](st, x, x_mask, k_play))
    scores = timed("judge", lambda: f["judge"](x, x_bare, y, y_mask))
    reward = timed("diversity", lambda: f["diversity"](st, x, x_len, scores))
    d_scores = scores.defender.astype(jnp.float32)
    runs = {"defend": (st.defender, st.defender_ref, k_def, "def",
                       Rollout(d_in, d_mask, y, y_mask.astype(jnp.int32), d_scores)),
            "attack": (st.attacker, st.attacker_ref, k_att, "att",
                       Rollout(a_in, a_mask, x, x_mask.astype(jnp.int32), reward))}
    for name, (player, ref, k, tag, rollout) in runs.items():
        exp_fn, upd_fn = f[f"experience_{tag}"], f[f"update_{tag}"]
        timed(f"experience_{name}", lambda e=exp_fn, p=player, r=ref, ro=rollout: e(p, r, ro))
        timed(f"update_{name}", lambda u=upd_fn, p=player, r=ref, ro=rollout, k=k: u(p, r, ro, k))
    rows = phase_rows(t)
    sums = [sum(r[1] for r in rows), sum(r[2] for r in rows)]
    print(f"\nreal_smollm2: phases jitted separately on the step's inputs (compile excluded); "
          f"prompt blocks {a_in.shape[1]} (attacker) / {d_in.shape[1]} (defender) tokens")
    print(f"  {'phase':30s} {'defence step':>12s} {'share':>6s} {'attack step':>12s} {'share':>6s}")
    for label, d, a in rows + [("sum of the phases", *sums)]:
        print(f"  {label:30s} {d:10.2f} s {d / sums[0]:6.0%} {a:10.2f} s {a / sums[1]:6.0%}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    phase_ms = {label: [round(d * 1e3, 1), round(a * 1e3, 1)] for label, d, a in rows}
    summary.record("game_real_phase_ms", phase_ms)  # label -> [defence step, attack step]
    summary.record("game_real_step_s", [round(s, 2) for s in sums])


if __name__ == "__main__":
    sys.exit(main())
