"""RL kernels vs plain NumPy loops / closed forms; the optimizer vs torch.optim.AdamW + LambdaLR."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch

from alignjax.rl import kernels
from alignjax.rl.state import OptimizerConfig, inverse_sqrt_factor, make_optimizer, make_schedule


def _random_batch(seed, b=6, n=9):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, n + 1, size=b)
    lengths[0] = n  # one full row, and (usually) one empty row
    mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)
    rewards = rng.normal(size=(b, n)).astype(np.float32)
    values = rng.normal(size=(b, n)).astype(np.float32)
    return rewards, values, mask


def _gae_loop(rewards, values, mask, gamma, lam):
    """Textbook GAE on each row's response tokens 0..L-1 (V after the last token = 0)."""
    b, n = rewards.shape
    adv = np.zeros((b, n))
    for i in range(b):
        length = int(mask[i].sum())
        last = 0.0
        for t in reversed(range(length)):
            next_v = values[i, t + 1] if t + 1 < length else 0.0
            delta = rewards[i, t] + gamma * next_v - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
    returns = (adv + values) * mask
    return adv, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_numpy_loop(gamma, lam):
    rewards, values, mask = _random_batch(0)
    adv, ret = jax.jit(kernels.gae, static_argnums=(3, 4))(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_loop(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)


@pytest.mark.parametrize("unbiased,shift_mean", [(False, True), (True, True), (False, False)])
def test_masked_whiten_matches_numpy(unbiased, shift_mean):
    x, _, mask = _random_batch(1)
    x = 3.0 * x + 1.5
    out = kernels.masked_whiten(x, mask, shift_mean=shift_mean, unbiased=unbiased, eps=1e-8)
    sel = x[mask > 0].astype(np.float64)
    mean, var = sel.mean(), sel.var(ddof=1 if unbiased else 0)
    ref = (x - mean) / np.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    np.testing.assert_allclose(out, np.where(mask > 0, ref, 0.0), atol=1e-5)
    np.testing.assert_allclose(kernels.masked_mean(x, mask), mean, rtol=1e-5)
    np.testing.assert_allclose(kernels.masked_var(x, mask, unbiased), var, rtol=1e-5)


def test_kl_estimators_match_formulas():
    rng = np.random.default_rng(2)
    logp = np.log(rng.uniform(0.01, 1.0, size=(4, 7)))
    ref = np.log(rng.uniform(0.01, 1.0, size=(4, 7)))
    ref[0, 0] = logp[0, 0] + 30.0  # exercises the low-variance clamps
    ratio = np.exp(ref) / np.exp(logp)  # pi_ref / pi
    expected = {
        "k1": logp - ref,
        "k2": 0.5 * (logp - ref) ** 2,
        "k3": ratio - 1.0 - np.log(ratio),
        "abs": np.abs(logp - ref),
    }
    lr = np.clip(ref - logp, -20, 20)
    expected["low_var_kl"] = np.clip(np.exp(lr) - 1.0 - lr, -10, 10)
    for name, want in expected.items():
        got = kernels.kl_estimate(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32), name)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kernels.kl_estimate(logp, ref, "k4")


def test_kl_estimators_are_monte_carlo_estimates_of_kl():
    """E_{y~p}[k1] = E_{y~p}[k3] = KL(p || q) (closed form), so the direction of the KL is right."""
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(6))
    q = rng.dirichlet(np.ones(6))
    exact = float(np.sum(p * np.log(p / q)))
    y = rng.choice(6, size=400_000, p=p)
    logp, logq = jnp.asarray(np.log(p[y]), jnp.float32), jnp.asarray(np.log(q[y]), jnp.float32)
    for name in ("k1", "k3"):
        est = float(jnp.mean(kernels.kl_estimate(logp, logq, name)))
        assert abs(est - exact) < 0.02 * max(exact, 0.1), (name, est, exact)


def test_token_logprobs_and_entropy_match_numpy():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    tokens = rng.integers(0, 11, size=(3, 5))
    for temp in (1.0, 0.7):
        lp = scipy.special.log_softmax(logits.astype(np.float64) / temp, axis=-1)
        want = np.take_along_axis(lp, tokens[..., None], -1)[..., 0]
        np.testing.assert_allclose(kernels.token_logprobs(logits, tokens, temp), want, atol=1e-5)
        ent = -np.sum(np.exp(lp) * lp, axis=-1)
        np.testing.assert_allclose(kernels.entropy_from_logits(logits, temp), ent, atol=1e-5)


def test_kernels_reject_wrong_shapes():
    r, v, m = _random_batch(5)
    with pytest.raises(AssertionError, match="shape"):
        kernels.gae(r, v[:, :-1], m, 1.0, 0.95)
    with pytest.raises(AssertionError, match="rank"):
        kernels.gae(r[0], v[0], m[0], 1.0, 0.95)
    with pytest.raises(AssertionError, match="shape"):
        kernels.masked_whiten(r, m[:, :-1])
    with pytest.raises(AssertionError, match="shape"):
        kernels.token_logprobs(np.zeros((2, 3, 5)), np.zeros((2, 4), np.int32))


def _authors_factor(step, warmup):
    """MOSS-RLHF's LambdaLR factor (ppo_trainer.invsqrt_scheduler), transcribed from the spec."""
    if step < warmup:
        f = max(step / warmup, 0.1)
    else:
        f = math.sqrt(warmup) / math.sqrt(max(warmup, step))
    return max(f, 1e-8)


def test_inverse_sqrt_schedule_matches_authors_formula():
    for s in [0, 1, 5, 9, 10, 11, 50, 100, 1000, 12345]:
        np.testing.assert_allclose(float(inverse_sqrt_factor(s, 10)), _authors_factor(s, 10), rtol=1e-6)
    sched = make_schedule(OptimizerConfig(learning_rate=3e-6, warmup_steps=100))
    np.testing.assert_allclose(float(sched(400)), 3e-6 * 0.5, rtol=1e-6)


def test_optimizer_matches_torch_adamw_with_lambda_lr_and_clipping():
    """Same gradients into optax (ours) and torch.optim.AdamW + LambdaLR + clip_grad_norm_."""
    cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=3, b1=0.9, b2=0.95, eps=1e-6, max_grad_norm=1.0)
    rng = np.random.default_rng(6)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    grads = [rng.normal(size=(4, 3)).astype(np.float32) * s for s in (0.1, 5.0, 0.3, 2.0, 0.01, 1.0, 3.0)]

    tx = make_optimizer(cfg)
    params = {"w": jnp.asarray(w0)}
    opt_state = tx.init(params)
    for g in grads:
        updates, opt_state = tx.update({"w": jnp.asarray(g)}, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)

    w = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.AdamW([w], lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _authors_factor(s, cfg.warmup_steps))
    for g in grads:
        w.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([w], 1.0)
        opt.step()
        sched.step()
    np.testing.assert_allclose(params["w"], w.detach().numpy(), atol=2e-6)


def test_optimizer_config_errors():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        OptimizerConfig(schedule="linear")
    with pytest.raises(ValueError, match="decay_steps"):
        OptimizerConfig(schedule="cosine")
