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
- :func:`check_output`: the vmapped output is one real scalar per particle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pso_jax.tree_utils import combine
from pso_jax.types import PyTree, is_real_dtype


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


def check_output(out: Any, num_particles: int | None = None) -> None:
    """Check a fitness output: one real scalar per particle.

    Only static shapes and dtypes are read (no device work; tracers and
    ``jax.eval_shape`` results pass).

    Args:
      out: what :func:`swarm_fitness` returned for ``num_particles`` particles
        (a ``[P]`` array is expected), or, with ``num_particles=None``, what the
        fitness returned for one particle (a ``()`` array is expected).
      num_particles: ``P`` (the rows evaluated here), or ``None``.

    Raises:
      ValueError: naming what ``fitness_fn`` returned per particle: a pytree
        (``(loss, aux)``), a shape other than ``()`` (a per-example ``[B]``
        loss: take its mean), or a dtype that is not real.

    >>> import jax.numpy as jnp
    >>> check_output(jnp.zeros((4, 8)), 4)
    Traceback (most recent call last):
    ...
    ValueError: fitness_fn must return a scalar for one particle; it returned shape (8,) per particle (a per-example loss? return its mean)
    """  # noqa: E501
    lead = 0 if num_particles is None else 1  # the particle axis
    if not (hasattr(out, "shape") and hasattr(out, "dtype")):
        per_particle = jax.tree.map(lambda a: tuple(jnp.shape(a)[lead:]), out)
        raise ValueError(
            "fitness_fn must return a scalar for one particle; it returned "
            f"{type(out).__name__} {per_particle} (shapes per particle): return "
            "only the fitness"
        )
    if out.shape != ((num_particles,) if lead else ()):
        raise ValueError(
            "fitness_fn must return a scalar for one particle; it returned shape "
            f"{tuple(out.shape[lead:])} per particle (a per-example loss? return "
            "its mean)"
        )
    if not is_real_dtype(out.dtype):
        raise ValueError(
            f"fitness_fn returned dtype {out.dtype}: expected a real number (float "
            "or int) for one particle"
        )


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
