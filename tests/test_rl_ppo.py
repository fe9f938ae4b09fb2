"""Experience and PPO losses vs NumPy computed from full-sequence forwards; NaN/inf handling; shape errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from alignjax.models import LMConfig, heads, init_critic, init_params, llama, value_forward
from alignjax.rl import (
    Experience,
    LlamaPlayerModels,
    NonFiniteError,
    OptimizerConfig,
    PPOConfig,
    Rollout,
    compute_experience,
    make_player_state,
    make_ppo_update,
    nonfinite_report,
    raise_if_nonfinite,
)
from alignjax.rl.ppo import policy_loss, value_loss

CFG = LMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
MODELS = LlamaPlayerModels(CFG)


def make_rollout(seed, b=4, p=5, n=6, vocab=None):
    """Left-padded prompts with 1..P real tokens, right-padded responses with 1..N tokens."""
    rng = np.random.default_rng(seed)
    plen = rng.integers(1, p + 1, size=b)
    rlen = rng.integers(1, n + 1, size=b)
    rlen[0] = n
    prompt_mask = (np.arange(p)[None, :] >= (p - plen)[:, None]).astype(np.int32)
    response_mask = (np.arange(n)[None, :] < rlen[:, None]).astype(np.int32)
    vocab = vocab or CFG.vocab_size
    prompt = np.where(prompt_mask > 0, rng.integers(3, vocab, size=(b, p)), 0).astype(np.int32)
    response = np.where(response_mask > 0, rng.integers(3, vocab, size=(b, n)), 0).astype(np.int32)
    scores = rng.uniform(size=b).astype(np.float32)
    return Rollout(*map(jnp.asarray, (prompt, prompt_mask, response, response_mask, scores)))


def full_forward_numpy(policy, critic, ro):
    """Log-probs and values of the response tokens from full-sequence forwards, indexed in NumPy."""
    tokens = jnp.concatenate([ro.prompt_tokens, ro.response_tokens], 1)
    mask = jnp.concatenate([ro.prompt_mask, ro.response_mask], 1)
    logits = np.asarray(llama.forward(policy, CFG, tokens, mask).logits, np.float64)
    values = np.asarray(value_forward(critic, CFG, tokens, mask)) if critic is not None else None
    p, n = ro.prompt_tokens.shape[1], ro.response_tokens.shape[1]
    b = tokens.shape[0]
    logp, vals = np.zeros((b, n)), np.zeros((b, n))
    m = np.asarray(ro.response_mask)
    for i in range(b):
        for t in range(n):
            if m[i, t]:
                logp[i, t] = scipy.special.log_softmax(logits[i, p + t - 1])[int(ro.response_tokens[i, t])]
                vals[i, t] = values[i, p + t - 1] if values is not None else 0.0
    return logp, vals, logits[:, p - 1 : p + n - 1]


def gae_loop(rewards, values, mask, gamma, lam):
    b, n = rewards.shape
    adv = np.zeros((b, n))
    for i in range(b):
        length, last = int(mask[i].sum()), 0.0
        for t in reversed(range(length)):
            next_v = values[i, t + 1] if t + 1 < length else 0.0
            last = rewards[i, t] + gamma * next_v - values[i, t] + gamma * lam * last
            adv[i, t] = last
    return adv


@pytest.fixture(scope="module")
def nets():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    policy = init_params(CFG, k1)
    ref = init_params(CFG, k2)
    critic = init_critic(CFG, k3, head_std=0.5)
    return policy, ref, critic


def test_experience_matches_numpy(nets):
    policy, ref, critic = nets
    ro = make_rollout(1)
    cfg = PPOConfig(kl_coef=0.3, kl_estimator="k3", gamma=0.97, lam=0.9, num_minibatches=2)
    exp, metrics, _ = jax.jit(functools.partial(compute_experience, models=MODELS, cfg=cfg))(
        policy, critic, ref, ro
    )
    b, n = ro.response_tokens.shape
    per_token = [exp.logprobs, exp.ref_logprobs, exp.values, exp.kl, exp.rewards, exp.advantages, exp.returns]
    chex.assert_shape(per_token, (b, n))
    chex.assert_type(per_token, jnp.float32)
    chex.assert_tree_all_finite(per_token)
    chex.assert_shape([exp.response_tokens, exp.response_mask], (b, n))
    chex.assert_shape([exp.prompt_tokens, exp.prompt_mask], ro.prompt_tokens.shape)
    chex.assert_shape(list(metrics.values()), ())
    logp, vals, _ = full_forward_numpy(policy, critic, ro)
    ref_logp, _, _ = full_forward_numpy(ref, None, ro)
    m = np.asarray(ro.response_mask, np.float64)
    kl = (np.exp(ref_logp - logp) - 1 - (ref_logp - logp)) * m
    rewards = -0.3 * kl
    for i in range(m.shape[0]):
        rewards[i, int(m[i].sum()) - 1] += float(ro.scores[i])
    adv = gae_loop(rewards, vals, m, 0.97, 0.9)
    returns = (adv + vals) * m
    sel = adv[m > 0]
    white = np.where(m > 0, (adv - sel.mean()) / np.sqrt(sel.var() + 1e-8), 0.0)
    np.testing.assert_allclose(exp.logprobs, logp, atol=1e-5)
    np.testing.assert_allclose(exp.ref_logprobs, ref_logp, atol=1e-5)
    np.testing.assert_allclose(exp.values, vals * m, atol=1e-5)
    np.testing.assert_allclose(exp.kl, kl, atol=1e-5)
    np.testing.assert_allclose(exp.rewards, rewards, atol=1e-5)
    np.testing.assert_allclose(exp.returns, returns, atol=1e-5)
    np.testing.assert_allclose(exp.advantages, white, atol=1e-4)
    np.testing.assert_allclose(metrics["kl_ref"], np.mean(np.sum((logp - ref_logp) * m, 1)), atol=1e-5)
    np.testing.assert_allclose(metrics["response_length"], m.sum(1).mean(), atol=1e-6)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_policy_and_value_losses_match_numpy(nets, aggregation):
    policy, _, critic = nets
    ro = make_rollout(2)
    rng = np.random.default_rng(3)
    logp, vals, logits = full_forward_numpy(policy, critic, ro)
    m = np.asarray(ro.response_mask, np.float64)
    old_logp = (logp + rng.normal(scale=0.4, size=logp.shape)) * m  # some ratios leave [0.8, 1.2]
    adv = rng.normal(size=m.shape) * m
    old_vals = (vals + rng.normal(scale=0.5, size=m.shape)) * m
    returns = rng.normal(size=m.shape) * m
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    mb = Experience(
        ro.prompt_tokens, ro.prompt_mask, ro.response_tokens, ro.response_mask,
        logprobs=f32(old_logp), ref_logprobs=f32(logp), values=f32(old_vals), kl=f32(0 * m),
        rewards=f32(0 * m), advantages=f32(adv), returns=f32(returns),
    )  # fmt: skip
    cfg = PPOConfig(
        clip_ratio=0.2, value_clip=0.2, entropy_coef=0.05, value_coef=0.7, loss_aggregation=aggregation
    )

    def agg(x):
        if aggregation == "token_mean":
            return np.sum(x * m) / m.sum()
        return np.mean(np.sum(x * m, 1) / m.sum(1))

    ratio = np.exp(logp - old_logp)
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    lp_all = scipy.special.log_softmax(logits, axis=-1)
    ent = -np.sum(np.exp(lp_all) * lp_all, -1)
    loss, aux = policy_loss(policy, mb, models=MODELS, cfg=cfg)
    chex.assert_shape([loss, *aux.values()], ())
    chex.assert_tree_all_finite([loss, aux])
    np.testing.assert_allclose(loss, agg(pg) - 0.05 * agg(ent), atol=1e-5)
    # the clip binds (TRL/MOSS "clipfrac") when the ratio left the band in the direction A pushes it
    binding = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    np.testing.assert_allclose(aux["clip_frac"], agg(binding), atol=1e-6)
    np.testing.assert_allclose(aux["ratio_mean"], agg(ratio), atol=1e-5)
    np.testing.assert_allclose(aux["approx_kl"], agg(ratio - 1 - np.log(ratio)), atol=1e-5)

    v_clip = old_vals + np.clip(vals - old_vals, -0.2, 0.2)
    vf = np.maximum((vals - returns) ** 2, (v_clip - returns) ** 2)
    vloss, vaux = value_loss(critic, mb, models=MODELS, cfg=cfg)
    chex.assert_shape([vloss, *vaux.values()], ())
    chex.assert_tree_all_finite([vloss, vaux])
    np.testing.assert_allclose(vloss, 0.7 * 0.5 * agg(vf), atol=1e-5)
    np.testing.assert_allclose(
        vaux["value_clip_frac"], agg((v_clip - returns) ** 2 > (vals - returns) ** 2), atol=1e-6
    )


@pytest.fixture(scope="module")
def update_fn():
    cfg = PPOConfig(epochs=2, num_minibatches=2, kl_coef=0.1)
    return jax.jit(make_ppo_update(MODELS, cfg))


def _player(nets):
    policy, _, critic = nets
    opt = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, schedule="constant")
    return make_player_state(policy, critic, opt, opt)


def _trees_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y, equal_nan=True)), a, b)))


def test_finite_update_changes_params_and_reports_metrics(nets, update_fn):
    state = _player(nets)
    new, metrics = update_fn(state, nets[1], make_rollout(4), jax.random.PRNGKey(1))
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
    chex.assert_shape(list(metrics.values()), ())
    chex.assert_type(list(metrics.values()), jnp.float32)
    chex.assert_tree_all_finite([new.policy_params, new.critic_params])
    assert not _trees_equal(new.policy_params, state.policy_params)
    assert not _trees_equal(new.critic_params, state.critic_params)
    assert int(new.step) == 1 and float(metrics["update_skipped"]) == 0.0
    for name in ["policy_loss", "value_loss", "approx_kl", "clip_frac", "ratio_mean", "entropy", "kl_ref",
                 "advantage_mean", "return_mean", "policy_grad_norm", "policy_lr", "critic_lr"]:  # fmt: skip
        assert np.isfinite(float(metrics[name])), name
    assert nonfinite_report(metrics) == []
    raise_if_nonfinite(metrics)


@pytest.fixture(scope="module")
def single_step_update_fn():
    """One epoch of one minibatch (the single pass: experience from the update's own forwards); the
    rollback is done by the minibatch gate alone."""
    cfg = PPOConfig(kl_coef=0.1)
    assert cfg.single_pass
    return jax.jit(make_ppo_update(MODELS, cfg))


@pytest.mark.parametrize("single_pass", [True, False], ids=["single_pass", "2_epochs_x_2_minibatches"])
@pytest.mark.parametrize("poison", ["scores", "critic", "policy"])
def test_nonfinite_update_is_detected_and_not_applied(
    nets, update_fn, single_step_update_fn, poison, single_pass
):
    if single_pass:
        update_fn = single_step_update_fn
    state = _player(nets)
    ro = make_rollout(5)
    if poison == "scores":
        ro = ro._replace(scores=ro.scores.at[1].set(jnp.nan))
        culprit = "scores"
    elif poison == "critic":
        crit = state.critic_params
        crit = {**crit, "head": {**crit["head"], "kernel": crit["head"]["kernel"].at[0].set(jnp.inf)}}
        state = state.replace(critic_params=crit)
        culprit = "values"
    else:
        pol = state.policy_params
        state = state.replace(policy_params={**pol, "final_norm": pol["final_norm"].at[0].set(jnp.nan)})
        culprit = "logprobs"
    state = state.replace(step=jnp.asarray(7, jnp.int32))
    new, metrics = update_fn(state, nets[1], ro, jax.random.PRNGKey(2))
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
    chex.assert_shape(list(metrics.values()), ())
    chex.assert_type(list(metrics.values()), jnp.float32)
    assert float(metrics["update_skipped"]) == 1.0
    assert float(metrics["nonfinite/" + culprit]) > 0
    assert _trees_equal(new.policy_params, state.policy_params)
    assert _trees_equal(new.critic_params, state.critic_params)
    assert _trees_equal(new.policy_opt_state, state.policy_opt_state)
    assert int(new.step) == 8
    with pytest.raises(NonFiniteError, match=f"step 7: non-finite .*{culprit}"):
        raise_if_nonfinite(metrics)
    # stacked metrics of several steps (as a scanned chunk returns them) name the bad step only
    good = {k: np.zeros_like(np.asarray(v)) for k, v in metrics.items()}
    good["step"] = np.float32(6)
    stacked = {k: np.stack([good[k], np.asarray(metrics[k])]) for k in metrics}
    report = nonfinite_report(stacked)
    assert len(report) == 1 and report[0].startswith("step 7")


def test_wrong_shapes_and_bad_configs_fail_clearly(nets, update_fn):
    state = _player(nets)
    ro = make_rollout(6)
    with pytest.raises(AssertionError, match="shape"):
        update_fn(state, nets[1], ro._replace(scores=ro.scores[:, None]), jax.random.PRNGKey(0))
    with pytest.raises(AssertionError, match="shape"):
        update_fn(state, nets[1], ro._replace(response_mask=ro.response_mask[:, :-1]), jax.random.PRNGKey(0))
    with pytest.raises(AssertionError):
        update_fn(state, nets[1], ro._replace(response_tokens=ro.response_tokens.astype(jnp.float32)),
                  jax.random.PRNGKey(0))  # fmt: skip
    with pytest.raises(ValueError, match="not divisible by num_minibatches"):
        make_ppo_update(MODELS, PPOConfig(num_minibatches=3))(state, nets[1], ro, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="unknown kl_estimator"):
        PPOConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="reward_scaling"):
        PPOConfig(reward_scaling="whiten")


def test_critic_initialised_from_a_reward_model_scores_every_prefix(nets):
    """A reward model's {"backbone", "head"} params are a critic as they are: V_t is the RM's score of
    the prefix that ends just before response token t (heads.reward_forward is the reference)."""
    _, _, rm_params = nets
    ro = make_rollout(7)
    p, n = ro.prompt_tokens.shape[1], ro.response_tokens.shape[1]
    tokens = jnp.concatenate([ro.prompt_tokens, ro.response_tokens], 1)
    mask = jnp.concatenate([ro.prompt_mask, ro.response_mask], 1)
    values = MODELS.critic_values(rm_params, tokens[:, :-1], mask[:, :-1], n)
    chex.assert_shape(values, (ro.response_tokens.shape[0], n))
    chex.assert_type(values, jnp.float32)
    for t in (0, 3, n - 1):
        want = heads.reward_forward(rm_params, CFG, tokens[:, : p + t], mask[:, : p + t])
        rows = np.asarray(ro.response_mask[:, t]) > 0
        np.testing.assert_allclose(np.asarray(values[:, t])[rows], np.asarray(want)[rows], atol=1e-5)
