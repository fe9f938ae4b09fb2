"""PPO update of one player (policy + its own critic) as a pure function, jittable and pmappable.

    state, metrics = ppo_update(state, ref_params, rollout, key, models=..., cfg=PPOConfig(...))

One update = experience (experience.py) + `cfg.epochs` passes over the batch, each a random
permutation split into `cfg.num_minibatches` minibatches, all as `lax.scan`s. With one epoch of one
minibatch (`cfg.single_pass`) the experience's old log-probs and values are the stop-gradient values
of the update's own forwards (`single_pass_gradients`): 3 forwards + 2 backwards instead of 5 + 2.
Per minibatch, with ratio rho_t = exp(logp_t - logp_old_t), whitened advantages A_t, returns R_t,
old values V_old:

    policy loss  L_pi = agg( max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) ) - c_ent * agg(H_t)
    value loss   L_V  = c_V / 2 * agg( max((V - R)^2, (V_old + clip(V - V_old, -eps_V, eps_V) - R)^2) )

`agg` is a masked mean over the response tokens of the whole (global) minibatch ("token_mean") or
of each sequence then over sequences ("seq_mean"). Policy and critic have their own optimizers.

Data parallel: with `axis_name` set (inside `jax.pmap(..., axis_name="data")`) every device holds a
slice of the batch; loss numerators are local and denominators global, and gradients are summed with
`lax.psum`, so the update equals the single-device update on the concatenated batch (with several
minibatches too: the minibatch permutation is global, `global_minibatches`).

Non-finite values: every quantity that could blow up (experience, losses, gradient norms) is checked
in-graph. A minibatch with a non-finite loss or gradient is not applied, and if anything in the
update was non-finite the whole update is rolled back (params and optimizer states unchanged; `step`
still advances). `metrics["nonfinite/<name>"]` counts the offenders and `metrics["update_skipped"]`
is 1; `raise_if_nonfinite(metrics)` turns that into an error on the host naming step and metric.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignjax.parallel import all_gather, axis_index, psum
from alignjax.rl import kernels
from alignjax.rl.experience import (
    Experience,
    PPOConfig,
    Rollout,
    check_rollout,
    compute_experience,
    experience_from_forwards,
    model_inputs,
    response_logprobs,
)
from alignjax.rl.state import PlayerState, RewardMoments, current_lr

NONFINITE_PREFIX = "nonfinite/"


class NonFiniteError(FloatingPointError):
    """A PPO or SFT step met NaN/inf; the message names the step(s) and the offending metrics."""



def local_share(x: jax.Array, mask: jax.Array, mode: str, axis_name: str | None) -> jax.Array:
    """This device's share of a global masked mean: local numerator / global denominator -> [].

    Summed over devices (psum) it is the mean over the global batch, and so is the psum of its
    gradients. token_mean: sum(x m) / N_tokens. seq_mean: sum_b [sum_t x m / len_b] / N_nonempty_seqs.
    """
    m = mask.astype(jnp.float32)
    if mode == "token_mean":
        num = jnp.sum(x * m)
        den = psum(jnp.sum(m), axis_name)
    else:
        lengths = jnp.sum(m, axis=1)
        num = jnp.sum(jnp.sum(x * m, axis=1) / jnp.maximum(lengths, 1.0))
        den = psum(jnp.sum((lengths > 0).astype(jnp.float32)), axis_name)
    return num / jnp.maximum(den, 1.0)


def policy_loss(params: Any, mb: Experience, *, models: Any, cfg: PPOConfig, axis_name: str | None = None):
    """Clipped-ratio policy loss (+ entropy bonus) of a minibatch -> (loss share, metric shares)."""
    n = mb.response_tokens.shape[1]
    tokens, tmask = model_inputs(mb.prompt_tokens, mb.prompt_mask, mb.response_tokens, mb.response_mask)
    return policy_objective(models.policy_logits(params, tokens, tmask, n), mb, cfg=cfg, axis_name=axis_name)


def policy_objective(logits: jax.Array, mb: Experience, *, cfg: PPOConfig, axis_name: str | None = None):
    """`policy_loss` from the policy's response logits [B, N, V] float32 (differentiable)."""
    m = mb.response_mask.astype(jnp.float32)
    logp = kernels.token_logprobs(logits, mb.response_tokens, cfg.logprob_temperature)
    log_ratio = (logp - mb.logprobs) * m
    ratio = jnp.exp(log_ratio)
    adv = mb.advantages
    pg = -adv * ratio
    clipped = jnp.zeros_like(pg)
    if cfg.clip_ratio is not None:
        pg_clip = -adv * jnp.clip(ratio, 1.0 - cfg.clip_ratio, 1.0 + cfg.clip_ratio)
        clipped = (pg_clip > pg).astype(jnp.float32)
        pg = jnp.maximum(pg, pg_clip)
    entropy = kernels.entropy_from_logits(logits, cfg.logprob_temperature)
    if cfg.entropy_coef == 0.0:
        entropy = jax.lax.stop_gradient(entropy)  # metric only: skip its backward pass
    share = functools.partial(local_share, mask=m, mode=cfg.loss_aggregation, axis_name=axis_name)
    pg_loss, ent = share(pg), share(entropy)
    loss = pg_loss - cfg.entropy_coef * ent
    ratio_sg = jax.lax.stop_gradient(ratio)
    aux = {
        "policy_loss": pg_loss,
        "entropy": ent,
        # k3 estimate of KL(pi_old || pi_new) on the sampled tokens
        "approx_kl": share(jax.lax.stop_gradient((ratio - 1.0) - log_ratio)),
        "clip_frac": share(clipped),
        "ratio_mean": share(ratio_sg),
    }
    return loss, aux


def value_loss(params: Any, mb: Experience, *, models: Any, cfg: PPOConfig, axis_name: str | None = None):
    """Clipped value loss of a minibatch -> (loss share, metric shares)."""
    n = mb.response_tokens.shape[1]
    tokens, tmask = model_inputs(mb.prompt_tokens, mb.prompt_mask, mb.response_tokens, mb.response_mask)
    return value_objective(models.critic_values(params, tokens, tmask, n), mb, cfg=cfg, axis_name=axis_name)


def value_objective(v: jax.Array, mb: Experience, *, cfg: PPOConfig, axis_name: str | None = None):
    """`value_loss` from the critic's values [B, N] float32 (differentiable)."""
    m = mb.response_mask.astype(jnp.float32)
    vf = jnp.square(v - mb.returns)
    clipped = jnp.zeros_like(vf)
    if cfg.value_clip is not None:
        v_clip = mb.values + jnp.clip(v - mb.values, -cfg.value_clip, cfg.value_clip)
        vf_clip = jnp.square(v_clip - mb.returns)
        clipped = (vf_clip > vf).astype(jnp.float32)
        vf = jnp.maximum(vf, vf_clip)
    share = functools.partial(local_share, mask=m, mode=cfg.loss_aggregation, axis_name=axis_name)
    vf_loss = 0.5 * share(vf)
    aux = {
        "value_loss": vf_loss,
        "value_clip_frac": share(clipped),
        "value_pred_mean": share(jax.lax.stop_gradient(v)),
    }
    return cfg.value_coef * vf_loss, aux


def check_key(key: jax.Array) -> None:
    """A PRNG key: a typed key [] or a raw uint32 key [2]."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        chex.assert_shape(key, ())
    else:
        chex.assert_shape(key, (2,))
        chex.assert_type(key, jnp.uint32)


def _select(ok: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _is_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


def global_minibatches(exp: Experience, key: jax.Array, nm: int, axis_name: str | None) -> Experience:
    """This device's rows of `nm` minibatches of a global random permutation: [b, ...] -> [nm, b / nm, ...].

    The permutation `permutation(key, B)` is over the global batch (B = b x devices; rows in device
    order): minibatch j is global rows perm[j B/nm : (j+1) B/nm], and device d takes its d-th slice of
    b/nm of them. So the minibatches, and with the psum-ed gradients the update, do not depend on how
    the batch is split (one device, pmap, or a mesh where the arrays are global)."""
    b = exp.response_tokens.shape[0]
    full = jax.tree.map(lambda x: all_gather(x, axis_name), exp)
    n_global = full.response_tokens.shape[0]
    perm = jax.random.permutation(key, n_global)
    mb = b // nm
    offset = axis_index(axis_name) * mb

    def split(x):
        x = x[perm].reshape((nm, n_global // nm) + x.shape[1:])
        return x if n_global == b else jax.lax.dynamic_slice_in_dim(x, offset, mb, axis=1)

    return jax.tree.map(split, full)


def apply_gradients(
    state: PlayerState,
    carry: tuple,
    p_grads: Any,
    c_grads: Any,
    aux: dict[str, jax.Array],
    alive: jax.Array,
    axis_name: str | None,
) -> tuple[tuple, dict[str, jax.Array], jax.Array]:
    """One optimiser step of policy and critic from this device's gradient shares.

    carry = (policy params, policy opt state, critic params, critic opt state); aux: the losses' metric
    shares. Gradients and metrics are summed over devices; the step is applied only if `alive` ([] bool)
    holds and the losses and gradient norms are finite. Returns (new carry, metrics, applied [] bool).
    """
    pp, pos, cp, cos = carry
    # global gradient = sum over devices of the local shares' gradients; metrics likewise
    p_grads, c_grads = psum(p_grads, axis_name), psum(c_grads, axis_name)
    aux = psum(aux, axis_name)
    p_norm, c_norm = optax.tree.norm(p_grads), optax.tree.norm(c_grads)
    checks = {
        "policy_loss": _is_finite(aux["policy_loss"]),
        "value_loss": _is_finite(aux["value_loss"]),
        "entropy": _is_finite(aux["entropy"]),
        "policy_grad_norm": _is_finite(p_norm),
        "critic_grad_norm": _is_finite(c_norm),
    }
    ok = functools.reduce(jnp.logical_and, checks.values()) & alive
    p_upd, new_pos = state.policy_tx.update(p_grads, pos, pp)
    c_upd, new_cos = state.critic_tx.update(c_grads, cos, cp)
    new_carry = (optax.apply_updates(pp, p_upd), new_pos, optax.apply_updates(cp, c_upd), new_cos)
    metrics = {**aux, "policy_grad_norm": p_norm, "critic_grad_norm": c_norm}
    metrics.update({NONFINITE_PREFIX + k: 1.0 - v.astype(jnp.float32) for k, v in checks.items()})
    # the select fuses into the optimizer's elementwise update, so skipping costs no extra pass
    return _select(ok, new_carry, carry), metrics, ok


def ppo_epochs(
    state: PlayerState,
    exp: Experience,
    key: jax.Array,
    *,
    models: Any,
    cfg: PPOConfig,
    axis_name: str | None = None,
    gate: jax.Array | None = None,
) -> tuple[PlayerState, dict[str, jax.Array], jax.Array]:
    """cfg.epochs x cfg.num_minibatches optimiser steps on an experience batch.

    A minibatch is applied only if its losses and gradients are finite, `gate` (e.g. "the experience
    is finite", [] bool) holds and no earlier minibatch failed. Returns (state with new params/opt
    states, metrics averaged over minibatches, all applied [] bool). `state.step` is not touched.
    """
    b = exp.response_tokens.shape[0]
    nm = cfg.num_minibatches
    if b % nm:
        raise ValueError(f"batch size per device {b} is not divisible by num_minibatches={nm}")

    def minibatch_step(carry, mb: Experience):
        (pp, _, cp, _), alive = carry
        p_grads, p_aux = jax.grad(
            functools.partial(policy_loss, models=models, cfg=cfg, axis_name=axis_name), has_aux=True
        )(pp, mb)
        c_grads, v_aux = jax.grad(
            functools.partial(value_loss, models=models, cfg=cfg, axis_name=axis_name), has_aux=True
        )(cp, mb)
        new_carry, metrics, ok = apply_gradients(
            state, carry[0], p_grads, c_grads, {**p_aux, **v_aux}, alive, axis_name
        )
        return (new_carry, ok), (metrics, ok)

    def epoch(carry, epoch_key):
        if nm == 1:
            data = jax.tree.map(lambda x: x[None], exp)
        else:
            data = global_minibatches(exp, epoch_key, nm, axis_name)
        return jax.lax.scan(minibatch_step, carry, data)

    alive0 = jnp.asarray(True) if gate is None else jnp.asarray(gate, bool)
    (carry, _), (metrics, oks) = jax.lax.scan(
        epoch, (_carry(state), alive0), jax.random.split(key, cfg.epochs)
    )
    out = {k: (jnp.sum(v) if k.startswith(NONFINITE_PREFIX) else jnp.mean(v)) for k, v in metrics.items()}
    return _with_carry(state, carry), out, jnp.all(oks)


def single_pass_gradients(
    state: PlayerState, ref_params: Any, rollout: Rollout, *, models: Any, cfg: PPOConfig,
    axis_name: str | None = None,
) -> tuple[Experience, dict[str, jax.Array], RewardMoments, tuple]:
    """Experience and gradients of a one-step update (`cfg.single_pass`) from one forward per network.

    The old log-probs and values of the experience are the stop-gradient values of the forwards the
    losses differentiate (the parameters are the same), so the ratio rho_t = exp(logp_t - sg(logp_t))
    is exactly 1 and d rho_t = d logp_t. The reference policy runs once without gradients; KL rewards,
    GAE and whitening are computed inside the loss from stop-gradient values. Same result as
    `compute_experience` followed by one minibatch of `ppo_epochs`, in 3 forwards + 2 backwards
    instead of 5 forwards + 2 backwards.

    Returns (experience, experience metrics, new reward moments, (policy grad shares, critic grad
    shares, loss metric shares)) for `apply_gradients`.
    """
    check_rollout(rollout)
    n = rollout.response_tokens.shape[1]
    tokens, tmask = model_inputs(
        rollout.prompt_tokens, rollout.prompt_mask, rollout.response_tokens, rollout.response_mask
    )
    ref_logp = jax.lax.stop_gradient(
        response_logprobs(models, ref_params, tokens, tmask, rollout.response_tokens, cfg)
    )

    def loss(params):
        logits = models.policy_logits(params[0], tokens, tmask, n)
        values = models.critic_values(params[1], tokens, tmask, n)
        logp = kernels.token_logprobs(logits, rollout.response_tokens, cfg.logprob_temperature)
        old = jax.lax.stop_gradient((logp, values))
        exp, exp_metrics, moments = experience_from_forwards(
            rollout, old[0], ref_logp, old[1], cfg=cfg, reward_moments=state.reward_moments,
            axis_name=axis_name,
        )  # fmt: skip
        p_loss, p_aux = policy_objective(logits, exp, cfg=cfg, axis_name=axis_name)
        v_loss, v_aux = value_objective(values, exp, cfg=cfg, axis_name=axis_name)
        return p_loss + v_loss, (exp, exp_metrics, moments, {**p_aux, **v_aux})

    (p_grads, c_grads), (exp, exp_metrics, moments, aux) = jax.grad(loss, has_aux=True)(
        (state.policy_params, state.critic_params)
    )
    return exp, exp_metrics, moments, (p_grads, c_grads, aux)


def _carry(state: PlayerState) -> tuple:
    return state.policy_params, state.policy_opt_state, state.critic_params, state.critic_opt_state


def _with_carry(state: PlayerState, carry: tuple) -> PlayerState:
    pp, pos, cp, cos = carry
    return state.replace(policy_params=pp, policy_opt_state=pos, critic_params=cp, critic_opt_state=cos)


def ppo_update(
    state: PlayerState,
    ref_params: Any,
    rollout: Rollout,
    key: jax.Array,
    *,
    models: Any,
    cfg: PPOConfig,
    axis_name: str | None = None,
) -> tuple[PlayerState, dict[str, jax.Array]]:
    """One PPO update of a player from a rollout batch.

    Args:
      state: the player's `PlayerState` (under pmap: replicated).
      ref_params: frozen reference policy params (same architecture as the policy).
      rollout: `Rollout` with prompt [B, P], response [B, N], scores [B] (under pmap: this device's slice).
      key: PRNG key of the minibatch permutations.
      models: `LlamaPlayerModels` (or any object with `policy_logits` / `critic_values`), static.
      cfg: `PPOConfig`, static. axis_name: the pmap axis ("data") or None on one device.

    Returns (new state, metrics: dict of [] float32, identical on every device).
    """
    check_key(key)
    chex.assert_trees_all_equal_shapes(state.policy_params, ref_params)
    if cfg.single_pass:
        exp, exp_metrics, new_moments, grads = single_pass_gradients(
            state, ref_params, rollout, models=models, cfg=cfg, axis_name=axis_name
        )
    else:
        exp, exp_metrics, new_moments = compute_experience(
            state.policy_params, state.critic_params, ref_params, rollout,
            models=models, cfg=cfg, reward_moments=state.reward_moments, axis_name=axis_name,
        )  # fmt: skip
    exp_checks = {
        "scores": _is_finite(rollout.scores),
        "logprobs": _is_finite(exp.logprobs),
        "ref_logprobs": _is_finite(exp.ref_logprobs),
        "values": _is_finite(exp.values),
        "advantages": _is_finite(exp.advantages),
    }
    if axis_name is not None:  # a NaN on any device must skip the update on every device
        exp_checks = {k: jax.lax.pmin(v.astype(jnp.int32), axis_name) > 0 for k, v in exp_checks.items()}
    exp_ok = functools.reduce(jnp.logical_and, exp_checks.values())
    if cfg.single_pass:
        carry, train_metrics, train_ok = apply_gradients(state, _carry(state), *grads, exp_ok, axis_name)
        new_state = _with_carry(state, carry)
    else:
        new_state, train_metrics, train_ok = ppo_epochs(
            state, exp, key, models=models, cfg=cfg, axis_name=axis_name, gate=exp_ok
        )
    ok = exp_ok & train_ok
    # All or nothing: a non-finite anything leaves params, optimizer states and reward moments as they
    # were. With one minibatch step the gate above already did it; otherwise earlier minibatches of a
    # failed update must be rolled back (one extra pass over the state).
    if cfg.epochs * cfg.num_minibatches > 1:
        new_state = _select(ok, new_state, state)
    new_state = new_state.replace(
        reward_moments=_select(ok, new_moments, state.reward_moments), step=state.step + 1
    )
    metrics = {**exp_metrics, **train_metrics}
    metrics.update({NONFINITE_PREFIX + k: 1.0 - v.astype(jnp.float32) for k, v in exp_checks.items()})
    metrics["update_skipped"] = 1.0 - ok.astype(jnp.float32)
    metrics["step"] = state.step.astype(jnp.float32)
    metrics["policy_lr"] = current_lr(new_state.policy_opt_state)
    metrics["critic_lr"] = current_lr(new_state.critic_opt_state)
    return new_state, metrics


def make_ppo_update(models: Any, cfg: PPOConfig, axis_name: str | None = None):
    """`ppo_update` with its static arguments bound: f(state, ref_params, rollout, key) -> (state, metrics).

    Wrap it in `jax.jit` (one device) or `alignjax.parallel.pmap` (axis "data"), or call it inside a
    larger jitted game step."""
    return functools.partial(ppo_update, models=models, cfg=cfg, axis_name=axis_name)


def nonfinite_report(metrics: dict[str, Any]) -> list[str]:
    """Host-side: one line per step whose update met NaN/inf, naming the offending metrics.

    Works on the metrics of one update ([] values) and on stacked metrics ([K] from a scan, or
    [devices, K] from pmap; all devices hold the same values)."""
    step = np.atleast_1d(np.asarray(metrics.get("step", -1))).reshape(-1)
    bad_keys = [k for k in metrics if k.startswith(NONFINITE_PREFIX)]
    flags = {k: np.atleast_1d(np.asarray(metrics[k])).reshape(-1) for k in bad_keys}
    if "update_skipped" in metrics:
        flags["update_skipped"] = np.atleast_1d(np.asarray(metrics["update_skipped"])).reshape(-1)
    size = max([len(step)] + [len(v) for v in flags.values()])
    step = np.resize(step, size)
    lines = []
    for i in range(size):
        names = [k[len(NONFINITE_PREFIX) :] for k in bad_keys if np.resize(flags[k], size)[i] > 0]
        skipped = "update_skipped" in flags and np.resize(flags["update_skipped"], size)[i] > 0
        if names or skipped:
            lines.append(
                f"step {int(step[i])}: non-finite {', '.join(names) or 'values'}; update not applied"
            )
    return lines


def raise_if_nonfinite(metrics: dict[str, Any]) -> None:
    """Raise `NonFiniteError` naming step(s) and metric(s) if any update in `metrics` met NaN/inf."""
    lines = nonfinite_report(metrics)
    if lines:
        raise NonFiniteError("; ".join(lines))
