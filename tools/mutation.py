"""Mutation-testing pass (`make mutation`): mutmut on the core pure modules, a sample of mutants per module.

mutmut (configured in pyproject.toml, `[tool.mutmut]`) copies the package to mutants/ and compiles every
mutant of the modules in `only_mutate` into that copy behind trampolines; the sources are never edited.
This driver

1. starts from a fresh mutants/ (so that edited tests and sources are always picked up),
2. generates the mutants with mutmut and draws a fixed-seed sample of at most `--per-module` per module
   (every module is sampled the same way on every pass, so passes are comparable),
3. runs `mutmut run` on the sample with one worker: mutmut first runs the selected tests once to learn
   which tests call which function, then runs for each mutant only the tests that call the mutated
   function (so a module's mutants run only the tests that cover it),
4. prints and writes (`--report`, default mutation-report.md) a per-module table of mutants, killed,
   survived and kill rate, followed by the diff of every mutant that was not killed.

Killed counts the mutants that made a test fail, time out or crash. Decorated functions (e.g. the
`@jax.jit` entry points of worlds/judge.py) are not mutated by mutmut (its trampolines cannot wrap them);
the functions they call are.

    python tools/mutation.py [--per-module 60] [--seed 0] [--module alignjax/rl/kernels.py ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DETECTED = {"killed", "timeout", "segfault"}


def generate_mutants(modules: list[str]) -> dict[str, list[str]]:
    """Write mutants/ with mutmut's own generator and return {module path: [mutant names]}."""
    from mutmut.__main__ import create_mutants
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir

    Path("mutants").mkdir()
    copy_src_dir()
    copy_also_copy_files()
    create_mutants(1)
    names = {}
    for path in modules:
        data = SourceFileMutationData(path=path)
        data.load()
        names[path] = sorted(
            data.exit_code_by_key, key=lambda k: (k.rpartition("__mutmut_")[0], int(k.rpartition("_")[2]))
        )
    return names


def results(modules: list[str], sample: dict[str, list[str]]):
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code

    rows, survivors = [], []
    for path in modules:
        data = SourceFileMutationData(path=path)
        data.load()
        status = {name: status_by_exit_code[data.exit_code_by_key.get(name)] for name in sample[path]}
        counts = Counter(status.values())
        killed = sum(counts[s] for s in DETECTED)
        rows.append((path, len(status), killed, len(status) - killed, counts))
        survivors += [(path, name, s) for name, s in status.items() if s not in DETECTED]
    return rows, survivors


def table(rows) -> str:
    lines = [
        "| module | mutants | killed | survived | kill rate |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for path, n, killed, survived, counts in rows:
        other = {k: v for k, v in counts.items() if k not in DETECTED | {"survived"}}
        note = f" ({', '.join(f'{v} {k}' for k, v in sorted(other.items()))})" if other else ""
        rate = f"{100 * killed / n:.1f}%" if n else "-"
        lines.append(f"| {path} | {n} | {killed} | {survived}{note} | {rate} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-module", type=int, default=60, help="mutants sampled per module (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--module", action="append", help="only these modules (paths); default: only_mutate")
    parser.add_argument("--report", default="mutation-report.md")
    parser.add_argument("--min-kill-rate", type=float, default=0.0, help="exit 1 if a module is below it")
    args = parser.parse_args()

    os.chdir(ROOT)
    cfg = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["mutmut"]
    modules = args.module or list(cfg["only_mutate"])
    unknown = [m for m in modules if m not in cfg["only_mutate"]]
    if unknown:
        parser.error(f"{unknown} are not in [tool.mutmut] only_mutate")

    start = time.time()
    shutil.rmtree("mutants", ignore_errors=True)
    all_names = generate_mutants(modules)
    sample = {}
    for path in modules:
        names = all_names[path]
        rng = random.Random(f"{args.seed}:{path}")  # a module's sample does not depend on the others
        k = len(names) if args.per_module <= 0 else min(args.per_module, len(names))
        sample[path] = sorted(rng.sample(names, k), key=names.index)
        print(f"{path}: {len(names)} mutants, {k} sampled")
    Path("mutants/sample.json").write_text(json.dumps(sample, indent=1))

    env = dict(os.environ)
    # The SFT'd players cache of the tests (tests/conftest.py would otherwise put it under mutants/).
    env.setdefault("ALIGNJAX_CACHE_DIR", str(ROOT / "cache" / "tests"))
    names = [n for path in modules for n in sample[path]]
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", "1", *names]
    log = Path("mutants/mutmut-run.log")
    print(f"mutmut run on {len(names)} mutants (its output: {log}) ...", flush=True)
    with log.open("w") as out:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    elapsed = time.time() - start
    if proc.returncode != 0:
        print(log.read_text().replace("\r", "\n")[-5000:])

    rows, survivors = results(modules, sample)
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    text = [
        "# Mutation testing report",
        "",
        f"mutmut, at most {args.per_module or 'all'} mutants per module (seed {args.seed}); "
        f"pass took {elapsed / 60:.1f} min (mutmut exit code {proc.returncode}).",
        "",
        table(rows),
        "",
        "## Mutants not killed",
        "",
    ]
    for path, name, status in survivors:
        text += [f"### {name} ({status})", "", "```diff", get_diff_for_mutant(name, path=path), "```", ""]
    Path(args.report).write_text("\n".join(text))
    print()
    print(table(rows))
    print(f"\n{len(survivors)} mutants not killed (diffs in {args.report}); {elapsed / 60:.1f} min")
    if proc.returncode != 0:
        return proc.returncode
    low = [path for path, n, killed, *_ in rows if n and killed / n < args.min_kill_rate]
    if low:
        print(f"below the kill rate {args.min_kill_rate:.0%}: {low}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
