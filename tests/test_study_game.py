"""Seeds of one experiment as one vmapped program (experiment.run_seeds) against separate runs, and
determinism: the same seed on the same machine writes bitwise the same metrics.jsonl and results.json.
A tiny synthetic game (2 steps, briefly SFT'd players) keeps it to about a minute on 2 cores."""

import copy
import json

import jax
import numpy as np
import pytest
from test_game import TINY

from alignjax import experiment as E
from alignjax import study
from alignjax.config import build_config
from alignjax.game.loop import read_metrics

CFG = copy.deepcopy(TINY)
CFG["world"].update(defender_sft_steps=5, attacker_sft_steps=5)
CFG["loop"].update(total_steps=2, chunk_size=1, check_replicas=False)
CFG["parallel"] = {"data": 2}
CFG["eval"] = {"every_chunks": 1}


def _cfg(seed):
    return build_config(E.Config, {**CFG, "seed": seed})


def _metrics(run_dir):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(run_dir)]


def _results(run_dir):
    res = json.loads((run_dir / "results.json").read_text())
    for measured in ("timing", "run", "plots", "memory", "load_average"):  # measured, not computed
        res.pop(measured, None)
    return res


def _numbers(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_numbers(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list):
        return {f"{prefix}{i}": float(v) for i, v in enumerate(tree) if isinstance(v, (int, float))}
    return {prefix: float(tree)} if isinstance(tree, (int, float)) else {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_game")
    E.run(_cfg(0), root / "sep0" / "r", progress=False)
    E.run(_cfg(0), root / "again0" / "r", progress=False)
    E.run(_cfg(1), root / "sep1" / "r", progress=False)
    E.run_seeds([_cfg(0), _cfg(1)], [root / "vm0" / "r", root / "vm1" / "r"], root / "group", progress=False)
    return root


def test_same_seed_same_machine_is_bitwise_identical(runs):
    assert _metrics(runs / "sep0" / "r") == _metrics(runs / "again0" / "r")
    assert _results(runs / "sep0" / "r") == _results(runs / "again0" / "r")
    members = [(runs / d / "r" / "defender_members.jsonl").read_text() for d in ("sep0", "again0")]
    # alternating 1/1 over 2 steps: one member, the defender after step 1
    assert members[0] == members[1] and members[0].count("\n") == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_vmapped_seeds_equal_separate_runs_within_1e6(runs, seed):
    sep, vm = _metrics(runs / f"sep{seed}" / "r"), _metrics(runs / f"vm{seed}" / "r")
    assert [r["step"] for r in sep] == [r["step"] for r in vm] and set(sep[0]) == set(vm[0])
    for a, b in zip(sep, vm, strict=True):
        np.testing.assert_allclose([b[k] for k in a], [a[k] for k in a], rtol=0, atol=1e-6)
    ra, rb = _numbers(_results(runs / f"sep{seed}" / "r")), _numbers(_results(runs / f"vm{seed}" / "r"))
    assert ra.keys() == rb.keys()
    np.testing.assert_allclose([rb[k] for k in ra], [ra[k] for k in ra], rtol=0, atol=1e-6)
    assert _metrics(runs / "vm1" / "r") != _metrics(runs / "vm0" / "r")  # two different games


def test_a_vmapped_run_records_its_seed_environment_and_every_study_metric(runs):
    res = json.loads((runs / "vm1" / "r" / "results.json").read_text())
    assert res["run"] == {"seed": 1, "vmapped_seeds": 2} and res["averaged"]["member_steps"] == [1]
    env = res["environment"]  # where it ran (alignjax.backend.describe)
    assert env["backend"] == "cpu" and env["local_device_count"] >= 2 and env["process_count"] == 1
    assert env["jax"] and env["jaxlib"] and env["accelerator_present"] == "cpu"
    # every metric a study reads is in a real results.json (this tiny world has no validation topics)
    values, curves = study.cell_values(runs / "vm1" / "r")
    missing = [m for m, v in values.items() if not np.isfinite(v) and m != "over_refusal_validation"]
    assert not missing and set(curves["eval/best_response_asr"]) == {0, 1}


def test_a_vmapped_run_killed_before_a_save_resumes_bitwise(tmp_path):
    """Seed-stacked state through run_loop(seed_dirs=): killed after a chunk, before its save, and resumed,
    it ends bitwise equal to an uninterrupted run, with each seed's metrics log equal too."""
    from test_game import random_players

    from alignjax.game.loop import run_loop, stack_seeds
    from alignjax.game.step import make_play_step
    from alignjax.settings.synthetic import SyntheticSetting
    from alignjax.worlds.synthetic import SyntheticWorld

    cfgs = [build_config(E.Config, {**CFG, "seed": s}) for s in (3, 4)]
    players = random_players(SyntheticWorld(cfgs[0].world))
    builts = [SyntheticSetting().build(c, progress=False, players=players) for c in cfgs]
    step_fn = make_play_step(builts[0].spec)
    state = stack_seeds([b.state for b in builts])
    consts = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[b.consts for b in builts])
    loop = cfgs[0].loop

    def go(name, **kw):
        d = tmp_path / name
        return run_loop(step_fn, state, loop, d, consts=consts, seed_dirs=[d / "s3", d / "s4"], **kw)

    ref = go("ref")

    def killed(step, _):
        if step == 2:  # step 1 was saved; the chunk ending at step 2 ran but is not saved
            raise KeyboardInterrupt("killed before the save of step 2")

    with pytest.raises(KeyboardInterrupt):
        go("cut", before_save=killed)
    resumed = go("cut")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ref, resumed)
    for s in ("s3", "s4"):
        assert _metrics(tmp_path / "ref" / s) == _metrics(tmp_path / "cut" / s)
    assert _metrics(tmp_path / "ref" / "s3") != _metrics(tmp_path / "ref" / "s4")


def test_vmapped_seeds_on_a_mesh_agree_with_pmap(tmp_path):
    """A study on a GPU/TPU runs its seed-stacked chunk on a mesh (parallel.mode auto -> mesh there): the
    same two seeds on a 2-device mesh end where the 2-device pmap run ends, within float tolerance, and
    log the same metrics (the step key, sampler draws and PPO permutation do not depend on the layout)."""
    from test_game import random_players

    from alignjax import parallel
    from alignjax.game.loop import run_loop, stack_seeds
    from alignjax.game.step import make_play_step
    from alignjax.settings.synthetic import SyntheticSetting
    from alignjax.worlds.synthetic import SyntheticWorld

    cfgs = [build_config(E.Config, {**CFG, "seed": s}) for s in (3, 4)]
    players = random_players(SyntheticWorld(cfgs[0].world))
    two = jax.devices()[:2]

    def go(name, mode):
        axis = parallel.DATA if mode == "pmap" else None
        builts = [SyntheticSetting().build(c, progress=False, players=players, axis_name=axis) for c in cfgs]
        state = stack_seeds([b.state for b in builts])
        consts = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[b.consts for b in builts])
        layout = parallel.make_layout(parallel.ParallelConfig(mode, data=2), devices=two)
        d = tmp_path / name
        final = run_loop(make_play_step(builts[0].spec), state, cfgs[0].loop, d, consts=consts,
                         seed_dirs=[d / "s3", d / "s4"], layout=layout)
        return final, [_metrics(d / s) for s in ("s3", "s4")]

    ref, ref_logs = go("pmap", "pmap")
    out, out_logs = go("mesh", "mesh")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                                         rtol=1e-5, atol=1e-5), ref, out)
    for a, b in zip(ref_logs, out_logs, strict=True):
        assert a and [r.keys() for r in a] == [r.keys() for r in b]
        for ra, rb in zip(a, b, strict=True):
            np.testing.assert_allclose([ra[k] for k in ra], [rb[k] for k in ra], rtol=1e-4, atol=1e-5)
