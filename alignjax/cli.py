"""Experiment runner: `python -m alignjax.cli NAME [section.key=value ...]` (what `make experiment` calls).

`experiments/NAME.yaml` holds `runner: <module under alignjax>` and a `config:` mapping, optionally
`base: <another experiment>` whose config it extends (a baseline then states only what defines it).
NAME may also be the path of such a file (`my/exp.yaml`; its `base` is looked up beside it, then in
experiments/); the run folder is then named after the file's stem.
The runner module exposes a dataclass `Config` and `run(cfg, run_dir) -> None` (and optionally
`resolve(cfg) -> cfg`, which makes machine-dependent defaults explicit before the config is written,
and `validate(cfg)`, which reads the inputs the config names and rejects bad ones before anything is
written). The resolved config is written to `runs/NAME/<timestamp>/config.yaml` before the run starts.

Bad input (alignjax.config.InputError, a checkpoint that cannot be read, a missing file) is reported
as one `error: ...` line naming the culprit, with exit status 2; a rejected run leaves at most its
config.yaml behind (README, "Bad input").
"""

from __future__ import annotations

import datetime
import importlib
import pathlib
import sys

import numpy as np
import yaml

from alignjax.config import ConfigError, InputError, build_config, dump_yaml, merge_trees
from alignjax.models.hf_config import CheckpointError

EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "experiments"
# what the cli reports as bad input (message, exit 2) rather than as a crash (traceback)
INPUT_ERRORS = (InputError, CheckpointError, FileNotFoundError)


def available() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def _is_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or "/" in name


def _spec_path(name: str, near: pathlib.Path | None) -> pathlib.Path:
    """The file of experiment `name`: a path as given, else beside the file that names it as its
    base (`near`), else experiments/NAME.yaml."""
    if _is_path(name):
        return pathlib.Path(name)
    if near is not None and (near / f"{name}.yaml").exists():
        return near / f"{name}.yaml"
    return EXPERIMENTS_DIR / f"{name}.yaml"


def run_name(name: str) -> str:
    """The folder under runs/ of experiment `name` (a path's stem)."""
    return pathlib.Path(name).stem if _is_path(name) else name


def _read_spec(name: str, seen: tuple[str, ...] = (), near: pathlib.Path | None = None) -> dict:
    """The experiment file `name`, with its `base` chain merged in (base first, this file on top)."""
    path = _spec_path(name, near)
    if not path.exists():
        raise ConfigError(f"no experiment {name!r}: {path} does not exist; available: {available()}")
    if name in seen:
        raise ConfigError(f"{path}: 'base' chain loops: {' -> '.join(seen + (name,))}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:  # the message names the line and column
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with 'runner' and 'config' keys, got a "
                          f"{type(spec).__name__}")
    unknown = sorted(set(spec) - {"runner", "config", "description", "base"})
    if unknown or "runner" not in spec:
        raise ConfigError(
            f"{path}: needs 'runner' and 'config' keys (optional 'description', 'base'); got {sorted(spec)}"
        )
    if "base" in spec:
        base = _read_spec(spec["base"], seen + (name,), path.parent)
        if base["runner"] != spec["runner"]:
            raise ConfigError(f"{path}: runner {spec['runner']!r} differs from its base's {base['runner']!r}")
        spec = {**spec, "config": merge_trees(base.get("config") or {}, spec.get("config") or {})}
    return spec


def load_experiment(name: str, overrides=()):
    spec = _read_spec(name)
    module = importlib.import_module(f"alignjax.{spec['runner']}")
    cfg = build_config(module.Config, spec.get("config") or {}, overrides)
    return module, cfg


def _environment_comment() -> str:
    """Where the run ran, as YAML comments under the config (the run also records it in results.json)."""
    from alignjax import backend

    return "".join(f"# environment.{k}: {v}\n" for k, v in backend.describe().items())


def _start_processes(cfg) -> bool:
    """Multi-host start-up when the config (or the environment) asks for it, before any device is
    touched (alignjax.parallel.distributed); returns whether this process is the primary one."""
    par = getattr(cfg, "parallel", None)
    if par is None:
        return True
    from alignjax.parallel import distributed

    distributed.initialize(par.coordinator, par.num_processes, par.process_id)
    return distributed.is_primary()


def _stamp() -> str:
    """The run folder's time stamp; with several processes, process 0's (all write one folder)."""
    now = datetime.datetime.now()
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        now = datetime.datetime.fromtimestamp(
            float(multihost_utils.broadcast_one_to_all(np.asarray(now.timestamp(), np.float64))))
    return now.strftime("%Y%m%d-%H%M%S")


def _reject(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + f"\n\nexperiments: {', '.join(available())}")
        return 0
    name = argv[0] if argv else "default"
    try:
        module, cfg = load_experiment(name, argv[1:])
    except INPUT_ERRORS as e:
        return _reject(e)
    primary = _start_processes(cfg)
    from alignjax import backend  # here: it brings in JAX
    from alignjax.worlds.players import default_cache_dir

    backend.use_compilation_cache(default_cache_dir() / "xla")
    if hasattr(module, "resolve"):  # this machine's defaults, made explicit in config.yaml
        cfg = module.resolve(cfg)
    try:
        if hasattr(module, "validate"):  # the inputs the config names, read before anything is written
            module.validate(cfg)
    except INPUT_ERRORS as e:
        return _reject(e)
    run_dir = pathlib.Path("runs") / run_name(name) / _stamp()
    run_dir.mkdir(parents=True, exist_ok=True)
    if primary:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg) + _environment_comment())
    print(f"[alignjax] experiment {name} -> {run_dir}")
    from alignjax.checkpoint import CheckpointWriteError  # imported here: they bring in JAX and Orbax
    from alignjax.game.loop import RunFolderError
    try:
        module.run(cfg, run_dir)
    except (InputError, CheckpointError) as e:  # found while loading (e.g. a NaN weight): the run folder
        return _reject(e)  # holds config.yaml only (a missing file mid-run keeps its traceback)
    except (RunFolderError, CheckpointWriteError) as e:  # an unwritable run folder, a full disk: the
        return _reject(e)  # message names the path and what to do; a traceback would add nothing
    return 0


if __name__ == "__main__":
    sys.exit(main())
