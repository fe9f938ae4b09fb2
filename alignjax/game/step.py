"""One step of the GPO game as a pure function: rollouts, judge, diversity, the stage's PPO update.

    game_step(state, batch, key, consts) -> (state, metrics)

The data path (design.md), per device on its slice of the batch:

    seeds s ──attacker samples──> x ──defender samples──> y            (prompt_source "attacker")
    (x, y) ──judge──> p_safe, p_unsafe, unsafe;   defender score r(x, y)  (world: p_safe - overrefusal)
    DEFEND: PPO update of the defender on the rollout (defender_input(x), y) with score r
    ATTACK: R_div(x; X) from Self-BLEU and embedding cosine against the history X (before adding x),
            attacker reward  w_u p_unsafe - w_s p_safe - w_b SelfBLEU_X(x) - w_c Cos_X(x)
            (rewards/attacker_reward.py presets "paper" = -r + k (R_bleu + R_emb)/2, "authors_code"),
            PPO update of the attacker on (attacker_input(s), x); then X += all-gathered x of all devices
    BOTH:   both updates on the same rollout (the simultaneous variant); X grows

With prompt_source "seeds" the attacker is skipped and x = s (RLHF on a fixed prompt set; the
Paraphrase baseline passes the initial attacker's rewrites as the seed set).

Every episode gets its scores (judge outputs, the defender's score, and in attack steps the
attacker's reward): no sample is dropped or reordered (the authors' code dropped judge outputs that
were neither "safe" nor "unsafe"). Only attack-stage prompts enter the history (theirs also stored
defence-stage prompts), and the EOS token is cut from stored prompts (theirs leaked `</s>`).

Metrics are global means over the batch (pmean / psum over the data axis), so every device returns
the same numbers. The player that does not learn in a step reports NaN for its PPO metrics (the
host logger drops NaNs).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp

from alignjax.game import schedule as sched
from alignjax.game.state import GameState, check_game_state
from alignjax.rewards import history as hist
from alignjax.rewards.attacker_reward import AttackerRewardConfig, attacker_reward
from alignjax.rewards.embedding import cosine_to_history
from alignjax.rewards.judge import JudgeOutput
from alignjax.rewards.selfbleu import self_bleu
from alignjax.rl.experience import PPOConfig, Rollout
from alignjax.rl.ppo import ppo_update
from alignjax.sampling import SamplingConfig, sample


@dataclasses.dataclass(frozen=True)
class GameConfig:
    """Static game settings (what the YAML's `game:` section holds)."""

    batch_size: int = 16  # episodes per step, over all devices (each device gets batch_size / n)
    prompt_source: Literal["attacker", "seeds"] = "attacker"
    schedule: sched.ScheduleConfig = dataclasses.field(default_factory=sched.ScheduleConfig)
    attacker_sampling: SamplingConfig = dataclasses.field(default_factory=lambda: SamplingConfig(32))
    defender_sampling: SamplingConfig = dataclasses.field(default_factory=lambda: SamplingConfig(32))
    defender_ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    attacker_ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    attacker_reward: AttackerRewardConfig = dataclasses.field(default_factory=AttackerRewardConfig)
    use_selfbleu: bool = True  # SelfBLEU_X term of R_div (else 0)
    use_embedding: bool = True  # Cos_X term of R_div (else 0); needs an embedder
    selfbleu_orders: tuple[int, ...] = (2, 3, 4, 5)
    history_capacity: int = 512  # prompts kept in X (a ring buffer: the oldest are overwritten)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"game.batch_size must be >= 1, got {self.batch_size}")
        if self.history_capacity < 1:
            raise ValueError(f"game.history_capacity must be >= 1, got {self.history_capacity}")
        if self.prompt_source == "seeds" and self.schedule.mode != "defend_only":
            raise ValueError("prompt_source 'seeds' has no attacker: it needs schedule.mode 'defend_only'")


class GameConsts(NamedTuple):
    """Read-only inputs of every step (broadcast to all devices, not checkpointed)."""

    seed_tokens: jax.Array  # [N, S] int32 left-padded seed prompts (the dataset D)
    seed_mask: jax.Array  # [N, S] int32
    embed_params: Any = None  # the sentence embedder's params (None without an embedder)
    judge: Any = None  # a judge pytree holding its weights (e.g. rewards.lm_judge.LMJudge), or None


@dataclasses.dataclass(frozen=True)
class GameSpec:
    """The game's static parts: configs and pure functions over token arrays.

    defender_models / attacker_models: `rl.LlamaPlayerModels` (policy + critic forward).
    defender_lm / attacker_lm: the policies' `LMConfig` (for sampling).
    judge: `(x, x_mask, y, y_mask) -> JudgeOutput` (x is the bare attacker prompt, no template).
    defender_inputs / attacker_inputs: token-level templates `(tokens, mask) -> (tokens, mask)`
      left-padded (`Human: {x} AI:` / `... similar topic: {s} Output:`); they must drop pads/EOS.
    defender_score: `(x, x_mask, y, y_mask) -> [B]`; None = judge p_safe.
    attacker_safety: `(x, x_mask, y, y_mask) -> (p_safe, p_unsafe)` fed to the reward combiner;
      None = the judge's pair.
    prompt_labels: optional `(x, x_mask) -> (harmful [B], benign [B])` for extra metrics.
    response_compliant: optional `(y, y_mask) -> [B] bool` (the answer complies) for the
      over-refusal metric on benign prompts.
    embed: optional `(params, tokens [B, L], lengths [B]) -> [B, E]` sentence embedder.
    embed_dim: E (history embedding width; 1 when there is no embedder).
    bind_judge: optional `(consts.judge) -> judge callable`: for judges whose weights travel in
      `GameConsts.judge` (an LM judge) instead of being baked into the step as constants.
    """

    cfg: GameConfig
    defender_models: Any
    attacker_models: Any
    defender_lm: Any
    attacker_lm: Any
    judge: Callable[..., JudgeOutput]
    defender_inputs: Callable
    attacker_inputs: Callable
    eos_id: int
    pad_id: int
    defender_score: Callable | None = None
    attacker_safety: Callable | None = None
    prompt_labels: Callable | None = None
    response_compliant: Callable | None = None
    embed: Callable | None = None
    embed_dim: int = 1
    bind_judge: Callable | None = None
    axis_name: str | None = "data"

    @property
    def prompt_len(self) -> int:
        """Length of the prompt block x (the attacker's generation length)."""
        return self.cfg.attacker_sampling.max_new_tokens


class Episode(NamedTuple):
    """Per-sample results of one rollout batch [B] / [B, ...]; nothing is dropped or reordered."""

    attacker_input: jax.Array  # [B, Pa] left-padded (seed in the attacker's template)
    attacker_input_mask: jax.Array
    prompt: jax.Array  # [B, Na] x, right-padded; with EOS when the attacker emitted one
    prompt_mask: jax.Array  # [B, Na] 1 on generated tokens incl. EOS
    prompt_lengths: jax.Array  # [B] tokens of x without EOS
    defender_input: jax.Array  # [B, Pd] left-padded (x in the defender's template)
    defender_input_mask: jax.Array
    response: jax.Array  # [B, Nd] y
    response_mask: jax.Array
    judge: JudgeOutput  # [B] each
    defender_score: jax.Array  # [B]
    attacker_p_safe: jax.Array  # [B] the pair the attacker-reward combiner reads
    attacker_p_unsafe: jax.Array


# --------------------------------------------------------------------------------------- data


def draw_batch(consts: GameConsts, cursor: jax.Array, rng: jax.Array, global_batch: int,
               axis_name: str | None) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """This device's seeds for the step at `cursor`, and the advanced cursor.

    Global row i of the step is seed perm_e[j] with c = cursor + i, e = c // N, j = c mod N, where
    perm_e = permutation(fold_in(data_key, e), N): every epoch visits each seed once in a fresh order,
    a pure function of (rng, cursor). Device d takes global rows [d * b, (d + 1) * b)."""
    n = consts.seed_tokens.shape[0]
    n_dev = 1 if axis_name is None else jax.lax.psum(1, axis_name)
    if global_batch % n_dev:
        raise ValueError(f"game.batch_size={global_batch} is not divisible by the {n_dev} devices")
    if global_batch > n:
        raise ValueError(f"game.batch_size={global_batch} exceeds the {n} seed prompts")
    b = global_batch // n_dev
    dev = 0 if axis_name is None else jax.lax.axis_index(axis_name)
    data_key = jax.random.fold_in(jax.random.split(rng)[1], 0)
    c = cursor + dev * b + jnp.arange(b)
    epoch0 = cursor // n
    perms = jnp.stack([jax.random.permutation(jax.random.fold_in(data_key, epoch0 + i), n) for i in (0, 1)])
    idx = perms[c // n - epoch0, c % n]
    return (consts.seed_tokens[idx], consts.seed_mask[idx]), cursor + global_batch


def left_to_right(tokens: jax.Array, mask: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Move the real tokens of each row to the left (stable): left-padded -> right-padded."""
    order = jnp.argsort(~mask.astype(bool), axis=1, stable=True)
    t = jnp.take_along_axis(tokens, order, axis=1)
    m = jnp.take_along_axis(mask, order, axis=1)
    return jnp.where(m.astype(bool), t, pad_id), m


# ------------------------------------------------------------------------------------ rollout


def play(spec: GameSpec, state: GameState, batch, key: jax.Array,
         consts: GameConsts | None = None) -> Episode:
    """Rollouts and judge scores of one batch of seeds `batch = (tokens [B, S], mask [B, S])`."""
    seed_tokens, seed_mask = batch
    chex.assert_rank([seed_tokens, seed_mask], 2)
    chex.assert_equal_shape([seed_tokens, seed_mask])
    cfg = spec.cfg
    k_att, k_def = jax.random.split(key)
    a_in, a_mask = spec.attacker_inputs(seed_tokens, seed_mask)
    if cfg.prompt_source == "attacker":
        out = sample(state.attacker.policy_params, spec.attacker_lm, a_in, a_mask, k_att,
                     cfg.attacker_sampling, spec.eos_id, spec.pad_id)
        x, x_mask = out.tokens, out.mask
    else:  # the seed itself is the prompt (RLHF / Paraphrase)
        x, x_mask = left_to_right(seed_tokens, seed_mask, spec.pad_id)
        width = spec.prompt_len
        if x.shape[1] < width:
            x = jnp.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=spec.pad_id)
            x_mask = jnp.pad(x_mask, ((0, 0), (0, width - x_mask.shape[1])))
        x, x_mask = x[:, :width], x_mask[:, :width]
    x_len = hist.prompt_lengths(x, x_mask, spec.eos_id)
    # the bare prompt without EOS: what the judge and the history see
    x_bare_mask = (jnp.arange(x.shape[1])[None, :] < x_len[:, None]).astype(jnp.int32)
    d_in, d_mask = spec.defender_inputs(x, x_bare_mask)
    y = sample(state.defender.policy_params, spec.defender_lm, d_in, d_mask, k_def,
               cfg.defender_sampling, spec.eos_id, spec.pad_id)
    judge = spec.judge
    if consts is not None and consts.judge is not None:
        judge = spec.bind_judge(consts.judge)
    verdict = judge(x, x_bare_mask, y.tokens, y.mask)
    if spec.defender_score is None:
        score = verdict.p_safe
    else:
        score = spec.defender_score(x, x_bare_mask, y.tokens, y.mask)
    if spec.attacker_safety is None:
        a_safe, a_unsafe = verdict.p_safe, verdict.p_unsafe
    else:
        a_safe, a_unsafe = spec.attacker_safety(x, x_bare_mask, y.tokens, y.mask)
    b = seed_tokens.shape[0]
    chex.assert_shape([verdict.p_safe, verdict.p_unsafe, verdict.unsafe, score, a_safe, a_unsafe], (b,))
    return Episode(a_in, a_mask, x, x_mask.astype(jnp.int32), x_len, d_in, d_mask, y.tokens,
                   y.mask.astype(jnp.int32), verdict, score.astype(jnp.float32),
                   a_safe.astype(jnp.float32), a_unsafe.astype(jnp.float32))


def clean_prompts(ep: Episode, pad_id: int) -> jax.Array:
    """x with everything from EOS on replaced by pad: [B, Na] (what the history stores)."""
    keep = jnp.arange(ep.prompt.shape[1])[None, :] < ep.prompt_lengths[:, None]
    return jnp.where(keep, ep.prompt, pad_id).astype(jnp.int32)


def diversity(spec: GameSpec, history: hist.History, ep: Episode, embed_params) -> tuple:
    """(SelfBLEU_X(x) [B], Cos_X(x) [B], embeddings [B, E]) of the new prompts against the history."""
    cfg = spec.cfg
    tokens = clean_prompts(ep, spec.pad_id)
    b = tokens.shape[0]
    valid = hist.valid_mask(history)
    if cfg.use_selfbleu:
        bleu = self_bleu(tokens, ep.prompt_lengths, history.tokens, history.lengths, valid,
                         form=cfg.attacker_reward.selfbleu_form, orders=cfg.selfbleu_orders)
    else:
        bleu = jnp.zeros((b,), jnp.float32)
    if cfg.use_embedding:
        emb = spec.embed(embed_params, tokens, ep.prompt_lengths).astype(jnp.float32)
        cos = cosine_to_history(emb, history.embeddings, valid)
    else:
        emb = jnp.zeros((b, history.embeddings.shape[1]), jnp.float32)
        cos = jnp.zeros((b,), jnp.float32)
    chex.assert_shape([bleu, cos], (b,))
    return bleu, cos, emb


def _gather(x, axis_name):
    """All devices' rows, in device order: [b, ...] -> [n * b, ...] (identical on every device)."""
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, tiled=True)


# --------------------------------------------------------------------------------------- step


def make_game_step(spec: GameSpec) -> Callable:
    """`game_step(state, batch, key, consts) -> (state, metrics)` for this spec (see module doc).

    `batch` is this device's seeds (tokens [b, S], mask [b, S]); `key` this device's key. The step
    counter and the cursor are advanced by the caller (`make_play_step` / the loop)."""
    cfg, ax = spec.cfg, spec.axis_name
    if cfg.use_embedding and cfg.schedule.mode != "defend_only" and spec.embed is None:
        raise ValueError("game.use_embedding is true but no embedder was given")
    defender_update = functools.partial(ppo_update, models=spec.defender_models, cfg=cfg.defender_ppo,
                                        axis_name=ax)
    attacker_update = functools.partial(ppo_update, models=spec.attacker_models, cfg=cfg.attacker_ppo,
                                        axis_name=ax)
    mean = (lambda v: v) if ax is None else (lambda v: jax.lax.pmean(v, ax))
    total = (lambda v: v) if ax is None else (lambda v: jax.lax.psum(v, ax))

    def defend(state, ep, key):
        rollout = Rollout(ep.defender_input, ep.defender_input_mask, ep.response, ep.response_mask,
                          ep.defender_score)
        return defender_update(state.defender, state.defender_ref, rollout, key)

    def attack(state, ep, key, consts):
        bleu, cos, emb = diversity(spec, state.history, ep, consts.embed_params)
        r = attacker_reward(cfg.attacker_reward, ep.attacker_p_safe, ep.attacker_p_unsafe, bleu, cos)
        rollout = Rollout(ep.attacker_input, ep.attacker_input_mask, ep.prompt, ep.prompt_mask, r.reward)
        player, metrics = attacker_update(state.attacker, state.attacker_ref, rollout, key)
        # X += x of every device, in device order, so the buffer stays identical everywhere
        new_hist = hist.add(
            state.history,
            _gather(clean_prompts(ep, spec.pad_id), ax),
            _gather(ep.prompt_lengths, ax),
            _gather(emb, ax),
            _gather(jnp.ones_like(ep.prompt_lengths, bool), ax),
        )
        extra = {
            "attacker/reward": mean(jnp.mean(r.reward)),
            "attacker/safety_term": mean(jnp.mean(r.safety_term)),
            "attacker/diversity_term": mean(jnp.mean(r.diversity_term)),
            "attacker/selfbleu_to_history": mean(jnp.mean(bleu)),
            "attacker/cosine_to_history": mean(jnp.mean(cos)),
            "rewards/attacker_scored": total(jnp.sum(jnp.isfinite(r.reward).astype(jnp.float32))),
        }
        return player, new_hist, metrics, extra

    def nan_like(tree):
        return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), tree)

    def game_step(state: GameState, batch, key: jax.Array, consts: GameConsts):
        check_game_state(state)
        k_play, k_def, k_att = jax.random.split(key, 3)
        ep = play(spec, state, batch, k_play, consts)
        stage = sched.stage_at(state.step, cfg.schedule)

        # Branch outputs must share one structure: learn the metric trees abstractly.
        def run_defend(state):
            player, m = defend(state, ep, k_def)
            return state._replace(defender=player), m

        def run_attack(state):
            player, new_hist, m, extra = attack(state, ep, k_att, consts)
            return state._replace(attacker=player, history=new_hist), m, extra

        def branch_defend(state):
            state, dm = run_defend(state)
            return state, dm, nan_like(jax.eval_shape(lambda s: run_attack(s)[1:], state))

        def branch_attack(state):
            state, am, extra = run_attack(state)
            return state, nan_like(jax.eval_shape(lambda s: run_defend(s)[1], state)), (am, extra)

        def branch_both(state):
            # the attacker's update reads the same rollout (its reward does not involve pi's params)
            state, dm = run_defend(state)
            state, am, extra = run_attack(state)
            return state, dm, (am, extra)

        mode = cfg.schedule.mode
        # single-stage modes compile one branch and report only the learning player's metrics
        if mode == "defend_only":
            state, dm = run_defend(state)
            am = ({}, {})
        elif mode == "attack_only":
            state, am, extra = run_attack(state)
            dm, am = {}, (am, extra)
        elif mode == "simultaneous":
            state, dm, am = branch_both(state)
        else:
            state, dm, am = jax.lax.cond(stage == sched.DEFEND, branch_defend, branch_attack, state)
        att_ppo, att_extra = am

        j = ep.judge
        metrics = {
            "stage": stage.astype(jnp.float32),
            "judge/p_safe": mean(jnp.mean(j.p_safe)),
            "judge/p_unsafe": mean(jnp.mean(j.p_unsafe)),
            "attack_success": mean(jnp.mean(j.unsafe.astype(jnp.float32))),
            "defender/score": mean(jnp.mean(ep.defender_score)),
            "defender/response_length": mean(jnp.mean(jnp.sum(ep.response_mask, axis=1).astype(jnp.float32))),
            "attacker/prompt_length": mean(jnp.mean(ep.prompt_lengths.astype(jnp.float32))),
            "attacker/empty_prompts": total(jnp.sum((ep.prompt_lengths == 0).astype(jnp.float32))),
            "rewards/defender_scored": total(jnp.sum(jnp.isfinite(ep.defender_score).astype(jnp.float32))),
            "rewards/judged": total(jnp.sum((jnp.isfinite(j.p_safe) & jnp.isfinite(j.p_unsafe))
                                            .astype(jnp.float32))),
            "history/size": state.history.count.astype(jnp.float32),
        }
        if spec.prompt_labels is not None:
            x_bare = (jnp.arange(ep.prompt.shape[1])[None, :] < ep.prompt_lengths[:, None]).astype(jnp.int32)
            harmful, benign = spec.prompt_labels(ep.prompt, x_bare)
            hf, bf = harmful.astype(jnp.float32), benign.astype(jnp.float32)
            n_h, n_b = total(jnp.sum(hf)), total(jnp.sum(bf))
            metrics["attacker/harmful_fraction"] = mean(jnp.mean(hf))
            metrics["attack_success_harmful"] = total(jnp.sum(j.unsafe * hf)) / jnp.maximum(n_h, 1.0)
            if spec.response_compliant is not None:
                refused = ~spec.response_compliant(ep.response, ep.response_mask)
                metrics["defender/benign_refusal"] = total(jnp.sum(bf * refused)) / jnp.maximum(n_b, 1.0)
        metrics.update({f"defender/ppo/{k}": v for k, v in dm.items()})
        metrics.update({f"attacker/ppo/{k}": v for k, v in att_ppo.items()})
        metrics.update(att_extra)
        return state, metrics

    return game_step


def make_play_step(spec: GameSpec) -> Callable:
    """The loop's step function `(state, key, consts) -> (state, metrics)`: draws this step's seeds
    from the data cursor, plays `game_step`, and advances the cursor (the loop advances `step`)."""
    game_step = make_game_step(spec)

    def play_step(state: GameState, key: jax.Array, consts: GameConsts):
        batch, cursor = draw_batch(consts, state.cursor, state.rng, spec.cfg.batch_size, spec.axis_name)
        state, metrics = game_step(state, batch, key, consts)
        return state._replace(cursor=cursor), metrics

    return play_step
