"""Where a compiled function's time goes, op by op: a `jax.profiler` trace of XLA's thunks, grouped by
the HLO instruction's result shape and the jax operation that produced it (the instruction's op_name
metadata, e.g. `dot_general`, `reduce_max`, `dynamic_update_slice`).

    python -m benchmarks.op_profile decode     # the sampler at the 134M generation bench, per decode step
    python -m benchmarks.op_profile ppo        # one single-pass PPO update at the 134M PPO bench
    ALIGNJAX_BENCH_SMALL=1 python -m benchmarks.op_profile decode   # a tiny model, seconds

Not part of `make bench` (it prints no reference): it is the tool behind the profiles in
docs/benchmarks.md. Caveat, on CPU: XLA's runtime runs independent thunks concurrently and some dots
asynchronously (their "end:" event is separate), so an op's time can include waiting for a busy
thread, and the rows can sum to more than the wall time. Read the table as where to look, then time
the candidate alone.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax

SMALL = os.environ.get("ALIGNJAX_BENCH_SMALL", "") not in ("", "0")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$", re.M)


@dataclasses.dataclass(frozen=True)
class OpRow:
    """One group of HLO instructions: total milliseconds per `per` unit, the count of events."""

    ms: float
    events: int
    shape: str
    op: str


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (result shape, jax op name)} of a compiled module's text (`compiled.as_text()`).
    The jax op is the last path element of the op_name metadata, or the HLO opcode without one."""
    out = {}
    for name, shape, opcode, rest in _INSTRUCTION.findall(hlo_text):
        meta = re.search(r'op_name="([^"]*)"', rest)
        op = meta.group(1).rsplit("/", 1)[-1] if meta else opcode
        out[name] = (shape.split("{")[0], op or opcode)
    return out


def op_table(compiled, args: tuple, *, per: int = 1, top: int = 25) -> tuple[list[OpRow], float]:
    """Run `compiled(*args)` once under the profiler; returns (the `top` groups by time, each in ms
    divided by `per`, and the total ms of all grouped instructions divided by `per`)."""
    names = hlo_instructions(compiled.as_text())
    jax.block_until_ready(compiled(*args))  # warm: allocations, thread pool
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(compiled(*args))
        (path,) = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    us, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            key = names[e["name"]]
            us[key] += e["dur"]
            count[key] += 1
    if not us:
        raise RuntimeError("the trace holds no XLA instruction events: is this jax's CPU or GPU runtime?")
    rows = [OpRow(v / 1e3 / per, count[k], *k) for k, v in us.most_common(top)]
    return rows, sum(us.values()) / 1e3 / per


def print_table(title: str, rows: list[OpRow], total_ms: float, unit: str) -> None:
    print(f"{title}: {total_ms:.1f} ms of XLA instructions per {unit} (grouped by result shape and jax op)")
    print(f"  {'ms/' + unit:>10s} {'share':>6s} {'events':>7s}  shape / op")
    for r in rows:
        print(f"  {r.ms:10.3f} {r.ms / total_ms:6.1%} {r.events:7d}  {r.shape} {r.op}")


def _config():
    from alignjax.models import LMConfig

    if SMALL:
        return LMConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=4, max_position_embeddings=512)  # fmt: skip
    return LMConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                    num_kv_heads=12, max_position_embeddings=2048)  # fmt: skip


def profile_decode() -> None:
    """The generation bench's sampler call (batch 8, 64 + 128 tokens), per decode step (prefill included
    in the totals, divided over the steps like the rest)."""
    import jax.numpy as jnp
    import numpy as np

    from alignjax.models import init_params
    from alignjax.sampling import SamplingConfig, sample

    config = _config()
    b, p, n = (2, 16, 16) if SMALL else (8, 64, 128)
    params = init_params(config, jax.random.key(0))
    prompt = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, size=(b, p)), jnp.int32)
    cfg = SamplingConfig(max_new_tokens=n, temperature=0.8, top_p=0.9, repetition_penalty=1.1)
    fn = jax.jit(lambda params, prompt, key: sample(params, config, prompt, jnp.ones_like(prompt), key, cfg,
                                                    None, 0))  # fmt: skip
    args = (params, prompt, jax.random.key(1))
    rows, total = op_table(fn.lower(*args).compile(), args, per=n - 1)
    print_table(f"sampler, {config.num_params / 1e6:.0f}M, batch {b}, {p} + {n} tokens", rows, total, "step")


def profile_ppo() -> None:
    """One single-pass PPO update (policy + critic + reference) at the PPO bench's shapes."""
    import jax.numpy as jnp
    import numpy as np

    from alignjax.models import init_critic, init_params
    from alignjax.rl import (
        LlamaPlayerModels,
        OptimizerConfig,
        PPOConfig,
        Rollout,
        make_player_state,
        make_ppo_update,
    )

    config = _config()
    b, p, n = (4, 16, 32) if SMALL else (8, 64, 128)
    params = init_params(config, jax.random.key(0))
    critic = init_critic(config, jax.random.key(1), backbone=params, head_std=0.02)
    opt = OptimizerConfig(learning_rate=5e-7), OptimizerConfig(learning_rate=1.5e-6)
    state = make_player_state(params, critic, *opt)
    rng = np.random.default_rng(0)
    tokens = lambda k: jnp.asarray(rng.integers(3, config.vocab_size, size=(b, k)), jnp.int32)  # noqa: E731
    batch = Rollout(tokens(p), jnp.ones((b, p), jnp.int32), tokens(n), jnp.ones((b, n), jnp.int32),
                    jnp.asarray(rng.uniform(size=b), jnp.float32))  # fmt: skip
    update = jax.jit(make_ppo_update(LlamaPlayerModels(config), PPOConfig()))
    args = (state, jax.tree.map(jnp.copy, params), batch, jax.random.key(0))
    rows, total = op_table(update.lower(*args).compile(), args)
    title = f"single-pass PPO update, {config.num_params / 1e6:.0f}M, [{b}, {p} + {n}]"
    print_table(title, rows, total, "update")


if __name__ == "__main__":
    targets = {"decode": profile_decode, "ppo": profile_ppo}
    chosen = sys.argv[1:] or list(targets)
    unknown = [t for t in chosen if t not in targets]
    if unknown:
        raise SystemExit(f"unknown target(s) {unknown}; choose from {list(targets)}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; load average {os.getloadavg()[0]:.2f}")
    for t in chosen:
        targets[t]()
