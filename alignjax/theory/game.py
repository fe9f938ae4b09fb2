"""The finite two-player game of GPO's theory (spec section 3) and its exact Nash gaps.

m prompts x, n responses y. The defender is a row-stochastic policy pi [m, n] (pi[x] = pi(.|x)),
the attacker a distribution mu [m] over prompts. With a safety reward r [m, n] in [0, 1] and a
diversity reward R_div [m]:

    l(x; pi)   = sum_y pi(y|x) r(x, y) - R_div(x)                    the attacker's loss vector [m]
    J(pi, mu)  = <mu, l(pi)>                                          defender maximises, attacker minimises
    J_tau      = J(pi, mu) - tau * H(mu)                              entropy-regularised payoff
    V(x)       = max_y r(x, y) - R_div(x)                             value of prompt x vs a best defender

Naming: the spec writes the entropy weight as eta, the same letter as the attacker's KL (step-size)
coefficient of the dynamics. Here the entropy weight is `tau` and `eta` is kept for the KL
coefficient, so that beta = eta = c*sqrt(T) can grow with T while the regularised game (and its
equilibrium) stays fixed.

Best responses, in closed form (J is linear in pi(.|x) for each x and linear in mu):
- defender, for J and J_tau alike (the entropy term does not involve pi):
      max_pi' J(pi', mu) = sum_x mu(x) max_y r(x, y) - <mu, R_div> = <mu, V>   (a pure strategy)
- attacker for J:       min_mu' J(pi, mu') = min_x l(x; pi)                      (a pure strategy)
- attacker for J_tau: it MINIMISES <mu', l> - tau*H(mu'), a strictly convex problem, so the entropy
  term rewards spread; the minimiser is Gibbs, mu'(x) ∝ exp(-l(x)/tau), and
      min_mu' J_tau(pi, mu') = -tau * log sum_x exp(-l(x; pi)/tau)
So the gaps are
      NEGap(pi, mu)     = <mu, V> - min_x l(x; pi)                                   >= 0
      NEGap_tau(pi, mu) = <mu, V> - tau*H(mu) + tau * logsumexp_x(-l(x; pi)/tau)      >= 0
(the second tends to the first as tau -> 0). The regularised equilibrium is unique in mu:
mu* ∝ exp(-V/tau) with any pi* that is greedy in r on every prompt (mu* has full support).
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


class Game(NamedTuple):
    """A finite game. r: [m, n] safety reward in [0, 1]; r_div: [m] diversity reward of each prompt."""

    r: jax.Array
    r_div: jax.Array


def random_game(key: chex.PRNGKey, m: int, n: int, div_scale: float = 0.0, dtype=jnp.float32) -> Game:
    """r ~ U[0, 1]^{m x n}; R_div ~ U[0, div_scale]^m (div_scale = 0: no diversity reward)."""
    kr, kd = jax.random.split(key)
    r = jax.random.uniform(kr, (m, n), dtype)
    r_div = div_scale * jax.random.uniform(kd, (m,), dtype)
    return Game(r, r_div)


def _check(game: Game, pi=None, mu=None):
    chex.assert_rank(game.r, 2)
    m, n = game.r.shape
    chex.assert_shape(game.r_div, (m,))
    if pi is not None:
        chex.assert_shape(pi, (m, n))
    if mu is not None:
        chex.assert_shape(mu, (m,))


def entropy(p: jax.Array, axis: int = -1) -> jax.Array:
    """Shannon entropy in nats, H(p) = -sum p log p, with 0 log 0 = 0."""
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def prompt_loss(game: Game, pi: jax.Array) -> jax.Array:
    """l(x; pi) = E_{y~pi(.|x)} r(x, y) - R_div(x).  pi [m, n] -> [m]."""
    _check(game, pi=pi)
    return jnp.sum(pi * game.r, axis=-1) - game.r_div


def value(game: Game) -> jax.Array:
    """V(x) = max_y r(x, y) - R_div(x): the attacker's loss against a best-responding defender. [m]."""
    _check(game)
    return jnp.max(game.r, axis=-1) - game.r_div


def payoff(game: Game, pi: jax.Array, mu: jax.Array, tau=0.0) -> jax.Array:
    """J_tau(pi, mu) = <mu, l(pi)> - tau * H(mu) (tau = 0: the plain payoff J). Scalar."""
    _check(game, pi, mu)
    return jnp.dot(mu, prompt_loss(game, pi)) - tau * entropy(mu)


def gibbs(game: Game, tau) -> jax.Array:
    """The regularised equilibrium attacker mu*(x) ∝ exp(-V(x)/tau). [m]."""
    return jax.nn.softmax(-value(game) / tau)


def attacker_best_value(game: Game, pi: jax.Array, tau=0.0) -> jax.Array:
    """min_mu J_tau(pi, mu): min_x l(x) for tau = 0, else -tau * logsumexp(-l/tau).

    tau may be a traced scalar; the tau = 0 branch is selected with `where` (safe divisor, no NaN
    gradients or values leaking from the unused branch)."""
    l = prompt_loss(game, pi)
    tau = jnp.asarray(tau, l.dtype)
    safe = jnp.where(tau > 0, tau, 1.0)
    soft = -safe * jax.scipy.special.logsumexp(-l / safe)
    return jnp.where(tau > 0, soft, jnp.min(l))


def defender_best_value(game: Game, mu: jax.Array, tau=0.0) -> jax.Array:
    """max_pi J_tau(pi, mu) = <mu, V> - tau * H(mu)."""
    _check(game, mu=mu)
    return jnp.dot(mu, value(game)) - tau * entropy(mu)


def nash_gap(game: Game, pi: jax.Array, mu: jax.Array, tau=0.0) -> jax.Array:
    """Exact Nash gap max_pi' J_tau(pi', mu) - min_mu' J_tau(pi, mu') >= 0 (see the module docstring).

    pi [m, n] row-stochastic, mu [m] a distribution, tau >= 0 the entropy weight. Scalar."""
    _check(game, pi, mu)
    return defender_best_value(game, mu, tau) - attacker_best_value(game, pi, tau)


def tv(p: jax.Array, q: jax.Array) -> jax.Array:
    """Total variation distance 0.5 * ||p - q||_1 over the last axis."""
    return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)
