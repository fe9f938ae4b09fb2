"""RL kernels vs plain NumPy loops / closed forms; the optimizer vs torch.optim.AdamW + LambdaLR."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch
from absl.testing import parameterized

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


def _whiten_ref(x, mask, unbiased=False, shift_mean=True, eps=1e-8):
    """NumPy masked statistics over the unmasked elements (float64); whitened y is 0 where masked."""
    sel = x[mask > 0].astype(np.float64)
    n = sel.size
    mean = sel.mean() if n else 0.0
    ss = np.sum((sel - mean) ** 2)
    var = ss / max(n - (1 if unbiased else 0), 1)
    y = (x - mean) / np.sqrt(var + eps) + (0.0 if shift_mean else mean)
    return {"sum": sel.sum(), "count": float(n), "mean": mean, "var": var, "y": np.where(mask > 0, y, 0.0)}


def _stats(x, mask, unbiased, shift_mean, eps, axis_name=None):
    return {
        "sum": kernels.masked_sum(x, mask, axis_name),
        "count": kernels.masked_count(mask, axis_name),
        "mean": kernels.masked_mean(x, mask, axis_name),
        "var": kernels.masked_var(x, mask, unbiased, axis_name),
        "y": kernels.masked_whiten(x, mask, shift_mean, unbiased, eps, axis_name),
    }


def _check_stats(got, want, shape):
    for name in ("sum", "count", "mean", "var"):
        chex.assert_shape(got[name], ())
        chex.assert_type(got[name], jnp.float32)
    chex.assert_shape(got["y"], shape)
    chex.assert_type(got["y"], jnp.float32)
    chex.assert_tree_all_finite(got)
    chex.assert_trees_all_close(
        got, jax.tree.map(lambda w: np.asarray(w, np.float32), want), atol=2e-5, rtol=2e-5
    )


class KernelsTest(chex.TestCase):
    """Each kernel jitted and not jitted, against NumPy loops / SciPy (float64)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((1.0, 0.95), (0.9, 1.0), (0.99, 0.0))
    def test_gae_matches_numpy_loop(self, gamma, lam):
        rewards, values, mask = _random_batch(0)
        assert mask.sum(1).min() == 0 and mask.sum(1).max() == mask.shape[1]  # an empty and a full row
        adv, ret = self.variant(kernels.gae, static_argnums=(3, 4))(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = _gae_loop(rewards, values, mask, gamma, lam)
        for out in (adv, ret):
            chex.assert_shape(out, rewards.shape)
            chex.assert_type(out, jnp.float32)
        chex.assert_tree_all_finite((adv, ret))
        chex.assert_trees_all_close(
            (adv, ret), (ref_adv.astype(np.float32), ref_ret.astype(np.float32)), atol=1e-5
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((False, True, 1e-8), (True, True, 1e-8), (True, False, 0.5))
    def test_masked_statistics_match_numpy(self, unbiased, shift_mean, eps):
        x, _, mask = _random_batch(1)
        x = 3.0 * x + 1.5
        fn = self.variant(_stats, static_argnums=(2, 3, 4))
        _check_stats(
            fn(x, mask, unbiased, shift_mean, eps), _whiten_ref(x, mask, unbiased, shift_mean, eps), x.shape
        )
        # A bool mask counts the same; an all-masked input gives 0 statistics and 0 outputs; one element
        # has variance 0 (unbiased: n - 1 = 0 is floored at 1); two elements.
        _check_stats(
            fn(x, mask > 0, unbiased, shift_mean, eps),
            _whiten_ref(x, mask, unbiased, shift_mean, eps),
            x.shape,
        )
        one = np.zeros_like(mask)
        one[2, 3] = 1
        two = one.copy()
        two[4, 0] = 1  # two elements: the unbiased variance divides by n - 1 = 1
        for m in (np.zeros_like(mask), one, two):
            _check_stats(
                fn(x, m, unbiased, shift_mean, eps), _whiten_ref(x, m, unbiased, shift_mean, eps), x.shape
            )

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_whiten_defaults(self):
        x, _, mask = _random_batch(2)
        y = self.variant(kernels.masked_whiten)(x, mask)  # shift_mean=True, unbiased=False, eps=1e-8
        chex.assert_trees_all_close(y, _whiten_ref(x, mask)["y"].astype(np.float32), atol=2e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_statistics_are_global_over_axis_name(self):
        """Under an axis name (as inside pmap; vmap binds one too) the statistics are those of the
        concatenated batch: every shard sees the global sum, count, mean, variance and whitening."""
        x, _, mask = _random_batch(3, b=8)
        x = 2.0 * x - 0.7
        shards, mshards = x.reshape(4, 2, -1), mask.reshape(4, 2, -1)
        for unbiased, shift_mean in ((False, True), (True, False)):
            stats = functools.partial(
                _stats, unbiased=unbiased, shift_mean=shift_mean, eps=1e-8, axis_name="data"
            )
            fn = jax.vmap(stats, axis_name="data")
            got = self.variant(fn)(shards, mshards)
            want = _whiten_ref(x, mask, unbiased, shift_mean)
            for name in ("sum", "count", "mean", "var"):
                chex.assert_shape(got[name], (4,))
                chex.assert_trees_all_close(
                    got[name], np.full(4, want[name], np.float32), rtol=2e-5, atol=2e-5
                )
            chex.assert_shape(got["y"], shards.shape)
            chex.assert_trees_all_close(got["y"].reshape(x.shape), want["y"].astype(np.float32), atol=2e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_kl_estimators_match_formulas(self):
        rng = np.random.default_rng(2)
        logp = np.log(rng.uniform(0.01, 1.0, size=(4, 7)))
        ref = np.log(rng.uniform(0.01, 1.0, size=(4, 7)))
        ref[0, 0] = logp[0, 0] + 30.0  # log r beyond both low_var_kl clamps
        ref[0, 1] = logp[0, 1] - 30.0
        ref[0, 2] = logp[0, 2] + 2.5  # k3 = e^2.5 - 3.5 = 8.68: inside the output clamp
        ratio = np.exp(ref) / np.exp(logp)  # pi_ref / pi
        expected = {
            "k1": logp - ref,
            "k2": 0.5 * (logp - ref) ** 2,
            "k3": ratio - 1.0 - np.log(ratio),
            "abs": np.abs(logp - ref),
        }
        lr = np.clip(ref - logp, -20, 20)
        expected["low_var_kl"] = np.clip(np.exp(lr) - 1.0 - lr, -10, 10)
        assert expected["low_var_kl"][0, 0] == expected["low_var_kl"][0, 1] == 10.0
        lp, rp = jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32)
        for name, want in expected.items():
            got = self.variant(kernels.kl_estimate, static_argnums=2)(lp, rp, name)
            direct = self.variant(kernels.KL_ESTIMATORS[name])(lp, rp)
            chex.assert_shape([got, direct], logp.shape)
            chex.assert_type([got, direct], jnp.float32)
            chex.assert_trees_all_close(got, direct, want.astype(np.float32), rtol=2e-5, atol=1e-5)
        chex.assert_trees_all_close(
            self.variant(kernels.kl_estimate)(lp, rp), expected["k1"].astype(np.float32)
        )
        # An impossible token under either policy (log-prob -inf): low_var_kl stays finite (clamped).
        inf_lp = lp.at[1, 0].set(-jnp.inf)
        inf_ref = rp.at[1, 1].set(-jnp.inf)
        low = self.variant(kernels.kl_low_var)(inf_lp, inf_ref)
        chex.assert_tree_all_finite(low)
        np.testing.assert_array_equal(np.asarray(low[1, :2]), [10.0, 10.0])
        # k3 near r = 1 keeps its precision: expm1 (exp(d) - 1 - d in float32 would be off by ~1000%)
        d = 1e-4
        small = self.variant(kernels.kl_k3)(jnp.zeros((1, 1)), jnp.full((1, 1), d))
        np.testing.assert_allclose(np.asarray(small), np.expm1(d) - d, rtol=1e-2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_token_logprobs_and_entropy_match_scipy(self):
        rng = np.random.default_rng(4)
        logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
        tokens = rng.integers(0, 11, size=(3, 5))
        for temp, dtype in ((1.0, jnp.float32), (0.7, jnp.float32), (1.0, jnp.bfloat16)):
            x = jnp.asarray(logits, dtype)
            lp_ref = scipy.special.log_softmax(np.asarray(x, np.float64) / temp, axis=-1)
            want = np.take_along_axis(lp_ref, tokens[..., None], -1)[..., 0]
            ent = -np.sum(np.exp(lp_ref) * lp_ref, axis=-1)
            if temp == 1.0:  # the default temperature
                got = self.variant(kernels.token_logprobs)(x, tokens)
                got_ent = self.variant(kernels.entropy_from_logits)(x)
            else:
                got = self.variant(kernels.token_logprobs, static_argnums=2)(x, tokens, temp)
                got_ent = self.variant(kernels.entropy_from_logits, static_argnums=1)(x, temp)
            chex.assert_shape([got, got_ent], tokens.shape)
            chex.assert_type([got, got_ent], jnp.float32)  # float32 whatever the logits' dtype
            chex.assert_trees_all_close(
                (got, got_ent), (want.astype(np.float32), ent.astype(np.float32)), atol=1e-5
            )


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
    with pytest.raises(AssertionError, match="rank"):
        kernels.token_logprobs(np.zeros((2, 5)), np.zeros((2,), np.int32))
    with pytest.raises(AssertionError, match="shape"):
        kernels.masked_sum(r, m[:, :-1])
    with pytest.raises(AssertionError, match="shape"):
        kernels.kl_estimate(r, v[:, :-1], "k3")
    with pytest.raises(
        ValueError,
        match=r"^unknown KL estimator 'k4'; choose from \['abs', 'k1', 'k2', 'k3', 'low_var_kl'\]$",
    ):
        kernels.kl_estimate(r, v, "k4")


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
