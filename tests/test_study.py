"""The study runner (alignjax/study.py): configs checked before anything runs, failures recorded,
resume skips finished cells, aggregates with n, claims' verdicts, the Markdown, and the committed
summaries behind the README (rendered again here, compared with README.md)."""

import json
import pathlib
import re

import numpy as np
import pytest

from alignjax import experiment, study
from alignjax.config import ConfigError, build_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _cfg(**kw):
    arms = [{"name": "a", "experiment": "default"}, {"name": "b", "experiment": "rlhf"}]
    tree = {"title": "t", "arms": arms,
            "seeds": [0, 1], "steps": 2, "vmap": True, "n_resamples": 2000, "min_seeds": 2,
            "claims": [{"name": "c", "a": "a", "b": "b", "metric": "best_response_asr"}]}
    return build_config(study.Config, tree | kw)


@pytest.mark.parametrize("change, words", [
    ({"arms": [{"name": "a", "experiment": "nope"}], "claims": []}, ["a-s0", "nope"]),
    ({"arms": [{"name": "a", "experiment": "default", "overrides": {"game": {"bogus": 1}}}], "claims": []},
     ["a-s0", "bogus"]),
    ({"arms": [{"name": "a", "experiment": "default", "overrides": {"loop": {"chunk_size": 0}}}],
      "claims": []}, ["a-s0", "chunk_size"]),
    ({"claims": [{"name": "c", "a": "a", "b": "zz", "metric": "best_response_asr"}]}, ["'c'", "zz"]),
    ({"claims": [{"name": "c", "a": "a", "b": "b", "metric": "nope"}]}, ["'c'", "nope"]),
    ({"seeds": [0, 0]}, ["unique"]),
    ({"steps": -1}, ["steps"]),
])
def test_bad_study_configs_fail_before_running_naming_the_cell_and_key(tmp_path, change, words):
    with pytest.raises(ConfigError) as e:
        study.plan(_cfg(**change), tmp_path)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "cells").exists()


def test_plan_builds_each_cell_with_its_seed_steps_and_overrides(tmp_path):
    arm = {"name": "j", "experiment": "rlhf", "overrides": {"world": {"seed_set": "train_framings"}}}
    cfg = _cfg(arms=[arm], claims=[])
    cells = study.plan(cfg, tmp_path)
    assert [c.name for c in cells] == ["j-s0", "j-s1"]
    assert [c.cfg.seed for c in cells] == [0, 1]
    assert all(c.cfg.loop.total_steps == 2 and c.cfg.loop.chunk_size == 2 for c in cells)
    assert all(c.cfg.world.seed_set == "train_framings" and c.cfg.game.schedule.mode == "defend_only"
               for c in cells)


def _fake_results(value: float) -> dict:
    out: dict = {}
    for i, (path, _, _) in enumerate(study.METRICS.values()):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value + i
    return out


VALUES = {("a", 0): 0.1, ("a", 1): 0.3, ("a", 2): 0.2, ("b", 0): 0.8, ("b", 1): 0.9, ("b", 2): 0.7}


def _fake_runners(monkeypatch, calls, fail_arm=None):
    def write(cell_dir, arm, seed):
        if arm == fail_arm:
            raise RuntimeError("boom in " + arm)
        d = pathlib.Path(cell_dir)
        (d / "results.json").write_text(json.dumps(_fake_results(VALUES[arm, seed])))
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"step": t, "attack_success": VALUES[arm, seed] * t, "eval/best_response_asr": 0.5})
            + "\n" for t in range(3)))

    def run_seeds(cfgs, dirs, group_dir, progress=True):
        calls.append(("vmapped", [pathlib.Path(d).name for d in dirs]))
        for c, d in zip(cfgs, dirs, strict=True):
            write(d, pathlib.Path(d).name.split("-s")[0], c.seed)

    def run(cfg, run_dir, progress=True):
        calls.append(("separate", [pathlib.Path(run_dir).name]))
        write(run_dir, pathlib.Path(run_dir).name.split("-s")[0], cfg.seed)

    monkeypatch.setattr(experiment, "run_seeds", run_seeds)
    monkeypatch.setattr(experiment, "run", run)


def test_failures_are_recorded_and_resume_runs_only_unfinished_cells(tmp_path, monkeypatch):
    calls = []
    _fake_runners(monkeypatch, calls, fail_arm="b")
    cfg = _cfg(seeds=[0, 1, 2])
    summary = study.run(cfg, tmp_path, progress=False)
    # b's vmapped group fails, then each of its seeds is tried on its own (and fails too)
    assert calls == [("vmapped", ["a-s0", "a-s1", "a-s2"]), ("vmapped", ["b-s0", "b-s1", "b-s2"]),
                     ("separate", ["b-s0"]), ("separate", ["b-s1"]), ("separate", ["b-s2"])]
    assert summary["arms"]["b"]["metrics"]["best_response_asr"]["n"] == 0
    assert summary["arms"]["b"]["failed"]["0"].startswith("RuntimeError: boom in b")
    assert (tmp_path / "cells" / "b-s1" / "FAILED.txt").exists()
    md = (tmp_path / "study.md").read_text()
    assert "(n=0/3)" in md and "Cells without results" in md and "inconclusive" in md

    calls.clear()
    _fake_runners(monkeypatch, calls)
    (tmp_path / "cells" / "a-s1" / "results.json").unlink()  # an interrupted cell
    resumed = build_config(study.Config, {**json.loads(json.dumps(_tree(cfg))), "resume": str(tmp_path)})
    summary = study.run(resumed, tmp_path / "new", progress=False)
    assert calls == [("separate", ["a-s1"]), ("vmapped", ["b-s0", "b-s1", "b-s2"])]  # one seed left: alone
    br = summary["arms"]["a"]["metrics"]["best_response_asr"]
    offset = list(study.METRICS).index("best_response_asr")
    assert br["n"] == 3 and br["mean"] == pytest.approx(np.mean([0.1, 0.3, 0.2]) + offset)
    claim = summary["claims"][0]["difference"]
    assert claim["n"] == 3 and claim["mean"] == pytest.approx(np.mean([0.1 - 0.8, 0.3 - 0.9, 0.2 - 0.7]))
    assert claim["verdict"] == "supported" and claim["p_improvement"] == 1.0
    assert (tmp_path / "plots" / "curves.png").stat().st_size > 0
    assert not (tmp_path / "cells" / "b-s1" / "FAILED.txt").exists()  # finished now
    assert summary["arms"]["a"]["ran"] == {"0": "vmapped", "1": "separate", "2": "vmapped"}
    # resuming with another config (here: more steps) is refused, naming the cell
    changed = build_config(study.Config, {**_tree(cfg), "steps": 3, "resume": str(tmp_path)})
    with pytest.raises(ConfigError, match="a-s0"):
        study.run(changed, tmp_path / "newer", progress=False)


def test_one_seed_failing_in_a_vmapped_group_costs_only_that_seed(tmp_path, monkeypatch):
    calls = []
    _fake_runners(monkeypatch, calls)
    separate = experiment.run

    def run_seeds(cfgs, dirs, group_dir, progress=True):
        calls.append(("vmapped", [pathlib.Path(d).name for d in dirs]))
        raise FloatingPointError("seed 1 went NaN")

    def run(cfg, run_dir, progress=True):
        if cfg.seed == 1:
            calls.append(("separate", [pathlib.Path(run_dir).name]))
            raise FloatingPointError("NaN")
        separate(cfg, run_dir, progress)

    monkeypatch.setattr(experiment, "run_seeds", run_seeds)
    monkeypatch.setattr(experiment, "run", run)
    summary = study.run(_cfg(seeds=[0, 1, 2], arms=[{"name": "a", "experiment": "default"}], claims=[]),
                        tmp_path, progress=False)
    m = summary["arms"]["a"]["metrics"]["asr_train"]
    assert m["n"] == 2 and m["n_asked"] == 3
    assert summary["arms"]["a"]["failed"] == {"1": "FloatingPointError: NaN"}


def test_vmap_off_runs_each_cell_separately(tmp_path, monkeypatch):
    calls = []
    _fake_runners(monkeypatch, calls)
    study.run(_cfg(vmap=False, seeds=[0, 1]), tmp_path, progress=False)
    assert [c[0] for c in calls] == ["separate"] * 4


def _tree(cfg):
    import dataclasses
    return dataclasses.asdict(cfg)


@pytest.mark.parametrize("name", ["study_table1", "study_table2", "study_helpfulness"])
def test_readme_tables_are_the_committed_summaries_rendered(name):
    """The README's game results are study_*.json rendered by study.render_markdown, never typed in."""
    summary = study.load_summary(ROOT / "results" / f"{name}.json")
    readme = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", readme, re.S)
    assert block, f"README.md has no {name} block"
    assert block.group(1) == study.render_markdown(summary, compact=True)
    for claim in summary["claims"]:
        assert claim["difference"]["verdict"] == study.stats.verdict(
            claim["difference"]["ci"], claim["better"] == "lower")


def test_reuse_copies_cells_with_the_same_config(tmp_path, monkeypatch):
    calls = []
    _fake_runners(monkeypatch, calls)
    study.run(_cfg(seeds=[0, 1]), tmp_path / "first", progress=False)
    calls.clear()
    cfg = _cfg(seeds=[0, 1, 2], reuse=[str(tmp_path / "first")])
    summary = study.run(cfg, tmp_path / "second", progress=False)
    assert calls == [("separate", ["a-s2"]), ("separate", ["b-s2"])]  # seeds 0, 1 copied
    assert summary["arms"]["a"]["metrics"]["asr_train"]["n"] == 3
    with pytest.raises(FileNotFoundError, match="reuse"):
        study.run(_cfg(reuse=[str(tmp_path / "nowhere")]), tmp_path / "third", progress=False)


def _members_by_simulation(mode, n_def, n_att, total, chunk):
    """Independent reference: walk the steps one by one, count the defender's updates, and take, for each
    defence stage, the first chunk end at which the defender has exactly that stage's updates done."""
    def defends(t):
        if mode == "alternating":
            return t % (n_def + n_att) < n_def
        return mode in ("defend_only", "simultaneous")

    stage_end_counts, count, prev = [], 0, False
    for t in range(total):
        d = defends(t)
        if prev and not d:
            stage_end_counts.append(count)
        count += d
        prev = d
    if prev:
        stage_end_counts.append(count)
    if not stage_end_counts:
        return [total]
    ends = sorted({min(c, total) for c in range(chunk, total + chunk, chunk)})
    done = {c: sum(defends(t) for t in range(c)) for c in ends}
    out = []
    for k in stage_end_counts:
        hit = [c for c in ends if done[c] == k]
        if hit:
            out.append(hit[0])
    return out


@pytest.mark.parametrize("mode", ["alternating", "defend_only", "attack_only", "simultaneous"])
@pytest.mark.parametrize("total, chunk, n_def, n_att", [(200, 20, 20, 20), (200, 50, 20, 20), (30, 7, 3, 5),
                                                         (10, 10, 2, 2), (9, 4, 4, 1)])
def test_averaged_defender_members_match_a_step_by_step_simulation(tmp_path, mode, total, chunk, n_def,
                                                                   n_att):
    schedule = {"mode": mode, "n_def": n_def, "n_att": n_att}
    cfg = build_config(experiment.Config, {"loop": {"total_steps": total, "chunk_size": chunk},
                                           "game": {"schedule": schedule}})
    members = experiment.DefenderMembers(object(), None, cfg, tmp_path)
    assert members.steps == _members_by_simulation(mode, n_def, n_att, total, chunk)
    if mode == "alternating" and chunk == 20:
        assert members.steps == [20, 60, 100, 140, 180] and members.missed == []
