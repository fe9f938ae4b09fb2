"""The parallel layer on 8 fake CPU devices: layouts, partition rules, and the game under a mesh.

- Layout checks reject bad meshes and degrees before anything compiles, naming the axis and sizes.
- Partition rules: Llama weights split as the table in parallel/rules.py says, Adam moments follow
  their params, and per-device parameter bytes (from `addressable_shards`) shrink by fsdp x tensor.
- The tiny game in `mesh` mode (data 2 x fsdp 4; data 1 x fsdp 2 x tensor 4) computes the same
  metrics and final state as `pmap` mode over 8 devices and as one device, within 1e-5 (the
  reference is the pmap/one-device run: GSPMD's collectives only change the summation order).
- A mesh run killed after its first chunk resumes bitwise; its checkpoint restores onto another mesh
  shape (saved on fsdp 4, continued on fsdp 2 x tensor 4) and ends where that layout's own run ends.
- Multi-host on JAX's own runtime: two processes on localhost (gloo CPU collectives), 4 fake devices
  each, play the game on one data 2 x fsdp 4 mesh over all 8 devices; their metrics (written by
  process 0) and final state equal the one-process 8-device run's, and the checkpoint both processes
  wrote (each its shards) restores in one process.

The game tests share compiled runs through module fixtures (the Makefile runs pytest with
--dist loadfile, so a module's fixtures are built once).
"""

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest
from test_game import TINY, random_players

from alignjax import experiment as E
from alignjax import parallel
from alignjax.checkpoint import CheckpointStore
from alignjax.config import build_config
from alignjax.game.loop import read_metrics, run_loop
from alignjax.game.step import make_play_step
from alignjax.models import llama
from alignjax.models.config import LMConfig
from alignjax.rl.state import OptimizerConfig, make_optimizer
from alignjax.settings.synthetic import SyntheticSetting
from alignjax.worlds.synthetic import SyntheticWorld

MESH_A = parallel.ParallelConfig("mesh", data=2, fsdp=4, tensor=1)
MESH_B = parallel.ParallelConfig("mesh", data=1, fsdp=2, tensor=4)
LM = LMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=8, num_kv_heads=4)


# ------------------------------------------------------------------------------ layout checks


@pytest.mark.parametrize("cfg,match", [
    (dict(mode="mesh", data=3, fsdp=2), "3 x 2 x 1 = 6 devices, but there are 8"),
    (dict(mode="mesh", fsdp=3), "fsdp x tensor = 3 x 1 = 3 does not divide the 8 devices"),
    (dict(mode="pmap", data=16), "parallel.data=16 but this process has only 8"),
    (dict(mode="mesh", data=3, fsdp=0), "data x tensor = 3 x 1 does not divide the 8 devices"),
])
def test_layout_rejects_a_mesh_that_does_not_match_the_devices(cfg, match):
    with pytest.raises(ValueError, match=match):
        parallel.make_layout(parallel.ParallelConfig(**cfg))


def test_fsdp_zero_takes_the_devices_the_other_axes_leave():
    assert dict(parallel.make_layout(parallel.ParallelConfig("mesh", data=1, fsdp=0)).mesh.shape) == \
        {"data": 1, "fsdp": 8, "tensor": 1}
    layout = parallel.make_layout(parallel.ParallelConfig("mesh", data=2, fsdp=0, tensor=2))
    assert dict(layout.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_config_rejects_sharding_axes_in_pmap_mode_and_bad_degrees():
    with pytest.raises(ValueError, match="fsdp=2 and tensor=1 need parallel.mode=mesh"):
        parallel.ParallelConfig("pmap", fsdp=2)
    with pytest.raises(ValueError, match="fsdp >= 0"):
        parallel.ParallelConfig("mesh", fsdp=-1)
    with pytest.raises(ValueError, match="choose one of"):
        parallel.ParallelConfig("fsdp")


@pytest.mark.parametrize("cfg,batch,lm,match", [
    (MESH_A, 12, LM, r"batch_size=12 is not divisible by the 8 batch shards \(data x fsdp = 2 x 4\)"),
    (MESH_B, 8, LMConfig(64, 32, 64, 2, 4, 2), "tensor=4 does not divide the defender's num_kv_heads=2"),
    (MESH_B, 8, LMConfig(64, 32, 64, 2, 2, 2), "tensor=4 does not divide the defender's num_heads=2"),
    (parallel.ParallelConfig("mesh", 1, 8, 1), 8, LMConfig(64, 36, 64, 2, 4, 4),
     "fsdp=8 does not divide the defender's hidden_size=36"),
    (parallel.ParallelConfig("pmap"), 12, LM, "batch_size=12 is not divisible by the 8 batch shards"),
])
def test_degrees_that_do_not_divide_the_model_or_batch_are_rejected(cfg, batch, lm, match):
    with pytest.raises(ValueError, match=match):
        parallel.check_model_fits_layout(parallel.make_layout(cfg), batch, {"defender": lm})


def test_distributed_settings_come_from_the_config_or_the_environment(monkeypatch):
    from alignjax.parallel import distributed

    for var in distributed.ENV.values():
        monkeypatch.delenv(var, raising=False)
    assert distributed.settings() is None  # one process: no start-up
    assert distributed.settings("auto") == {}  # TPU slice / SLURM: JAX detects everything
    monkeypatch.setenv("ALIGNJAX_COORDINATOR", "10.0.0.2:8476")
    monkeypatch.setenv("ALIGNJAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("ALIGNJAX_PROCESS_ID", "3")
    want = {"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3}
    assert distributed.settings() == want
    assert distributed.settings("h:1", 2, 0)["coordinator_address"] == "h:1"  # the config wins
    with pytest.raises(ValueError, match="got num_processes=2 process_id=5"):
        distributed.settings("h:1", 2, 5)
    monkeypatch.delenv("ALIGNJAX_COORDINATOR")
    with pytest.raises(ValueError, match="num_processes=4 needs parallel.coordinator"):
        distributed.settings()


# ------------------------------------------------------------------------------ partition rules


def test_rules_split_llama_weights_and_adam_moments_follow_their_params():
    layout = parallel.make_layout(MESH_B)
    params = llama.init_params(LM, jax.random.PRNGKey(0))
    opt = make_optimizer(OptimizerConfig())
    tree = {"params": params, "opt": opt.init(params)}
    shardings = parallel.state_shardings(tree, layout.mesh)
    specs = jax.tree.map(lambda s: tuple(s.spec), shardings)
    p = specs["params"]
    assert p["layers"]["wq"] == (None, "fsdp", "tensor") and p["layers"]["wk"] == (None, "fsdp", "tensor")
    assert p["layers"]["wo"] == (None, "tensor", "fsdp") and p["layers"]["w_down"] == (None, "tensor", "fsdp")
    assert p["layers"]["w_up"] == (None, "fsdp", "tensor") and p["layers"]["attn_norm"] == ()
    assert p["embed"] == ("tensor", "fsdp") and p["lm_head"] == ("fsdp", "tensor") and p["final_norm"] == ()
    moments = [(jax.tree_util.keystr(path), tuple(s.spec))
               for path, s in jax.tree_util.tree_leaves_with_path(shardings["opt"])]
    wq_moments = [s for path, s in moments if "wq" in path]
    assert len(wq_moments) == 2 and all(s == (None, "fsdp", "tensor") for s in wq_moments), moments
    scalars = [s for path, s in moments if "count" in path]
    assert scalars and all(s == () for s in scalars), moments


def test_per_device_parameter_bytes_shrink_by_fsdp_times_tensor():
    params = llama.init_params(LM, jax.random.PRNGKey(0))
    full = sum(x.nbytes for x in jax.tree.leaves(params))
    for cfg in (MESH_A, MESH_B):
        layout = parallel.make_layout(cfg)
        shardings = parallel.state_shardings(params, layout.mesh)
        placed = parallel.place(params, shardings)
        split = cfg.fsdp * cfg.tensor
        per_device = parallel.bytes_per_device(placed)  # measured from the arrays' own shards
        assert per_device == parallel.bytes_per_device(params, shardings)  # the plan's count agrees
        norms = (params["layers"]["attn_norm"], params["layers"]["mlp_norm"], params["final_norm"])
        unsplit = sum(x.nbytes for x in norms)  # replicated by the rules
        assert per_device == pytest.approx((full - unsplit) / split + unsplit, rel=1e-6)
        f, t = cfg.fsdp, cfg.tensor  # wq [L, D 32, Hq*hd 32], w_down [L, F 64, D 32]
        chex.assert_shape(placed["layers"]["wq"].addressable_shards[0].data, (2, 32 // f, 32 // t))
        chex.assert_shape(placed["layers"]["w_down"].addressable_shards[0].data, (2, 64 // t, 32 // f))
        np.testing.assert_array_equal(np.asarray(placed["layers"]["wq"]), np.asarray(params["layers"]["wq"]))


# ------------------------------------------------------------------------------ the game



CFG = copy.deepcopy(TINY)
CFG["world"].update(hidden_size=32, intermediate_size=64, num_heads=8, num_kv_heads=4)
CFG["game"].update(batch_size=16,  # 2 rows per device; 2 minibatches of a global permutation
                   defender_ppo={"epochs": 2, "num_minibatches": 2},
                   attacker_ppo={"epochs": 2, "num_minibatches": 2})
CFG["loop"].update(check_replicas=False)


@pytest.fixture(scope="module")
def mesh_game():
    cfg = build_config(E.Config, CFG)
    players = random_players(SyntheticWorld(cfg.world))
    games = {}
    for axis_name in ("data", None):
        built = SyntheticSetting().build(cfg, progress=False, players=players, axis_name=axis_name)
        games[axis_name] = (built, make_play_step(built.spec))
    return cfg, games


def _run(mesh_game, pcfg, run_dir, **kw):
    cfg, games = mesh_game
    layout = parallel.make_layout(pcfg)
    built, step_fn = games[None if layout.is_mesh else "data"]
    models = {"defender": built.spec.defender.models.policy_config}
    parallel.check_model_fits_layout(layout, cfg.game.batch_size, models)
    final = run_loop(step_fn, built.state, cfg.loop, run_dir, consts=built.consts, layout=layout, **kw)
    return parallel.to_host(final), read_metrics(run_dir), final


def _assert_close(a, b, atol=1e-5):
    (sa, ma), (sb, mb) = a, b
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb, strict=True):
        for k, v in ra.items():
            if not k.startswith("time/"):
                assert v == pytest.approx(rb[k], abs=atol), (ra["step"], k)
    chex.assert_trees_all_close(sa, sb, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def pmap_run(mesh_game, tmp_path_factory):
    s, m, _ = _run(mesh_game, parallel.ParallelConfig("pmap", 8), tmp_path_factory.mktemp("pmap8"))
    return s, m


@pytest.fixture(scope="module")
def mesh_a_run(mesh_game, tmp_path_factory):
    s, m, final = _run(mesh_game, MESH_A, tmp_path_factory.mktemp("mesh_a"))
    return s, m, final


def test_mesh_data_fsdp_equals_pmap(pmap_run, mesh_a_run):
    s, m, final = mesh_a_run
    wq = final.defender.policy_params["layers"]["wq"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # 4 divides D=32, tensor is 1
    chex.assert_shape(wq.addressable_shards[0].data, (1, 32 // 4, 32))
    assert len(m) == 4 and {"defender/ppo/policy_loss", "attacker/reward"} <= set().union(*m)
    _assert_close(pmap_run, (s, m))


def test_mesh_with_tensor_parallel_equals_pmap_and_restores_another_mesh(mesh_game, pmap_run, mesh_a_run,
                                                                          tmp_path):
    s, m, final = _run(mesh_game, MESH_B, tmp_path / "b")
    wo = final.attacker.policy_params["layers"]["wo"]
    assert wo.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    _assert_close(pmap_run, (s, m))
    # a checkpoint written on data 2 x fsdp 4 (step 2) continues on data 1 x fsdp 2 x tensor 4
    d = tmp_path / "a_then_b"

    def stop(step, state):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(mesh_game, MESH_A, d, before_save=stop)
    s2, m2, final2 = _run(mesh_game, MESH_B, d)
    assert final2.attacker.policy_params["layers"]["wo"].sharding.spec == wo.sharding.spec
    _assert_close((s, m), (s2, m2))


def test_mesh_run_killed_after_a_chunk_resumes_bitwise(mesh_game, mesh_a_run, tmp_path):
    def stop(step, state):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(mesh_game, MESH_A, tmp_path, before_save=stop)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    s, m, _ = _run(mesh_game, MESH_A, tmp_path)
    ref_s, ref_m, _ = mesh_a_run
    chex.assert_trees_all_equal(ref_s, s)
    assert [{k: v for k, v in r.items() if not k.startswith("time/")} for r in m] == \
        [{k: v for k, v in r.items() if not k.startswith("time/")} for r in ref_m]


WORKER = textwrap.dedent("""
    import json, os, sys
    sys.path[:0] = [{tests!r}, {root!r}]
    import jax, numpy as np
    from alignjax import parallel
    from alignjax.parallel import distributed
    pid = int(sys.argv[1])
    distributed.initialize(coordinator="localhost:{port}", num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
    from jax.experimental import multihost_utils
    from test_game import random_players
    from alignjax import experiment as E
    from alignjax.config import build_config
    from alignjax.game.loop import run_loop
    from alignjax.game.step import make_play_step
    from alignjax.settings.synthetic import SyntheticSetting
    from alignjax.worlds.synthetic import SyntheticWorld
    cfg = build_config(E.Config, json.loads(open({cfg_path!r}).read()))
    built = SyntheticSetting().build(cfg, progress=False, players=random_players(SyntheticWorld(cfg.world)),
                                     axis_name=None)
    layout = parallel.make_layout(parallel.ParallelConfig("mesh", data=2, fsdp=4))
    final = run_loop(make_play_step(built.spec), built.state, cfg.loop, {run_dir!r}, consts=built.consts,
                     layout=layout)
    host = multihost_utils.process_allgather(final, tiled=True)
    if pid == 0:
        np.savez({out!r}, *[np.asarray(x) for x in jax.tree.leaves(host)])
    print("worker", pid, "done", flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_eight_devices(mesh_a_run, tmp_path):
    cfg_path, run_dir, out = tmp_path / "cfg.json", tmp_path / "run", tmp_path / "final.npz"
    cfg_path.write_text(json.dumps(CFG))
    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=tests, root=os.path.dirname(tests), port=_free_port(),
                                    cfg_path=str(cfg_path), run_dir=str(run_dir), out=str(out)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(script), str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"worker {i} failed:\n{log[-3000:]}"
    multi_metrics = read_metrics(run_dir)
    assert len(multi_metrics) == 4  # process 0 wrote one line per step, process 1 none on top

    ref_state, ref_metrics, _ = mesh_a_run  # one process, 8 devices, the same mesh
    leaves = list(np.load(out).values())
    multi_state = jax.tree.unflatten(jax.tree.structure(ref_state), leaves)
    _assert_close((ref_state, ref_metrics), (multi_state, multi_metrics))
    # the checkpoint both processes wrote (each its shards) restores here, in one process: whole on one
    # device (what a pmap resume reads) and sharded on the 8-device mesh
    store = CheckpointStore(run_dir / "checkpoints")
    whole = store.restore(ref_state)
    mesh = parallel.make_layout(MESH_A).mesh
    sharded = store.restore(ref_state, shardings=parallel.state_shardings(ref_state, mesh))
    store.close()
    assert whole.step == sharded.step == 4
    chex.assert_trees_all_equal(whole.tree, multi_state)
    chex.assert_trees_all_equal(parallel.to_host(sharded.tree), multi_state)
