"""Typed experiment configs: nested dataclasses filled from YAML plus dotted overrides.

`build_config(cls, mapping, overrides)` walks the dataclass tree; unknown keys, values of the wrong
type and values a dataclass's own `__post_init__` rejects fail with a `ConfigError` that names the
dotted key (and lists the valid keys at that level). Values of a dotted override (`game.rounds=4`)
are parsed as YAML scalars (`4` -> int, `true` -> bool, `[1,2]` -> list). YAML is only ever read
with `yaml.safe_load` (no Python objects from a config file).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml


class InputError(ValueError):
    """Bad input (a config, a data file, a checkpoint) named in the message: `alignjax.cli` prints the
    message without a traceback and exits with status 2."""


class ConfigError(InputError):
    pass


def _is_dataclass_type(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _check_type(value, annotation, where: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _check_type(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected None, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in pairs)
        inner = args[0] if args else Any
        out = [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if _is_dataclass_type(annotation):
        return build_config(annotation, value, (), where)
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads `5e-4` (no dot) as a string; accept any numeric literal for a float.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a float, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a float, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an int, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _set_dotted(tree: dict, dotted: str, value):
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_one_line(e)})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_trees(base: dict, top: dict) -> dict:
    """Nested dicts merged key by key, `top` winning; a non-dict value replaces the whole subtree."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_trees(out[k], v)
        else:
            out[k] = v
    return out


def build_config(cls, mapping: dict | None = None, overrides=(), where: str = "config"):
    """Instantiate dataclass `cls` from `mapping` (+ dotted `overrides`), validating keys and types."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping (a section of keys), got {mapping!r}")
    mapping = dict(mapping)
    if overrides:
        mapping = merge_trees(mapping, parse_overrides(overrides))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in mapping.items():
        kwargs[name] = _check_type(value, hints[name], f"{where}.{name}")
    for name, f in fields.items():
        if name not in kwargs and _is_dataclass_type(hints[name]) and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            kwargs[name] = build_config(hints[name], {}, (), f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a missing field, or the dataclass's own __post_init__ check
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from None


def _one_line(err: Exception) -> str:
    """A YAML error's message on one line (it names the line and column of the culprit)."""
    return " ".join(str(err).split())


def flatten(tree: dict | None, prefix: str = "") -> dict:
    """{"section.key": value} of a nested dict (a config as read from YAML or `to_dict`)."""
    out = {}
    for k, v in (tree or {}).items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_diff(saved_yaml: str, cfg, ignore=()) -> list[str]:
    """The dotted keys where a saved config.yaml differs from `cfg` (keys in `ignore` skipped). A key
    that one side lacks counts as its default, so an option added to the library later does not make
    old run folders differ."""
    old, new = flatten(yaml.safe_load(saved_yaml)), flatten(yaml.safe_load(dump_yaml(cfg)))
    default = flatten(yaml.safe_load(dump_yaml(type(cfg)())))
    return sorted(k for k in set(old) | set(new)
                  if k not in ignore and old.get(k, default.get(k)) != new.get(k, default.get(k)))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return yaml.safe_dump(plain(to_dict(cfg)), sort_keys=False)
