"""Exact resume of the chunked pmap loop: a run killed mid-way and restarted ends bitwise identical.

First with a tiny fake step (an Adam regression plus an all-gathered ring buffer, the same
ingredients as the game: pmean'd gradients, a replicated history, per-step keys), including a real
SIGKILL of a subprocess and a damaged latest checkpoint; the real game_step's resume test is in
tests/test_game.py.
"""

import os
import pathlib
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax.game.loop import LoopConfig, read_metrics, run_loop

TX = optax.adam(0.1)
B_LOCAL, H = 2, 16


class FakeState(NamedTuple):
    step: jax.Array
    rng: jax.Array
    w: jax.Array
    opt: optax.OptState
    hist: jax.Array  # [H, 3] ring buffer of "prompts"
    hist_count: jax.Array


def fake_init(seed=0):
    w = jnp.zeros(4)
    return FakeState(jnp.int32(0), jax.random.PRNGKey(seed), w, TX.init(w), jnp.zeros((H, 3), jnp.int32),
                     jnp.int32(0))


def fake_step(state, key, consts=None):
    kx, kp = jax.random.split(key)
    x = jax.random.normal(kx, (B_LOCAL, 4))

    def loss_fn(w):
        return jnp.mean((x @ w - 1.0) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(state.w)
    g = jax.lax.pmean(g, "data")
    upd, opt = TX.update(g, state.opt, state.w)
    prompts = jax.random.randint(kp, (B_LOCAL, 3), 0, 100)
    allp = jax.lax.all_gather(prompts, "data").reshape(-1, 3)  # same rows on every device
    idx = (state.hist_count + jnp.arange(allp.shape[0])) % H
    hist = state.hist.at[idx].set(allp)
    new = state._replace(w=optax.apply_updates(state.w, upd), opt=opt, hist=hist,
                         hist_count=state.hist_count + allp.shape[0])
    return new, {"loss": jax.lax.pmean(loss, "data")}


CFG = LoopConfig(total_steps=6, chunk_size=2, tensorboard=False)


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _metrics_wo_time(run_dir):
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in read_metrics(run_dir)]


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    final = run_loop(fake_step, fake_init(), CFG, d)
    return d, final


def test_uninterrupted_run_shapes_and_logs(reference):
    d, final = reference
    assert jax.device_count() == 8
    assert int(final.step) == 6 and int(final.hist_count) == 6 * 8 * B_LOCAL
    assert [m["step"] for m in read_metrics(d)] == list(range(6))
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["4", "6"]


def test_exception_before_save_then_resume_is_bitwise_identical(reference, tmp_path):
    ref_dir, ref_final = reference

    def die(step, state):
        if step == 4:  # chunk 2 ran, its checkpoint was never written
            raise Killed

    with pytest.raises(Killed):
        run_loop(fake_step, fake_init(), CFG, tmp_path, before_save=die)
    assert [m["step"] for m in read_metrics(tmp_path)][-1] == 3  # logged but unsaved lines
    final = run_loop(fake_step, fake_init(), CFG, tmp_path)
    assert _bits(final) == _bits(ref_final)
    assert _metrics_wo_time(tmp_path) == _metrics_wo_time(ref_dir)


def test_damaged_latest_checkpoint_resumes_from_previous(reference, tmp_path):
    _, ref_final = reference
    run_loop(fake_step, fake_init(), LoopConfig(total_steps=4, chunk_size=2, max_to_keep=3,
                                                tensorboard=False), tmp_path)
    (tmp_path / "checkpoints" / "4" / "state" / "_METADATA").unlink()
    with pytest.warns(UserWarning, match="step 4"):
        final = run_loop(fake_step, fake_init(), CFG, tmp_path)
    assert _bits(final) == _bits(ref_final)


def test_sigkilled_subprocess_resumes_bitwise(reference, tmp_path):
    """A real SIGKILL (no cleanup, no finally) after chunk 2 ran and before it was saved."""
    _, ref_final = reference
    script = textwrap.dedent(f"""
        import os, signal, sys
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
        import numpy as np
        from test_game_resume import CFG, fake_init, fake_step
        from alignjax.game.loop import run_loop
        kill = lambda step, state: os.kill(os.getpid(), signal.SIGKILL) if step == 4 else None
        run_loop(fake_step, fake_init(), CFG, {str(tmp_path)!r}, before_save=kill)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    final = run_loop(fake_step, fake_init(), CFG, tmp_path)
    assert _bits(final) == _bits(ref_final)


def test_a_checkpoint_of_another_config_is_never_restored(tmp_path):
    """The config fingerprint saved with each checkpoint must match the resuming run's."""
    short = LoopConfig(total_steps=2, chunk_size=2, tensorboard=False)
    run_loop(fake_step, fake_init(), short, tmp_path, metadata={"fingerprint": "aaaa"})
    with pytest.raises(ValueError, match="fingerprint aaaa, this run bbbb"):
        run_loop(fake_step, fake_init(), CFG, tmp_path, metadata={"fingerprint": "bbbb"})
    final = run_loop(fake_step, fake_init(), short, tmp_path, metadata={"fingerprint": "aaaa"})
    assert int(final.step) == 2  # the same config resumes (here: nothing left to run)


def test_config_fingerprint_ignores_only_what_a_resume_may_change():
    import dataclasses

    from alignjax import experiment as E

    cfg = E.Config()
    same = dataclasses.replace(cfg, resume="runs/x/1", allow_cpu=True,
                               loop=dataclasses.replace(cfg.loop, total_steps=999))
    assert E.config_fingerprint(cfg) == E.config_fingerprint(same)
    assert E.config_fingerprint(cfg) != E.config_fingerprint(dataclasses.replace(cfg, seed=1))
    other_lr = dataclasses.replace(cfg.defender, policy_optimizer=dataclasses.replace(
        cfg.defender.policy_optimizer, learning_rate=1e-3))
    assert E.config_fingerprint(cfg) != E.config_fingerprint(dataclasses.replace(cfg, defender=other_lr))
    assert E.config_fingerprint(cfg, cfg) != E.config_fingerprint(cfg)  # a seed group hashes all its configs
