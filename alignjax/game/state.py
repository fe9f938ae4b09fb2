"""GameState: everything that changes during a GPO run, as one pytree (checkpointed whole).

    GameState(
      step          [] int32      finished game steps; the stage of the next step is stage_at(step)
      rng           [2] uint32    the run's base key: step t on device d uses fold_in(fold_in(rng, t), d)
      defender      PlayerState   policy + its own critic, both optimizer states, PPO counter
      attacker      PlayerState   likewise (a separate critic: the authors' code shared one, a bug)
      defender_ref  params        frozen reference of the defender's KL penalty (its SFT model)
      attacker_ref  params        frozen reference of the attacker's KL penalty (its SFT rewriter)
      history       History       ring buffer of the attacker's past prompts (+ embeddings): X of R_div
      cursor        [] int32      seed rows consumed so far (the data cursor; epochs reshuffle)
    )

Nothing else is needed to continue a run: the schedule is a function of `step`, the keys of `rng`
and `step`, and the data order of `rng` and `cursor`, so restoring a GameState restores the run.
Under `jax.pmap` every device holds an identical copy (gradients are reduced across devices and the
history receives the all-gathered prompts of all devices).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from alignjax.rewards import history as hist
from alignjax.rl.state import PlayerState


class GameState(NamedTuple):
    step: jax.Array
    rng: jax.Array
    defender: PlayerState
    attacker: PlayerState
    defender_ref: Any
    attacker_ref: Any
    history: hist.History
    cursor: jax.Array


def init_game_state(
    defender: PlayerState,
    attacker: PlayerState,
    defender_ref: Any,
    attacker_ref: Any,
    history: hist.History,
    seed: int | jax.Array,
) -> GameState:
    """Fresh state at step 0. `seed` is an int or a raw uint32 [2] key."""
    rng = jax.random.PRNGKey(seed) if isinstance(seed, int) else jnp.asarray(seed)
    chex.assert_shape(rng, (2,))
    chex.assert_type(rng, jnp.uint32)
    chex.assert_trees_all_equal_shapes(defender.policy_params, defender_ref)
    chex.assert_trees_all_equal_shapes(attacker.policy_params, attacker_ref)
    return GameState(
        step=jnp.zeros((), jnp.int32),
        rng=rng,
        defender=defender,
        attacker=attacker,
        defender_ref=defender_ref,
        attacker_ref=attacker_ref,
        history=history,
        cursor=jnp.zeros((), jnp.int32),
    )


def check_game_state(state: GameState) -> None:
    """chex checks of the scalar fields (the players are checked by the RL code)."""
    chex.assert_shape([state.step, state.cursor], ())
    chex.assert_type([state.step, state.cursor], jnp.int32)
    chex.assert_shape(state.rng, (2,))
    chex.assert_type(state.rng, jnp.uint32)
