"""Settings behind one interface: every option of the experiment config either works in a setting or
that setting rejects it by name (walks every leaf option of `Config` in both settings)."""

import dataclasses
import typing

import pytest

from alignjax import experiment as E
from alignjax.settings import SETTINGS, get_setting, unsupported_options


def _leaves(cls, prefix=""):
    """(dotted name, field type, default) of every leaf option of a config dataclass."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t, default = hints[f.name], getattr(cls(), f.name)
        if dataclasses.is_dataclass(default):
            out += _leaves(type(default), f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", t, default))
    return out


def _other_value(t, default):
    """A valid value different from the default, for the option's type."""
    if typing.get_origin(t) is typing.Literal:
        return next(a for a in typing.get_args(t) if a != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default * 0.5 if default else 0.5
    if isinstance(default, str):
        return default + "x"
    if isinstance(default, tuple):
        return default[:-1] if len(default) > 1 else default
    return None


def _replace(cfg, dotted, value):
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _replace(getattr(cfg, head), rest, value)})


OPTIONS = [o for o in _leaves(E.Config) if o[0] != "setting"]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_every_option_works_or_is_rejected_by_name(setting):
    base = E.Config(setting=setting)
    unsupported = SETTINGS[setting].UNSUPPORTED
    rejected, accepted = [], []
    for name, t, default in OPTIONS:
        value = _other_value(t, default)
        if value is None or value == default:
            continue
        try:
            cfg = _replace(base, name, value)
        except (ValueError, TypeError):
            continue  # the dataclass itself refuses this value (e.g. a constraint): not a setting question
        is_unsupported = any(name == u or (u.endswith(".") and name.startswith(u)) for u in unsupported)
        if is_unsupported:
            with pytest.raises(ValueError, match=rf"setting '{setting}' has no option\(s\) \['{name}'\]"):
                unsupported_options(cfg, base, unsupported, setting)
            rejected.append(name)
        else:
            unsupported_options(cfg, base, unsupported, setting)  # accepted
            accepted.append(name)
    assert rejected and accepted
    # the options that exist in one setting only
    if setting == "real":
        assert {"data", "world.seed", "eval.attacker_samples_per_seed", "cache_dir"} <= set(rejected)
    else:
        assert {"real.judge.checkpoint", "real.seed_prompts", "eval.real_prompts",
                "defender.critic_checkpoint"} <= set(rejected)
    for shared in ("game.batch_size", "loop.total_steps", "eval.every_chunks", "embedder.kind", "seed"):
        assert shared in accepted


def test_real_rejects_paraphrase_before_loading_anything(tmp_path):
    cfg = E.Config(setting="real", data="paraphrase")
    with pytest.raises(ValueError, match=r"\['data'\]"):
        E.run(cfg, tmp_path)
    assert not any(tmp_path.iterdir())


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match="choose from"):
        get_setting("elsewhere")


def test_precision_reaches_the_players_and_auto_resolves_per_backend():
    """`precision` and `remat` reach every player's networks: trained weights (and so their Adam
    moments) in precision.params, the references in the compute dtype; "auto" compute is float32 on
    this CPU machine and explicit in the resolved config."""
    import jax
    import jax.numpy as jnp
    from test_game import TINY, random_players

    from alignjax.config import build_config
    from alignjax.settings.synthetic import SyntheticSetting
    from alignjax.worlds.synthetic import SyntheticWorld

    want = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    assert E.resolve(E.Config()).precision.compute == want
    cfg = build_config(E.Config, TINY, ["precision.compute=bfloat16", "remat=full"])
    built = SyntheticSetting().build(cfg, progress=False, players=random_players(SyntheticWorld(cfg.world)))
    for role in (built.spec.defender, built.spec.attacker):
        assert (role.models.compute_dtype, role.models.remat) == ("bfloat16", "full")
    dtypes = lambda tree: {str(x.dtype) for x in jax.tree.leaves(tree)
                           if jnp.issubdtype(x.dtype, jnp.floating)}
    state = built.state
    assert dtypes(state.defender.policy_params) == dtypes(state.defender.policy_opt_state) == {"float32"}
    assert dtypes(state.attacker.critic_params) == {"float32"}
    assert dtypes(state.defender_ref) == dtypes(state.attacker_ref) == {"bfloat16"}
    with pytest.raises(ValueError, match="remat"):
        build_config(E.Config, TINY, ["remat=most"])
