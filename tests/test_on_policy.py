"""On-policy PPO by construction: the log-probs PPO uses come from the distribution the player sampled
at (its temperature), derived from the player's SamplingConfig and never set apart from it.

With T = 0.8, top-p 0.9 and repetition penalty 1.1 (the paper's sampling):
- the game derives PPO's temperature from the sampler, and rejects a config that sets another;
- PPO's old log-probs equal a NumPy reference log softmax(logits / T)[y_t] of the sampled tokens
  (and differ from the T = 1 log-probs that the old default used);
- the first epoch's importance ratio is 1 and approx-KL is 0 to float tolerance;
- the sampler's own log q(y_t) equals a NumPy reference of the fully processed distribution
  (penalty, temperature, nucleus), so log q - log pi_T is exactly the nucleus renormalisation and
  the penalty: what PPO does not model (documented in docs/rl.md).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from alignjax.game.step import GameConfig
from alignjax.models import LMConfig, init_critic, init_params, llama
from alignjax.rl import (
    LlamaPlayerModels,
    OptimizerConfig,
    PPOConfig,
    Rollout,
    compute_experience,
    make_player_state,
    make_ppo_update,
)
from alignjax.sampling import SamplingConfig, sample

CFG = LMConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
PAPER = SamplingConfig(max_new_tokens=6, temperature=0.8, top_p=0.9, repetition_penalty=1.1)
B, P = 8, 5


def test_ppo_temperature_follows_the_sampler_and_a_different_one_is_rejected():
    g = GameConfig(defender_sampling=PAPER, attacker_sampling=PAPER)
    assert g.defender_ppo.temperature == 0.8 and g.attacker_ppo.temperature == 0.8
    same = GameConfig(defender_sampling=PAPER, defender_ppo=PPOConfig(temperature=0.8))
    assert same.defender_ppo.temperature == 0.8
    with pytest.raises(ValueError, match=r"defender_ppo.temperature=1.0 differs"):
        GameConfig(defender_sampling=PAPER, defender_ppo=PPOConfig(temperature=1.0))


def _rollout():
    params = init_params(CFG, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(3, CFG.vocab_size, size=(B, P)), jnp.int32)
    pmask = jnp.ones((B, P), jnp.int32)
    out = sample(params, CFG, prompt, pmask, jax.random.PRNGKey(1), PAPER, eos_id=2, pad_id=0)
    chex.assert_shape([out.tokens, out.logprobs, out.mask], (B, PAPER.max_new_tokens))
    scores = jnp.asarray(rng.uniform(size=B), jnp.float32)
    return params, Rollout(prompt, pmask, out.tokens, out.mask, scores), out


def _numpy_logits(params, ro):
    tokens = jnp.concatenate([ro.prompt_tokens, ro.response_tokens], 1)
    mask = jnp.concatenate([ro.prompt_mask, ro.response_mask], 1)
    logits = np.asarray(llama.forward(params, CFG, tokens, mask).logits, np.float64)
    return logits[:, P - 1 : P - 1 + ro.response_tokens.shape[1]]  # position t predicts y_t


def _processed_logq(logits, prompt, response, t, i, cfg: SamplingConfig):
    """NumPy log q(y_t) of the sampler's distribution: HF order (penalty, temperature, top-p)."""
    z = logits.copy()
    seen = set(prompt.tolist()) | set(response[:t].tolist())
    for v in seen:
        z[v] = z[v] / cfg.repetition_penalty if z[v] > 0 else z[v] * cfg.repetition_penalty
    z = z / cfg.temperature
    p = scipy.special.softmax(z)
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    keep = np.zeros_like(p, bool)
    keep[order[: int(np.searchsorted(cum, cfg.top_p) + 1)]] = True  # smallest set with mass >= top_p
    q = np.where(keep, p, 0.0) / p[keep].sum()
    return np.log(q[i])


def test_first_epoch_ratio_is_one_and_logprobs_are_the_tempered_ones():
    params, ro, out = _rollout()
    ppo = GameConfig(defender_sampling=PAPER).defender_ppo  # temperature derived: 0.8
    models = LlamaPlayerModels(CFG)
    critic = init_critic(CFG, jax.random.PRNGKey(2), params)
    exp, _, _ = compute_experience(params, critic, params, ro, models=models, cfg=ppo)
    chex.assert_shape(exp.logprobs, ro.response_tokens.shape)
    chex.assert_tree_all_finite(exp.logprobs)
    logits = _numpy_logits(params, ro)
    m = np.asarray(ro.response_mask).astype(bool)
    y = np.asarray(ro.response_tokens)
    at_y = lambda logp: np.where(m, np.take_along_axis(logp, y[..., None], -1)[..., 0], 0.0)
    tempered = at_y(scipy.special.log_softmax(logits / 0.8, -1))
    untempered = at_y(scipy.special.log_softmax(logits, -1))
    np.testing.assert_allclose(np.asarray(exp.logprobs), tempered, atol=2e-5)
    assert np.abs(np.asarray(exp.logprobs) - untempered)[m].max() > 1e-3  # the old T = 1 default differs

    # the sampler's log q is the processed distribution (NumPy reference); PPO's is pi_T
    prompt, resp = np.asarray(ro.prompt_tokens), np.asarray(ro.response_tokens)
    ref_q = np.zeros_like(tempered)
    for b in range(B):
        for t in range(resp.shape[1]):
            if m[b, t]:
                ref_q[b, t] = _processed_logq(logits[b, t], prompt[b], resp[b], t, y[b, t], PAPER)
    np.testing.assert_allclose(np.asarray(out.logprobs), ref_q, atol=2e-4)

    state = make_player_state(params, critic, OptimizerConfig(learning_rate=1e-3), OptimizerConfig())
    _, metrics = jax.jit(make_ppo_update(models, ppo))(state, params, ro, jax.random.PRNGKey(3))
    chex.assert_shape([metrics["ratio_mean"], metrics["approx_kl"]], ())
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(metrics["approx_kl"])) < 1e-7
    assert abs(float(metrics["kl_ref"])) < 1e-6  # policy == reference at the first update
