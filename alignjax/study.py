"""Reproducibility studies (`runner: study` in experiments/*.yaml): a grid of experiments x seeds, with
every figure stated over seeds, a bootstrap CI, and claims judged from paired differences.

    make experiment NAME=study_table1                              # 5 experiments x seeds 0..4
    make experiment NAME=study_table1 ARGS="seeds=[0,1] steps=20"  # smoke size
    make experiment NAME=study_table1 ARGS="resume=runs/study_table1/<stamp>"  # finish a study

Layout of `runs/<study>/<stamp>/`:

    config.yaml                    the study's resolved config
    cells/<arm>-s<seed>/           each cell's ordinary run folder (config.yaml, metrics.jsonl, results.json,
                                   results.md, plots/), or FAILED.txt with the cell's error
    groups/<arm>-s<seeds>/         checkpoints of the arm's seeds run as one vmapped program
    study.json                     every per-seed value, every aggregate, the claims, how each arm ran
    study.md                       the tables (mean [95% CI] over seeds, n per entry) and the verdicts
    plots/curves.png, plots/final.png

Before any cell runs, every cell's config is built and checked (a bad experiment name or override key
fails naming the cell). Cells with results.json are skipped on `resume`; unfinished ones continue from
their checkpoints. A cell that crashes is recorded with its error and the study goes on; aggregates give
n for every entry, so fewer seeds than asked never pass silently.

Arms of the synthetic setting run their seeds as one compiled program (`vmap: true`, default;
`experiment.run_seeds`): each seed computes what it computes alone, but the compiled code differs, so
over a whole run the seeds drift from separate runs in the last bits (the game is chaotic). study.json
records which way each arm ran. Statistics: alignjax/stats.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import shutil
import time
import traceback
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from alignjax import backend, stats
from alignjax.config import ConfigError, config_diff, dump_yaml

# metric name -> (path in results.json, better, label); the tables pick from these
METRICS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "asr_train": (("final", "defender", "train", "attack_success_rate"), "lower", "ASR train framings"),
    "asr_heldout_framings": (("final", "defender", "heldout_framings", "attack_success_rate"), "lower",
                             "ASR held-out framings"),
    "asr_heldout_topics": (("final", "defender", "heldout_topics", "attack_success_rate"), "lower",
                           "ASR held-out topics"),
    "over_refusal": (("final", "defender", "benign", "over_refusal"), "lower", "over-refusal"),
    "over_refusal_validation": (("final", "defender", "benign_validation", "over_refusal"), "lower",
                                "over-refusal (validation topics)"),
    "best_response_asr": (("final", "exploitability", "best_response_asr"), "lower", "best-response ASR"),
    "fraction_exploitable": (("final", "exploitability", "fraction_exploitable"), "lower",
                             "fraction exploitable"),
    "avg_asr_heldout_framings": (("averaged", "asr_heldout_framings"), "lower",
                                 "averaged: ASR held-out framings"),
    "avg_over_refusal": (("averaged", "over_refusal"), "lower", "averaged: over-refusal"),
    "avg_best_response_asr": (("averaged", "best_response_asr"), "lower", "averaged: best-response ASR"),
    "attacker_asr_vs_initial": (("attacker_vs_initial", "attack_success"), "higher",
                                "attacker ASR vs initial defender"),
    "attacker_diversity": (("attacker_vs_initial", "selfbleu_diversity"), "higher",
                           "attacker diversity (1 - Self-BLEU)"),
    "attacker_framing_entropy": (("attacker_vs_initial", "framing_entropy"), "higher", "framing entropy"),
    "attacker_grammatical": (("attacker_vs_initial", "grammatical"), "higher", "grammatical"),
}
TABLES = {
    "defender": ("asr_train", "asr_heldout_framings", "asr_heldout_topics", "over_refusal",
                 "best_response_asr", "fraction_exploitable", "avg_best_response_asr",
                 "avg_asr_heldout_framings"),
    "attacker": ("attacker_asr_vs_initial", "attacker_diversity", "attacker_framing_entropy",
                 "attacker_grammatical"),
    # choosing a hyperparameter: the validation split only (disjoint from every reported split) and
    # the training framings' ASR (the game's own training distribution)
    "selection": ("over_refusal_validation", "asr_train"),
}
CURVES = ("attack_success", "eval/best_response_asr", "eval/over_refusal")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One row of the study: an experiment (experiments/<experiment>.yaml) with optional overrides."""

    name: str
    experiment: str
    overrides: dict = dataclasses.field(default_factory=dict)  # nested, as in the experiment's config:
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Claim:
    """"Arm `a` is better than arm `b` on `metric`" (better = METRICS' direction), judged on the paired
    difference a - b over seeds."""

    name: str
    a: str
    b: str
    metric: str
    paper: str = ""  # what the paper reports for it


@dataclasses.dataclass(frozen=True)
class Config:
    title: str = "study"
    table: Literal["defender", "attacker", "selection"] = "defender"
    arms: tuple[Arm, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 0  # game steps per cell (0 = each experiment's own loop.total_steps)
    claims: tuple[Claim, ...] = ()
    vmap: bool = True  # synthetic arms: the seeds as one vmapped program
    confidence: float = 0.95
    n_resamples: int = stats.DEFAULT_RESAMPLES
    min_seeds: int = 5  # paired seeds a claim needs before it gets a verdict other than inconclusive
    resume: str = ""  # an earlier study folder: finished cells are skipped, unfinished ones resume
    # earlier study folders: a cell whose resolved config equals a finished cell's there is copied, not
    # run again (e.g. Table 2's GPO arms are Table 1's cells)
    reuse: tuple[str, ...] = ()


@dataclasses.dataclass
class Cell:
    arm: str
    seed: int
    cfg: Any  # experiment.Config
    dir: pathlib.Path

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}={json.dumps(v)}"]
    return out


def plan(cfg: Config, study_dir: pathlib.Path) -> list[Cell]:
    """Every cell's experiment config, built and checked before anything runs."""
    from alignjax import experiment
    from alignjax.cli import load_experiment

    names = [a.name for a in cfg.arms]
    if not names:
        raise ConfigError("study: no arms")
    if len(set(names)) != len(names) or len(set(cfg.seeds)) != len(cfg.seeds) or not cfg.seeds:
        raise ConfigError(f"study: arm names and seeds must be unique and non-empty: {names}, {cfg.seeds}")
    if cfg.steps < 0:
        raise ConfigError(f"study: steps must be >= 0, got {cfg.steps}")
    for c in cfg.claims:
        if c.a not in names or c.b not in names:
            raise ConfigError(f"study claim {c.name!r}: arms {c.a!r}/{c.b!r} must be among {names}")
        if c.metric not in METRICS:
            raise ConfigError(f"study claim {c.name!r}: unknown metric {c.metric!r}; "
                              f"valid: {sorted(METRICS)}")
    cells = []
    for arm in cfg.arms:
        for seed in cfg.seeds:
            where = f"study cell {arm.name}-s{seed} (experiment {arm.experiment!r})"
            extra = [f"seed={seed}"]
            if cfg.steps:
                extra.append(f"loop.total_steps={cfg.steps}")
            try:
                module, cell_cfg = load_experiment(arm.experiment, _dotted(arm.overrides) + extra)
                if module is not experiment:
                    raise ConfigError(f"runner must be 'experiment', got {module.__name__}")
                if cfg.steps and cell_cfg.loop.chunk_size > cfg.steps:
                    cell_cfg = dataclasses.replace(
                        cell_cfg, loop=dataclasses.replace(cell_cfg.loop, chunk_size=cfg.steps))
                experiment.check_config(cell_cfg)
            except (ConfigError, ValueError, FileNotFoundError) as e:
                raise ConfigError(f"{where}: {e}") from None
            cells.append(Cell(arm.name, seed, cell_cfg, study_dir / "cells" / f"{arm.name}-s{seed}"))
    return cells


def run(cfg: Config, run_dir, progress: bool = True) -> dict:
    """Run (or resume) the study; writes study.json, study.md and plots; returns the summary."""
    from alignjax import experiment

    study_dir = pathlib.Path(cfg.resume) if cfg.resume else pathlib.Path(run_dir)
    if cfg.resume and not (study_dir / "cells").is_dir():
        raise FileNotFoundError(f"resume={cfg.resume!r}: {study_dir / 'cells'} does not exist")
    cells = plan(cfg, study_dir)
    t0 = time.perf_counter()
    for c in cells:
        c.dir.mkdir(parents=True, exist_ok=True)
        _write_cell_config(c)
    how = _previous_how(study_dir) | _reuse(cfg, cells)  # cell name -> vmapped / separate / reused from ...
    groups = _groups(cfg, cells)
    todo = [g for g in groups if not all(_finished(c) for c in g)]
    tqdm.write(f"[alignjax] study {cfg.title}: {len(cells)} cells, {len(cells) - sum(map(len, todo))} "
               f"finished, {len(todo)} program(s) to run")
    bar = tqdm(total=len(cells), initial=len(cells) - sum(map(len, todo)), desc=cfg.title, unit="cell",
               dynamic_ncols=True)
    for group in todo:
        if len(group) > 1:
            seeds = "-".join(str(c.seed) for c in group)
            ok = _attempt(group, lambda g=group, sd=seeds: experiment.run_seeds(
                [c.cfg for c in g], [c.dir for c in g], study_dir / "groups" / f"{g[0].arm}-s{sd}",
                progress=progress))
            how.update({c.name: "vmapped" for c in group})
            if not ok:  # one seed's failure (a NaN, say) must not cost the others: run them one by one
                for c in group:
                    if not _finished(c):
                        tqdm.write(f"[alignjax] study: running {c.name} on its own")
                        _attempt([c], lambda c=c: experiment.run(c.cfg, c.dir, progress=progress))
                        how[c.name] = "separate (after its vmapped group failed)"
        else:
            _attempt(group, lambda c=group[0]: experiment.run(c.cfg, c.dir, progress=progress))
            how[group[0].name] = "separate"
        bar.update(len(group))
    bar.close()
    summary = summarize_study(cfg, cells, how)
    summary["wall_s"] = {**(_previous_wall(study_dir)), datetime.datetime.now().isoformat(timespec="seconds"):
                         round(time.perf_counter() - t0, 1)}
    summary["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_study(study_dir, summary)
    tqdm.write(f"[alignjax] study: {study_dir / 'study.md'}")
    return summary


def same_config(text: str, cfg) -> bool:
    """Whether a cell's saved config.yaml holds `cfg`: equal key by key, where a key that one side lacks
    counts as its default (so an option added to the library later does not orphan finished cells)."""
    return not config_diff(text, cfg)


def _write_cell_config(cell: Cell) -> None:
    """The cell's config.yaml; a resumed study must not change a cell's config under its results."""
    path, text = cell.dir / "config.yaml", dump_yaml(cell.cfg)
    if path.exists() and not same_config(path.read_text(), cell.cfg) and (
            _finished(cell) or (cell.dir / "metrics.jsonl").exists()):
        raise ConfigError(f"study cell {cell.name}: its config differs from the one in {path} (changed "
                          "steps, overrides or experiment files?); start a new study instead of resuming")
    if not path.exists() or not same_config(path.read_text(), cell.cfg):
        path.write_text(text)


def _attempt(cells: list[Cell], fn) -> bool:
    """Run fn; on an exception record it in each unfinished cell's FAILED.txt (a crash is a result and
    the study goes on). A finished cell loses any FAILED.txt of an earlier attempt."""
    try:
        fn()
        ok = True
    except Exception as e:
        ok = False
        names = ", ".join(c.name for c in cells if not _finished(c))
        tqdm.write(f"[alignjax] study: {names} failed: {type(e).__name__}: {e}")
        for c in cells:
            if not _finished(c):
                (c.dir / "FAILED.txt").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
    for c in cells:
        if _finished(c) and (c.dir / "FAILED.txt").exists():
            (c.dir / "FAILED.txt").unlink()
    return ok


def _reuse(cfg: Config, cells: list[Cell]) -> dict:
    """Copy finished cells with the same resolved config from `cfg.reuse` folders (an unfinished cell's
    own files are replaced); {cell name: "reused from <study>"}."""
    found = []
    for folder in map(pathlib.Path, cfg.reuse):
        if not (folder / "cells").is_dir():
            raise FileNotFoundError(f"reuse={str(folder)!r}: {folder / 'cells'} does not exist")
        found += [(d, (d / "config.yaml").read_text()) for d in sorted((folder / "cells").iterdir())
                  if (d / "results.json").is_file() and (d / "config.yaml").is_file()]
    out = {}
    for c in cells:
        src = next((d for d, text in found if same_config(text, c.cfg)), None)
        if src is not None and not _finished(c):
            shutil.rmtree(c.dir)
            shutil.copytree(src, c.dir, ignore=shutil.ignore_patterns("checkpoints"))
            out[c.name] = f"reused from {src.parent.parent}"
    return out


def _previous_how(study_dir: pathlib.Path) -> dict:
    """How each cell ran in earlier invocations of this study (from its study.json)."""
    path = study_dir / "study.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    out = {}
    for name, arm in summary.get("arms", {}).items():
        ran = arm.get("ran")  # per seed; a plain string (older study.json) holds for all the arm's seeds
        per_seed = ran if isinstance(ran, dict) else {str(s): ran for s in summary.get("seeds", [])}
        out.update({f"{name}-s{seed}": h for seed, h in per_seed.items() if h and h != "-"})
    return out


def _previous_wall(study_dir: pathlib.Path) -> dict:
    """Wall seconds of earlier invocations of this study (a resumed study keeps adding to it)."""
    path = study_dir / "study.json"
    return json.loads(path.read_text()).get("wall_s", {}) if path.exists() else {}


def _groups(cfg: Config, cells: list[Cell]) -> list[list[Cell]]:
    """Cells run together: an arm's unfinished seeds (synthetic, vmap on) or one cell each."""
    out = []
    for arm in cfg.arms:
        mine = [c for c in cells if c.arm == arm.name]
        if cfg.vmap and mine[0].cfg.setting == "synthetic" and len(mine) > 1:
            left = [c for c in mine if not _finished(c)]
            out.append(left or mine)
        else:
            out += [[c] for c in mine]
    return out


def _finished(cell: Cell) -> bool:
    return (cell.dir / "results.json").is_file()


def _get(tree, path):
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return math.nan
        tree = tree[k]
    return float(tree) if tree is not None else math.nan


def cell_values(cell_dir: pathlib.Path) -> tuple[dict, dict]:
    """(metric -> value, curve name -> {step: value}) of a finished cell (NaN where absent)."""
    res = json.loads((cell_dir / "results.json").read_text())
    values = {m: _get(res, path) for m, (path, _, _) in METRICS.items()}
    curves: dict = {k: {} for k in CURVES}
    path = cell_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        for k in CURVES:
            if k in rec:
                curves[k][int(rec["step"])] = float(rec[k])
    return values, curves


def summarize_study(cfg: Config, cells: list[Cell], how: dict | None = None) -> dict:
    """study.json: per cell its status and values, per arm and metric the per-seed values with mean,
    CI and n (of n asked), the claims with paired differences and verdicts, the curves."""
    ci = dict(confidence=cfg.confidence, n_resamples=cfg.n_resamples)
    per_arm: dict = {a.name: {"values": {m: {} for m in METRICS}, "curves": {k: {} for k in CURVES},
                              "failed": {}} for a in cfg.arms}
    for c in cells:
        arm = per_arm[c.arm]
        if _finished(c):
            values, curves = cell_values(c.dir)
            for m, v in values.items():
                arm["values"][m][c.seed] = v
            for k, series in curves.items():
                arm["curves"][k][c.seed] = series
        else:
            failed = c.dir / "FAILED.txt"
            arm["failed"][c.seed] = failed.read_text().splitlines()[0] if failed.exists() else "not run"
    arms = {}
    for a in cfg.arms:
        info = per_arm[a.name]
        agg = {}
        for m in METRICS:
            by_seed = info["values"][m]
            s = stats.summarize([by_seed.get(seed, math.nan) for seed in cfg.seeds], **ci)
            agg[m] = s | {"n_asked": len(cfg.seeds), "by_seed": {str(k): v for k, v in by_seed.items()}}
        arms[a.name] = {"experiment": a.experiment, "overrides": a.overrides, "description": a.description,
                        "metrics": agg, "failed": {str(k): v for k, v in info["failed"].items()},
                        "ran": {str(c.seed): (how or {}).get(c.name) or _how_it_ran(c) for c in cells
                                if c.arm == a.name},
                        "curves": {k: {str(s): v for s, v in c.items()} for k, c in info["curves"].items()}}
    claims = []
    for c in cfg.claims:
        lower = METRICS[c.metric][1] == "lower"
        d = stats.paired_difference(per_arm[c.a]["values"][c.metric], per_arm[c.b]["values"][c.metric],
                                    lower, min_n=cfg.min_seeds, **ci)
        claims.append(dataclasses.asdict(c) | {"better": "lower" if lower else "higher", "difference": d,
                                               "n_asked": len(cfg.seeds)})
    return {"title": cfg.title, "table": cfg.table, "seeds": list(cfg.seeds), "steps": cfg.steps,
            "confidence": cfg.confidence, "n_resamples": cfg.n_resamples, "arms": arms, "claims": claims,
            "machine": f"{platform.processor() or platform.machine()}, {backend.cpu_model()}",
            "date": datetime.date.today().isoformat()}


def _how_it_ran(cell: Cell) -> str:
    """vmapped / separate, from the cell's results.json (for cells of an earlier invocation)."""
    if not _finished(cell):
        return "-"
    run = json.loads((cell.dir / "results.json").read_text()).get("run", {})
    return "-" if "vmapped_seeds" not in run else "vmapped" if run["vmapped_seeds"] else "separate"


def _fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.3f}"


def _cell(s: dict) -> str:
    if s["n"] == 0:
        return f"- (n=0/{s['n_asked']})"
    ci = "" if not np.isfinite(s["ci"][0]) else f" [{_fmt(s['ci'][0])}, {_fmt(s['ci'][1])}]"
    n = "" if s["n"] == s["n_asked"] else f" (n={s['n']}/{s['n_asked']})"
    return f"{_fmt(s['mean'])}{ci}{n}"


def render_markdown(summary: dict, heading: str = "#", compact: bool = False) -> str:
    """study.md (and the README's results block) from a study summary: the table, per-seed values of
    the headline metric, the claims with their verdicts. `compact` (the README): without the title,
    the per-seed table and the explanations (docs/studies.md has them)."""
    cols = TABLES[summary["table"]]
    seeds = summary["seeds"]
    conf = int(round(100 * summary["confidence"]))
    lines = [] if compact else [f"{heading} Study: {summary['title']}", ""]
    lines += [f"Mean over seeds [{conf}% percentile-bootstrap CI of the mean] (n = seeds that finished, "
             f"shown when fewer than the {len(seeds)} asked: {seeds}); "
             + (f"{summary['steps']} game steps per cell." if summary["steps"] else
                "each experiment's own number of game steps."), "",
             "| experiment | " + " | ".join(METRICS[m][2] + (" ↓" if METRICS[m][1] == "lower" else " ↑")
                                         for m in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, arm in summary["arms"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(arm["metrics"][m]) for m in cols) + " |")
    if not compact:
        head = cols[4] if summary["table"] == "defender" else cols[0]
        lines += ["", f"Per seed, {METRICS[head][2]}:", "",
                  "| experiment | " + " | ".join(f"s{s}" for s in seeds) + " | ran |",
                  "|---|" + "---|" * (len(seeds) + 1)]
        for name, arm in summary["arms"].items():
            by = arm["metrics"][head]["by_seed"]
            row = [_fmt(by[str(s)]) if str(s) in by else ("failed" if str(s) in arm["failed"] else "-")
                   for s in seeds]
            ran = arm["ran"] if isinstance(arm["ran"], str) else ", ".join(sorted(set(arm["ran"].values())))
            lines.append(f"| {name} | " + " | ".join(row) + f" | {ran} |")
    if summary["claims"]:
        min_n = summary["claims"][0]["difference"].get("min_n", 2)
        intro = ("Claims, judged from the paired difference a - b over seeds (docs/studies.md):" if compact
                 else "Claims of the paper, as hypotheses: the paired difference a - b over the seeds both "
                 f"finished, its {conf}% CI, rliable's probability of improvement P(a better than b), the "
                 "exact sign-flip permutation p-value of the mean difference, and the verdict computed "
                 "from the CI (supported: the CI excludes 0 on the claimed side; contradicted: it excludes "
                 f"0 on the other side; otherwise, or with fewer than {min_n} paired seeds, inconclusive). "
                 "The percentile CI is narrow with few seeds; the p-value says how strong a claim is.")
        lines += ["", intro, "", "| claim | metric | a - b [CI] | P(a better) | p | n | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for c in summary["claims"]:
            d = c["difference"]
            ci = f"[{_fmt(d['ci'][0])}, {_fmt(d['ci'][1])}]" if np.isfinite(d["ci"][0]) else ""
            lines.append(f"| {c['name']}: {c['a']} {'<' if c['better'] == 'lower' else '>'} {c['b']} | "
                         f"{METRICS[c['metric']][2]} | {_fmt(d['mean'])} {ci} | {_fmt(d['p_improvement'])} | "
                         f"{_fmt(d.get('p_value', math.nan))} | {d['n']}/{c['n_asked']} | "
                         f"**{d['verdict']}** |")
    failed = [(n, s, e) for n, a in summary["arms"].items() for s, e in a["failed"].items()]
    if failed:
        lines += ["", "Cells without results: " + "; ".join(f"{n}-s{s}: {e}" for n, s, e in failed)]
    wall = sum(summary.get("wall_s", {}).values())
    lines += ["", f"Machine: {summary['machine']}; {summary['date']}; study wall time {wall / 60:.1f} min"
              f" (load average at the end {summary.get('load_average_at_end', '?')})."]
    return "\n".join(lines) + "\n"


def write_study(study_dir: pathlib.Path, summary: dict) -> None:
    (study_dir / "study.json").write_text(json.dumps(summary, indent=1))
    (study_dir / "study.md").write_text(render_markdown(summary))
    plot_study(study_dir / "plots", summary)


def plot_study(out_dir: pathlib.Path, summary: dict) -> list[pathlib.Path]:
    """curves.png (mean over seeds with the CI band, per experiment, against game step) and final.png
    (the table's metrics: mean and CI per experiment)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    for ax, key in zip(axes, CURVES, strict=True):
        for i, (name, arm) in enumerate(summary["arms"].items()):
            series = list(arm["curves"][key].values())
            steps = sorted({int(s) for ser in series for s in ser})
            if not steps:
                continue
            grid = np.array([[ser.get(str(s), ser.get(s, np.nan)) for s in steps] for ser in series], float)
            mean, lo, hi = stats.band(grid, summary["confidence"])
            col = colours[i % len(colours)]
            ax.plot(steps, mean, color=col, label=f"{name} (n={len(series)})")
            ax.fill_between(steps, lo, hi, color=col, alpha=0.2)
        ax.set_title(key)
        ax.set_xlabel("game step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths = [out_dir / "curves.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    cols = TABLES[summary["table"]]
    fig, axes = plt.subplots(1, len(cols), figsize=(2.6 * len(cols), 3.4), sharey=False)
    for ax, m in zip(axes, cols, strict=True):
        for i, arm in enumerate(summary["arms"].values()):
            s = arm["metrics"][m]
            if s["n"]:
                finite = np.isfinite(s["ci"][0])
                err = [[s["mean"] - s["ci"][0]], [s["ci"][1] - s["mean"]]] if finite else None
                ax.errorbar([i], [s["mean"]], yerr=err, fmt="o", color=colours[i % len(colours)], capsize=3)
        ax.set_xticks(range(len(summary["arms"])), list(summary["arms"]), rotation=60, fontsize=7)
        ax.set_title(METRICS[m][2], fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "final.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def load_summary(path) -> dict:
    return json.loads(pathlib.Path(path).read_text())
