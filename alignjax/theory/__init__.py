"""Tabular theory of GPO: the finite game, its exact Nash gaps, and the idealised dynamics.

See game.py (payoffs, best responses, gaps, Gibbs equilibrium), dynamics.py (Theorem 3.2's algorithm,
simultaneous/alternating, entropy-regularised, coupled log-linear defender) and experiment.py (the
`make experiment NAME=nash_gap` runner).
"""

from alignjax.theory.dynamics import (
    DynamicsResult,
    best_loglinear_value,
    loglinear_policy,
    natural_gradient,
    run,
    run_coupled,
    step_sizes,
)
from alignjax.theory.game import (
    Game,
    attacker_best_value,
    defender_best_value,
    entropy,
    gibbs,
    nash_gap,
    payoff,
    prompt_loss,
    random_game,
    tv,
    value,
)

__all__ = [
    "DynamicsResult",
    "Game",
    "attacker_best_value",
    "best_loglinear_value",
    "defender_best_value",
    "entropy",
    "gibbs",
    "loglinear_policy",
    "nash_gap",
    "natural_gradient",
    "payoff",
    "prompt_loss",
    "random_game",
    "run",
    "run_coupled",
    "step_sizes",
    "tv",
    "value",
]
