"""The run's PRNG streams, named once. Every random draw of an experiment comes from one of these.

    run_key(seed)              GameState.rng: the base key of the game (checkpointed with the state)
      step_key(rng, t)         step t: fold_in(fold_in(rng, t), 0), the same on every device  (game.loop)
      data_key(rng)            the seed order: epoch e is permutation(fold_in(data_key, e), N)
    init_keys(seed)            (defender critic head, attacker critic head, Paraphrase rewrites)
    embedder_key(seed)         the bag-of-words embedder's fixed random table
    eval_key(eval_seed)        initial / final / in-game evaluations (cfg.eval.seed)

Streams are pure functions of (seed, step): a resumed run draws exactly the keys of an uninterrupted
one, and no two consumers share a key. No key depends on the device or the layout: a draw per batch
row is indexed by the global row (sampling.sample's `row_offset`), so one device, pmap over D devices
and any mesh draw the same numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class InitKeys(NamedTuple):
    defender_critic: jax.Array
    attacker_critic: jax.Array
    paraphrase: jax.Array


def run_key(seed: int) -> jax.Array:
    """[2] uint32: the game's base key (GameState.rng)."""
    return jax.random.PRNGKey(seed)


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """Key of one step, the same on every device: fold_in(fold_in(rng, step), 0).

    The trailing fold_in(., 0) is what device 0 folded in when keys were per device (before the mesh
    layouts): single-device runs made then reproduce bitwise now."""
    return jax.random.fold_in(jax.random.fold_in(rng, step), 0)


def data_key(rng: jax.Array) -> jax.Array:
    """Key of the data order (the seed permutations of every epoch), derived from GameState.rng."""
    return jax.random.fold_in(jax.random.split(rng)[1], 0)


def init_keys(seed: int) -> InitKeys:
    """Keys of the one-off draws at build time: the critics' value heads and the Paraphrase rewrites."""
    return InitKeys(*jax.random.split(jax.random.PRNGKey(seed), 3))


def embedder_key(seed: int) -> jax.Array:
    """Key of the bag-of-words embedder's table W ~ N(0, 1) [V, dim]."""
    return jax.random.PRNGKey(seed)


def eval_key(eval_seed: int) -> jax.Array:
    """Key of every evaluation (the same key for the initial and the final players: paired samples)."""
    return jax.random.PRNGKey(eval_seed)
