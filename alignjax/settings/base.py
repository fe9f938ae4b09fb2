"""A setting is where a game is played: the synthetic world (offline default) or real HF models.

Every setting offers the same four things to the runner (`alignjax.experiment.run`):

    check(cfg)                                   reject options this setting does not have
    build(cfg, progress) -> Built                the GameSpec, the GameState at step 0, the consts
    evaluate(built, defender, attacker, key)     a dict of results for one pair of players
    progress(built, state)                       scalars logged during the game (eval/*), or None
    report(name, cfg, results) -> Markdown       the setting's results tables

Run-level reporting (results.json / results.md, plots, HF export) is `alignjax.report`, shared by all.
An option either works in every setting or the setting that lacks it rejects it in `check`
(`unsupported_options`): tests/test_settings.py walks every option of the config in every setting.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Protocol

import jax

from alignjax.config import ConfigError
from alignjax.game.state import GameState
from alignjax.game.step import GameConsts, GameSpec


@dataclasses.dataclass
class Built:
    """What a setting's `build` returns: the game's static spec, its state at step 0, its consts,
    and the setting's own context (the synthetic world, or the real players' tokenizer)."""

    spec: GameSpec
    state: GameState
    consts: GameConsts
    context: Any
    tokenizer_dir: Any = None  # folder of tokenizer files exported beside the final policies
    notes: dict = dataclasses.field(default_factory=dict)  # facts for the report (e.g. cut seeds)


class Setting(Protocol):
    name: str

    def check(self, cfg) -> None: ...
    def build(self, cfg, progress: bool = True) -> Built: ...
    def evaluate(self, built: Built, defender_params, attacker_params, key, cfg) -> dict: ...
    def extra(self, built: Built, final_state, key, cfg) -> dict: ...
    def progress(self, built: Built, state, cfg) -> dict | None: ...
    def report(self, name: str, cfg, results: dict) -> str: ...


def _leaves(obj, prefix: str = "") -> dict[str, Any]:
    """{dotted name: value} of a (nested) config dataclass."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_leaves(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def unsupported_options(cfg, default_cfg, unsupported: tuple[str, ...], setting: str) -> None:
    """Raise ConfigError (a ValueError) naming every option under `unsupported` (dotted names or section
    prefixes ending in ".") whose value differs from its default: the setting has no such option."""
    now, default = _leaves(cfg), _leaves(default_cfg)
    bad = [k for k in now if now[k] != default[k]
           and any(k == u or (u.endswith(".") and k.startswith(u)) for u in unsupported)]
    if bad:
        raise ConfigError(f"setting {setting!r} has no option(s) {bad}: they exist only in another "
                          "setting; remove them from the config")


def _exists(path: str) -> bool:
    from alignjax.worlds.real_data import package_path  # `package:<pkg>/<file>` paths

    try:
        return pathlib.Path(package_path(path)).expanduser().exists()
    except FileNotFoundError:
        return False


def check_paths(needs: list[tuple[str, str, str, bool]]) -> None:
    """Fail before any heavy work when a path the config needs is missing.

    needs: (option name, path, what it must be, required). An empty optional path is fine."""
    missing = []
    for name, path, what, required in needs:
        if not path:
            if required:
                missing.append(f"{name} is empty (needs {what})")
        elif not _exists(path):
            missing.append(f"{name}={path!r} does not exist ({what})")
    if missing:
        raise FileNotFoundError("missing inputs for this experiment:\n  - " + "\n  - ".join(missing))


def common_paths(cfg) -> list[tuple[str, str, str, bool]]:
    """The paths every setting may be given: a run to resume, a sentence embedder folder."""
    needs = [("resume", cfg.resume, "an earlier run folder", False)]
    if cfg.embedder.kind == "minilm":
        needs.append(("embedder.path", cfg.embedder.path, "a sentence-transformers folder", False))
    return needs


def compute_dtype(cfg) -> str:
    """The forward/backward dtype name of this run ("auto" resolved for this backend): the players'
    `LlamaPlayerModels.compute_dtype`, and the storage dtype of the frozen models (references, judge)."""
    return cfg.precision.resolve(jax.default_backend()).compute
