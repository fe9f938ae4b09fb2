"""Rematerialisation of the Llama layers in the PPO update: memory against time, remat none / full / dots.

    python -m benchmarks.run_all bench_remat                  # ~30M Llama, batch 2 x (64 + 128) tokens
    ALIGNJAX_BENCH_SMALL=1 python -m benchmarks.run_all bench_remat   # smoke size, well under a minute
    BENCH_REMAT_COMPUTE=bfloat16 python -m benchmarks.run_all bench_remat   # bf16 compute, f32 params

Compiles one PPO update (`make_ppo_update` under `jax.jit`: one epoch x one minibatch, so the single
pass: the reference forward, the policy and critic forward/backward that also give the experience, and
AdamW; `PPOConfig.fuse_experience`) of the same
player for each remat policy of `LlamaPlayerModels` (`alignjax.models.precision`), and prints per
policy XLA's buffer sizes of the compiled update (`memory_analysis()`: temp = activations and other
scratch, argument = params, optimizer states, batch) and the median wall time of an update
(compilation excluded). "none" is the reference: the other rows trade its step time for temp memory.
Params are float32; compute is BENCH_REMAT_COMPUTE ("auto" by default: float32 on CPU, bfloat16 on
accelerators).
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from alignjax import backend
from alignjax.models import LMConfig, init_critic, init_params
from alignjax.models.precision import REMAT_POLICIES, PrecisionConfig
from alignjax.rl import (
    LlamaPlayerModels,
    OptimizerConfig,
    PPOConfig,
    Rollout,
    make_player_state,
    make_ppo_update,
)

SMALL = os.environ.get("ALIGNJAX_BENCH_SMALL", "") not in ("", "0")
REPEATS = int(os.environ.get("ALIGNJAX_BENCH_REPEATS", "1" if SMALL else "3"))
COMPUTE = os.environ.get("BENCH_REMAT_COMPUTE", "auto")


def _machine() -> str:
    return f"{backend.cpu_model()}, {os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.2f}"


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def main():
    if SMALL:
        config = LMConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                          num_kv_heads=4, max_position_embeddings=512)  # fmt: skip
        b, p, n = 2, 16, 32
    else:
        # A small vocabulary: the [V, D] embedding and LM-head gradients would otherwise set the peak
        # (V 16384: 65 MiB of temp whatever the remat), and remat acts on the layers' activations only.
        config = LMConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=8,
                          num_heads=8, num_kv_heads=8, max_position_embeddings=1024)  # fmt: skip
        b, p, n = 2, 64, 128
    precision = PrecisionConfig(params="float32", compute=COMPUTE).resolve(jax.default_backend())
    cfg = PPOConfig(epochs=1, num_minibatches=1, kl_coef=0.01)
    opt = OptimizerConfig(learning_rate=5e-7, warmup_steps=100)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; machine: {_machine()}")
    print(f"model: {config.num_params / 1e6:.1f}M params per network (L={config.num_layers}, "
          f"d={config.hidden_size}, F={config.intermediate_size}, V={config.vocab_size}); params "
          f"{precision.params}, compute {precision.compute}; batch {b} x ({p} prompt + {n} response) "
          f"tokens; policy + reference + critic; 1 epoch x 1 minibatch; median of {REPEATS}")  # fmt: skip

    params = init_params(config, jax.random.key(0))
    critic = init_critic(config, jax.random.key(1), backbone=params, head_std=0.02)
    ref = jax.tree.map(jnp.copy, params)
    rng = np.random.default_rng(0)
    batch = Rollout(
        jnp.asarray(rng.integers(3, config.vocab_size, size=(b, p)), jnp.int32),
        jnp.ones((b, p), jnp.int32),
        jnp.asarray(rng.integers(3, config.vocab_size, size=(b, n)), jnp.int32),
        jnp.ones((b, n), jnp.int32),
        jnp.asarray(rng.uniform(size=b), jnp.float32),
    )
    key = jax.random.PRNGKey(0)

    rows = []
    for remat in REMAT_POLICIES:
        models = LlamaPlayerModels(config, compute_dtype=precision.compute, remat=remat)
        state = make_player_state(params, critic, opt, opt)
        t = time.perf_counter()
        update = jax.jit(make_ppo_update(models, cfg)).lower(state, ref, batch, key).compile()
        t_compile = time.perf_counter() - t
        mem = update.memory_analysis()
        state, metrics = jax.block_until_ready(update(state, ref, batch, key))  # warm-up
        times = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            state, metrics = jax.block_until_ready(update(state, ref, batch, key))
            times.append(time.perf_counter() - t)
        rows.append((remat, mem, statistics.median(times), t_compile, float(metrics["policy_grad_norm"])))
        print(f"  {remat}: compiled in {t_compile:.1f}s", flush=True)

    base_temp = rows[0][1].temp_size_in_bytes if rows[0][1] is not None else None
    base_time = rows[0][2]
    print(f"{'remat':8s}{'temp MiB':>10s}{'vs none':>9s}{'args MiB':>10s}{'step s':>9s}{'vs none':>9s}"
          f"{'compile s':>11s}{'policy |g|':>12s}")  # fmt: skip
    for remat, mem, t_step, t_compile, gnorm in rows:
        temp = None if mem is None else mem.temp_size_in_bytes
        args = None if mem is None else mem.argument_size_in_bytes
        ratio = "n/a" if temp is None or not base_temp else f"{temp / base_temp:.2f}x"
        print(f"{remat:8s}{_mb(temp):>10s}{ratio:>9s}{_mb(args):>10s}{t_step:9.2f}{t_step / base_time:8.2f}x"
              f"{t_compile:11.1f}{gnorm:12.5g}")  # fmt: skip
    print(f"machine at the end: {_machine()}")


if __name__ == "__main__":
    main()
