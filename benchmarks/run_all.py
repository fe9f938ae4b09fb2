"""`make bench`: runs every benchmarks/bench_*.py in turn (each prints ours vs the reference)."""

import pathlib
import runpy
import sys

if __name__ == "__main__":
    only = sys.argv[1:]
    for path in sorted(pathlib.Path(__file__).parent.glob("bench_*.py")):
        if only and path.stem not in only:
            continue
        print(f"\n=== {path.stem} ===", flush=True)
        runpy.run_path(str(path), run_name="__main__")
