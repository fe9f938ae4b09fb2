"""The idealised GPO dynamics of spec section 3 (the paper's Theorem 3.2), exactly, in JAX.

Round t = 1..T plays (pi_t, mu_t); with beta = eta = c * sqrt(T):

    pi_{t+1}(y|x) ∝ pi_t(y|x) * exp( r(x, y) / beta )                    (defender, every prompt)
    mu_{t+1}(x)   ∝ mu_t(x)^{eta/(eta+tau)} * exp( -l_s(x) / (eta+tau) )  (attacker)

with l_s = l(pi_t) (simultaneous) or l(pi_{t+1}) (alternating: defender first, the attacker answers
the new defender). tau = 0 is the paper's Hedge update mu_{t+1} ∝ mu_t exp(-l/eta); tau > 0 is the
exact KL-proximal step of the entropy-regularised game, argmin_mu <mu, l> - tau*H(mu) + eta*KL(mu||mu_t),
whose fixed point for a fixed l is the Gibbs distribution ∝ exp(-l/tau). The averaged policies
pi_hat = mean_t pi_t and mu_hat = mean_t mu_t are returned next to the last iterates (pi_T, mu_T).

"Exact": every update is the exact KL-regularised (proximal) step, no sampling, no inner optimiser.
The defender's update does not involve mu, so pi_t ∝ pi_1 * exp((t-1) r / beta) in closed form
(the tests check the scan against it); mu_t depends on the whole history of pi and is carried in
log space, renormalised each round. Memory is O(m n) whatever T: the loop carries running sums,
never the iterates. T is a traced loop bound (`lax.fori_loop`), so one compilation serves every T
on a grid; vmap over games, seeds and variants (tau, alternating are traced too).

Precision: the running sums add up to 1e5 terms, and log mu_t / pi_t accumulate ~T multiplicative
increments of size ~1/eta; in float32 each round rounds at ~6e-8 relative, so after 1e5 rounds the
iterates and sums drift by ~1e-4..1e-3 relative, not small next to the gaps at T = 1e5 (~1e-2
averaged, <1e-4 last-iterate); measured on 8 random 20x10 games at T = 1e5, float32 moves the
averaged gap by up to 1% relative. We therefore run in float64 (`with jax.enable_x64():`; the
experiment and the tests do), where the same drift is ~1e-11, rather than add Kahan sums (XLA may
reassociate floating-point arithmetic, and float64 costs nothing at these sizes). The code is
dtype-agnostic.

`run_coupled` is the boundary case the theorem does not cover: a shared-parameter (log-linear)
defender pi_theta(y|x) ∝ pi_1(y|x) exp(<theta, phi(x, y)>) trained by natural gradient on prompts
drawn from mu_t, so that its update (and best response) depends on the attacker's distribution.
With one-hot features phi(x, y) = e_{(x,y)} it reduces to the tabular update above.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from alignjax.theory.game import Game, prompt_loss, tv


class DynamicsResult(NamedTuple):
    """Outputs of one run of T rounds. Shapes for one game; vmapped runs add leading axes."""

    pi_avg: jax.Array  # [m, n] mean_t pi_t
    mu_avg: jax.Array  # [m]    mean_t mu_t
    pi_last: jax.Array  # [m, n] pi_T
    mu_last: jax.Array  # [m]    mu_T
    mu_path: jax.Array  # []     sum_t TV(mu_{t+1}, mu_t): O(1) for monotone convergence, grows if mu cycles


def step_sizes(T, c) -> jax.Array:
    """beta = eta = c * sqrt(T) (the theorem's choice), as a float scalar."""
    return c * jnp.sqrt(jnp.asarray(T, jnp.result_type(float)))


def _attacker_update(log_mu, loss, eta, tau):
    # argmin_mu <mu, l> - tau H(mu) + eta KL(mu || mu_t)  =>  log mu ∝ (eta log mu_t - l) / (eta + tau)
    return jax.nn.log_softmax((eta * log_mu - loss) / (eta + tau))


def _check_rounds(T) -> None:
    """T >= 1 when it is a Python int (a traced T cannot be checked; T = 0 would divide by zero)."""
    if isinstance(T, int) and T < 1:
        raise ValueError(f"the dynamics need T >= 1 rounds, got {T}")


def _uniform(m, n, dtype):
    return jnp.full((m, n), 1.0 / n, dtype), jnp.full((m,), 1.0 / m, dtype)


def run(game: Game, T, c=1.0, tau=0.0, alternating=False, pi0=None, mu0=None) -> DynamicsResult:
    """T rounds of the tabular dynamics (module docstring) from (pi0, mu0), uniform by default.

    Args:
      game: Game with r [m, n], r_div [m].
      T: number of rounds (python or traced int >= 1); beta = eta = c * sqrt(T).
      c: step-size constant. tau: entropy weight of the attacker's objective (0 = the plain game).
      alternating: bool (may be traced): the attacker answers pi_{t+1} instead of pi_t.
      pi0: [m, n] initial defender (rows sum to 1, full support), e.g. an "SFT-like" peaked policy.
      mu0: [m] initial attacker (full support).
    Returns: DynamicsResult.
    """
    _check_rounds(T)
    chex.assert_rank(game.r, 2)
    m, n = game.r.shape
    dtype = game.r.dtype
    u_pi, u_mu = _uniform(m, n, dtype)
    pi0 = u_pi if pi0 is None else pi0
    mu0 = u_mu if mu0 is None else mu0
    chex.assert_shape(pi0, (m, n))
    chex.assert_shape(mu0, (m,))
    beta = eta = step_sizes(T, c).astype(dtype)
    tau = jnp.asarray(tau, dtype)
    alternating = jnp.asarray(alternating, bool)
    # pi_{t+1} = normalise(pi_t * exp(r/beta)): the tilt is computed once, so a round costs no
    # exponential of the [m, n] table. Renormalising every round keeps rows on the simplex; the
    # drift from the closed form pi_t ∝ pi_1 exp((t-1) r/beta) is ~T*eps relative (1e-11 in float64).
    tilt = jnp.exp(game.r / beta)

    def body(_, carry):
        pi_t, log_mu, mu_t, sum_pi, sum_mu, path = carry
        pi_next = pi_t * tilt
        pi_next = pi_next / jnp.sum(pi_next, axis=-1, keepdims=True)
        loss = jnp.where(alternating, prompt_loss(game, pi_next), prompt_loss(game, pi_t))
        log_mu_next = _attacker_update(log_mu, loss, eta, tau)
        mu_next = jnp.exp(log_mu_next)
        path = path + tv(mu_next, mu_t)
        return pi_next, log_mu_next, mu_next, sum_pi + pi_t, sum_mu + mu_t, path

    zero = jnp.zeros((), dtype)
    init = (pi0, jnp.log(mu0), mu0, jnp.zeros_like(pi0), jnp.zeros_like(mu0), zero)
    # Keep the state of round T (not T+1) as the last iterate: loop T-1 times, then add round T.
    pi_T, _, mu_T, sum_pi, sum_mu, path = jax.lax.fori_loop(0, T - 1, body, init)
    Tf = jnp.asarray(T, dtype)
    return DynamicsResult((sum_pi + pi_T) / Tf, (sum_mu + mu_T) / Tf, pi_T, mu_T, path)


# ---------------------------------------------------------------------------------------------
# Coupled variant: a shared-parameter log-linear defender (outside the theorem's assumptions).


def loglinear_policy(theta: jax.Array, feats: jax.Array, log_pi0: jax.Array) -> jax.Array:
    """pi_theta(y|x) = softmax_y(log pi0(y|x) + <theta, phi(x, y)>).  theta [d], feats [m, n, d] -> [m, n]."""
    return jax.nn.softmax(log_pi0 + feats @ theta, axis=-1)


def natural_gradient(game: Game, theta, feats, log_pi0, mu, ridge=1e-6) -> jax.Array:
    """F^{-1} grad_theta J(pi_theta, mu), F = sum_x mu(x) Cov_{pi(.|x)}[phi] + ridge * I.

    grad J = sum_x mu(x) Cov_{pi(.|x)}[phi, r], so the step is the mu-weighted least-squares fit of
    r(x, .) by the centred features (compatible function approximation): it depends on mu unless the
    features separate prompts (one-hot), where it equals the tabular per-prompt step r - E_pi r. [d]."""
    pi = loglinear_policy(theta, feats, log_pi0)
    centred = feats - jnp.einsum("xy,xyd->xd", pi, feats)[:, None, :]
    w = mu[:, None] * pi  # [m, n] sampling weights of (x, y) pairs
    fisher = jnp.einsum("xy,xyd,xye->de", w, centred, centred)
    grad = jnp.einsum("xy,xyd,xy->d", w, centred, game.r)
    d = theta.shape[0]
    return jnp.linalg.solve(fisher + ridge * jnp.eye(d, dtype=theta.dtype), grad)


def run_coupled(
    game: Game, feats: jax.Array, T, c=1.0, tau=0.0, alternating=False, pi0=None, mu0=None, ridge=1e-6
) -> DynamicsResult:
    """T rounds with a log-linear defender theta_{t+1} = theta_t + (1/beta) * natural_gradient(mu_t).

    Same attacker, step sizes, averaging and outputs as `run`; feats [m, n, d] (the defender's
    features phi(x, y)); theta_1 = 0 so that pi_1 = pi0."""
    _check_rounds(T)
    chex.assert_rank(feats, 3)
    m, n, d = feats.shape
    chex.assert_shape(game.r, (m, n))
    dtype = game.r.dtype
    u_pi, u_mu = _uniform(m, n, dtype)
    pi0 = u_pi if pi0 is None else pi0
    mu0 = u_mu if mu0 is None else mu0
    log_pi0 = jnp.log(pi0)
    beta = eta = step_sizes(T, c).astype(dtype)
    tau = jnp.asarray(tau, dtype)
    alternating = jnp.asarray(alternating, bool)

    def body(i, carry):
        theta, log_mu, sum_pi, sum_mu, path = carry
        mu_t = jnp.exp(log_mu)
        pi_t = loglinear_policy(theta, feats, log_pi0)
        # The defender trains on prompts drawn from the current attacker: this is the coupling.
        theta_next = theta + natural_gradient(game, theta, feats, log_pi0, mu_t, ridge) / beta
        pi_next = loglinear_policy(theta_next, feats, log_pi0)
        loss = jnp.where(alternating, prompt_loss(game, pi_next), prompt_loss(game, pi_t))
        log_mu_next = _attacker_update(log_mu, loss, eta, tau)
        path = path + tv(jnp.exp(log_mu_next), mu_t)
        return theta_next, log_mu_next, sum_pi + pi_t, sum_mu + mu_t, path

    zero = jnp.zeros((), dtype)
    init = (jnp.zeros((d,), dtype), jnp.log(mu0), jnp.zeros_like(pi0), jnp.zeros_like(mu0), zero)
    theta_T, log_mu_T, sum_pi, sum_mu, path = jax.lax.fori_loop(0, T - 1, body, init)
    pi_T, mu_T = loglinear_policy(theta_T, feats, log_pi0), jnp.exp(log_mu_T)
    Tf = jnp.asarray(T, dtype)
    return DynamicsResult((sum_pi + pi_T) / Tf, (sum_mu + mu_T) / Tf, pi_T, mu_T, path)


def best_loglinear_value(game: Game, feats, log_pi0, mu, key, n_starts=32, steps=300, lr=0.3) -> jax.Array:
    """max_theta J(pi_theta, mu) within the log-linear class, by multi-start natural-gradient ascent.

    J is not concave in theta, so this is a lower bound on the class's best response value (and a
    restricted gap built from it is a lower bound of the true restricted gap). Scalar."""
    d = feats.shape[-1]
    starts = 3.0 * jax.random.normal(key, (n_starts, d), feats.dtype)

    def ascend(theta):
        def body(_, th):
            return th + lr * natural_gradient(game, th, feats, log_pi0, mu, ridge=1e-4)

        th = jax.lax.fori_loop(0, steps, body, theta)
        return jnp.dot(mu, prompt_loss(game, loglinear_policy(th, feats, log_pi0)))

    return jnp.max(jax.vmap(ascend)(starts))
