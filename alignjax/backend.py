"""Which accelerator this machine has, which one JAX is using, and a check that the two agree.

`detect_accelerator()` looks at the machine only (device files, environment variables, PATH), never at
JAX, so `make env` can call it before JAX is installed: `python3 -I alignjax/backend.py --detect` prints
`cpu`, `tpu` or `cuda` (this file imports nothing outside the standard library at module level; jax is
imported inside `describe()`). The rules, in order:

1. `ALIGNJAX_ACCEL` set to `cpu`, `tpu` or `cuda` (any case) wins; any other non-empty value is an error.
   Use it where the rules below guess wrong, e.g. `ALIGNJAX_ACCEL=cpu` on a GPU machine to stay on the CPU.
2. `tpu` if a TPU runtime variable is set (`TPU_NAME`, `TPU_ACCELERATOR_TYPE`, `TPU_WORKER_ID`,
   `CLOUD_TPU_TASK_ID`, `TPU_WORKER_HOSTNAMES`), or the device folder holds `accel<N>` nodes (TPU v2-v4
   VMs show /dev/accel0 ...; the Linux accel subsystem's /dev/accel/ folder of other NPUs does not count).
3. `cuda` if `nvidia-smi` is on PATH or /dev/nvidia0 exists.
4. `tpu` if /dev/vfio holds an IOMMU group (a numbered entry): TPU v5e/v6e VMs expose their chips so. This
   is the weakest sign (any VFIO passthrough host has one), hence checked after the GPU.
5. Otherwise `cpu`.

`describe()` reports what JAX runs on (backend, device kind and counts, processes, versions) next to the
detected accelerator; every run records it. `check_backend()` raises when the machine has an accelerator
but JAX fell back to the CPU (the usual cause: the venv holds the CPU build of jaxlib), unless the run
allows the CPU explicitly.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Mapping

ACCELERATORS = ("cpu", "tpu", "cuda")
OVERRIDE_VAR = "ALIGNJAX_ACCEL"
TPU_ENV_VARS = (
    "TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID", "TPU_WORKER_HOSTNAMES",
)
_ACCEL_NODE = re.compile(r"accel\d+")


def _entries(path: str) -> list[str]:
    """The names in folder `path`; [] when it is missing or unreadable."""
    try:
        return os.listdir(path)
    except OSError:
        return []


def detect_accelerator(
    env: Mapping[str, str] = os.environ,
    dev_dir: str = "/dev",
    which: Callable[[str], str | None] = shutil.which,
) -> str:
    """The accelerator this machine has, by the rules in the module docstring, without importing JAX.

    env, dev_dir and which (PATH look-up) are injectable for tests. Returns "tpu", "cuda" or "cpu".
    Raises ValueError when env[ALIGNJAX_ACCEL] is set to anything but cpu, tpu or cuda.
    """
    override = env.get(OVERRIDE_VAR, "").strip().lower()
    if override:
        if override not in ACCELERATORS:
            choices = ", ".join(ACCELERATORS)
            raise ValueError(f"{OVERRIDE_VAR}={env[OVERRIDE_VAR]!r}: must be one of {choices} "
                             "(or unset to detect)")
        return override
    if any(env.get(name, "").strip() for name in TPU_ENV_VARS):
        return "tpu"
    if any(_ACCEL_NODE.fullmatch(name) for name in _entries(dev_dir)):
        return "tpu"
    if which("nvidia-smi") or os.path.exists(os.path.join(dev_dir, "nvidia0")):
        return "cuda"
    if any(name.isdigit() for name in _entries(os.path.join(dev_dir, "vfio"))):
        return "tpu"
    return "cpu"


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo), or the platform string where that is unreadable: the
    machine to name under a speed figure or a study."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.platform()


def describe() -> dict:
    """What JAX runs on here. Reads only (it initialises JAX's backends, as any JAX call would).

    Returns a dict: backend (jax.default_backend(): "cpu", "gpu" or "tpu"), device_kind (of the first
    device), local_device_count, global_device_count, process_count, process_index (ints), jax and jaxlib
    (version strings), and accelerator_present (detect_accelerator(): "cpu", "tpu" or "cuda", i.e. what the
    machine has, whatever JAX uses).
    """
    import jax
    import jaxlib

    return {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "local_device_count": jax.local_device_count(),
        "global_device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "accelerator_present": detect_accelerator(),
    }


def use_compilation_cache(folder) -> str:
    """Turn on XLA's persistent compilation cache in `folder` (unless $JAX_COMPILATION_CACHE_DIR already
    names one): a second run of the same experiment, a resumed run and the seeds of a study load their
    compiled programs instead of compiling them again (the default game's first chunk compiled for
    about 20 s on 2 cores). A hit loads the executable the first compilation wrote, so the numbers are
    those of a fresh compile. Returns the folder in use."""
    import jax

    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(folder)
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


def check_backend(allow_cpu: bool, info: dict | None = None) -> None:
    """Fail (or, with allow_cpu, warn) when the machine has an accelerator but JAX runs on the CPU.

    info: a describe() dict (only "backend" and "accelerator_present" are read; jax/jaxlib name the build
    in the message); None calls describe(). Returns None. Raises RuntimeError on the mismatch unless
    allow_cpu, when it issues a RuntimeWarning instead. A CPU-only machine, or JAX on any accelerator,
    passes silently.
    """
    info = describe() if info is None else info
    accel = info["accelerator_present"]
    if accel == "cpu" or info["backend"] != "cpu":
        return
    build = f" (jax {info['jax']}, jaxlib {info['jaxlib']})" if "jax" in info and "jaxlib" in info else ""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    pinned = "cpu" in [p.strip() for p in platforms.split(",")]
    hint = f" because JAX_PLATFORMS={platforms!r} selects it (unset that)" if pinned else ""
    message = (
        f"this machine has a {accel.upper()} accelerator but JAX is running on the CPU{build}{hint}. "
        f"Install the matching JAX build with `make env ACCEL={accel}` (reinstalls the venv's jax with "
        f"the {accel} extra), or pass `allow_cpu=true` to run on the CPU anyway "
        f"(or set {OVERRIDE_VAR}=cpu if the detection is wrong)."
    )
    if not allow_cpu:
        raise RuntimeError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def _main(argv: list[str]) -> int:
    """`python3 -I alignjax/backend.py --detect` (no JAX needed) or `--describe`."""
    if argv == ["--detect"]:
        try:
            print(detect_accelerator())
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if argv == ["--describe"]:
        import json

        print(json.dumps(describe(), indent=2))
        return 0
    print("usage: backend.py --detect | --describe", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
