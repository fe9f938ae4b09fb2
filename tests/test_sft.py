"""SFT: loss value vs NumPy cross-entropy from a full forward; loss goes down on a small corpus."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from alignjax.models import LMConfig, init_params, llama
from alignjax.rl import (
    LlamaPlayerModels,
    NonFiniteError,
    OptimizerConfig,
    SFTBatch,
    SFTState,
    make_optimizer,
    make_sft_step,
    raise_if_nonfinite,
    sft_loss,
)

CFG = LMConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
MODELS = LlamaPlayerModels(CFG)
EOS = 2


def corpus(seed, b=32, p=4):
    """Prompt: 1..P random tokens (left-padded); response: the prompt reversed, then EOS (right-padded)."""
    rng = np.random.default_rng(seed)
    n = p + 1
    prompt, pmask = np.zeros((b, p), np.int32), np.zeros((b, p), np.int32)
    resp, rmask = np.zeros((b, n), np.int32), np.zeros((b, n), np.int32)
    for i in range(b):
        k = rng.integers(1, p + 1)
        x = rng.integers(3, CFG.vocab_size, size=k)
        prompt[i, p - k :], pmask[i, p - k :] = x, 1
        resp[i, : k + 1], rmask[i, : k + 1] = np.append(x[::-1], EOS), 1
    return SFTBatch(*map(jnp.asarray, (prompt, pmask, resp, rmask)))


def numpy_loss(params, batch):
    tokens = jnp.concatenate([batch.prompt_tokens, batch.response_tokens], 1)
    mask = jnp.concatenate([batch.prompt_mask, batch.response_mask], 1)
    logits = np.asarray(
        jax.jit(llama.forward, static_argnums=1)(params, CFG, tokens, mask).logits, np.float64
    )
    p = batch.prompt_tokens.shape[1]
    nll = []
    for i in range(tokens.shape[0]):
        for t in range(batch.response_tokens.shape[1]):
            if batch.response_mask[i, t]:
                nll.append(-scipy.special.log_softmax(logits[i, p + t - 1])[int(batch.response_tokens[i, t])])
    return float(np.mean(nll))


def test_sft_loss_matches_numpy_cross_entropy():
    params = init_params(CFG, jax.random.PRNGKey(0), std=0.3)
    batch = corpus(0, b=6)
    loss, aux = sft_loss(params, batch, models=MODELS)
    chex.assert_shape([loss, *aux.values()], ())
    chex.assert_tree_all_finite([loss, aux])
    np.testing.assert_allclose(float(loss), numpy_loss(params, batch), rtol=1e-5)


def test_sft_drives_loss_down_and_handles_bad_input():
    params = init_params(CFG, jax.random.PRNGKey(1))
    state = SFTState.create(params, make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant",
                                                                   warmup_steps=5)))  # fmt: skip
    step = jax.jit(make_sft_step(MODELS))
    data = corpus(1, b=32)  # a small corpus, fitted full-batch
    start = numpy_loss(state.params, data)
    state0 = state
    for _ in range(100):
        state, metrics = step(state, data)
        assert float(metrics["update_skipped"]) == 0.0
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
    chex.assert_shape(list(metrics.values()), ())
    chex.assert_tree_all_finite(state.params)
    end = numpy_loss(state.params, data)
    assert start > 0.9 * np.log(CFG.vocab_size), start  # starts near the uniform cross-entropy
    assert end < 0.3 * start, (start, end)
    assert float(metrics["token_accuracy"]) > 0.7

    # a NaN in the params: the step is reported and not applied
    bad = state.replace(params={**state.params, "final_norm": state.params["final_norm"].at[0].set(jnp.nan)})
    new, metrics = step(bad, data)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, bad)
    chex.assert_shape(list(metrics.values()), ())
    assert float(metrics["update_skipped"]) == 1.0
    with pytest.raises(NonFiniteError, match="loss"):
        raise_if_nonfinite(metrics)
    assert bool(jnp.isnan(new.params["final_norm"][0]))
    assert np.array_equal(new.params["embed"], bad.params["embed"])

    with pytest.raises(AssertionError, match="shape"):
        step(state, data._replace(response_mask=data.response_mask[:, :-1]))
