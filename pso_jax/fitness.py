"""Fitness: evaluating a swarm, and the one score every best is ranked by.

- :func:`swarm_fitness`: a one-particle function vmapped over the particle axis,
  every particle on the same batch (``vmap(fn, in_axes=(0, None))``, as evosax's
  problems do).
- :func:`score`: the minimisation key of a fitness value. Lower is better;
  ``sign * fitness`` with ``sign = -1`` when maximising; non-finite values are
  ``+inf``, the worst, so NaN never becomes a best (evosax's
  ``update_best_solution_and_fitness`` does the same).
- :func:`sanitize` and :func:`worst`: a non-finite fitness stored as the worst
  value in the user's sign (``+inf``, or ``-inf`` when maximising).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pso_jax.tree_utils import combine
from pso_jax.types import PyTree


def worst(maximize: bool) -> float:
    """The worst fitness value in the user's sign.

    >>> worst(False), worst(True)
    (inf, -inf)
    """
    return -jnp.inf if maximize else jnp.inf


def score(fitness: jax.Array, maximize: bool) -> jax.Array:
    """Minimisation key of ``fitness``: lower is better, non-finite is ``+inf``.

    >>> import jax.numpy as jnp
    >>> score(jnp.array([1.0, jnp.nan, -jnp.inf]), maximize=True).tolist()
    [-1.0, inf, inf]
    """
    sign = -1.0 if maximize else 1.0
    return jnp.where(jnp.isfinite(fitness), sign * fitness, jnp.inf)


def sanitize(fitness: jax.Array, maximize: bool) -> jax.Array:
    """``fitness`` with non-finite values replaced by the worst value.

    >>> import jax.numpy as jnp
    >>> sanitize(jnp.array([2.0, jnp.nan]), maximize=False).tolist()
    [2.0, inf]
    """
    return jnp.where(jnp.isfinite(fitness), fitness, worst(maximize))


def swarm_fitness(
    fitness_fn: Callable[[PyTree, Any], Any],
    swarmed: PyTree,
    frozen: PyTree,
    batch: Any,
) -> Any:
    """``fitness_fn`` of every particle on one shared ``batch``.

    Args:
      fitness_fn: ``fitness_fn(params, batch)`` for ONE particle's full
        parameters; it may return any pytree (a scalar fitness, logits, ...).
      swarmed: the moved leaves, ``[P, ...]`` (``None`` where frozen).
      frozen: the leaves stored once (``None`` where swarmed).
      batch: passed to every particle unchanged.

    Returns:
      ``fitness_fn``'s outputs with a leading ``[P]`` axis.

    >>> import jax.numpy as jnp
    >>> swarm_fitness(lambda p, b: p["w"] @ b, {"w": jnp.eye(2)}, {"w": None},
    ...               jnp.array([1.0, 2.0])).tolist()
    [1.0, 2.0]
    """

    def one(p, f, b):
        return fitness_fn(combine(p, f), b)

    return jax.vmap(one, in_axes=(0, None, None))(swarmed, frozen, batch)
