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
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="*", type=pathlib.Path)
    ap.add_argument("--plan", type=pathlib.Path, help="a `python -m alignjax.plan --collect` file")
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
    args.readme.write_text(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
