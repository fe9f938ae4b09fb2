"""The game's metric schema, the loop's NaN stop and the resumed evaluation cadence.

- `metrics.select` keeps exactly what a step of each stage measured; the progress bar reads only
  those; a NaN in a kept metric stops the run naming the step, the metric and the last checkpoint.
- The evaluation cadence is a function of the step: a run with eval.every_chunks=2, killed between
  chunks and resumed, writes the metrics.jsonl of an uninterrupted run.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_game_resume import CFG, fake_init, fake_step

from alignjax import experiment as E
from alignjax.config import build_config
from alignjax.game import metrics as M
from alignjax.game import schedule as sched
from alignjax.game.loop import NonFiniteMetricError, _postfix_keys, run_loop

RECORD = {"stage": 0.0, "judge/p_safe": 0.5, "defender/score": 0.9, "defender/ppo/kl_ref": 0.1,
          "attacker/ppo/kl_ref": 0.0, "attacker/reward": 0.0, "attacker/safety_term": 0.0, "step": 3}


@pytest.mark.parametrize("stage,kept", [
    (sched.DEFEND, {"defender/ppo/kl_ref"}),
    (sched.ATTACK, {"attacker/ppo/kl_ref", "attacker/reward", "attacker/safety_term"}),
    (sched.BOTH, {"defender/ppo/kl_ref", "attacker/ppo/kl_ref", "attacker/reward",
                  "attacker/safety_term"}),
])
def test_select_keeps_what_the_stage_measured(stage, kept):
    common = {"stage", "judge/p_safe", "defender/score", "step"}
    out = M.select(RECORD | {"stage": float(stage)})
    assert set(out) == common | kept
    assert list(out) == [k for k in RECORD if k in out]  # order kept (metrics.jsonl is stable)
    postfix = _postfix_keys(out)
    assert ("attacker/reward" in postfix) == (stage != sched.DEFEND)


def test_nonfinite_names_the_offending_entries():
    assert M.nonfinite({"a": 1.0, "b": float("nan"), "c": np.float32("inf"), "step": 2}) == ["b", "c"]
    assert M.nonfinite(M.select(RECORD)) == []


def nan_step(state, key, consts=None):
    new, metrics = fake_step(state, key, consts)
    bad = jnp.where(state.step == 3, jnp.nan, 0.0)  # step 3 only: in the second chunk
    return new, metrics | {"loss": metrics["loss"] + bad}


def test_a_nan_metric_stops_the_run_naming_step_metric_and_checkpoint(tmp_path):
    with pytest.raises(NonFiniteMetricError) as err:
        run_loop(nan_step, fake_init(), CFG, tmp_path)
    msg = str(err.value)
    assert "step 3" in msg and "'loss'" in msg
    assert f"step 2 in {tmp_path / 'checkpoints'}" in msg  # the last good checkpoint (chunk size 2)


def _metrics_lines(path):
    lines = []
    for ln in path.read_text().splitlines():
        rec = json.loads(ln)
        rec.pop("time/step_s", None)
        lines.append(rec)
    return lines


def test_resumed_run_keeps_the_evaluation_cadence(tmp_path):
    cfg = build_config(E.Config, {"loop": {"total_steps": CFG.total_steps, "chunk_size": CFG.chunk_size},
                                  "eval": {"every_chunks": 2}})
    # chunk ends 2, 4, 6: every 2nd chunk, and the last
    assert [s for s in (2, 4, 6) if E.evaluation_due(s, cfg)] == [4, 6]
    evaluate = lambda step, state: {"eval/w0": float(state.w[0])} if E.evaluation_due(step, cfg) else None
    ref = run_loop(fake_step, fake_init(), CFG, tmp_path / "ref", on_chunk_end=evaluate)

    class Killed(Exception):
        pass

    def die(step, state):
        if step == 4:  # the second chunk ran and was evaluated; its checkpoint was not written
            raise Killed

    with pytest.raises(Killed):
        run_loop(fake_step, fake_init(), CFG, tmp_path / "run", on_chunk_end=evaluate, before_save=die)
    final = run_loop(fake_step, fake_init(), CFG, tmp_path / "run", on_chunk_end=evaluate)
    assert np.asarray(final.w).tobytes() == np.asarray(ref.w).tobytes()
    got = _metrics_lines(tmp_path / "run" / "metrics.jsonl")
    want = _metrics_lines(tmp_path / "ref" / "metrics.jsonl")
    assert got == want
    assert [r["step"] for r in want if "eval/w0" in r] == [3, 5]
