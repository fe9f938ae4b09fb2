"""Typed configs and dotted overrides (alignjax/config.py): hand-written expectations."""

import dataclasses

import pytest

from alignjax.config import ConfigError, build_config, dump_yaml


@dataclasses.dataclass(frozen=True)
class Inner:
    rounds: int = 2
    lr: float = 1e-3
    preset: str = "paper"
    ks: tuple[int, ...] = (1, 2)


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    flag: bool = False
    path: str | None = None
    game: Inner = dataclasses.field(default_factory=Inner)


def test_yaml_and_dotted_overrides_merge():
    cfg = build_config(Outer, {"game": {"rounds": 3}}, ["game.lr=0.5", "flag=true", "game.ks=[4, 5, 6]"])
    assert cfg == Outer(flag=True, game=Inner(rounds=3, lr=0.5, ks=(4, 5, 6)))


def test_yaml_exponent_without_dot_is_a_float():
    import yaml

    assert yaml.safe_load("lr: 5e-4") == {"lr": "5e-4"}  # the YAML 1.1 trap this guards against
    assert build_config(Outer, yaml.safe_load("game: {lr: 5e-4}")).game.lr == 5e-4


def test_int_is_accepted_for_float_and_none_for_optional():
    cfg = build_config(Outer, {"game": {"lr": 1}, "path": None})
    assert cfg.game.lr == 1.0 and isinstance(cfg.game.lr, float) and cfg.path is None


def test_unknown_key_lists_valid_keys():
    expected = r"unknown key\(s\) \['round'\].*valid keys: \['ks', 'lr', 'preset', 'rounds'\]"
    with pytest.raises(ConfigError, match=expected):
        build_config(Outer, {}, ["game.round=4"])


@pytest.mark.parametrize("override", ["game.rounds=abc", "game.rounds=1.5", "flag=3", "game.lr=true"])
def test_wrong_type_fails_with_location(override):
    with pytest.raises(ConfigError, match="config.(game.rounds|flag|game.lr)"):
        build_config(Outer, {}, [override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config(Outer, {}, ["game.rounds"])


def test_dump_roundtrip():
    import yaml

    cfg = build_config(Outer, {}, ["game.ks=[7]"])
    assert build_config(Outer, yaml.safe_load(dump_yaml(cfg))) == cfg


def test_experiment_base_chain_merges_and_rejects_loops(tmp_path, monkeypatch):
    from alignjax import cli

    monkeypatch.setattr(cli, "EXPERIMENTS_DIR", tmp_path)
    (tmp_path / "a.yaml").write_text("runner: r\nconfig: {game: {rounds: 3, lr: 0.5}, name: a}\n")
    (tmp_path / "b.yaml").write_text("runner: r\nbase: a\nconfig: {game: {rounds: 4}}\n")
    assert cli._read_spec("b")["config"] == {"game": {"rounds": 4, "lr": 0.5}, "name": "a"}
    (tmp_path / "c.yaml").write_text("runner: r\nbase: d\nconfig: {}\n")
    (tmp_path / "d.yaml").write_text("runner: r\nbase: c\nconfig: {}\n")
    with pytest.raises(ConfigError, match="loops: c -> d -> c"):
        cli._read_spec("c")
    (tmp_path / "e.yaml").write_text("runner: other\nbase: a\nconfig: {}\n")
    with pytest.raises(ConfigError, match="differs from its base"):
        cli._read_spec("e")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_cli_help_lists_the_experiments(flag, capsys):
    from alignjax import cli

    assert cli.main([flag]) == 0
    out = capsys.readouterr().out
    assert "python -m alignjax.cli NAME" in out
    listed = out.split("experiments: ")[1].strip().split(", ")
    assert listed == sorted(p.stem for p in (cli.EXPERIMENTS_DIR).glob("*.yaml")) and "real_smollm2" in listed
