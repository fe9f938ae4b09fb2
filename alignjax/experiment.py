"""The GPO experiment runner (`runner: experiment` in experiments/*.yaml).

    make experiment                        # experiments/default.yaml: synthetic world, GPO + Div
    make experiment NAME=rlhf ARGS="loop.total_steps=40"

`run(cfg, run_dir)` is one pipeline for every setting (alignjax/settings):

    validate -> build -> evaluate the initial players -> play the game (game.loop.run_loop: chunks of
    lax.scan-ed steps under jax.pmap, an Orbax checkpoint after each, exact resume; the setting's
    progress evaluation every `eval.every_chunks` chunks) -> evaluate the final players -> report
    (results.json, results.md, plots, HF export of both final policies)

Baselines are configurations of the same step (see experiments/*.yaml): RLHF = defend_only on the
seed prompts; RLHF attacker = attack_only against the frozen defender (k = 0 or k > 0); Paraphrase =
the initial attacker rewrites the seed set once, then RLHF on the rewrites; GPO = alternating with
k = 0; GPO+Div = alternating with k > 0; simultaneous = both players learn every step.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Literal

import jax
import jax.numpy as jnp
import yaml
from tqdm.auto import tqdm

from alignjax import parallel, report
from alignjax.config import dump_yaml, to_dict
from alignjax.game import keys
from alignjax.game.loop import LoopConfig, run_loop
from alignjax.game.step import GameConfig, make_play_step
from alignjax.rewards.embedding import EmbedderConfig
from alignjax.rl.state import OptimizerConfig
from alignjax.settings import RealConfig, get_setting
from alignjax.worlds.synthetic import WorldConfig


@dataclasses.dataclass(frozen=True)
class PlayerConfig:
    """One player's optimizers and where its initial weights live."""

    policy_optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    critic_optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: str = ""  # HF causal-LM folder (real setting; required there). "" = the world's SFT player
    critic_checkpoint: str = ""  # real setting: optional HF reward-model folder to start the critic from


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every_chunks: int = 1  # progress evaluation cadence during the game, in chunks (0 = off)
    attacker_samples_per_seed: int = 1  # synthetic: rewrites per training seed in the attacker evaluation
    real_prompts: int = 256  # real setting: seed prompts used by the evaluations
    seed: int = 1234


@dataclasses.dataclass(frozen=True)
class Config:
    setting: Literal["synthetic", "real"] = "synthetic"
    seed: int = 0
    data: Literal["seeds", "paraphrase"] = "seeds"  # paraphrase: the initial attacker rewrites D once
    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    real: RealConfig = dataclasses.field(default_factory=RealConfig)
    game: GameConfig = dataclasses.field(default_factory=GameConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    defender: PlayerConfig = dataclasses.field(default_factory=PlayerConfig)
    attacker: PlayerConfig = dataclasses.field(default_factory=PlayerConfig)
    embedder: EmbedderConfig = dataclasses.field(default_factory=EmbedderConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    export: bool = True  # write the final policies as HF checkpoints under run_dir/export
    cache_dir: str = ""  # synthetic players' cache ("" = $ALIGNJAX_CACHE_DIR or <repo>/cache)
    resume: str = ""  # an earlier run folder (runs/NAME/<timestamp>) to continue from its last checkpoint


def check_config(cfg: Config) -> None:
    """The setting's own checks (options it lacks, paths it needs), then cross-field checks that the
    dataclasses cannot do alone."""
    get_setting(cfg.setting).check(cfg)
    g = cfg.game
    if cfg.data == "paraphrase" and (g.prompt_source != "seeds" or g.schedule.mode != "defend_only"):
        raise ValueError("data: paraphrase is the Paraphrase baseline: it needs game.prompt_source=seeds "
                         "and game.schedule.mode=defend_only")
    if g.needs_embedder and cfg.embedder.kind == "none":
        raise ValueError("game.use_embedding is true but embedder.kind is 'none'")
    if cfg.loop.chunk_size > max(cfg.loop.total_steps, 1):
        raise ValueError(f"loop.chunk_size={cfg.loop.chunk_size} > loop.total_steps={cfg.loop.total_steps}")


def evaluation_due(step: int, cfg: Config) -> bool:
    """Whether the progress evaluation runs after the chunk ending at `step`: a function of the step
    alone (chunk ceil(step / chunk_size)), so a resumed run evaluates at the same steps."""
    every, chunk = cfg.eval.every_chunks, cfg.loop.chunk_size
    return bool(every) and (-(-step // chunk) % every == 0 or step == cfg.loop.total_steps)


def run(cfg: Config, run_dir, progress: bool = True) -> dict:
    """Run (or resume, when run_dir holds checkpoints) one experiment; returns the results dict."""
    check_config(cfg)
    run_dir = resume_dir(cfg, pathlib.Path(run_dir))
    setting = get_setting(cfg.setting)
    t = {"start": time.perf_counter()}
    built = setting.build(cfg, progress=progress)
    play_step = make_play_step(built.spec)
    # Trace one step abstractly (seconds, no compilation) so a bad combination of settings fails now,
    # not after the initial evaluation.
    jax.eval_shape(jax.pmap(play_step, axis_name=parallel.DATA_AXIS, in_axes=(0, 0, None)),
                   jax.tree.map(lambda x: jnp.asarray(x)[None], built.state),
                   jax.random.PRNGKey(0)[None], built.consts)
    t["built"] = time.perf_counter()
    eval_key = keys.eval_key(cfg.eval.seed)
    tqdm.write("[alignjax] evaluating the initial players")
    initial = setting.evaluate(built, built.state.defender_ref, built.state.attacker_ref, eval_key, cfg)
    t["eval0"] = time.perf_counter()

    def on_chunk_end(step, state):
        return setting.progress(built, state, cfg) if evaluation_due(step, cfg) else None

    metadata = {"config": json.loads(json.dumps(to_dict(cfg), default=report.json_default))}
    final_state = run_loop(play_step, built.state, cfg.loop, run_dir, metadata, on_chunk_end=on_chunk_end,
                           consts=built.consts, desc=run_dir.parent.name or "game")
    t["game"] = time.perf_counter()
    tqdm.write("[alignjax] evaluating the final players")
    final = setting.evaluate(built, final_state.defender.policy_params, final_state.attacker.policy_params,
                             eval_key, cfg)
    results = {"initial": initial, "final": final, **setting.extra(built, final_state, eval_key, cfg),
               "history": report.history_summary(cfg, final_state), "data": built.notes}
    t["eval1"] = time.perf_counter()
    if cfg.export:
        results["export"] = report.export_players(run_dir, final_state, built.spec, built.tokenizer_dir)
    results["plots"] = [str(p) for p in report.make_plots(run_dir, cfg)]
    t["end"] = time.perf_counter()
    results["timing"] = {
        "world + initial players (SFT or cache)": t["built"] - t["start"],
        "initial evaluation": t["eval0"] - t["built"],
        "game (incl. compile, checkpoints, evaluations)": t["game"] - t["eval0"],
        "final evaluation": t["eval1"] - t["game"],
        "export + plots": t["end"] - t["eval1"],
        "total": t["end"] - t["start"],
    }
    markdown = setting.report(run_dir.parent.name, cfg, results) + report.notes_markdown(results)
    path = report.write_results(run_dir, results, markdown)
    tqdm.write(f"[alignjax] results: {path}")
    return results


def resume_dir(cfg: Config, run_dir: pathlib.Path) -> pathlib.Path:
    """The folder the run writes to: `cfg.resume` (checked to hold checkpoints of the same config;
    `run_dir` then gets a pointer file) or `run_dir`."""
    if not cfg.resume:
        return run_dir
    old = pathlib.Path(cfg.resume)
    if not (old / "checkpoints").is_dir():
        raise FileNotFoundError(f"resume={cfg.resume!r}: {old / 'checkpoints'} does not exist")
    check_resume_config(cfg, old)
    if old.resolve() != run_dir.resolve():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "RESUMED_IN.txt").write_text(f"this run continues in {old}\n")
        tqdm.write(f"[alignjax] resuming {old}")
    return old


def check_resume_config(cfg: Config, old: pathlib.Path) -> None:
    """A resumed run must use the old run's config (loop.total_steps may grow, `resume` differs)."""
    path = old / "config.yaml"
    if not path.exists():
        return

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    before, now = flat(yaml.safe_load(path.read_text())), flat(yaml.safe_load(dump_yaml(cfg)))
    diff = sorted(k for k in set(before) | set(now)
                  if before.get(k) != now.get(k) and k not in ("resume", "loop.total_steps"))
    if diff:
        raise ValueError(f"resume={str(old)!r}: the config differs from that run's in {diff}; "
                         "resume with the same settings (only loop.total_steps may change)")
