"""Where a game step's time goes: the default synthetic game, step by phase, and the host's share of a run.

    python -m benchmarks.run_all bench_game              # or: make bench
    BENCH_GAME_EXPERIMENT=gpo BENCH_GAME_STEPS=60 ...    # another experiment / a longer loop run
    ALIGNJAX_BENCH_SMALL=1 ...                           # smoke size (fewer repeats and steps)

How the split is measured (on CPU a trace of one scanned XLA program does not attribute its time to
phases reliably, so we time the phases themselves). The game step is one XLA program inside the
loop's `lax.scan` chunk. Each phase of `game.step` is jitted on its own, on the same state, shapes and
keys as the step (attacker sampling, defender sampling, the judge, the diversity rewards of the
attacker's reward (embedding + Self-BLEU + cosine against the history), the experience (policy,
reference and critic forwards + GAE, `rl.experience.compute_experience`) and the PPO optimisation
(the whole `ppo_update` minus its experience); for a player whose PPO runs in a single pass (1 epoch
x 1 minibatch, as in the real experiments) the experience row is the reference forward alone, and
the optimisation row the rest of the update), and timed as the median of repeated calls with
`block_until_ready`. The whole step is timed inside a scanned chunk of `BENCH_GAME_CHUNK` steps (the
loop's own `make_chunk_fn`, compile excluded), once in a defence stage and once in an attack stage;
what the phases do not account for is printed as "unattributed" (fusion across phases, the scan,
metrics, the history update; negative when the fused step is cheaper than its parts).

Parity: the phases, chained with the step's own key derivation, must reproduce the scanned step's
new player parameters (max |difference| printed; it fails above 1e-4 relative).

The host share is measured by running the experiment itself (`experiment.run`, evaluation every chunk,
checkpoints, metric logs) for BENCH_GAME_STEPS steps in chunks of BENCH_GAME_CHUNK: the time the loop
spent inside chunks (each chunk's `time/step_s` x its length, from metrics.jsonl) against the loop's
wall time from the end of the first chunk (which holds the compilation) to its return:
host share = 1 - (chunk seconds after the first) / (that wall time).
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

try:
    from benchmarks import summary
except ImportError:  # run as a script, python benchmarks/bench_game.py
    import summary

from alignjax import backend, experiment
from alignjax.cli import load_experiment
from alignjax.game import keys, loop
from alignjax.game import schedule as sched
from alignjax.game import step as gs
from alignjax.rewards import history as hist
from alignjax.rewards.attacker_reward import attacker_reward, similarity_to_history
from alignjax.rl.experience import Rollout, compute_experience, model_inputs, response_logprobs
from alignjax.rl.ppo import make_ppo_update
from alignjax.sampling import sample

SMALL = bool(os.environ.get("ALIGNJAX_BENCH_SMALL"))
REPEATS = int(os.environ.get("ALIGNJAX_BENCH_REPEATS", "2" if SMALL else "5"))


def median_time_and_output(fn, repeats: int):
    """(median seconds of `repeats` calls of fn, the output of the first, compiling call)."""
    out = jax.block_until_ready(fn())  # compile (and warm)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def median_time(fn, repeats: int) -> float:
    return median_time_and_output(fn, repeats)[0]


def phase_rows(t: dict) -> list[tuple[str, float, float]]:
    """(phase, defence-step s, attack-step s) from the phase timings `t` (profile_stage's keys).

    A player whose PPO runs in a single pass (`PPOConfig.single_pass`: 1 epoch x 1 minibatch) has no
    separate experience: its experience row is the reference forward (`phases`' experience function
    times that), and its optimisation row holds the rest of the update."""
    return [("attacker sampling", t["attacker_sample"], t["attacker_sample"]),
            ("defender sampling", t["defender_sample"], t["defender_sample"]),
            ("judge", t["judge"], t["judge"]),
            ("diversity rewards", 0.0, t["diversity"]),
            ("experience (forwards + GAE)", t["experience_defend"], t["experience_attack"]),
            ("PPO optimisation", t["update_defend"] - t["experience_defend"],
             t["update_attack"] - t["experience_attack"])]


def phases(spec, state, consts):
    """The step's phases as separate jitted functions, fed like `make_game_step` feeds them."""
    cfg = spec.cfg
    att, dfd = spec.attacker.models, spec.defender.models

    def attacker_sample(state, batch, k_play):
        k_att, _ = jax.random.split(k_play)
        a_in, a_mask = spec.attacker.inputs(*batch)
        out = sample(att.compute_params(state.attacker.policy_params), att.policy_config, a_in, a_mask, k_att,
                     cfg.attacker_sampling, spec.eos_id, spec.pad_id, row_offset=0, total_rows=cfg.batch_size)
        return a_in, a_mask, out.tokens, out.mask

    def defender_sample(state, x, x_mask, k_play):
        _, k_def = jax.random.split(k_play)
        x_len = hist.prompt_lengths(x, x_mask, spec.eos_id)
        x_bare = hist.length_mask(x_len, x.shape[1])
        d_in, d_mask = spec.defender.inputs(x, x_bare)
        y = sample(dfd.compute_params(state.defender.policy_params), dfd.policy_config, d_in, d_mask, k_def,
                   cfg.defender_sampling, spec.eos_id, spec.pad_id, row_offset=0, total_rows=cfg.batch_size)
        return d_in, d_mask, y.tokens, y.mask, x_len, x_bare

    def judge(x, x_bare, y, y_mask):
        return spec.referee(consts.judge, x, x_bare, y, y_mask)

    def diversity(state, x, x_len, scores):
        keep = hist.length_mask(x_len, x.shape[1]).astype(bool)
        tokens = jnp.where(keep, x, spec.pad_id).astype(jnp.int32)
        emb = None
        if cfg.use_embedding:
            emb = spec.embed(consts.embed_params, tokens, x_len).astype(jnp.float32)
        sim = similarity_to_history(state.history, tokens, x_len, emb, cfg.attacker_reward.selfbleu_form,
                                    orders=cfg.selfbleu_orders, use_selfbleu=cfg.use_selfbleu)
        return attacker_reward(cfg.attacker_reward, scores.attacker_p_safe.astype(jnp.float32),
                               scores.attacker_p_unsafe.astype(jnp.float32), sim.selfbleu, sim.cosine).reward

    def experience_of(models, ppo):
        if ppo.single_pass:  # only the reference's forward runs outside the update's gradient pass
            def reference_forward(player, ref, rollout):
                tokens, mask = model_inputs(*rollout[:4])
                return response_logprobs(models, ref, tokens, mask, rollout.response_tokens, ppo)
            return jax.jit(reference_forward)
        return jax.jit(lambda player, ref, rollout: compute_experience(
            player.policy_params, player.critic_params, ref, rollout, models=models, cfg=ppo,
            reward_moments=player.reward_moments, axis_name=None))

    return dict(
        attacker_sample=jax.jit(attacker_sample), defender_sample=jax.jit(defender_sample),
        judge=jax.jit(judge), diversity=jax.jit(diversity),
        experience_def=experience_of(dfd, cfg.defender_ppo),
        experience_att=experience_of(att, cfg.attacker_ppo),
        update_def=jax.jit(make_ppo_update(dfd, cfg.defender_ppo, None)),
        update_att=jax.jit(make_ppo_update(att, cfg.attacker_ppo, None)),
        one_step=jax.jit(loop.make_chunk_fn(gs.make_play_step(spec), 1)),  # the parity reference
    )


def profile_stage(spec, consts, f, name: str, st, t: dict) -> float:
    """Time the phases of one step from state `st` into `t`; return the parity of the new policy
    parameters against one scanned step from the same state (max relative |difference|)."""
    key = keys.step_key(st.rng, st.step)
    k_play, k_def, k_att = jax.random.split(key, 3)
    batch, _ = gs.draw_batch(consts, st.cursor, st.rng, spec.cfg.batch_size, None)
    a_in, a_mask, x, x_mask = f["attacker_sample"](st, batch, k_play)
    d_in, d_mask, y, y_mask, x_len, x_bare = f["defender_sample"](st, x, x_mask, k_play)
    scores = f["judge"](x, x_bare, y, y_mask)
    if name == "defend":
        rollout = Rollout(d_in, d_mask, y, y_mask.astype(jnp.int32), scores.defender.astype(jnp.float32))
        player, ref, k, exp_fn, upd_fn = st.defender, st.defender_ref, k_def, "experience_def", "update_def"
        # sampling and the judge cost the same in both stages: timed once
        t["attacker_sample"] = median_time(lambda: f["attacker_sample"](st, batch, k_play), REPEATS)
        t["defender_sample"] = median_time(lambda: f["defender_sample"](st, x, x_mask, k_play), REPEATS)
        t["judge"] = median_time(lambda: f["judge"](x, x_bare, y, y_mask), REPEATS)
    else:
        reward = f["diversity"](st, x, x_len, scores)
        rollout = Rollout(a_in, a_mask, x, x_mask.astype(jnp.int32), reward)
        player, ref, k, exp_fn, upd_fn = st.attacker, st.attacker_ref, k_att, "experience_att", "update_att"
        t["diversity"] = median_time(lambda: f["diversity"](st, x, x_len, scores), REPEATS)
    t[f"experience_{name}"] = median_time(lambda: f[exp_fn](player, ref, rollout), REPEATS)
    t[f"update_{name}"] = median_time(lambda: f[upd_fn](player, ref, rollout, k), REPEATS)
    new_player, _ = f[upd_fn](player, ref, rollout, k)
    # parity: one scanned step from the same state must give the same new parameters
    one = f["one_step"](st, consts)[0]
    ours = one.defender if name == "defend" else one.attacker
    a, b = jax.tree.leaves(new_player.policy_params), jax.tree.leaves(ours.policy_params)
    return max(float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-12))
               for u, v in zip(a, b, strict=True))


def profile_step(cfg, chunk_len: int) -> dict:
    setting = experiment.get_setting(cfg.setting)
    built = setting.build(cfg, progress=False, axis_name=None)  # one device, jit: the mesh's view
    spec, consts = built.spec, jax.tree.map(jnp.asarray, built.consts)
    state0 = jax.tree.map(jnp.asarray, built.state)
    schedule = spec.cfg.schedule
    attack_at = next(s for s in range(10_000) if int(sched.stage_at(s, schedule)) == sched.ATTACK)
    defend_at = next(s for s in range(10_000) if int(sched.stage_at(s, schedule)) == sched.DEFEND)
    f = phases(spec, state0, consts)

    # The whole step, inside the loop's scanned chunk (compiled once; both stages use the same program).
    chunk = jax.jit(loop.make_chunk_fn(gs.make_play_step(spec), chunk_len))
    whole, stepped = {}, {}
    for name, at in (("defend", defend_at), ("attack", attack_at)):
        start = loop._with_step(state0, jnp.asarray(at, state0.step.dtype))
        whole[name] = median_time(lambda s=start: chunk(s, consts), REPEATS) / chunk_len
        stepped[name] = start

    # The phases, on the step's own inputs and keys (the first step of each stage's chunk).
    t, out = {}, {}
    for name, st in stepped.items():
        out[f"parity_{name}"] = profile_stage(spec, consts, f, name, st, t)
    return dict(whole=whole, phases=t, parity=out, batch=spec.cfg.batch_size, chunk=chunk_len)


def host_share(cfg_overrides: list[str], name: str) -> dict:
    """Run the experiment for a few chunks and split its loop's wall time into chunks and host."""
    marks = {}
    real_run_loop = experiment.run_loop

    def timed_run_loop(*args, on_chunk_end=None, **kw):
        def hook(step, state):
            marks.setdefault("first_chunk_end", time.perf_counter())
            return on_chunk_end(step, state) if on_chunk_end is not None else None

        t0 = time.perf_counter()
        try:
            return real_run_loop(*args, on_chunk_end=hook, **kw)
        finally:
            marks["start"], marks["end"] = t0, time.perf_counter()

    cfg = load_experiment(name, cfg_overrides)[1]
    experiment.run_loop = timed_run_loop
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = pathlib.Path(tmp) / "r"
            experiment.run(cfg, run_dir, progress=False)
            records = [json.loads(ln) for p in run_dir.rglob("metrics.jsonl")
                       for ln in p.read_text().splitlines()]
    finally:
        experiment.run_loop = real_run_loop
    per_step = {r["step"]: r["time/step_s"] for r in records if "time/step_s" in r}
    chunk = cfg.loop.chunk_size
    firsts = sorted(per_step)[::1]
    first_chunk = set(firsts[:chunk])
    in_chunks = sum(v for s, v in per_step.items() if s not in first_chunk)
    wall = marks["end"] - marks["first_chunk_end"]
    steps = len(per_step) - len(first_chunk)
    return dict(wall=wall, in_chunks=in_chunks, host=wall - in_chunks, steps=steps,
                share=(wall - in_chunks) / wall, whole_run=marks["end"] - marks["start"],
                compile_chunk=sum(v for s, v in per_step.items() if s in first_chunk))


def main():
    name = os.environ.get("BENCH_GAME_EXPERIMENT", "default")
    chunk_len = int(os.environ.get("BENCH_GAME_CHUNK", "5" if SMALL else "10"))
    steps = int(os.environ.get("BENCH_GAME_STEPS", str(3 * chunk_len)))
    print(f"{backend.cpu_model()}, {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.2f} at the start; "
          f"jax {jax.__version__} on {jax.default_backend()}; medians of {REPEATS}", flush=True)
    overrides = ["loop.tensorboard=false", f"loop.chunk_size={chunk_len}", f"loop.total_steps={steps}"]
    cfg = load_experiment(name, overrides)[1]
    cfg = experiment.resolve(cfg)
    prof = profile_step(cfg, chunk_len)
    t, whole = prof["phases"], prof["whole"]
    ms = lambda s: f"{s * 1e3:9.1f} ms"
    rows = phase_rows(t)
    sums = [sum(r[1] for r in rows), sum(r[2] for r in rows)]
    print(f"\n{name}: batch {prof['batch']}; one step = time of a scanned chunk of {chunk_len} / {chunk_len} "
          "(compile excluded); phases jitted separately on the step's inputs")
    print(f"  {'phase':30s} {'defence step':>12s} {'share':>6s} {'attack step':>12s} {'share':>6s}")
    for label, d, a in rows:
        print(f"  {label:30s} {ms(d)} {d / whole['defend']:6.0%} {ms(a)} {a / whole['attack']:6.0%}")
    for label, d, a in (("unattributed", whole["defend"] - sums[0], whole["attack"] - sums[1]),
                        ("whole step (in the chunk)", whole["defend"], whole["attack"])):
        print(f"  {label:30s} {ms(d)} {d / whole['defend']:6.0%} {ms(a)} {a / whole['attack']:6.0%}")
    par = prof["parity"]
    print(f"  parity, phases vs the scanned step (max relative |diff| of the new policy params): "
          f"defence {par['parity_defend']:.1e}, attack {par['parity_attack']:.1e}")
    if max(par.values()) > 1e-4:
        raise SystemExit("bench_game: the separately jitted phases do not reproduce the scanned step")

    host = host_share(overrides, name)
    print(f"\nloop run (experiment.run: {steps} steps in chunks of {chunk_len}, evaluation every chunk, "
          f"checkpoints): whole run {host['whole_run']:.1f} s, "
          f"first chunk (compiles) {host['compile_chunk']:.1f} s")
    print(f"  after the first chunk: wall {host['wall']:.1f} s = in chunks {host['in_chunks']:.1f} s "
          f"+ host {host['host']:.1f} s (logging, evaluation, checkpoint) -> host share {host['share']:.0%}")
    steps_per_s = host["steps"] / host["wall"]
    print(f"  game steps/s {steps_per_s:.2f} (host included), "
          f"{host['steps'] / host['in_chunks']:.2f} in chunks; "
          f"load average {os.getloadavg()[0]:.2f} at the end")

    phase_ms = {label: [round(d * 1e3, 2), round(a * 1e3, 2)] for label, d, a in rows}
    phase_ms["unattributed"] = [round((whole["defend"] - sums[0]) * 1e3, 2),
                                round((whole["attack"] - sums[1]) * 1e3, 2)]
    phase_ms["whole step"] = [round(whole["defend"] * 1e3, 2), round(whole["attack"] * 1e3, 2)]
    summary.record("game_experiment", name)
    summary.record("game_phase_ms", phase_ms)  # label -> [defence step, attack step]
    summary.record("game_steps_per_s", round(steps_per_s, 3))
    summary.record("game_host_share", round(host["share"], 4))
    summary.record("game_parity_max_rel", max(par.values()))


if __name__ == "__main__":
    sys.exit(main())
