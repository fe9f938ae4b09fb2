"""Supervised fine-tuning step: masked next-token cross-entropy on response tokens.

Batches use the PPO layout, [prompt (left-padded, P) | response (right-padded, N)], and only the
response tokens are targets (the prompt is context):

    L = - sum_{b,t} m_bt log p(y_bt | x_b, y_b,<t) / sum_{b,t} m_bt

averaged over all response tokens of the (global, with `axis_name`) batch. Used to build the
initial attacker (seed -> rewrite) and defender (prompt -> answer) before the game.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from alignjax.rl import kernels
from alignjax.rl.experience import model_inputs
from alignjax.rl.ppo import NONFINITE_PREFIX, local_share
from alignjax.rl.state import SFTState, current_lr


class SFTBatch(NamedTuple):
    """prompt_tokens, prompt_mask [B, P] left-padded; response_tokens, response_mask [B, N] right-padded
    (mask 1 on the target tokens, EOS included)."""

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    response_tokens: jax.Array
    response_mask: jax.Array


def check_sft_batch(batch: SFTBatch) -> None:
    chex.assert_rank([batch.prompt_tokens, batch.prompt_mask, batch.response_tokens, batch.response_mask], 2)
    b, p = batch.prompt_tokens.shape
    n = batch.response_tokens.shape[1]
    chex.assert_shape(batch.prompt_mask, (b, p))
    chex.assert_shape([batch.response_tokens, batch.response_mask], (b, n))
    chex.assert_type([batch.prompt_tokens, batch.response_tokens], int)


def sft_loss(params: Any, batch: SFTBatch, *, models: Any, axis_name: str | None = None):
    """(loss share, metric shares): this device's share of the global token-mean cross-entropy.

    Summed over devices (psum) the share is the global mean; without `axis_name` it is the mean."""
    check_sft_batch(batch)
    n = batch.response_tokens.shape[1]
    m = batch.response_mask.astype(jnp.float32)
    tokens, tmask = model_inputs(
        batch.prompt_tokens, batch.prompt_mask, batch.response_tokens, batch.response_mask
    )
    logits = models.policy_logits(params, tokens, tmask, n)
    nll = -kernels.token_logprobs(logits, batch.response_tokens)
    correct = (jnp.argmax(logits, axis=-1) == batch.response_tokens).astype(jnp.float32)
    loss = local_share(nll, m, "token_mean", axis_name)
    aux = {"loss": loss, "token_accuracy": local_share(correct, m, "token_mean", axis_name)}
    return loss, aux


def sft_step(
    state: SFTState, batch: SFTBatch, *, models: Any, axis_name: str | None = None
) -> tuple[SFTState, dict[str, jax.Array]]:
    """One optimiser step on a batch. Under pmap (axis "data"): batch is this device's slice, state
    replicated; gradients are summed over devices so the step equals the single-device one.

    A non-finite loss or gradient leaves params and optimizer state unchanged (`update_skipped` = 1,
    `nonfinite/loss`, `nonfinite/grad_norm` name the culprit; see `ppo.raise_if_nonfinite`)."""
    (_, aux), grads = jax.value_and_grad(
        functools.partial(sft_loss, models=models, axis_name=axis_name), has_aux=True
    )(state.params, batch)
    if axis_name is not None:
        grads, aux = jax.lax.psum((grads, aux), axis_name)
    grad_norm = optax.tree.norm(grads)
    checks = {"loss": jnp.all(jnp.isfinite(aux["loss"])), "grad_norm": jnp.isfinite(grad_norm)}
    ok = checks["loss"] & checks["grad_norm"]
    updates, new_opt = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = state.replace(
        params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state), step=state.step + 1
    )
    metrics = {
        **aux,
        "grad_norm": grad_norm,
        "num_tokens": kernels.masked_count(batch.response_mask, axis_name),
        "lr": current_lr(new_state.opt_state),
        "step": state.step.astype(jnp.float32),
        "update_skipped": 1.0 - ok.astype(jnp.float32),
    }
    metrics.update({NONFINITE_PREFIX + k: 1.0 - v.astype(jnp.float32) for k, v in checks.items()})
    return new_state, metrics


def make_sft_step(models: Any, axis_name: str | None = None):
    """`sft_step` with static arguments bound: f(state, batch) -> (state, metrics); jit or pmap it."""
    return functools.partial(sft_step, models=models, axis_name=axis_name)
