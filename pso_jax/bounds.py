"""Position bounds and their handling, per parameter leaf.

Handlers (Helwig, Branke & Mostaghim, 2013, "Experimental analysis of bound
handling techniques in particle swarm optimization"):

- ``"clip"``: put the coordinate on the violated bound and zero its velocity
  (absorbing walls).
- ``"reflect"``: mirror the coordinate back into the box and reverse its velocity.
- ``"periodic"``: wrap the coordinate around (a torus); velocity unchanged.
- ``"resample"``: draw the violating coordinate afresh, uniformly in the box, and
  zero its velocity.

Every handler leaves positions inside ``[low, high]``; leaves with infinite bounds
are never touched.
"""

from __future__ import annotations

import jax.numpy as jnp

BOUND_HANDLERS = ("clip", "reflect", "periodic", "resample")


def apply(handling: str, x, v, low, high, u=None):
    """Return ``(x, v)`` with ``x`` inside ``[low, high]``.

    Args:
      handling: one of :data:`BOUND_HANDLERS`.
      x: ``[P, ...]`` positions after the move.
      v: ``[P, ...]`` velocities of that move.
      low, high: arrays broadcastable to one particle's leaf (finite).
      u: ``[P, ...]`` uniforms in [0, 1), needed by ``"resample"`` only.

    >>> import jax.numpy as jnp
    >>> apply("reflect", jnp.array([1.5, -0.25]), jnp.array([1.0, -1.0]), 0.0, 1.0)[0]
    Array([0.5 , 0.25], dtype=float32)
    """
    below, above = x < low, x > high
    out = below | above
    if handling == "clip":
        return jnp.clip(x, low, high), jnp.where(out, jnp.zeros_like(v), v)
    if handling == "reflect":
        xr = jnp.where(below, 2 * low - x, jnp.where(above, 2 * high - x, x))
        # A jump of more than one box width would reflect out the other side.
        return jnp.clip(xr, low, high), jnp.where(out, -v, v)
    if handling == "periodic":
        width = high - low
        wrapped = low + jnp.mod(x - low, width)
        # mod can round up to exactly `width` in floating point.
        wrapped = jnp.where(wrapped >= high, low, wrapped)
        return jnp.where(out, wrapped, x), v
    if handling == "resample":
        fresh = low + u * (high - low)
        return jnp.where(out, fresh, x), jnp.where(out, jnp.zeros_like(v), v)
    raise ValueError(f"bound_handling={handling!r}: expected one of {BOUND_HANDLERS}")
