"""`make bench`: runs every benchmarks/bench_*.py in turn (each prints ours vs the reference), then writes
`runs/bench/<stamp>/bench.json` (benchmarks/summary.py): the figures the benchmarks recorded, which
benchmarks ran (and which failed), the processor, core count, load average at the start, JAX version
and backend. The README's benchmark section is generated from that file by tools/readme_bench.py.

    python -m benchmarks.run_all                   # all
    python -m benchmarks.run_all bench_ppo ...     # only the named ones (file stems)
    ALIGNJAX_BENCH_OUT=dir python -m benchmarks.run_all   # write dir/bench.json instead
"""

import datetime
import os
import pathlib
import runpy
import sys
import traceback

from benchmarks import summary

if __name__ == "__main__":
    only = sys.argv[1:]
    machine = summary.machine()  # the load average at the start
    print(f"processor {machine['processor']} ({machine['cores']} cores); load average at the start "
          f"{' '.join(f'{x:.2f}' for x in machine['load_average'])}", flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = pathlib.Path(os.environ.get("ALIGNJAX_BENCH_OUT") or pathlib.Path("runs") / "bench" / stamp)
    ran, failed = [], []

    def write_summary():  # after every benchmark, so that an interrupted run still leaves what ran
        done = dict(machine, load_average_end=list(os.getloadavg()), date=stamp,
                    small=bool(os.environ.get("ALIGNJAX_BENCH_SMALL")))
        if failed:
            done["failed"] = list(failed)
        return summary.write(out / "bench.json", done, ran)

    for path in sorted(pathlib.Path(__file__).parent.glob("bench_*.py")):
        if only and path.stem not in only:
            continue
        print(f"\n=== {path.stem} === (load average {os.getloadavg()[0]:.2f})", flush=True)
        try:
            runpy.run_path(str(path), run_name="__main__")
            ran.append(path.stem)
        except SystemExit as e:  # sys.exit(main()): 0 / None is success
            (failed if e.code not in (0, None) else ran).append(path.stem)
            if e.code not in (0, None):
                print(f"{path.stem} exited with {e.code!r}", flush=True)
        except Exception:  # record what ran; the others still run
            traceback.print_exc()
            failed.append(path.stem)
        write_summary()
    written = write_summary()
    print(f"\nwrote {written}; load average at the end {os.getloadavg()[0]:.2f}", flush=True)
    sys.exit(1 if failed else 0)
