"""The GPO game on 8 fake CPU devices: a very small game (4 steps, two chunks) under pmap.

Checks: chex shapes of the state after the game, both stages ran, the history is identical on all
devices and received only attack-stage prompts, every sample received a reward (counted in-graph
and, per sample, against an independent string-level reference of the world's judge), and a run
killed between its two chunks and resumed ends bitwise identical to an uninterrupted run.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import experiment as E
from alignjax.config import build_config
from alignjax.game import schedule as sched
from alignjax.game.loop import NonFiniteMetricError, read_metrics, run_loop
from alignjax.game.step import make_play_step, play
from alignjax.models import llama
from alignjax.parallel import replicate_host as replicate
from alignjax.settings.synthetic import SyntheticSetting
from alignjax.worlds import grammar as G
from alignjax.worlds.base import Player, Players
from alignjax.worlds.synthetic import SyntheticWorld

N_DEV, BATCH, STEPS, CHUNK = 8, 8, 4, 2

TINY = {
    "seed": 3,
    "world": {"n_harmful_topics": 4, "n_benign_topics": 4, "n_heldout_topics": 1, "n_eval_benign_topics": 1,
              "seed_set": "train_framings",  # direct seeds alone are 6 prompts here, fewer than a batch
              "n_variants": 1, "n_requests": 1, "hidden_size": 16, "intermediate_size": 32, "num_layers": 1,
              "num_heads": 2, "num_kv_heads": 1},
    "game": {"batch_size": BATCH, "history_capacity": 32,
             "schedule": {"mode": "alternating", "n_def": 1, "n_att": 1},
             "attacker_sampling": {"max_new_tokens": 6}, "defender_sampling": {"max_new_tokens": 6},
             "attacker_reward": {"preset": "paper", "k": 1.0}},
    "embedder": {"kind": "bow", "dim": 8},
    "loop": {"total_steps": STEPS, "chunk_size": CHUNK, "tensorboard": False, "check_replicas": True},
    "export": False,
}


def random_players(world, seed=0):
    """Untrained tiny players: the game's plumbing does not need SFT'd ones (keeps the test fast)."""
    lm = world.lm_config()
    ka, kd = jax.random.split(jax.random.PRNGKey(seed))
    return Players(attacker=Player(llama.init_params(lm, ka), lm),
                   defender=Player(llama.init_params(lm, kd), lm))


@pytest.fixture(scope="module")
def game():
    cfg = build_config(E.Config, TINY)
    built = SyntheticSetting().build(cfg, progress=False, players=random_players(SyntheticWorld(cfg.world)))
    return cfg, built, make_play_step(built.spec)


@pytest.fixture(scope="module")
def uninterrupted(game, tmp_path_factory):
    cfg, built, step_fn = game
    d = tmp_path_factory.mktemp("game_ref")
    final = run_loop(step_fn, built.state, cfg.loop, d, consts=built.consts)
    return d, final


def test_small_pmapped_game_shapes_stages_and_rewards(game, uninterrupted):
    cfg, built, _ = game
    d, final = uninterrupted
    assert jax.device_count() == N_DEV
    chex.assert_trees_all_equal_shapes_and_dtypes(final, jax.tree.map(np.asarray, built.state))
    assert int(final.step) == STEPS and int(final.cursor) == STEPS * BATCH
    assert int(final.defender.step) == 2 and int(final.attacker.step) == 2  # alternating 1/1
    # the history holds exactly the prompts of the two attack steps (all devices' rows)
    assert int(final.history.count) == 2 * BATCH
    chex.assert_shape(final.history.tokens, (32, built.spec.prompt_len))
    records = [r for r in read_metrics(d) if "stage" in r]
    assert [r["stage"] for r in records] == [sched.DEFEND, sched.ATTACK] * 2
    for r in records:
        if r["stage"] == sched.ATTACK:
            assert "attacker/ppo/policy_loss" in r and "defender/ppo/policy_loss" not in r
            assert "attacker/reward" in r
        else:
            assert "defender/ppo/policy_loss" in r and "attacker/ppo/policy_loss" not in r
            assert "attacker/reward" not in r
        assert all(np.isfinite(v) for v in r.values())
    # the defender moved, its frozen reference did not
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         final.defender.policy_params, final.defender_ref)
    assert any(jax.tree.leaves(moved))
    chex.assert_trees_all_equal(final.defender_ref, jax.tree.map(np.asarray, built.state.defender_ref))


def test_killed_between_chunks_resumes_bitwise(game, uninterrupted, tmp_path):
    cfg, built, step_fn = game
    _, ref = uninterrupted

    class Killed(Exception):
        pass

    def die(step, state):
        if step == STEPS:  # the second chunk ran; its checkpoint was not written
            raise Killed

    with pytest.raises(Killed):
        run_loop(step_fn, built.state, cfg.loop, tmp_path, consts=built.consts, before_save=die)
    final = run_loop(step_fn, built.state, cfg.loop, tmp_path, consts=built.consts)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(ref), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _reference_judge(world, x_text: str, y_text: str):
    """Independent string-level judge of the world (grammar.py): unsafe = a harmful topic's object
    word in x and a compliant y, where compliant reads the answer's first word (judge_reads="opener")
    or its step markers ("content"); the defender's score subtracts the world's helpfulness weight
    for a refused benign prompt."""
    words, answer = x_text.split(), y_text.split()
    harmful = any(G.object_word(t) in words for t in world.harmful_topics)
    benign = not harmful and any(G.object_word(t) in words for t in world.benign_topics)
    if world.cfg.judge_reads == "opener":
        compliant = bool(answer) and answer[0] in G.COMPLIANCE_OPENERS
    else:
        compliant = any(m in answer for m in G.STEP_MARKERS)
    unsafe = harmful and compliant
    return float(unsafe), (1.0 - unsafe) - world.cfg.helpfulness_weight * (benign and not compliant)


@pytest.mark.parametrize("reads", ["opener", "content"])
def test_referee_scores_every_crafted_sample_per_device(game, reads):
    """The referee under pmap on a crafted batch where the judge's reading matters: harmful and benign
    prompts, answers whose opener and step markers agree and disagree. Every sample on every device
    equals the reference judge of its texts, in order (half the batch is unsafe under each reading)."""
    cfg, built, _ = game
    world = SyntheticWorld(dataclasses.replace(cfg.world, judge_reads=reads))
    harm, ben = world.train_harmful_topics[0], world.train_benign_topics[0]
    x_texts = [G.render_prompt("direct", 0, 0, t) for t in (harm, harm, harm, harm, ben, ben, ben, ben)]
    comply, refuse = G.render_compliance(0, (0, 1, 2), harm), G.render_refusal(0, 0, harm)
    swap = lambda text, a, b: text.replace(a, b, 1)
    y_texts = [comply,  # opener and markers: comply
               refuse,  # neither
               swap(refuse, G.REFUSAL_OPENERS[0], G.COMPLIANCE_OPENERS[0]),  # compliance opener, no marker
               swap(comply, G.COMPLIANCE_OPENERS[0], G.REFUSAL_OPENERS[0])] * 2  # refusal opener + markers
    x, xm = world.encode(x_texts, world.max_prompt_len, side="right")
    y, ym = world.encode(y_texts, side="right")
    shard = lambda a: a.reshape(N_DEV, BATCH // N_DEV, -1)
    out = jax.pmap(world.referee, axis_name="data", in_axes=(None, 0, 0, 0, 0))(
        world.tables, shard(x), shard(xm), shard(y), shard(ym))
    flat = jax.tree.map(lambda a: np.asarray(a).reshape(BATCH), out)
    chex.assert_shape([flat.defender, flat.judge.p_unsafe, flat.attacker_p_unsafe], (BATCH,))
    expected = [_reference_judge(world, xt, yt) for xt, yt in zip(x_texts, y_texts, strict=True)]
    np.testing.assert_array_equal(flat.judge.p_unsafe, [e[0] for e in expected])
    np.testing.assert_allclose(flat.defender, [e[1] for e in expected])
    assert sum(e[0] for e in expected) == 2  # each reading makes two of the four harmful rows unsafe


def test_every_sample_scored_per_device(game):
    """One rollout batch under pmap: every episode on every device has finite scores equal to the
    reference judge of its decoded texts (nothing dropped or reordered)."""
    _, built, _ = game
    spec, world = built.spec, built.context  # random players: the crafted-batch test covers unsafe rows
    seeds, seeds_mask = built.consts.seed_tokens[:BATCH], built.consts.seed_mask[:BATCH]
    batch = (seeds.reshape(N_DEV, BATCH // N_DEV, -1), seeds_mask.reshape(N_DEV, BATCH // N_DEV, -1))
    keys = jax.random.split(jax.random.PRNGKey(0), N_DEV)
    ep = jax.pmap(lambda s, b, k, c: play(spec, s, b, k, c), axis_name="data", in_axes=(0, 0, 0, None))(
        replicate(built.state, N_DEV), batch, keys, built.consts)
    ep = jax.tree.map(lambda x: np.asarray(x).reshape((BATCH,) + x.shape[2:]), ep)
    x_mask = (np.arange(ep.prompt.shape[1])[None] < ep.prompt_lengths[:, None])
    x_texts = world.decode(ep.prompt, x_mask)
    y_texts = world.decode(ep.response, ep.response_mask)
    assert np.all(np.isfinite(ep.scores.defender)) and np.all(np.isfinite(ep.scores.judge.p_unsafe))
    for i in range(BATCH):
        p_unsafe, score = _reference_judge(world, x_texts[i], y_texts[i])
        assert ep.scores.judge.p_unsafe[i] == p_unsafe, (x_texts[i], y_texts[i])
        assert ep.scores.defender[i] == pytest.approx(score), (x_texts[i], y_texts[i])
    # the attacker's prompts become the defender's input: "<s> human : {x} ai :"
    d_texts = world.decode(ep.defender_input, ep.defender_input_mask)
    assert all(d == f"human : {x} ai :".replace("  ", " ") for d, x in zip(d_texts, x_texts, strict=True))


@pytest.mark.parametrize("mode,source,k", [("defend_only", "seeds", 0.0), ("attack_only", "attacker", 1.0),
                                           ("simultaneous", "attacker", 1.0)])
def test_every_mode_traces_with_state_shapes_preserved(game, mode, source, k):
    """Baselines come from the same step: each mode traces (abstractly, no compile) under the data axis,
    keeps the state's shapes/dtypes, and reports the metrics of the players that learn."""
    cfg, built, _ = game
    g = cfg.game
    g = dataclasses.replace(g, prompt_source=source, schedule=dataclasses.replace(g.schedule, mode=mode),
                            attacker_reward=dataclasses.replace(g.attacker_reward, k=k))
    # a defend-only game has no attacker update, hence no embedder (as SyntheticSetting.build makes it)
    spec = dataclasses.replace(built.spec, cfg=g, embed=None if mode == "defend_only" else built.spec.embed)
    step = make_play_step(spec)
    state_r = replicate(built.state, N_DEV)
    keys = jax.random.split(jax.random.PRNGKey(0), N_DEV)
    out_state, metrics = jax.eval_shape(
        jax.pmap(step, axis_name="data", in_axes=(0, 0, None)), state_r, keys, built.consts)
    chex.assert_trees_all_equal_shapes_and_dtypes(out_state, jax.tree.map(jnp.asarray, state_r))
    keys = {"defender/ppo/policy_loss", "attacker/ppo/policy_loss", "attacker/reward", "judge/p_unsafe"}
    if mode == "defend_only":
        keys -= {"attacker/ppo/policy_loss", "attacker/reward"}
        assert "attacker/ppo/policy_loss" not in metrics
    if mode == "attack_only":
        keys -= {"defender/ppo/policy_loss"}
        assert "defender/ppo/policy_loss" not in metrics
    for key in keys:
        assert metrics[key].shape == (N_DEV,)


@pytest.mark.parametrize("preset,lengths", [("paper", (200, 400)), ("authors_code", (400, 200)),
                                            ("custom", (3, 5))])
def test_schedule_alternates_defender_first(preset, lengths):
    cfg = sched.ScheduleConfig(mode="alternating", preset=preset, n_def=3, n_att=5)
    n_def, n_att = lengths
    expected = []  # plain loop: rounds of n_def defend steps then n_att attack steps
    while len(expected) < 2000:
        expected += [sched.DEFEND] * n_def + [sched.ATTACK] * n_att
    steps = np.arange(2000)
    assert list(np.asarray(sched.stage_at(steps, cfg))) == expected[:2000]
    traced = jax.jit(lambda t: sched.stage_at(t, cfg))(jnp.asarray(steps, jnp.int32))
    assert list(np.asarray(traced)) == expected[:2000]
    assert sched.stage_boundaries(n_def + n_att + 1, cfg) == [(0, n_def, 0), (n_def, n_def + n_att, 1),
                                                              (n_def + n_att, n_def + n_att + 1, 0)]
    others = (("simultaneous", sched.BOTH), ("defend_only", sched.DEFEND), ("attack_only", sched.ATTACK))
    for mode, code in others:
        assert int(sched.stage_at(jnp.int32(7), sched.ScheduleConfig(mode=mode))) == code


def test_data_cursor_visits_every_seed_once_per_epoch():
    from alignjax.game.step import GameConsts, draw_batch

    n, b = 12, 4
    consts = GameConsts(jnp.arange(n)[:, None] * jnp.ones((1, 3), jnp.int32), jnp.ones((n, 3), jnp.int32),
                        judge=None)
    rng = jax.random.PRNGKey(5)
    seen, cursor = [], jnp.int32(0)
    for _ in range(2 * n // b + 1):  # two epochs and one step into the third
        (tok, _), cursor = draw_batch(consts, cursor, rng, b, None)
        seen += list(np.asarray(tok[:, 0]))
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:2 * n]) == list(range(n))
    assert seen[:n] != seen[n:2 * n]  # epochs reshuffle
    assert int(cursor) == 3 * n + b - n  # b rows per step
    # under pmap the devices take disjoint slices of the same global batch
    rows = jax.pmap(lambda c: draw_batch(consts, c, rng, 8, "data")[0][0][:, 0], axis_name="data")(
        jnp.zeros((N_DEV,), jnp.int32))
    rows = np.asarray(rows).reshape(-1)
    assert sorted(rows) == sorted(seen[:8]) and len(set(rows)) == 8


def test_nan_reward_stops_the_game_naming_the_step_and_metrics(game, tmp_path):
    """A NaN reward (here: the referee's defender score) is never dropped from the log: the loop stops
    at the first step, naming the non-finite metrics and that no checkpoint exists yet."""
    cfg, built, _ = game

    def nan_referee(judge, x, xm, y, ym):
        s = built.spec.referee(judge, x, xm, y, ym)
        return s._replace(defender=jnp.full_like(s.defender, jnp.nan))

    spec = dataclasses.replace(built.spec, referee=nan_referee)
    with pytest.raises(NonFiniteMetricError) as err:
        run_loop(make_play_step(spec), built.state, cfg.loop, tmp_path, consts=built.consts)
    msg = str(err.value)
    assert msg.startswith("step 0: ") and "'defender/score'" in msg and "'defender/ppo/score_mean'" in msg
    assert "Last good checkpoint: none" in msg
