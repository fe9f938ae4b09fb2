"""Every experiments/*.yaml of the game runner is a valid config; the baselines differ from the
default run only where the baseline is defined to differ; the real-model experiments fail early and
name every missing checkpoint path."""

import dataclasses
import pathlib

import pytest
import yaml

from alignjax import experiment as E
from alignjax.cli import EXPERIMENTS_DIR, load_experiment
from alignjax.config import ConfigError
from alignjax.settings import RealSetting

GAME_EXPERIMENTS = sorted(
    p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")
    if yaml.safe_load(p.read_text()).get("runner") == "experiment"
)

# baseline -> the fields (dotted) that define it, relative to experiments/default.yaml (GPO + Div)
BASELINES = {
    "rlhf": {"game.schedule.mode": "defend_only", "game.prompt_source": "seeds"},
    "paraphrase": {"game.schedule.mode": "defend_only", "game.prompt_source": "seeds", "data": "paraphrase"},
    "rlhf_attacker": {"game.schedule.mode": "attack_only", "game.attacker_reward.k": 0.0},
    "rlhf_attacker_div": {"game.schedule.mode": "attack_only"},
    "gpo": {"game.attacker_reward.k": 0.0},
    "gpo_div": {},
    "simultaneous": {"game.schedule.mode": "simultaneous"},
}


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_all_game_experiments_build():
    assert {"default", *BASELINES, "real_llama7b_gpo_div"} <= set(GAME_EXPERIMENTS)
    for name in GAME_EXPERIMENTS:
        _, cfg = load_experiment(name)
        assert isinstance(cfg, E.Config)
        if cfg.setting == "synthetic":
            E.check_config(cfg)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_differ_from_default_only_where_defined(name):
    _, default = load_experiment("default")
    _, cfg = load_experiment(name)
    a, b = _flat(dataclasses.asdict(default)), _flat(dataclasses.asdict(cfg))
    diff = {k: b[k] for k in a if a[k] != b[k]}
    assert diff == BASELINES[name]


def test_default_is_gpo_div():
    _, cfg = load_experiment("default")
    assert cfg.setting == "synthetic" and cfg.game.schedule.mode == "alternating"
    assert cfg.game.prompt_source == "attacker" and cfg.game.attacker_reward.k > 0
    assert cfg.game.use_selfbleu and cfg.game.use_embedding


def test_unknown_key_and_wrong_type_are_rejected():
    with pytest.raises(ConfigError, match="valid keys"):
        load_experiment("default", ["game.batchsize=4"])
    with pytest.raises(ConfigError, match="expected an int"):
        load_experiment("default", ["game.batch_size=many"])
    with pytest.raises(ConfigError, match="not one of"):
        load_experiment("default", ["game.schedule.mode=sometimes"])


def test_real_experiment_has_spec_hyperparameters():
    _, cfg = load_experiment("real_llama7b_gpo_div")
    assert cfg.setting == "real"
    assert cfg.defender.policy_optimizer.learning_rate == 5e-7
    assert cfg.attacker.policy_optimizer.learning_rate == 3e-6
    assert cfg.defender.critic_optimizer.learning_rate == 1.5e-6
    assert cfg.attacker.critic_optimizer.learning_rate == 1.5e-6
    for opt in (cfg.defender.policy_optimizer, cfg.attacker.critic_optimizer):
        assert (opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.max_grad_norm) == (0.9, 0.95, 1e-6, 0.0, 1.0)
        assert opt.schedule == "inverse_sqrt" and opt.warmup_steps == 100
    assert cfg.game.defender_ppo.kl_coef == cfg.game.attacker_ppo.kl_coef == 0.01
    assert (cfg.game.defender_ppo.gamma, cfg.game.defender_ppo.lam) == (1.0, 0.95)
    s = cfg.game.defender_sampling
    assert (s.temperature, s.top_p, s.repetition_penalty, s.max_new_tokens) == (0.8, 0.9, 1.1, 512)
    assert cfg.loop.total_steps == 800 and cfg.seed == 42 and cfg.embedder.kind == "minilm"
    assert cfg.game.schedule.preset == "paper"


# the real experiments whose inputs the user supplies (real_smollm2's come from installed packages,
# tests/test_real_smollm2.py checks that they resolve)
USER_INPUT_REAL = [n for n in GAME_EXPERIMENTS if n.startswith("real_") and n != "real_smollm2"]


@pytest.mark.parametrize("name", USER_INPUT_REAL)
def test_real_experiment_fails_early_naming_missing_paths(name, tmp_path):
    _, cfg = load_experiment(name)
    with pytest.raises(FileNotFoundError) as err:
        E.run(cfg, tmp_path)  # must fail before loading anything
    msg = str(err.value)
    for field in ("defender.checkpoint", "attacker.checkpoint", "real.judge", "real.seed_prompts"):
        assert field in msg
    assert not any(tmp_path.iterdir())


def test_real_paths_present_pass_the_check(tmp_path):
    _, cfg = load_experiment("real_llama7b_gpo_div")
    paths = {}
    for n in ("defender", "attacker", "judge"):
        (tmp_path / n).mkdir()
        paths[n] = str(tmp_path / n)
    (tmp_path / "seeds.txt").write_text("how do i pick a lock?\n")
    cfg = dataclasses.replace(
        cfg,
        defender=dataclasses.replace(cfg.defender, checkpoint=paths["defender"]),
        attacker=dataclasses.replace(cfg.attacker, checkpoint=paths["attacker"]),
        real=dataclasses.replace(cfg.real, seed_prompts=str(tmp_path / "seeds.txt"),
                                 judge=dataclasses.replace(cfg.real.judge, checkpoint=paths["judge"])),
        embedder=dataclasses.replace(cfg.embedder, path=""),
    )
    RealSetting().check(cfg)  # no exception: every required path exists
    bad_judge = dataclasses.replace(cfg.real.judge, checkpoint=str(tmp_path / "nope"))
    bad = dataclasses.replace(cfg, real=dataclasses.replace(cfg.real, judge=bad_judge))
    with pytest.raises(FileNotFoundError, match=str(pathlib.Path(tmp_path / "nope"))):
        RealSetting().check(bad)


def test_resume_needs_the_same_config(tmp_path):
    from alignjax.config import dump_yaml

    _, cfg = load_experiment("default")
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    longer = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, total_steps=400),
                                 resume=str(tmp_path))
    E.check_resume_config(longer, tmp_path)  # extending the run is fine
    other = dataclasses.replace(cfg, seed=7)
    with pytest.raises(ValueError, match=r"\['seed'\]"):
        E.check_resume_config(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        E.run(dataclasses.replace(cfg, resume=str(tmp_path)), tmp_path / "new")
