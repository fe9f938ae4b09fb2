"""Data parallel (pmap over 8 fake CPU devices) equals one device on the same global batch."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import parallel
from alignjax.models import LMConfig, init_critic, init_params
from alignjax.rl import (
    LlamaPlayerModels,
    OptimizerConfig,
    PPOConfig,
    Rollout,
    SFTBatch,
    SFTState,
    make_optimizer,
    make_player_state,
    make_ppo_update,
    make_sft_step,
    masked_whiten,
)

CFG = LMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
MODELS = LlamaPlayerModels(CFG)
D = 8


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
    if jax.local_device_count() < D:
        pytest.fail(
            f"needs {D} devices (tests/conftest.py sets 8 fake CPU devices), found {jax.local_device_count()}"
        )


def make_rollout(seed, b=2 * D, p=5, n=6):
    rng = np.random.default_rng(seed)
    plen, rlen = rng.integers(1, p + 1, size=b), rng.integers(1, n + 1, size=b)
    prompt_mask = (np.arange(p)[None, :] >= (p - plen)[:, None]).astype(np.int32)
    response_mask = (np.arange(n)[None, :] < rlen[:, None]).astype(np.int32)
    prompt = np.where(prompt_mask > 0, rng.integers(3, CFG.vocab_size, size=(b, p)), 0).astype(np.int32)
    response = np.where(response_mask > 0, rng.integers(3, CFG.vocab_size, size=(b, n)), 0).astype(np.int32)
    # scores spread unevenly over devices, so per-device statistics differ from global ones
    scores = (rng.uniform(size=b) * np.repeat(np.arange(1, D + 1), b // D)).astype(np.float32)
    return Rollout(*map(jnp.asarray, (prompt, prompt_mask, response, response_mask, scores)))


def test_whitening_is_global_across_devices():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(D * 3, 7)) * np.repeat(np.arange(1, D + 1), 3)[:, None]).astype(np.float32)
    mask = (rng.uniform(size=x.shape) < 0.7).astype(np.float32)
    out = parallel.pmap(lambda a, m: masked_whiten(a, m, axis_name=parallel.DATA_AXIS))(
        parallel.shard(x), parallel.shard(mask)
    )
    chex.assert_shape(out, (D, 3, 7))
    chex.assert_tree_all_finite(out)
    sel = x[mask > 0].astype(np.float64)
    want = np.where(mask > 0, (x - sel.mean()) / np.sqrt(sel.var() + 1e-8), 0.0)
    np.testing.assert_allclose(parallel.unshard(out), want, atol=1e-5)
    # sanity: whitening each device's slice on its own would give something else
    first = x[:3][mask[:3] > 0]
    local = np.where(mask[:3] > 0, (x[:3] - first.mean()) / np.sqrt(first.var() + 1e-8), 0.0)
    assert np.max(np.abs(local - want[:3])) > 0.1


@pytest.mark.parametrize("epochs", [2, 1], ids=["2_epochs", "single_pass"])
def test_pmapped_ppo_update_equals_single_device(epochs):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    policy, ref = init_params(CFG, k1), init_params(CFG, k2)
    critic = init_critic(CFG, k3, head_std=0.3)
    opt = OptimizerConfig(learning_rate=3e-3, warmup_steps=2)
    state = make_player_state(policy, critic, opt, opt.__class__(learning_rate=1e-3, warmup_steps=2))
    # one minibatch per epoch: the global minibatch is then the same set of rows in both runs
    cfg = PPOConfig(epochs=epochs, num_minibatches=1, kl_coef=0.2, kl_estimator="k3", entropy_coef=0.01,
                    reward_scaling="normalize", whiten_advantages=True)  # fmt: skip
    ro, key = make_rollout(1), jax.random.PRNGKey(5)

    single = jax.jit(make_ppo_update(MODELS, cfg))
    s1, m1 = single(state, ref, ro, key)
    s1, m1b = single(s1, ref, make_rollout(2), key)  # a second step: running reward moments carry over

    multi = parallel.pmap(make_ppo_update(MODELS, cfg, axis_name=parallel.DATA_AXIS))
    sr, mr = multi(
        parallel.replicate(state), parallel.replicate(ref), parallel.shard(ro), parallel.replicate(key)
    )
    sr, mrb = multi(sr, parallel.replicate(ref), parallel.shard(make_rollout(2)), parallel.replicate(key))

    chex.assert_trees_all_equal_shapes_and_dtypes(s1, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(sr, parallel.replicate(state))
    chex.assert_shape(list(m1.values()) + list(m1b.values()), ())
    chex.assert_type(list(m1.values()) + list(m1b.values()), jnp.float32)
    chex.assert_shape(list(mr.values()) + list(mrb.values()), (D,))
    # every device holds the same state
    jax.tree.map(lambda x: np.testing.assert_array_equal(x[0], x[-1]), (sr.policy_params, sr.critic_params))
    s8 = parallel.unreplicate(sr)
    for name in ("policy_params", "critic_params", "policy_opt_state", "critic_opt_state", "reward_moments"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                     getattr(s1, name), getattr(s8, name))  # fmt: skip
    for single_m, multi_m in ((m1, mr), (m1b, mrb)):
        for k in single_m:
            np.testing.assert_allclose(single_m[k], multi_m[k][0], atol=1e-5, rtol=1e-5, err_msg=k)
    assert float(m1["update_skipped"]) == 0.0 and int(s8.step) == 2


def test_pmapped_sft_step_equals_single_device():
    params = init_params(CFG, jax.random.PRNGKey(3))
    state = SFTState.create(params, make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0)))
    ro = make_rollout(3)
    batch = SFTBatch(ro.prompt_tokens, ro.prompt_mask, ro.response_tokens, ro.response_mask)
    s1, m1 = jax.jit(make_sft_step(MODELS))(state, batch)
    sr, mr = parallel.pmap(make_sft_step(MODELS, axis_name=parallel.DATA_AXIS))(
        parallel.replicate(state), parallel.shard(batch)
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(s1, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(sr, parallel.replicate(state))
    chex.assert_shape(list(m1.values()), ())
    chex.assert_shape(list(mr.values()), (D,))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 s1.params, parallel.unreplicate(sr).params)  # fmt: skip
    for k in m1:
        np.testing.assert_allclose(m1[k], mr[k][0], atol=1e-5, rtol=1e-5, err_msg=k)


def test_shard_errors_and_roundtrip():
    x = np.arange(D * 6).reshape(D * 2, 3)
    np.testing.assert_array_equal(parallel.unshard(parallel.shard(x)), x)
    with pytest.raises(ValueError, match="divisible by 8"):
        parallel.shard(np.zeros((12, 3)))
