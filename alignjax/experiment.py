"""The GPO experiment runner (`runner: experiment` in experiments/*.yaml).

    make experiment                        # experiments/default.yaml: synthetic world, GPO + Div
    make experiment NAME=rlhf ARGS="loop.total_steps=40"

`run(cfg, run_dir)` is one pipeline for every setting (alignjax/settings):

    validate -> build -> evaluate the initial players -> play the game (game.loop.run_loop: chunks of
    lax.scan-ed steps under jax.pmap, an Orbax checkpoint after each, exact resume; the setting's
    progress evaluation every `eval.every_chunks` chunks) -> evaluate the final players and the
    averaged defender (`DefenderMembers`) -> report (results.json, results.md, plots, HF export of
    both final policies; results.json also says where the run ran: alignjax/backend.py)

`run_seeds(cfgs, run_dirs, group_dir)` is the same pipeline for the seeds of one experiment as one
vmapped program (what studies use, alignjax/study.py).

Baselines are configurations of the same step (see experiments/*.yaml): RLHF = defend_only on the
seed prompts; RLHF attacker = attack_only against the frozen defender (k = 0 or k > 0); Paraphrase =
the initial attacker rewrites the seed set once, then RLHF on the rewrites; GPO = alternating with
k = 0; GPO+Div = alternating with k > 0; simultaneous = both players learn every step.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from alignjax import backend, faults, parallel, report
from alignjax.config import ConfigError, config_diff, flatten, to_dict
from alignjax.game import keys
from alignjax.game import schedule as sched
from alignjax.game.loop import LoopConfig, run_loop, stack_seeds, unstack_seeds
from alignjax.game.step import GameConfig, make_play_step
from alignjax.models.precision import PrecisionConfig, remat_policy
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
    real_batch_size: int = 0  # real setting: rows per evaluation call (0 = game.batch_size); larger is
    # faster on CPU (one weight read per decode step serves more rows), at one more compilation
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
    allow_cpu: bool = False  # run on the CPU although the machine has an accelerator (alignjax/backend.py)
    parallel: parallel.ParallelConfig = dataclasses.field(default_factory=parallel.ParallelConfig)
    # params (and Adam moments) dtype / forward-backward dtype; "auto" compute: bf16 on GPU/TPU, f32 on CPU
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    remat: str = "none"  # rematerialisation of each layer in the PPO backward passes: none | full | dots
    plan: bool = False  # print the memory plan of this layout (alignjax/plan.py) instead of running

    def __post_init__(self):
        remat_policy(self.remat)


def resolve(cfg: Config) -> Config:
    """The config with this machine's defaults made explicit (written to config.yaml): "auto" compute
    precision becomes bfloat16 on GPU/TPU and float32 on CPU (alignjax/models/precision.py); parallel
    mode "auto" becomes mesh on GPU/TPU or several processes, pmap on one CPU process
    (alignjax/parallel/layout.py `ParallelConfig.resolve`)."""
    backend = jax.default_backend()
    return dataclasses.replace(cfg, precision=cfg.precision.resolve(backend),
                               parallel=cfg.parallel.resolve(backend, jax.process_count()))


# The smallest value of every size option: a zero or negative size is rejected by name (check_config).
_PLAYERS = [f"{p}.{o}_optimizer" for p in ("defender", "attacker") for o in ("policy", "critic")]
MIN_SIZES = {
    "game.batch_size": 1, "game.history_capacity": 1, "game.schedule.n_def": 0, "game.schedule.n_att": 0,
    **{f"game.{p}_sampling.{k}": m for p in ("defender", "attacker") for k, m in
       (("max_new_tokens", 1), ("top_k", 0))},
    **{f"game.{p}_ppo.{k}": 1 for p in ("defender", "attacker") for k in ("epochs", "num_minibatches")},
    "loop.total_steps": 1, "loop.chunk_size": 1, "loop.max_to_keep": 1,
    **{f"{o}.{k}": 0 for o in _PLAYERS for k in ("warmup_steps", "decay_steps")},
    "embedder.dim": 1, "embedder.max_len": 1,
    "eval.every_chunks": 0, "eval.attacker_samples_per_seed": 1, "eval.real_prompts": 1,
    "eval.real_batch_size": 0,
    "real.max_prompt_tokens": 1, "real.judge.reencode_tokens": 1,
    "parallel.data": 0, "parallel.fsdp": 0, "parallel.tensor": 1, "parallel.num_processes": 0,
    **{f"world.{k}": 1 for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                 "intermediate_size", "sft_batch_size")},
    "world.defender_sft_steps": 0, "world.attacker_sft_steps": 0,
}  # fmt: skip


def check_config(cfg: Config) -> None:
    """Sizes (MIN_SIZES), the setting's own checks (options it lacks, paths it needs), then cross-field
    checks that the dataclasses cannot do alone. Raises ConfigError / FileNotFoundError naming the key."""
    values = flatten(to_dict(cfg))
    small = [f"{k}={values[k]} (must be >= {m})" for k, m in MIN_SIZES.items() if values[k] < m]
    if small:
        raise ConfigError("size(s) out of range: " + ", ".join(small))
    get_setting(cfg.setting).check(cfg)
    g = cfg.game
    if cfg.data == "paraphrase" and (g.prompt_source != "seeds" or g.schedule.mode != "defend_only"):
        raise ConfigError("data: paraphrase is the Paraphrase baseline: it needs game.prompt_source=seeds "
                          "and game.schedule.mode=defend_only")
    if g.needs_embedder and cfg.embedder.kind == "none":
        raise ConfigError("game.use_embedding is true but embedder.kind is 'none'")
    if cfg.loop.chunk_size > max(cfg.loop.total_steps, 1):
        raise ConfigError(f"loop.chunk_size={cfg.loop.chunk_size} > loop.total_steps={cfg.loop.total_steps}")


def validate(cfg: Config) -> None:
    """Everything that can be checked before a run writes or builds anything (`alignjax.cli` calls it
    before config.yaml is written; `run` calls it again): `check_config`, then the inputs the config
    names (`check_inputs`). A memory plan (plan=true) reads no weights: its inputs are not opened."""
    check_config(cfg)
    if not cfg.plan:
        check_inputs(cfg)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:  # (validate runs in the cli, then again in run)
    tqdm.write(f"[alignjax] warning: {message}", file=sys.stderr)


def check_inputs(cfg: Config) -> None:
    """Read the inputs the config names, cheaply, and reject bad ones by name: the folder to resume
    (a run of this config), the checkpoint folders (config.json, architecture, safetensors only, tensor
    shapes from the headers: `hf_io.check_checkpoint`), and in the real setting the players' tokenizers
    (one vocabulary, one pad and EOS id) and the prompt files (`real_data.read_prompt_lines`: not
    empty, UTF-8, no question longer than the model's context or the prompt block, duplicates counted
    in a warning, at least game.batch_size questions). NaN weights are found while loading (hf_io)."""
    from alignjax.models import hf_io
    from alignjax.settings.real import check_judge
    from alignjax.text.tokenizer import check_players_agree, folder_tokens, load_tokenizer
    from alignjax.worlds import real_data

    if cfg.resume:
        check_resume_folder(cfg)
    for who in ("defender", "attacker"):
        player = getattr(cfg, who)
        if player.checkpoint:
            hf_io.check_checkpoint(player.checkpoint, f"{who}.checkpoint")
        if player.critic_checkpoint:
            hf_io.check_checkpoint(player.critic_checkpoint, f"{who}.critic_checkpoint",
                                   hf_io.SEQ_CLS_ARCHITECTURES)
    if cfg.setting != "real":
        return
    real = cfg.real
    if real.judge.kind == "lm":  # kind refusal has no model
        hf_io.check_checkpoint(real.judge.checkpoint, "real.judge.checkpoint")
    check_judge(cfg)  # the judge's template and answer words against its tokenizer (settings/real.py)
    tok_option = f"real.tokenizer={real.tokenizer}" if real.tokenizer else \
        f"defender.checkpoint={cfg.defender.checkpoint}"
    sources = {tok_option: folder_tokens(real.tokenizer or cfg.defender.checkpoint)}
    for who in ("defender", "attacker"):
        path = getattr(cfg, who).checkpoint
        if f"{who}.checkpoint={path}" != tok_option and not hf_io.is_gguf(path):
            sources[f"{who}.checkpoint={path}"] = folder_tokens(path)
    check_players_agree(sources)
    tok = load_tokenizer(real.tokenizer or cfg.defender.checkpoint)
    context = min((hf_io.read_config(getattr(cfg, who).checkpoint)[0].max_position_embeddings
                   for who in ("defender", "attacker") if not hf_io.is_gguf(getattr(cfg, who).checkpoint)),
                  default=None)  # (a GGUF file states its context inside; gguf_io reads it)
    block = cfg.game.attacker_sampling.max_new_tokens  # a seed asked directly must fit the prompt block
    for option in ("real.seed_prompts", "real.benign_prompts"):
        path = getattr(real, option.split(".")[1])
        if not path:
            continue
        prompts = real_data.read_prompt_lines(path, option)
        if (warning := prompts.duplicate_warning(option)) is not None:
            _warn_once(warning)
        encode = tok.encode
        if context is not None:
            real_data.check_prompt_lengths(prompts, encode, context, option, "the players' context "
                                           "(max_position_embeddings)")
        if real.long_seeds == "reject":
            real_data.check_prompt_lengths(
                prompts, encode, min(real.max_prompt_tokens, block), option,
                f"real.max_prompt_tokens={real.max_prompt_tokens} / the prompt block game.attacker_sampling."
                f"max_new_tokens={block} (real.long_seeds=truncate keeps the last tokens, counted)")
        if option == "real.seed_prompts" and len(prompts.texts) < cfg.game.batch_size:
            raise ConfigError(f"game.batch_size={cfg.game.batch_size} is larger than the seed set: "
                              f"real.seed_prompts={path!r} holds {len(prompts.texts)} question(s)")


def evaluation_due(step: int, cfg: Config) -> bool:
    """Whether the progress evaluation runs after the chunk ending at `step`: a function of the step
    alone (chunk ceil(step / chunk_size)), so a resumed run evaluates at the same steps."""
    every, chunk = cfg.eval.every_chunks, cfg.loop.chunk_size
    return bool(every) and (-(-step // chunk) % every == 0 or step == cfg.loop.total_steps)


def run(cfg: Config, run_dir, progress: bool = True) -> dict:
    """Run (or resume, when run_dir holds checkpoints) one experiment; returns the results dict."""
    cfg = resolve(cfg)
    if cfg.plan:  # compile the game chunk abstractly on a virtual mesh; no weights are read
        from alignjax import plan

        return plan.run(cfg, run_dir)
    validate(cfg)
    environment = where_it_runs(cfg)
    run_dir = resume_dir(cfg, pathlib.Path(run_dir))
    t = {"start": time.perf_counter(), "load_start": os.getloadavg()[0]}
    rss_before_build = report.rss_bytes()
    setting, built, play_step, layout = _build(cfg, progress)
    t["built"] = time.perf_counter()
    environment["layout"] = layout.describe()
    initial = _evaluate_initial(setting, built, cfg)
    t["eval0"] = time.perf_counter()
    members = DefenderMembers(setting, built, cfg, run_dir)

    def on_chunk_end(step, state):
        # `state` views the device buffers the next chunk donates: nothing may keep it after this call
        members.built = now = dataclasses.replace(built, state=state)  # the evaluations' state template
        try:
            members.observe(step, state)
            return setting.progress(now, state, cfg) if evaluation_due(step, cfg) else None
        finally:
            members.built = built

    # The loop owns the state from here: `built` keeps no reference to the step-0 state, so once the
    # loop has placed it on the devices, the host copy is freed (one copy of the state, not two). The
    # evaluations take the current state as their template (they replace the policies they measure;
    # the reference policies never change).
    owned = [built.state]
    state_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(built.state))
    built = dataclasses.replace(built, state=None)
    members.built = built
    final_state = run_loop(play_step, owned.pop(), cfg.loop, run_dir, _metadata(cfg),
                           on_chunk_end=on_chunk_end, consts=built.consts, desc=run_dir.parent.name or "game",
                           layout=layout)
    t["game"] = time.perf_counter()
    built = dataclasses.replace(built, state=final_state)
    memory = report.memory_report(rss_before_build, state_bytes)
    return _finish(cfg, run_dir, setting, built, final_state, initial, members, t, environment, memory=memory)


def run_seeds(cfgs: list[Config], run_dirs: list, group_dir, progress: bool = True) -> list[dict]:
    """The seeds of one experiment as one compiled program: configs that differ only in `seed`, their
    states stacked on a seed axis and the chunk `jax.vmap`-ed over it (game.loop.run_loop(seed_dirs=)).
    Each run folder gets what `run` writes; the stacked checkpoints live in `group_dir`. Resumes from
    `group_dir`'s checkpoints. Returns the results of each seed, in order."""
    cfgs = [resolve(c) for c in cfgs]
    for c in cfgs:
        check_config(c)
        if dataclasses.replace(c, seed=cfgs[0].seed) != cfgs[0]:
            raise ValueError("run_seeds: the configs must differ in `seed` only")
    run_dirs = [pathlib.Path(d) for d in run_dirs]
    environment = where_it_runs(cfgs[0])
    t = {"start": time.perf_counter(), "load_start": os.getloadavg()[0]}
    setting, built, play_step, layout = _build(cfgs[0], progress)
    builts = [built] + [setting.build(c, progress=progress, axis_name=built.spec.axis_name) for c in cfgs[1:]]
    t["built"] = time.perf_counter()
    environment["layout"] = layout.describe()
    # The initial players and the evaluation key do not depend on the seed: one evaluation serves all.
    initial = _evaluate_initial(setting, built, cfgs[0])
    t["eval0"] = time.perf_counter()
    members = [DefenderMembers(setting, b, c, d) for b, c, d in zip(builts, cfgs, run_dirs, strict=True)]

    def on_chunk_end(step, state):
        out = []
        for i, (b, c) in enumerate(zip(builts, cfgs, strict=True)):
            one = unstack_seeds(state, i)
            members[i].observe(step, one)
            out.append(setting.progress(b, one, c) if evaluation_due(step, c) else None)
        return out

    state = stack_seeds([b.state for b in builts])
    consts = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[b.consts for b in builts])
    final = run_loop(play_step, state, cfgs[0].loop, group_dir, _metadata(*cfgs), on_chunk_end=on_chunk_end,
                     consts=consts, desc=pathlib.Path(group_dir).name, seed_dirs=run_dirs, layout=layout)
    t["game"] = time.perf_counter()
    return [_finish(c, d, setting, b, unstack_seeds(final, i), initial, m, dict(t), environment, len(cfgs))
            for i, (c, d, b, m) in enumerate(zip(cfgs, run_dirs, builts, members, strict=True))]


def _build(cfg: Config, progress: bool):
    """(setting, built, play_step, layout). The layout (`cfg.parallel`) is checked against the devices,
    the batch and the models, and one step is traced abstractly (seconds, no compilation), so that a
    bad combination of settings fails now, not after the initial evaluation."""
    setting = get_setting(cfg.setting)
    layout = parallel.make_layout(cfg.parallel)
    built = setting.build(cfg, progress=progress, axis_name=None if layout.is_mesh else parallel.DATA)
    models = {"defender": built.spec.defender.models.policy_config,
              "attacker": built.spec.attacker.models.policy_config}
    parallel.check_model_fits_layout(layout, cfg.game.batch_size, models)
    play_step = make_play_step(built.spec)
    if layout.is_mesh:
        with jax.set_mesh(layout.mesh):
            jax.eval_shape(play_step, built.state, jax.random.PRNGKey(0), built.consts)
    else:
        jax.eval_shape(jax.pmap(play_step, axis_name=parallel.DATA, in_axes=(0, 0, None)),
                       jax.tree.map(lambda x: jnp.asarray(x)[None], built.state),
                       jax.random.PRNGKey(0)[None], built.consts)
    return setting, built, play_step, layout


def _evaluate_initial(setting, built, cfg: Config) -> dict:
    tqdm.write("[alignjax] evaluating the initial players")
    with faults.phase("eval", 0):  # fault trials (tools/faults.py) kill runs in named phases
        return setting.evaluate(built, built.state.defender_ref, built.state.attacker_ref,
                                keys.eval_key(cfg.eval.seed), cfg)


# options that may differ when a run is resumed (check_resume_config, config_fingerprint)
# (the layout may change: checkpoints hold global arrays and no random draw depends on the layout)
RESUMABLE_CHANGES = ("resume", "loop.total_steps", "allow_cpu", "plan") + tuple(
    f"parallel.{f.name}" for f in dataclasses.fields(parallel.ParallelConfig))


def config_fingerprint(*cfgs: Config) -> str:
    """Hash of the configs (in order) without RESUMABLE_CHANGES: saved with every checkpoint, so that a
    checkpoint of another experiment's config is never restored silently (game.loop.run_loop)."""
    flat = [{k: v for k, v in flatten(json.loads(json.dumps(to_dict(c), default=report.json_default))).items()
             if k not in RESUMABLE_CHANGES} for c in cfgs]
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def _metadata(*cfgs: Config) -> dict:
    return {"config": json.loads(json.dumps(to_dict(cfgs[0]), default=report.json_default)),
            "fingerprint": config_fingerprint(*cfgs)}


def where_it_runs(cfg: Config) -> dict:
    """The backend, devices, processes and versions of this run (alignjax.backend.describe), printed;
    stops when the machine has an accelerator that JAX does not use, unless `allow_cpu`."""
    info = backend.describe()
    backend.check_backend(cfg.allow_cpu, info)
    info["processor"], info["cpus"] = backend.cpu_model(), os.cpu_count()  # the machine under the timings
    tqdm.write("[alignjax] running on " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return info


def _finish(cfg, run_dir, setting, built, final_state, initial, members, t, environment: dict,
            vmapped: int = 0, memory: dict | None = None) -> dict:
    """Final evaluation, the averaged defender, history, export, plots, results.json / results.md."""
    eval_key = keys.eval_key(cfg.eval.seed)
    tqdm.write("[alignjax] evaluating the final players")
    with faults.phase("eval", cfg.loop.total_steps):
        final = setting.evaluate(built, final_state.defender.policy_params,
                                 final_state.attacker.policy_params, eval_key, cfg)
    results = {"initial": initial, "final": final, **setting.extra(built, final_state, eval_key, cfg),
               "history": report.history_summary(cfg, final_state), "data": built.notes}
    averaged = members.summary()
    if averaged is not None:
        results["averaged"] = averaged
    t["eval1"] = time.perf_counter()
    with faults.phase("export", cfg.loop.total_steps):  # the HF export and the plots
        if cfg.export:
            results["export"] = report.export_players(run_dir, final_state, built.spec, built.tokenizer_dir)
        results["plots"] = [str(p) for p in report.make_plots(run_dir, cfg)]
    t["end"] = time.perf_counter()
    shared = f" (shared by the {vmapped} vmapped seeds)" if vmapped else ""
    results["timing"] = {
        "world + initial players (SFT or cache)" + shared: t["built"] - t["start"],
        "initial evaluation" + shared: t["eval0"] - t["built"],
        "game (incl. compile, checkpoints, evaluations)" + shared: t["game"] - t["eval0"],
        "final evaluation": t["eval1"] - t["game"],
        "export + plots": t["end"] - t["eval1"],
        "total": t["end"] - t["start"],
    }
    results["run"] = {"seed": cfg.seed, "vmapped_seeds": vmapped}
    # how busy the machine was (1-minute load averages): the timings above are read against it
    results["load_average"] = {"start": t["load_start"], "end": os.getloadavg()[0]}
    if memory is not None:  # peak resident memory up to the end of the game against the state's bytes
        results["memory"] = memory
    results["environment"] = environment
    markdown = setting.report(run_dir.parent.name, cfg, results) + report.notes_markdown(results)
    path = report.write_results(run_dir, results, markdown)
    tqdm.write(f"[alignjax] results: {path}")
    return results


class DefenderMembers:
    """The averaged defender of Theorem 3.2: the uniform mixture of the defenders at the end of each
    defence stage (alternating: every N_def + N_att steps; defend_only / simultaneous: the final one;
    attack_only: the frozen defender). A member is the defender at the first chunk end in
    [end of its defence stage, start of the next one]; `setting.member(built, params)` measures it
    (per-prompt values; None where the setting cannot) and the members go to
    `run_dir/defender_members.jsonl` (lines at or after a re-run chunk's step are replaced, so a
    resumed run keeps exactly an uninterrupted run's members). `setting.averaged(members)` turns them
    into the mixture's metrics."""

    def __init__(self, setting, built, cfg: Config, run_dir: pathlib.Path):
        self.setting, self.built, self.path = setting, built, pathlib.Path(run_dir) / "defender_members.jsonl"
        self.enabled = hasattr(setting, "member")
        total, chunk = cfg.loop.total_steps, cfg.loop.chunk_size
        ends = sorted({min(c, total) for c in range(chunk, total + chunk, chunk)})
        segs = [(a, b) for a, b, s in sched.stage_boundaries(total, cfg.game.schedule)
                if s in (sched.DEFEND, sched.BOTH)] or [(total, total)]
        self.steps, self.missed = [], []
        for i, (_, end) in enumerate(segs):
            nxt = segs[i + 1][0] if i + 1 < len(segs) else total
            hit = [c for c in ends if end <= c <= nxt]
            (self.steps.append(hit[0]) if hit else self.missed.append(end))
        if self.enabled and self.missed:
            tqdm.write(f"[alignjax] averaged defender: no chunk end between the defence stages ending at "
                       f"steps {self.missed} and the next defence stage; those stages are left out (choose "
                       "loop.chunk_size dividing n_def + n_att to keep them)")

    def observe(self, step: int, state) -> None:
        if not self.enabled or step not in self.steps:
            return
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] < step]
        row = {"step": step, **self.setting.member(self.built, state.defender.policy_params)}
        self.path.write_text("".join(ln + "\n" for ln in kept) + json.dumps(row) + "\n")

    def summary(self) -> dict | None:
        if not self.enabled:
            return None
        rows = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()] \
            if self.path.exists() else []
        if [r["step"] for r in rows] != self.steps:  # e.g. a run resumed from a folder made before them
            tqdm.write(f"[alignjax] averaged defender left out: {self.path} holds members at steps "
                       f"{[r['step'] for r in rows]}, the schedule needs {self.steps}")
            return None
        out = self.setting.averaged(rows)
        out["member_steps"], out["missed_stage_ends"] = self.steps, self.missed
        return out


def resume_dir(cfg: Config, run_dir: pathlib.Path) -> pathlib.Path:
    """The folder the run writes to: `cfg.resume` (checked to hold checkpoints of the same config;
    `run_dir` then gets a pointer file) or `run_dir`."""
    if not cfg.resume:
        return run_dir
    old = check_resume_folder(cfg)
    if old.resolve() != run_dir.resolve():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "RESUMED_IN.txt").write_text(f"this run continues in {old}\n")
        tqdm.write(f"[alignjax] resuming {old}")
    return old


def check_resume_folder(cfg: Config) -> pathlib.Path:
    """`cfg.resume` as a folder, checked to hold checkpoints and a config.yaml of the same config."""
    old = pathlib.Path(cfg.resume)
    if not (old / "checkpoints").is_dir():
        raise FileNotFoundError(f"resume={cfg.resume!r}: {old / 'checkpoints'} does not exist")
    check_resume_config(cfg, old)
    return old


def check_resume_config(cfg: Config, old: pathlib.Path) -> None:
    """A resumed run must use the old run's config (loop.total_steps may grow, `resume` differs)."""
    path = old / "config.yaml"
    if not old.is_dir():
        raise FileNotFoundError(f"resume={str(old)!r} does not exist (needs a run folder runs/NAME/<stamp>)")
    if not path.exists():
        raise ConfigError(f"resume={str(old)!r} is not a run folder: it has no config.yaml")
    diff = config_diff(path.read_text(), cfg, ignore=RESUMABLE_CHANGES)
    if diff:
        raise ConfigError(f"resume={str(old)!r}: the config differs from that run's in {diff}; "
                         "resume with the same settings (only loop.total_steps, allow_cpu and the parallel "
                         "layout may change)")
