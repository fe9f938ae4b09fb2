"""Fault-phase markers: where a run is, printed for the fault trials (`make faults`, tools/faults.py).

A run is killed in the fault trials at a named phase (inside a chunk, a checkpoint save, an
evaluation, the export). The trial tool cannot see inside the process, so the process says where it
is: with the environment variable

    ALIGNJAX_FAULT_PHASE=save            (one phase; or a comma-separated list; or "all")

every entry into and exit from a matching phase prints one line to stderr,

    [alignjax-fault] enter save 4 1733150000.123456
    [alignjax-fault] leave save 4 1733150000.161803

(phase, step or -1, wall-clock time), flushed at once. The tool sends SIGKILL itself, at a chosen
moment after an `enter`; library code never kills itself, and without the variable `phase` costs one
dictionary lookup. The phases: `chunk` (a scanned chunk runs), `save` (Orbax writes a checkpoint),
`eval` (the initial, progress or final evaluation), `export` (the HF export of the final players
and the plots).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

ENV = "ALIGNJAX_FAULT_PHASE"
PHASES = ("chunk", "save", "eval", "export")
MARK = "[alignjax-fault]"


def traced(name: str) -> bool:
    """Whether ALIGNJAX_FAULT_PHASE asks for markers of phase `name`."""
    wanted = os.environ.get(ENV, "")
    return bool(wanted) and (wanted == "all" or name in wanted.split(","))


def _mark(what: str, name: str, step) -> None:
    # One write of a whole line: tqdm shares stderr, and the tool searches lines for the mark.
    sys.stderr.write(f"\n{MARK} {what} {name} {-1 if step is None else int(step)} {time.time():.6f}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def phase(name: str, step=None):
    """Marks the enclosed code as phase `name` (at game step `step`) for the fault trials."""
    if name not in PHASES:
        raise ValueError(f"unknown fault phase {name!r}; known: {PHASES}")
    if not traced(name):
        yield
        return
    _mark("enter", name, step)
    yield
    _mark("leave", name, step)
