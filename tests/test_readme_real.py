"""The README's SmolLM2 figures are a committed run's results rendered (tools/readme_results.py --real),
never typed in; the intervals in them are checked against a NumPy percentile bootstrap."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAME = "real_smollm2"


def _tool():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "tools" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numpy_bootstrap(values, n=20_000, seed=1):
    """Percentile bootstrap of the mean by hand: resample with replacement, take the 2.5 / 97.5 %."""
    x = np.asarray(values, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n, len(x)))
    means = x[idx].mean(axis=1)
    return np.percentile(means, [2.5, 97.5])


def test_readme_block_is_the_committed_run_rendered():
    summary = json.loads((ROOT / "results" / f"{NAME}.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {NAME}:begin -->\n(.*?)<!-- {NAME}:end -->", readme, re.S)
    assert block, f"README.md has no {NAME} block"
    assert block.group(1) == _tool().real_block(summary, NAME)
    assert (ROOT / "results" / f"{NAME}.md").read_text().startswith(f"# Results: {NAME}")


@pytest.mark.parametrize("label", ["initial", "final"])
def test_committed_rates_and_intervals_follow_from_the_per_prompt_verdicts(label):
    r = json.loads((ROOT / "results" / f"{NAME}.json").read_text())[label]
    assert len(r["per_prompt"]["defender_attack_success"]) == r["n"]
    assert len(r["per_prompt"]["over_refusal"]) == r["n_benign"]
    for rate, values in r["per_prompt"].items():
        assert r[rate] == pytest.approx(np.mean(values), abs=1e-6)  # a float32 mean
        if min(values) == max(values):  # no spread: the interval is the point
            assert r[f"{rate}_ci"] == [values[0], values[0]]
            continue
        lo, hi = _numpy_bootstrap(values)
        # two Monte-Carlo bootstraps of n <= 64 verdicts agree to about one verdict's weight
        assert r[f"{rate}_ci"] == pytest.approx([lo, hi], abs=1.5 / len(values)), rate
    assert 1 <= len(r["samples"]) <= 5
    for i, row in enumerate(r["samples"]):
        assert row["p_unsafe"] == r["per_prompt"]["attacker_attack_success"][i]
        assert row["seed"].strip()
