"""Put finished studies into the README: their summaries are committed and rendered, never typed in.

    python tools/readme_results.py runs/study_table1/<stamp> [runs/study_table2/<stamp> ...]

For each study folder (written by `make experiment NAME=study_*`, alignjax/study.py) this copies
`study.json` to `results/<title>.json` and its plots to `results/<title>-{curves,final}.png`, then
rewrites the README text between `<!-- <title>:begin -->` and `<!-- <title>:end -->` with
`alignjax.study.render_markdown(summary, compact=True)`. tests/test_study.py renders the committed
summaries again and fails when the README differs.

    python tools/readme_results.py --plan results/plan_7b.md

puts the summary table of the memory plans (`python -m alignjax.plan --collect ...`) between
`<!-- plan_7b:begin -->` and `<!-- plan_7b:end -->` (`plan_table`; tests/test_plan.py checks it).

    python tools/readme_results.py --real runs/real_smollm2/<stamp>

copies a real-setting run's results.json (with its per-step times from metrics.jsonl added as
`step_seconds`) to `results/<name>.json` and its results.md to `results/<name>.md`, and puts
`real_block(summary)` (rates with their intervals, time, memory, the machine) between
`<!-- <name>:begin -->` and `<!-- <name>:end -->` (tests/test_readme_real.py checks it).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alignjax import study  # noqa: E402


def fill(readme: str, title: str, body: str) -> str:
    begin, end = f"<!-- {title}:begin -->", f"<!-- {title}:end -->"
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README has no '{begin}' ... '{end}' block")
    return pattern.sub(lambda _: f"{begin}\n{body}{end}", readme)


def plan_table(plans_md: str) -> str:
    """The summary table (header and rows) of a `--collect` file, as the README shows it."""
    lines = plans_md.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("| layout |"))
    end = next((i for i, ln in enumerate(lines[first:]) if not ln.startswith("|")), len(lines) - first)
    return "\n".join(lines[first:first + end]) + "\n"


def real_summary(run_dir: pathlib.Path) -> dict:
    """A real-setting run's results.json plus `step_seconds` ({step: seconds}, from metrics.jsonl) and
    `chunk_size` (config.yaml)."""
    import yaml

    summary = json.loads((run_dir / "results.json").read_text())
    summary["chunk_size"] = yaml.safe_load((run_dir / "config.yaml").read_text())["loop"]["chunk_size"]
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["step_seconds"] = {str(r["step"]): r["time/step_s"] for r in records if "time/step_s" in r}
    return summary


def _rate(r: dict, key: str) -> str:
    if key not in r:
        return "n/a"
    lo, hi = r.get(f"{key}_ci", (None, None))
    return f"{r[key]:.3f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and lo == lo else "")


def real_block(summary: dict, name: str) -> str:
    """The README's account of one real-setting run: rates before / after, time, memory, machine."""
    env, t, mem = summary["environment"], summary["timing"], summary.get("memory", {})
    load = summary.get("load_average", {})
    steps = {int(k): v for k, v in summary["step_seconds"].items()}
    first = min(steps)  # the first chunk's per-step time holds its compilation
    later = [v for k, v in steps.items() if k >= first + summary["chunk_size"]]
    per_step = (f"{sum(later) / len(later):.1f} s per step after the first chunk" if later
                else "one chunk only")
    gib = 2.0**30
    lines = [
        f"Generated from [results/{name}.json](results/{name}.json) by `tools/readme_results.py --real` "
        f"(samples of text: [results/{name}.md](results/{name}.md)). Machine: {env.get('processor', '?')}, "
        f"{env.get('cpus', '?')} CPUs, load average {load.get('start', float('nan')):.2f} at the start and "
        f"{load.get('end', float('nan')):.2f} at the end.",
        "",
        f"- time: {t['total'] / 60:.1f} min in all; game {t[_key(t, 'game')]:.0f} s for {len(steps)} steps "
        f"({per_step}; checkpoints and the first chunk's compilation included in the game's total), "
        f"evaluations {t[_key(t, 'initial evaluation')]:.0f} s + {t['final evaluation']:.0f} s",
    ]
    if mem.get("peak_rss_bytes"):
        ratio = mem["peak_rss_bytes"] / mem["state_bytes"]
        lines.append(f"- memory: peak resident {mem['peak_rss_bytes'] / gib:.1f} GiB against a game state "
                     f"of {mem['state_bytes'] / gib:.1f} GiB ({ratio:.2f}x)")
    lines += ["", f"| players (n = {summary['initial']['n']} seeds, {summary['initial'].get('n_benign', 0)} "
              "benign) | defender ASR | attacker ASR | over-refusal |", "|---|---|---|---|"]
    for label in ("initial", "final"):
        r = summary[label]
        cells = [_rate(r, k) for k in ("defender_attack_success", "attacker_attack_success", "over_refusal")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _key(timing: dict, prefix: str) -> str:
    return next(k for k in timing if k.startswith(prefix))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="*", type=pathlib.Path)
    ap.add_argument("--plan", type=pathlib.Path, help="a `python -m alignjax.plan --collect` file")
    ap.add_argument("--real", type=pathlib.Path, help="a real-setting run folder (runs/<name>/<stamp>)")
    ap.add_argument("--readme", type=pathlib.Path, default=ROOT / "README.md")
    args = ap.parse_args(argv)
    readme = args.readme.read_text()
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    for folder in args.studies:
        summary = study.load_summary(folder / "study.json")
        title = summary["title"]
        shutil.copyfile(folder / "study.json", out / f"{title}.json")
        for name in ("curves", "final"):
            shutil.copyfile(folder / "plots" / f"{name}.png", out / f"{title}-{name}.png")
        readme = fill(readme, title, study.render_markdown(summary, compact=True))
        print(f"{title}: {folder} -> results/{title}.json")
    if args.plan:
        readme = fill(readme, "plan_7b", plan_table(args.plan.read_text()))
        print(f"plan_7b: {args.plan}")
    if args.real:
        name = args.real.parent.name
        summary = real_summary(args.real)
        (out / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
        shutil.copyfile(args.real / "results.md", out / f"{name}.md")
        readme = fill(readme, name, real_block(summary, name))
        print(f"{name}: {args.real} -> results/{name}.json")
    args.readme.write_text(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
