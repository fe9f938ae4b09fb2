"""Experiment runner: `python -m alignjax.cli NAME [section.key=value ...]` (what `make experiment` calls).

`experiments/NAME.yaml` holds `runner: <module under alignjax>` and a `config:` mapping. The runner
module exposes a dataclass `Config` and `run(cfg, run_dir) -> None`. The resolved config is written
to `runs/NAME/<timestamp>/config.yaml` before the run starts.
"""

from __future__ import annotations

import datetime
import importlib
import pathlib
import sys

import yaml

from alignjax.config import ConfigError, build_config, dump_yaml

EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "experiments"


def available() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def load_experiment(name: str, overrides=()):
    path = EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"no experiment {name!r}: {path} does not exist; available: {available()}")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(spec) - {"runner", "config", "description"})
    if unknown or "runner" not in spec:
        raise ConfigError(
            f"{path}: needs 'runner' and 'config' keys (optional 'description'); got {sorted(spec)}"
        )
    module = importlib.import_module(f"alignjax.{spec['runner']}")
    cfg = build_config(module.Config, spec.get("config") or {}, overrides)
    return module, cfg


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv else "default"
    try:
        module, cfg = load_experiment(name, argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = pathlib.Path("runs") / name / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    print(f"[alignjax] experiment {name} -> {run_dir}")
    module.run(cfg, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
