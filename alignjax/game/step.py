"""GPO in one file: one step of the two-player game as a pure function.

    game_step(state, batch, key, consts) -> (state, metrics)

The data path (design.md), per device on its slice of the batch:

    seeds s ──attacker samples──> x ──defender samples──> y            (prompt_source "attacker")
    (x, y) ──referee(consts.judge)──> judge p_safe / p_unsafe, defender reward r(x, y), labels
    DEFEND: defend_update = PPO on the defender's rollout (defender_input(x), y) with reward r
    ATTACK: attack_update = R_div(x; X) from Self-BLEU and embedding cosine against the history X
            (before adding x), attacker reward  w_u p_unsafe - w_s p_safe - w_b SelfBLEU_X - w_c Cos_X
            (rewards/attacker_reward.py presets "paper" = -r + k (R_bleu + R_emb) / 2, "authors_code"),
            PPO on the attacker's rollout (attacker_input(s), x); then X += all-gathered x of all devices
    BOTH:   both updates on the same rollout (the simultaneous variant)

Who learns is `schedule.stage_at(state.step)`, decided once per step. With prompt_source "seeds" the
attacker is skipped and x = s (RLHF on a fixed prompt set; the Paraphrase baseline passes the
initial attacker's rewrites as the seed set).

Every episode gets its scores: no sample is dropped or reordered (the authors' code dropped judge
outputs that were neither "safe" nor "unsafe"). Only attack-stage prompts enter the history (theirs
also stored defence-stage prompts), and the EOS token is cut from stored prompts (theirs leaked `</s>`).
Metrics (game/metrics.py) are global means over the batch, identical on every device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp

from alignjax import parallel
from alignjax.game import keys
from alignjax.game import metrics as M
from alignjax.game import schedule as sched
from alignjax.game.state import GameState, check_game_state
from alignjax.rewards import history as hist
from alignjax.rewards.attacker_reward import AttackerRewardConfig, attacker_reward, similarity_to_history
from alignjax.rewards.judge import Scores
from alignjax.rl.experience import PPOConfig, Rollout
from alignjax.rl.ppo import make_ppo_update
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
        # On-policy by construction: PPO's log-probs use the temperature the player samples at.
        for player in ("defender", "attacker"):
            ppo, sampling = getattr(self, f"{player}_ppo"), getattr(self, f"{player}_sampling")
            if ppo.temperature is None:
                ppo = dataclasses.replace(ppo, temperature=sampling.temperature)
                object.__setattr__(self, f"{player}_ppo", ppo)
            elif ppo.temperature != sampling.temperature:
                raise ValueError(
                    f"game.{player}_ppo.temperature={ppo.temperature} differs from "
                    f"game.{player}_sampling.temperature={sampling.temperature}: PPO's importance ratios "
                    "and KL would be computed under another distribution than the one that sampled the "
                    "tokens. Leave the PPO temperature unset (it follows the sampler).")

    @property
    def needs_embedder(self) -> bool:
        """Whether the attacker's reward has an embedding term (an attacker that learns, Cos_X on)."""
        return self.use_embedding and self.schedule.mode != "defend_only"


class GameConsts(NamedTuple):
    """Read-only inputs of every step (broadcast to all devices, not checkpointed)."""

    seed_tokens: jax.Array  # [N, S] int32 left-padded seed prompts (the dataset D)
    seed_mask: jax.Array  # [N, S] int32
    judge: Any  # the referee's weights: an LM judge's params, or the synthetic world's tables
    embed_params: Any = None  # the sentence embedder's params (None without an embedder)


class Role(NamedTuple):
    """One player's static parts: its networks (`rl.LlamaPlayerModels`: policy + critic forward, and
    `.policy_config` for sampling) and its token-level template `(tokens, mask) -> (tokens, mask)`
    (left-padded; it must drop pads / EOS of x)."""

    models: Any
    inputs: Callable


@dataclasses.dataclass(frozen=True)
class GameSpec:
    """The game's static parts.

    referee: `(consts.judge, x, x_mask, y, y_mask) -> rewards.judge.Scores` (x is the bare attacker
      prompt without template or EOS); the setting provides it.
    embed: optional `(params, tokens [B, L], lengths [B]) -> [B, E]` sentence embedder; embed_dim: E
      (the history's embedding width; 1 without an embedder).
    axis_name: the data axis of `jax.pmap`; None on one device and under a mesh (`parallel`), where
      the step runs on the global batch and GSPMD inserts the collectives."""

    cfg: GameConfig
    defender: Role
    attacker: Role
    referee: Callable[..., Scores]
    eos_id: int
    pad_id: int
    embed: Callable | None = None
    embed_dim: int = 1
    axis_name: str | None = parallel.DATA_AXIS

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
    scores: Scores  # [B] each: the judge, the defender's reward, the attacker's pair, labels


# --------------------------------------------------------------------------------------- data


def draw_batch(consts: GameConsts, cursor: jax.Array, rng: jax.Array, global_batch: int,
               axis_name: str | None) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """This device's seeds for the step at `cursor`, and the advanced cursor.

    Global row i of the step is seed perm_e[j] with c = cursor + i, e = c // N, j = c mod N, where
    perm_e = permutation(fold_in(data_key(rng), e), N): every epoch visits each seed once in a fresh
    order, a pure function of (rng, cursor). Device d takes global rows [d * b, (d + 1) * b)."""
    n = consts.seed_tokens.shape[0]
    n_dev = parallel.axis_size(axis_name)
    if global_batch % n_dev:
        raise ValueError(f"game.batch_size={global_batch} is not divisible by the {n_dev} devices")
    if global_batch > n:
        raise ValueError(f"game.batch_size={global_batch} exceeds the {n} seed prompts")
    b = global_batch // n_dev
    c = cursor + parallel.axis_index(axis_name) * b + jnp.arange(b)
    epoch0 = cursor // n
    data_key = keys.data_key(rng)
    perms = jnp.stack([jax.random.permutation(jax.random.fold_in(data_key, epoch0 + i), n) for i in (0, 1)])
    idx = perms[c // n - epoch0, c % n]
    batch = parallel.constrain_batch((consts.seed_tokens[idx], consts.seed_mask[idx]))
    return batch, cursor + global_batch


def left_to_right(tokens: jax.Array, mask: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Move the real tokens of each row to the left (stable): left-padded -> right-padded."""
    order = jnp.argsort(~mask.astype(bool), axis=1, stable=True)
    t = jnp.take_along_axis(tokens, order, axis=1)
    m = jnp.take_along_axis(mask, order, axis=1)
    return jnp.where(m.astype(bool), t, pad_id), m


def seeds_as_prompts(spec: GameSpec, seed_tokens, seed_mask) -> tuple[jax.Array, jax.Array]:
    """x = s (no attacker): the left-padded seeds [B, S] right-aligned-free in the prompt block
    [B, prompt_len]; a seed longer than the block keeps its last prompt_len tokens (the settings
    reject or count such seeds before the game: settings/real.py `encode_prompts`)."""
    width = spec.prompt_len
    if seed_tokens.shape[1] > width:
        seed_tokens, seed_mask = seed_tokens[:, -width:], seed_mask[:, -width:]
    x, x_mask = left_to_right(seed_tokens, seed_mask, spec.pad_id)
    if x.shape[1] < width:
        x = jnp.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=spec.pad_id)
        x_mask = jnp.pad(x_mask, ((0, 0), (0, width - x_mask.shape[1])))
    return x, x_mask


# ------------------------------------------------------------------------------------ rollout


def play(spec: GameSpec, state: GameState, batch, key: jax.Array, consts: GameConsts) -> Episode:
    """Rollouts and scores of one batch of seeds `batch = (tokens [B, S], mask [B, S])`."""
    seed_tokens, seed_mask = batch
    chex.assert_rank([seed_tokens, seed_mask], 2)
    chex.assert_equal_shape([seed_tokens, seed_mask])
    cfg = spec.cfg
    k_att, k_def = jax.random.split(key)
    # the draws of global rows [offset, offset + b): samples do not depend on the layout
    rows = dict(row_offset=parallel.row_offset(seed_tokens.shape[0], spec.axis_name),
                total_rows=cfg.batch_size)
    a_in, a_mask = spec.attacker.inputs(seed_tokens, seed_mask)
    if cfg.prompt_source == "attacker":
        att = spec.attacker.models
        out = sample(att.compute_params(state.attacker.policy_params), att.policy_config, a_in, a_mask, k_att,
                     cfg.attacker_sampling, spec.eos_id, spec.pad_id, **rows)
        x, x_mask = out.tokens, out.mask
    else:  # the seed itself is the prompt (RLHF / Paraphrase)
        x, x_mask = seeds_as_prompts(spec, seed_tokens, seed_mask)
    x_len = hist.prompt_lengths(x, x_mask, spec.eos_id)
    x_bare_mask = hist.length_mask(x_len, x.shape[1])  # x without EOS: what the judge and history see
    d_in, d_mask = spec.defender.inputs(x, x_bare_mask)
    dfd = spec.defender.models  # samplers run in the compute dtype (a bf16 copy of f32 master weights)
    y = sample(dfd.compute_params(state.defender.policy_params), dfd.policy_config, d_in, d_mask, k_def,
               cfg.defender_sampling, spec.eos_id, spec.pad_id, **rows)
    scores = spec.referee(consts.judge, x, x_bare_mask, y.tokens, y.mask)
    chex.assert_shape([scores.defender, scores.attacker_p_safe, scores.attacker_p_unsafe],
                      (seed_tokens.shape[0],))
    scores = scores._replace(defender=scores.defender.astype(jnp.float32),
                             attacker_p_safe=scores.attacker_p_safe.astype(jnp.float32),
                             attacker_p_unsafe=scores.attacker_p_unsafe.astype(jnp.float32))
    return Episode(a_in, a_mask, x, x_mask.astype(jnp.int32), x_len, d_in, d_mask, y.tokens,
                   y.mask.astype(jnp.int32), scores)


def clean_prompts(ep: Episode, pad_id: int) -> jax.Array:
    """x with everything from EOS on replaced by pad: [B, Na] (what the history stores)."""
    keep = hist.length_mask(ep.prompt_lengths, ep.prompt.shape[1]).astype(bool)
    return jnp.where(keep, ep.prompt, pad_id).astype(jnp.int32)


# ------------------------------------------------------------------------------------ updates


def defend_update(spec: GameSpec, state: GameState, ep: Episode, key: jax.Array):
    """PPO update of the defender on (defender_input(x), y) with reward r(x, y). -> (state, ppo metrics)."""
    update = make_ppo_update(spec.defender.models, spec.cfg.defender_ppo, spec.axis_name)
    rollout = Rollout(ep.defender_input, ep.defender_input_mask, ep.response, ep.response_mask,
                      ep.scores.defender)
    player, ppo_metrics = update(state.defender, state.defender_ref, rollout, key)
    return state._replace(defender=player), ppo_metrics


def attack_update(spec: GameSpec, state: GameState, ep: Episode, key: jax.Array, embed_params):
    """PPO update of the attacker on (attacker_input(s), x) with reward safety + k R_div(x; X), then
    X += x (all devices' rows, in device order). -> (state, ppo metrics, reward metrics)."""
    cfg, ax = spec.cfg, spec.axis_name
    tokens = clean_prompts(ep, spec.pad_id)
    emb = None
    if cfg.use_embedding:
        emb = spec.embed(embed_params, tokens, ep.prompt_lengths).astype(jnp.float32)
    sim = similarity_to_history(state.history, tokens, ep.prompt_lengths, emb,
                                cfg.attacker_reward.selfbleu_form, orders=cfg.selfbleu_orders,
                                use_selfbleu=cfg.use_selfbleu)
    if emb is None:
        emb = jnp.zeros((tokens.shape[0], state.history.embeddings.shape[1]), jnp.float32)
    r = attacker_reward(cfg.attacker_reward, ep.scores.attacker_p_safe, ep.scores.attacker_p_unsafe,
                        sim.selfbleu, sim.cosine)
    rollout = Rollout(ep.attacker_input, ep.attacker_input_mask, ep.prompt, ep.prompt_mask, r.reward)
    update = make_ppo_update(spec.attacker.models, cfg.attacker_ppo, ax)
    player, ppo_metrics = update(state.attacker, state.attacker_ref, rollout, key)
    gather = lambda v: parallel.all_gather(v, ax)
    history = hist.add(state.history, gather(tokens), gather(ep.prompt_lengths), gather(emb),
                       gather(jnp.ones_like(ep.prompt_lengths, bool)))
    return (state._replace(attacker=player, history=history), ppo_metrics,
            M.attack_reward_metrics(r, sim, ax))


# --------------------------------------------------------------------------------------- step


def make_game_step(spec: GameSpec) -> Callable:
    """`game_step(state, batch, key, consts) -> (state, metrics)` for this spec (see module doc).

    `batch` is this device's seeds (tokens [b, S], mask [b, S]); `key` this device's key. The step
    counter and the cursor are advanced by the caller (`make_play_step` / the loop). Each stage's
    branch returns the same metric structure (zeros for the player that did not learn); the host
    logs only the learning players' entries (`metrics.select`)."""
    if spec.cfg.needs_embedder and spec.embed is None:
        raise ValueError("game.use_embedding is true but no embedder was given")

    def learn_defender(state, ep, key, consts):
        new, dm = defend_update(spec, state, ep, key)
        return new.defender, dm

    def learn_attacker(state, ep, key, consts):  # reads neither pi nor its update: order-free in BOTH
        new, am, extra = attack_update(spec, state, ep, key, consts.embed_params)
        return (new.attacker, new.history), (am, extra)

    def player_update(learns, learn, part, *args):
        """`learn(state, ep, key, consts)` -> (the player's new part of the state, its metrics) where
        `learns`, else (its part unchanged, zero metrics). `learns` is a Python bool when every stage
        of the mode agrees (then the metrics of a player that never learns are None), else a traced
        bool: one `lax.cond` per player whose results are that player's part only. (A `lax.switch`
        over whole-state branches made XLA copy the other player through: plan=true measured
        6.3 GB of temporaries against 4.3 GB for the SmolLM2 chunk.)"""
        if isinstance(learns, bool):
            return learn(*args) if learns else (part(args[0]), None)
        zeros = M.zeros_like(jax.eval_shape(learn, *args)[1])
        return jax.lax.cond(learns, learn, lambda state, *_: (part(state), zeros), *args)

    stages = sched.stages_of(spec.cfg.schedule)  # the stages this mode can take, static

    def game_step(state: GameState, batch, key: jax.Array, consts: GameConsts):
        check_game_state(state)
        k_play, k_def, k_att = jax.random.split(key, 3)
        ep = play(spec, state, batch, k_play, consts)
        stage = sched.stage_at(state.step, spec.cfg.schedule)

        def learns(*who):  # static when the mode's stages agree, else traced
            static = {s in who for s in stages}
            return static.pop() if len(static) == 1 else sum(stage == s for s in who) > 0

        # The barriers order the collectives: the updates hold some (gradient pmean, history
        # all-gather), and XLA's CPU runtime runs independent ops concurrently, a cond's collectives
        # included, so without a data dependency the devices could enter them in different orders
        # (a rendezvous abort under pmap on 8 devices).
        state, ep = jax.lax.optimization_barrier((state, ep))
        defender, dm = player_update(learns(sched.DEFEND, sched.BOTH), learn_defender,
                                     lambda s: s.defender, state, ep, k_def, consts)
        state, ep, dm = jax.lax.optimization_barrier((state._replace(defender=defender), ep, dm))
        (attacker, history), att = player_update(learns(sched.ATTACK, sched.BOTH), learn_attacker,
                                                 lambda s: (s.attacker, s.history), state, ep, k_att, consts)
        dm = dm if dm is not None else M.zeros_like(att[0])
        am, extra = att if att is not None else (M.zeros_like(dm), M.attack_reward_placeholder())
        state = state._replace(attacker=attacker, history=history)
        state, ep, dm, am, extra = jax.lax.optimization_barrier((state, ep, dm, am, extra))
        metrics = M.step_metrics(ep, stage, history, dm, am, extra, spec.axis_name)
        if len(stages) == 1:  # one stage: its metrics only
            metrics = {k: v for k, v in metrics.items() if M.measured(k, stages[0])}
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

