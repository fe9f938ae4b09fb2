"""PPO learns: on a tiny LM, reward 1 when the response contains a target token.

The KL to the reference is checked on both sides, on the scale of this problem (kl_ref is the mean over
sequences of sum_t log pi / pi_ref, in nats per response):

- below: the reward r(y) is a function of y, so by the data-processing inequality any policy whose reward
  rate is q has KL(pi || pi_ref) >= KL(Bernoulli(q) || Bernoulli(p0)), p0 the reference's reward rate
  (about 0.2 here): raising the reward from 0.2 to 0.95 costs at least 1.3 nats. The KL starts at 0 (the
  first rollout comes from pi_ref) and has to grow at least that much.
- above: pi_ref is close to uniform over the 16 tokens (init std 0.1), so putting all the mass on the
  cheapest rewarded answer, the two tokens (target, EOS), costs ln(16^2) = 5.5 nats. Staying below that
  means the policy did not collapse onto a single answer; PPO here peaks at about 3.3 nats. (The old bound
  1 / beta = 20 nats, the KL of the regularised optimum's worst case, was never approached.)
"""

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.models import LMConfig, init_critic, init_params
from alignjax.rl import LlamaPlayerModels, OptimizerConfig, PPOConfig, Rollout, make_player_state, ppo_update
from alignjax.sampling import SamplingConfig, sample

CFG = LMConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
MODELS = LlamaPlayerModels(CFG)
TARGET, EOS, PAD = 7, 2, 0
B, P, N = 64, 3, 4
BETA = 0.05
SAMPLING = SamplingConfig(max_new_tokens=N)  # temperature 1: the sampler draws from the policy itself
PPO = PPOConfig(epochs=2, num_minibatches=2, kl_coef=BETA, clip_ratio=0.2, value_clip=0.2)


def rewards_of(tokens, mask):
    """1 if the target token is among the response tokens (up to and including EOS), else 0."""
    return jnp.any((tokens == TARGET) & (mask > 0), axis=1).astype(jnp.float32)


def prompts(key, b):
    tokens = jax.random.randint(key, (b, P), 3, CFG.vocab_size)
    return tokens, jnp.ones((b, P), jnp.int32)


@jax.jit
def iteration(state, ref, key):
    k_prompt, k_sample, k_ppo = jax.random.split(key, 3)
    pt, pm = prompts(k_prompt, B)
    out = sample(state.policy_params, CFG, pt, pm, k_sample, SAMPLING, EOS, PAD)
    ro = Rollout(pt, pm, out.tokens, out.mask, rewards_of(out.tokens, out.mask))
    return ppo_update(state, ref, ro, k_ppo, models=MODELS, cfg=PPO)


@jax.jit
def evaluate(params, key):
    k_prompt, k_sample = jax.random.split(key)
    pt, pm = prompts(k_prompt, 512)
    out = sample(params, CFG, pt, pm, k_sample, SAMPLING, EOS, PAD)
    return jnp.mean(rewards_of(out.tokens, out.mask))


def bernoulli_kl(q, p):
    """KL(Bernoulli(q) || Bernoulli(p)) in nats."""
    q = min(max(q, 1e-9), 1 - 1e-9)
    return q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))


def test_ppo_raises_reward_and_kl_stays_bounded():
    k_init, k_critic, key = jax.random.split(jax.random.PRNGKey(0), 3)
    ref = init_params(CFG, k_init, std=0.1)
    critic = init_critic(CFG, k_critic, backbone=ref)
    opt = OptimizerConfig(learning_rate=5e-3, schedule="constant", warmup_steps=0)
    state = make_player_state(ref, critic, opt, opt)

    start = float(evaluate(ref, jax.random.PRNGKey(100)))
    rewards, kls = [], []
    for i in range(60):
        state, m = iteration(state, ref, jax.random.fold_in(key, i))
        assert float(m["update_skipped"]) == 0.0
        rewards.append(float(m["score_mean"]))
        kls.append(float(m["kl_ref"]))
        if i >= 3 and np.mean(rewards[-3:]) > 0.95:
            break
    final = float(evaluate(state.policy_params, jax.random.PRNGKey(101)))
    assert start < 0.5, start
    assert final > 0.9, (start, final, rewards)
    assert abs(kls[0]) < 1e-4  # the first rollout comes from pi_ref itself
    assert min(kls[1:]) > 0.1, kls  # positive once the policy moved
    for q, kl in zip(rewards[1:], kls[1:], strict=True):  # data-processing lower bound (module doc)
        assert kl >= bernoulli_kl(q, start) - 0.2, (q, kl, start)
    assert max(kls) > bernoulli_kl(0.9, start), kls  # reaching a 0.9 reward rate cost that much at least
    assert max(kls) < 2 * np.log(CFG.vocab_size), kls  # no collapse onto a single answer (module doc)


if __name__ == "__main__":  # debugging aid: print the learning curve
    import time

    t0 = time.time()
    k_init, k_critic, key = jax.random.split(jax.random.PRNGKey(0), 3)
    ref = init_params(CFG, k_init, std=0.1)
    critic = init_critic(CFG, k_critic, backbone=ref)
    opt = OptimizerConfig(learning_rate=5e-3, schedule="constant", warmup_steps=0)
    state = make_player_state(ref, critic, opt, opt)
    print("start", float(evaluate(ref, jax.random.PRNGKey(100))), time.time() - t0)
    for i in range(60):
        state, m = iteration(state, ref, jax.random.fold_in(key, i))
        print(
            i,
            round(time.time() - t0, 1),
            {k: round(float(m[k]), 3) for k in ("score_mean", "kl_ref", "entropy")},
        )
    print("final", float(evaluate(state.policy_params, jax.random.PRNGKey(101))))
