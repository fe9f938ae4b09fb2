"""Mixed precision (float32 master weights, bfloat16 compute) and rematerialisation of the Llama players.

References are independent of the code under test: `llama.forward` for the default path, a float32
PPO update for the bf16-compute update, JAX's own gradient without checkpointing for remat.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rl_ppo import make_rollout as rl_ppo_rollout

from alignjax.models import LMConfig, init_critic, init_params, llama
from alignjax.models.precision import (
    DTYPES,
    REMAT_POLICIES,
    PrecisionConfig,
    cast_floating,
    dtype_of,
    remat_policy,
)
from alignjax.rl import (
    LlamaPlayerModels,
    OptimizerConfig,
    PPOConfig,
    make_player_state,
    make_ppo_update,
)

# The tests compare numerics and buffer sizes, not speed: LLVM's optimisation of the generated code
# takes about half of an XLA:CPU compile and changes neither (buffer assignment is decided on the HLO).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# One layer keeps the three PPO compilations of the update test short (the scan is the same at any L).
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
CFG = LMConfig(**TINY, num_layers=1)
# Several layers and a longer sequence for remat: residuals [L, B, H, T, T] dominate without it.
DEEP = LMConfig(**TINY, num_layers=4)


def make_rollout(seed, b=8, p=6, n=8):
    """tests/test_rl_ppo.py's rollout (left-padded prompts, right-padded responses) in this vocabulary."""
    return rl_ppo_rollout(seed, b=b, p=p, n=n, vocab=CFG.vocab_size)


def random_params(config: LMConfig, seed: int, critic: bool = False):
    """LM (or critic) params of `init_params`' / `init_critic`'s layout drawn with NumPy (no XLA compile
    per shape): norms 1, weights N(0, 0.02^2), a critic head N(0, 0.5^2) with bias 0."""
    rng = np.random.default_rng(seed)
    init = (lambda k: init_critic(config, k)) if critic else (lambda k: init_params(config, k))
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.ones(s.shape, s.dtype)
        if "bias" in name:
            return jnp.zeros(s.shape, s.dtype)
        std = 0.5 if "head" in name and "kernel" in name else 0.02
        return jnp.asarray(std * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def run_fast(fn, *args):
    """fn(*args) jitted and compiled with FAST_COMPILE."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def flat(tree) -> np.ndarray:
    """All leaves of a pytree, flattened and concatenated, in float64."""
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


# ----------------------------------------------------------------------------------------- configs


def test_precision_config_validation_and_resolve():
    assert PrecisionConfig() == PrecisionConfig(params="float32", compute="auto")
    for platform in ("gpu", "tpu", "cuda", "rocm", "GPU"):
        assert PrecisionConfig().resolve(platform) == PrecisionConfig("float32", "bfloat16")
    assert PrecisionConfig().resolve("cpu") == PrecisionConfig("float32", "float32")
    # explicit choices are kept on every platform
    assert PrecisionConfig("float32", "float32").resolve("tpu").compute == "float32"
    assert PrecisionConfig("bfloat16", "bfloat16").resolve("cpu").compute == "bfloat16"
    legacy = PrecisionConfig.legacy_bf16()
    assert (legacy.params, legacy.compute) == ("bfloat16", "bfloat16")
    assert legacy.params_dtype == jnp.bfloat16 and legacy.compute_dtype == jnp.bfloat16
    hash(PrecisionConfig())  # a static jit argument
    with pytest.raises(ValueError, match="precision.params"):
        PrecisionConfig(params="float16")
    with pytest.raises(ValueError, match="precision.compute"):
        PrecisionConfig(compute="half")
    with pytest.raises(ValueError, match="resolve"):
        PrecisionConfig().compute_dtype  # noqa: B018
    with pytest.raises(ValueError, match="platform"):
        PrecisionConfig().resolve("quantum")
    with pytest.raises(ValueError, match="bfloat16.*float32"):
        dtype_of("fp16")
    assert {dtype_of(n) for n in DTYPES} == {jnp.float32, jnp.bfloat16}


def test_cast_floating_casts_floats_only_and_is_a_noop_on_matching_dtype():
    tree = {"w": jnp.ones((2, 3)), "ids": jnp.arange(4), "mask": jnp.ones(2, bool)}
    tree["h"] = jnp.ones(2, jnp.bfloat16)
    out = cast_floating(tree, jnp.bfloat16)
    assert out["w"].dtype == jnp.bfloat16 and out["h"] is tree["h"]
    assert out["ids"] is tree["ids"] and out["mask"] is tree["mask"]
    same = cast_floating(tree, jnp.float32)
    assert same["w"] is tree["w"] and same["h"].dtype == jnp.float32
    # on a float32 tree the cast adds nothing to the graph
    jaxpr = jax.make_jaxpr(lambda t: cast_floating(t, jnp.float32))({"w": jnp.ones(3)})
    assert not jaxpr.eqns


def test_remat_policy_names():
    assert REMAT_POLICIES == ("none", "full", "dots")
    assert remat_policy("none") is None and remat_policy("full") is None
    assert remat_policy("dots") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    with pytest.raises(ValueError, match="none.*full.*dots"):
        remat_policy("everything")
    with pytest.raises(ValueError, match="remat"):
        llama.hidden_states({}, CFG, jnp.ones((1, 2), jnp.int32), remat="x")  # fails before reading params
    with pytest.raises(ValueError, match="dtype"):
        LlamaPlayerModels(CFG, compute_dtype="float16")
    with pytest.raises(ValueError, match="remat"):
        LlamaPlayerModels(CFG, remat="some")
    hash(LlamaPlayerModels(CFG, compute_dtype="bfloat16", remat="dots"))


def test_default_player_is_the_plain_forward_and_bf16_outputs_float32():
    params = random_params(CFG, 0)
    ro = make_rollout(0, b=2)
    tokens = jnp.concatenate([ro.prompt_tokens, ro.response_tokens], 1)
    mask = jnp.concatenate([ro.prompt_mask, ro.response_mask], 1)
    n = 5
    default = LlamaPlayerModels(CFG)
    bf16 = LlamaPlayerModels(CFG, compute_dtype="bfloat16")
    critic = random_params(CFG, 1, critic=True)

    def run(params, critic):
        ref = llama.forward(params, CFG, tokens, mask).logits[:, -n:]
        plain = default.policy_logits(params, tokens, mask, n)
        mixed = bf16.policy_logits(params, tokens, mask, n)
        return ref, plain, mixed, bf16.critic_values(critic, tokens, mask, n)

    ref, logits32, logits, values = run_fast(run, params, critic)
    assert "lm_head" in params and float(jnp.std(params["embed"])) == pytest.approx(0.02, rel=0.1)
    chex.assert_trees_all_equal(logits32, ref)  # bitwise
    same = zip(jax.tree.leaves(default.compute_params(params)), jax.tree.leaves(params), strict=True)
    assert all(a is b for a, b in same)  # no cast at all
    chex.assert_type(jax.tree.leaves(bf16.compute_params(params)), jnp.bfloat16)
    chex.assert_shape(logits, ref.shape)
    chex.assert_type(logits, jnp.float32)
    # bf16 keeps ~3 significant digits; the logits here are O(0.1)
    np.testing.assert_allclose(logits, ref, atol=2e-2)
    chex.assert_shape(values, (2, n))
    chex.assert_type(values, jnp.float32)


# ------------------------------------------------------------------ master weights in a PPO update


@pytest.fixture(scope="module")
def ppo_runs():
    """One PPO update at lr 5e-7 (constant, AdamW) from the same weights and batch, three ways:
    "f32" float32 params + compute, "mixed" float32 params + bf16 compute, "bf16" bf16 params + compute
    (the old behaviour). Returns {name: (state before, state after, metrics)}."""
    policy, ref, critic = random_params(CFG, 0), random_params(CFG, 1), random_params(CFG, 2, critic=True)
    opt = OptimizerConfig(learning_rate=5e-7, warmup_steps=0, schedule="constant")
    rollout = make_rollout(1)
    runs = {}
    for name, params_dtype, compute in (
        ("f32", jnp.float32, "float32"),
        ("mixed", jnp.float32, "bfloat16"),
        ("bf16", jnp.bfloat16, "bfloat16"),
    ):
        cast = lambda t, d=params_dtype: cast_floating(t, d)
        state = make_player_state(cast(policy), cast(critic), opt, opt)
        models = LlamaPlayerModels(CFG, compute_dtype=compute)
        update = make_ppo_update(models, PPOConfig(kl_coef=0.1))
        new, metrics = run_fast(update, state, cast(ref), rollout, jax.random.PRNGKey(0))
        runs[name] = (state, new, metrics)
    return runs


def test_bf16_compute_with_f32_master_weights_tracks_the_f32_update(ppo_runs):
    """The mixed-precision update against the float32 one (same weights, batch, key).

    Measured on this config (CPU, jax 0.10.2): cosine similarity of the flattened weight deltas 0.9981
    (policy, 13408 elements) / 0.9978 (critic, 11393); the norms of the deltas differ by 4e-5 / 1.2e-4
    relative (AdamW's first step is ~lr * sign(g), so the norm hardly depends on the gradient's
    precision); ||d_mixed - d_f32|| / ||d_f32|| = 0.062 / 0.066, all from the 0.2% of elements whose
    gradient sign bf16 compute flips. Asserted with ~5x margin: cosine > 0.99, |norm ratio - 1| < 0.01,
    relative difference < 0.15, and as many elements moved as in float32 (12704 / 10689 both ways).
    """
    s32, n32, m32 = ppo_runs["f32"]
    smx, nmx, mmx = ppo_runs["mixed"]
    assert float(m32["update_skipped"]) == 0.0 and float(mmx["update_skipped"]) == 0.0
    for tree in (nmx.policy_params, nmx.critic_params, nmx.policy_opt_state, nmx.critic_opt_state):
        floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        chex.assert_type(floats, jnp.float32)  # master weights and Adam moments stay float32
    chex.assert_trees_all_equal_shapes_and_dtypes(nmx, s32)
    for which in ("policy_params", "critic_params"):
        d32 = flat(getattr(n32, which)) - flat(getattr(s32, which))
        dmx = flat(getattr(nmx, which)) - flat(getattr(smx, which))
        cos = d32 @ dmx / (np.linalg.norm(d32) * np.linalg.norm(dmx))
        assert cos > 0.99, (which, cos)
        assert abs(np.linalg.norm(dmx) / np.linalg.norm(d32) - 1.0) < 0.01, which
        assert np.linalg.norm(dmx - d32) / np.linalg.norm(d32) < 0.15, which
        assert np.count_nonzero(dmx) >= 0.99 * np.count_nonzero(d32), which


def test_bf16_params_lose_most_updates_at_small_learning_rates(ppo_runs):
    """bf16 params round w + u back to w unless |u| exceeds half a bf16 ulp of w, between |w| 2^-9 and
    |w| 2^-8: with AdamW's first step |u| <= lr = 5e-7, only |w| < 2.6e-4 (under 1% of N(0, 0.02^2))
    can move, and the norms (1.0, ulp 2^-7) never do. Measured: 99 of 13408 policy elements (105 of
    11393 critic) moved in bf16 vs 12704 (10689) in float32; asserted: under 5% of float32's count."""
    s32, n32, _ = ppo_runs["f32"]
    s16, n16, m16 = ppo_runs["bf16"]
    assert float(m16["update_skipped"]) == 0.0
    chex.assert_type(jax.tree.leaves(n16.policy_params), jnp.bfloat16)
    for which in ("policy_params", "critic_params"):
        moved32 = np.count_nonzero(flat(getattr(n32, which)) != flat(getattr(s32, which)))
        moved16 = np.count_nonzero(flat(getattr(n16, which)) != flat(getattr(s16, which)))
        assert moved32 > 0.9 * flat(getattr(s32, which)).size, which
        assert moved16 < 0.05 * moved32, (which, moved16, moved32)
        # the elements that can move are the near-zero ones (independent of the update's code)
        w = flat(getattr(s16, which))
        assert moved16 <= np.count_nonzero(np.abs(w) < 1e-3), which


# ------------------------------------------------------------------------------------------- remat


@pytest.fixture(scope="module")
def remat_grads():
    """Loss and gradient of the mean next-token NLL of `policy_logits` on DEEP at T = 128, compiled per
    remat policy; returns {name: (loss, grads, memory_analysis or None)}."""
    rng = np.random.default_rng(0)
    b, t, n = 2, 128, 16
    tokens = jnp.asarray(rng.integers(0, DEEP.vocab_size, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), jnp.int32).at[1, :5].set(0)
    targets = jnp.asarray(rng.integers(0, DEEP.vocab_size, (b, n)), jnp.int32)
    params = random_params(DEEP, 3)
    out = {}
    for name in REMAT_POLICIES:
        models = LlamaPlayerModels(DEEP, remat=name)

        def nll(p, models=models):
            logp = jax.nn.log_softmax(models.policy_logits(p, tokens, mask, n))
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

        compiled = jax.jit(jax.value_and_grad(nll)).lower(params).compile(FAST_COMPILE)
        loss, grads = compiled(params)
        out[name] = (loss, grads, compiled.memory_analysis())
    return out


def test_remat_gradients_equal_plain_gradients(remat_grads):
    """Recomputation runs the same ops on the same inputs: measured max |diff| 0 with FAST_COMPILE and
    ~1e-8 with XLA's default optimisation (gradients up to 0.15); asserted within 1e-6."""
    loss, grads, _ = remat_grads["none"]
    for name in ("full", "dots"):
        l2, g2, _ = remat_grads[name]
        chex.assert_trees_all_close(l2, loss, atol=1e-6, rtol=0)
        chex.assert_trees_all_close(g2, grads, atol=1e-6, rtol=0)
        chex.assert_trees_all_equal_shapes_and_dtypes(g2, grads)


def test_remat_lowers_compiled_temp_memory(remat_grads):
    """Without remat the backward keeps every layer's residuals (scores [B, H, T, T] among them);
    "full" keeps one [B, T, D] per layer. Measured (XLA:CPU, L 4, B 2, T 128, D 32): temp bytes none 8.95 MB,
    dots 3.42 MB, full 2.53 MB; asserted full < none / 2 and dots < none."""
    temp = {}
    for name, (_, _, analysis) in remat_grads.items():
        if analysis is None:
            pytest.skip("memory_analysis() is not available on this backend")
        temp[name] = analysis.temp_size_in_bytes
    assert temp["full"] < 0.5 * temp["none"], temp
    assert temp["dots"] < temp["none"], temp


def test_remat_on_unstacked_layers_matches():
    """The unrolled no-cache path (per-layer params) checkpoints each layer too; same gradient."""
    params = llama.unstack_layers(random_params(CFG, 4))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)

    def grads(p):
        f = lambda p, remat: jnp.mean(jnp.square(llama.forward(p, CFG, tokens, remat=remat).logits))
        return jax.grad(f)(p, "full"), jax.grad(f)(p, "none")

    full, plain = run_fast(grads, params)
    chex.assert_trees_all_close(full, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("unstacked", [False, True])
def test_remat_wraps_each_layer_only_when_asked(unstacked):
    """The traced forward holds one checkpoint per layer (stacked: one, the scan body) under remat,
    none without it, and none on the cached path, which ignores remat."""
    params = jax.eval_shape(lambda: random_params(DEEP, 0))
    if unstacked:
        params = jax.eval_shape(llama.unstack_layers, params)
    tokens = jnp.ones((1, 4), jnp.int32)

    remat_names = ("checkpoint", "remat", "remat2")  # jax.checkpoint's primitive, by JAX version

    def checkpoints(jaxpr) -> int:
        """Outermost checkpoints in `jaxpr`, looking inside scans and other nested jaxprs."""
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in remat_names:
                n += 1
                continue
            for v in eqn.params.values():
                inner = getattr(v, "jaxpr", v)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    n += checkpoints(inner)
        return n

    def count(remat, cache=None):
        f = lambda p: llama.forward(p, DEEP, tokens, cache=cache, remat=remat).logits
        return checkpoints(jax.make_jaxpr(f)(params).jaxpr)

    assert count("none") == 0
    assert count("full") == count("dots") == (DEEP.num_layers if unstacked else 1)
    assert count("full", llama.init_cache(DEEP, 1, 8)) == 0
