"""Fill README.md's results block from finished game runs, stated over seeds.

    python tools/readme_results.py runs/default/20261202-* runs/rlhf/20261202-* [--readme README.md]

Each RUN_DIR is a run folder `runs/<NAME>/<timestamp>/` written by `make experiment`: its
`config.yaml` gives the seed, its parent folder's name gives the experiment, and its `results.json`
the initial and final players' evaluation (alignjax/experiment.py `run`; the keys come from
alignjax/eval/safety.py `evaluate_defender` and alignjax/eval/exploitability.py `exploitability`).
Runs are grouped by experiment; runs of one experiment must share their config except for the seed.

For every experiment and for the initial and the final players the table gives, per metric, the mean
over seeds with a 95% percentile-bootstrap confidence interval: resample the seeds with replacement
10,000 times (NumPy generator with a fixed seed, so the table is reproducible), take the mean of each
resample, and report the 2.5th and 97.5th percentiles of those means. One seed prints its value and
"(1 seed)". Under the table: the machine the table was made on, the date and the command.

Only the text between `<!-- results:begin -->` and `<!-- results:end -->` is rewritten; a README
without both markers is an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import sys

import numpy as np
import yaml

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
PLAYERS = ("initial", "final")
# (column header, path inside results["initial"] / results["final"]); lower is better for all four
METRICS = (
    ("best-response ASR", ("exploitability", "best_response_asr")),
    ("ASR held-out framings", ("defender", "heldout_framings", "attack_success_rate")),
    ("over-refusal (benign)", ("defender", "benign", "over_refusal")),
    ("ASR train seeds", ("defender", "train", "attack_success_rate")),
)
# config keys that may differ between runs of one experiment
FREE_KEYS = frozenset({"seed", "resume", "cache_dir"})


class ResultsError(ValueError):
    pass


# ------------------------------------------------------------------------------------- reading


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _get(tree: dict, path: tuple[str, ...], where: str) -> float:
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise ResultsError(f"{where}: no {'.'.join(path)} (is this a synthetic-setting game run?)")
        node = node[key]
    return float(node)


def read_run(run_dir) -> dict:
    """{experiment, seed, config (flat dict), values {(players, metric header): float}} of one run."""
    run_dir = pathlib.Path(run_dir)
    cfg_path, res_path = run_dir / "config.yaml", run_dir / "results.json"
    for p in (cfg_path, res_path):
        if not p.is_file():
            raise ResultsError(f"{run_dir}: {p.name} is missing (not a finished run folder "
                               "runs/<NAME>/<timestamp>; a resumed run writes its results in the old folder)")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    if "seed" not in cfg:
        raise ResultsError(f"{cfg_path}: no top-level 'seed'")
    results = json.loads(res_path.read_text())
    values = {}
    for players in PLAYERS:
        if players not in results:
            raise ResultsError(f"{res_path}: no {players!r} section")
        for header, path in METRICS:
            values[players, header] = _get(results[players], path, f"{res_path} [{players}]")
    return {"experiment": run_dir.resolve().parent.name, "seed": int(cfg["seed"]), "config": _flat(cfg),
            "values": values, "dir": str(run_dir)}


def group_runs(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs by experiment (in order of first appearance), each group sorted by seed; the runs of a
    group must have the same config apart from FREE_KEYS."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["experiment"], []).append(r)
    for name, rs in groups.items():
        ref = rs[0]
        for r in rs[1:]:
            keys = set(ref["config"]) | set(r["config"])
            diff = sorted(k for k in keys - FREE_KEYS if ref["config"].get(k) != r["config"].get(k))
            if diff:
                raise ResultsError(f"experiment {name!r}: {r['dir']} and {ref['dir']} differ in {diff}; "
                                   "a row of the table is one configuration over seeds")
        rs.sort(key=lambda r: r["seed"])
    return groups


# ---------------------------------------------------------------------------------- statistics


def bootstrap_ci(values, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of `values` [n]: the (1 -/+ confidence)/2 quantiles of the
    means of `n_resamples` resamples of size n drawn with replacement."""
    x = np.asarray(values, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"need a non-empty 1-D array of values, got shape {x.shape}")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _num(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.3f}"


def format_cell(values) -> str:
    """'mean [lo, hi]' over seeds, or 'value (1 seed)'."""
    x = np.asarray(values, np.float64)
    if x.size == 1:
        return f"{_num(float(x[0]))} (1 seed)"
    lo, hi = bootstrap_ci(x)
    return f"{_num(float(x.mean()))} [{_num(lo)}, {_num(hi)}]"


# ------------------------------------------------------------------------------------- output


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_line() -> str:
    try:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "unavailable"
    return f"{cpu_model()}, {os.cpu_count()} logical cores; load average (1, 5, 15 min) {load}"


def results_table(groups: dict[str, list[dict]]) -> str:
    headers = ["experiment", "seeds", "players"] + [h for h, _ in METRICS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, rs in groups.items():
        seeds = ", ".join(str(r["seed"]) for r in rs)
        for players in PLAYERS:
            cells = [format_cell([r["values"][players, h] for r in rs]) for h, _ in METRICS]
            lines.append("| " + " | ".join([f"`{name}`", f"[{seeds}]", players] + cells) + " |")
    return "\n".join(lines)


def results_block(groups: dict[str, list[dict]], command: str, now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now().astimezone()
    return "\n".join([
        results_table(groups),
        "",
        f"Mean over seeds with a {CONFIDENCE:.0%} percentile-bootstrap interval ({N_RESAMPLES:,} resamples "
        f"of the seeds, generator seed {BOOTSTRAP_SEED}); lower is better in every column. "
        "Initial = the SFT'd players before the game; final = after it.",
        "",
        f"Table made on: {machine_line()}. Date: {now.strftime('%Y-%m-%d %H:%M %Z')}. "
        f"Command: `{command}`.",
    ])


def replace_block(text: str, block: str, where: str = "README") -> str:
    """`text` with everything between the markers replaced by `block` (the markers stay)."""
    b, e = text.find(BEGIN), text.find(END)
    if b < 0 or e < 0:
        missing = [m for m, i in ((BEGIN, b), (END, e)) if i < 0]
        raise ResultsError(f"{where}: marker(s) {missing} not found; add {BEGIN} ... {END} where the "
                           "table goes")
    if text.count(BEGIN) > 1 or text.count(END) > 1 or e < b:
        raise ResultsError(f"{where}: need exactly one {BEGIN} followed by one {END}")
    return text[: b + len(BEGIN)] + "\n" + block.strip("\n") + "\n" + text[e:]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    default_readme = pathlib.Path(__file__).resolve().parent.parent / "README.md"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders runs/<NAME>/<timestamp>")
    ap.add_argument("--readme", type=pathlib.Path, default=default_readme, help="file to update (README.md)")
    args = ap.parse_args(argv)
    try:
        groups = group_runs([read_run(d) for d in args.run_dirs])
        text = args.readme.read_text()
        command = shlex.join(["python", "tools/readme_results.py", *argv])
        args.readme.write_text(replace_block(text, results_block(groups, command), str(args.readme)))
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote the results of {sum(map(len, groups.values()))} runs ({len(groups)} experiments) "
          f"into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
