"""bench.json (benchmarks/summary.py) and the README block rendered from it (tools/readme_bench.py).

Fast: no benchmark runs. The expected values are written out by hand from the fixture below.
"""

import importlib.util
import json
import pathlib

from benchmarks import summary

ROOT = pathlib.Path(__file__).resolve().parent.parent

FIXTURE = {
    "machine": {"processor": "Test CPU 9000", "cores": 2, "load_average": [2.5, 2.0, 1.0],
                "jax_version": "0.0.1", "backend": "cpu", "date": "20261203-060000", "small": True},
    "ran": ["bench_game", "bench_ppo"],
    "figures": {"ppo_update_s": 10.0, "ppo_update_torch_s": 15.0, "ppo_speedup_vs_torch": 1.5,
                "game_steps_per_s": 0.25, "game_host_share": 0.25},
}


def _tool():
    spec = importlib.util.spec_from_file_location("readme_bench", ROOT / "tools" / "readme_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_record_write_load_round_trip(tmp_path):
    summary.clear()
    try:
        summary.record("generate_tok_s", 1.0)
        summary.record("generate_tok_s", 2.5)  # a later record replaces
        summary.record("game_phase_ms", {"judge": [1.0, 2.0]})
        machine = {"processor": "x", "cores": 2, "load_average": [0.5, 0.5, 0.5]}
        path = summary.write(tmp_path / "a" / "bench.json", machine, ["bench_generate"])
        assert json.loads(path.read_text()) == {
            "machine": {"processor": "x", "cores": 2, "load_average": [0.5, 0.5, 0.5]},
            "ran": ["bench_generate"],
            "figures": {"generate_tok_s": 2.5, "game_phase_ms": {"judge": [1.0, 2.0]}},
        }
        assert summary.load(path)["figures"]["generate_tok_s"] == 2.5
    finally:
        summary.clear()


def test_record_refuses_what_json_cannot_hold():
    import pytest

    with pytest.raises(TypeError):
        summary.record("bad", object())
    with pytest.raises(ValueError):
        summary.record("", 1.0)


def test_machine_names_processor_and_load():
    m = summary.machine()
    assert m["processor"] and m["cores"] >= 1 and len(m["load_average"]) == 3


def test_readme_block_from_fixture(tmp_path):
    tool = _tool()
    text = tool.render(FIXTURE)
    assert text.endswith("\n")
    assert "Test CPU 9000 (2 cores)" in text
    assert "load average 2.50 at the start" in text
    assert "Other jobs were running" in text  # 2.5 > 1.5
    assert "Smoke sizes" in text
    assert ("| PPO update (single pass), s | 10.00 | 15.00 (PyTorch, the same single pass) | 1.50x PyTorch |"
            in text)
    separate = "| PPO update (separate experience), s | not measured | not measured (PyTorch) | not measured"
    assert separate in text
    assert "not measuredx" not in text
    assert "| generation, tokens/s | not measured | not measured (HF `generate`) | not measured" in text
    assert "| game steps/s (`default`, host included) | 0.25 | | host share 25% |" in text
    assert "Figures on another processor differ" in text and "2.43x" in text and "1.54x" in text
    assert "| SmolLM2 game step, s (phases summed: defence, attack) | not measured | | |" in text
    real = dict(FIXTURE, figures={**FIXTURE["figures"], "smollm2_generate_tok_s": 107.1,
                                  "smollm2_generate_hf_tok_s": 50.9, "smollm2_generate_speedup_vs_hf": 2.104,
                                  "game_real_step_s": [25.23, 33.57]})
    real_text = tool.render(real)
    row = "| generation, SmolLM2-135M-Instruct, tokens/s | 107.1 | 50.9 (HF `generate`) | 2.10x HF |"
    assert row in real_text
    assert "| SmolLM2 game step, s (phases summed: defence, attack) | 25.2, 33.6 | | |" in real_text

    quiet = json.loads(json.dumps(FIXTURE))
    quiet["machine"]["load_average"] = [0.3, 0.3, 0.3]
    assert "Other jobs were running" not in tool.render(quiet)

    readme = tmp_path / "README.md"
    readme.write_text("head\n<!-- bench:begin -->\nold\n<!-- bench:end -->\ntail\n")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(FIXTURE))
    new = tool._fill()(readme.read_text(), "bench", tool.render(FIXTURE))
    assert new == "head\n<!-- bench:begin -->\n" + text + "<!-- bench:end -->\ntail\n"


def test_committed_readme_block_matches_committed_bench_json():
    bench = ROOT / "results" / "bench.json"
    readme = (ROOT / "README.md").read_text()
    if not bench.exists():  # nothing generated yet: the block may hold only a placeholder
        return
    block = _tool().render(json.loads(bench.read_text()))
    assert f"<!-- bench:begin -->\n{block}<!-- bench:end -->" in readme


def test_merge_of_partial_runs():
    second = {"machine": dict(FIXTURE["machine"], load_average=[4.0, 3.0, 2.0], date="20261203-070000",
                              small=False),
              "ran": ["bench_selfbleu"], "figures": {"selfbleu_speedup": 100.0, "game_steps_per_s": 0.5}}
    merged = _tool().merge([FIXTURE, second])
    assert merged["ran"] == ["bench_game", "bench_ppo", "bench_selfbleu"]
    assert merged["machine"]["load_average"] == [4.0, 3.0, 2.0]  # the higher load at a start
    assert merged["machine"]["date"] == "20261203-060000, 20261203-070000"
    assert merged["machine"]["small"] is True
    assert merged["figures"]["game_steps_per_s"] == 0.5 and merged["figures"]["ppo_update_s"] == 10.0
    assert merged["figures"]["selfbleu_speedup"] == 100.0
    # a benchmark re-run on top of a merged summary is listed once, its newer figures winning
    rerun = {"machine": dict(FIXTURE["machine"], date="20261203-080000"), "ran": ["bench_ppo"],
             "figures": {"ppo_update_s": 9.0}}
    again = _tool().merge([merged, rerun])
    assert again["ran"] == ["bench_game", "bench_ppo", "bench_selfbleu"]
    assert again["figures"]["ppo_update_s"] == 9.0
