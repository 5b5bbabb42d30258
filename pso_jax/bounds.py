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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax.tree_utils import leaf_paths, partition
from pso_jax.types import check_real

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
        return jnp.where(out, wrap(x, low, high), x), v
    if handling == "resample":
        fresh = low + u * (high - low)
        return jnp.where(out, fresh, x), jnp.where(out, jnp.zeros_like(v), v)
    raise ValueError(f"bound_handling={handling!r}: expected one of {BOUND_HANDLERS}")


def wrap(x, low, high):
    """``x`` wrapped onto the torus ``[low, high)`` (periodic walls).

    ``low + (x - low) mod (high - low)``, written with ``floor`` rather than
    ``jnp.mod``: XLA:CPU's remainder is a scalar call per element, which made a
    swarm step with periodic walls 4.2x the unbounded one, against 1.06x now
    (``benchmarks/results/bound_cost.md``, 256 x 1e5). Rounding can
    land a hair outside the box (``floor`` of a quotient that rounded up, or a
    remainder equal to the width): a remainder below zero takes one more width,
    and one that reaches ``high`` goes to ``low``.

    >>> import jax.numpy as jnp
    >>> wrap(jnp.array([1.25, -0.25, 3.5, 1.0]), 0.0, 1.0).tolist()
    [0.25, 0.75, 0.5, 0.0]
    """
    width = high - low
    shifted = x - low
    wrapped = low + (shifted - width * jnp.floor(shifted / width))
    wrapped = jnp.where(wrapped < low, wrapped + width, wrapped)
    wrapped = jnp.where(wrapped >= high, low, wrapped)
    return wrapped.astype(jnp.result_type(x))


def check_pair(bounds: Any) -> None:
    """Check the ``(low, high)`` pair; scalar bounds are checked in full.

    Bounds given as pytrees are checked leaf by leaf by :func:`normalize`, where
    the parameters (and so each leaf's shape and dtype) are known.

    Raises:
      ValueError: not a pair, a scalar bound that is not a finite real number,
        or scalar ``low >= high``.

    >>> check_pair((1.0, 0.0))
    Traceback (most recent call last):
    ...
    ValueError: bounds: low must be < high, got low=1.0, high=0.0
    """
    if not (isinstance(bounds, tuple | list) and len(bounds) == 2):
        raise ValueError(f"bounds must be a (low, high) pair, got {bounds!r}")
    lo, hi = bounds
    for name, b in (("low", lo), ("high", hi)):
        if b is not None and _is_scalar(b):
            check_real(f"bounds {name}", b)
    if (
        lo is not None
        and hi is not None
        and _is_scalar(lo)
        and _is_scalar(hi)
        and not float(lo) < float(hi)
    ):
        raise ValueError(f"bounds: low must be < high, got low={lo}, high={hi}")


def _is_scalar(b) -> bool:
    return np.ndim(b) == 0 and not isinstance(b, dict | list | tuple)


def check_handling(handling: Any) -> None:
    """Raise a ``ValueError`` unless every name in ``handling`` is a handler."""
    for h in [handling] if isinstance(handling, str) else jax.tree.leaves(handling):
        if h not in BOUND_HANDLERS:
            raise ValueError(f"bound_handling={h!r}: expected one of {BOUND_HANDLERS}")


def handler_tree(handling: str | Any, swarmed: Any) -> Any:
    """A per-leaf tree of handler names over ``swarmed`` (``None`` where frozen).

    Names are static: the tree is built while tracing, never stored in a state.
    """
    if isinstance(handling, str):
        return jax.tree.map(lambda _: handling, swarmed)
    return jax.tree.map(
        lambda t, h: None if t is None else h, swarmed, handling, is_leaf=_is_none
    )


def _is_none(x) -> bool:
    return x is None


def normalize(bounds: Any, template: Any, mask_tree: Any) -> tuple[Any, Any]:
    """Per swarmed leaf ``(low, high)`` arrays, or ``None`` for unbounded leaves.

    Args:
      bounds: ``None`` or a ``(low, high)`` pair of scalars or of pytrees of
        ``template``'s structure (``None`` leaves are unbounded).
      template: one particle's parameters.
      mask_tree: the bool swarm mask of ``template``'s structure.

    Returns:
      Two trees of the *swarmed* structure (``None`` at frozen leaves too).

    Raises:
      ValueError: naming the leaf, for bounds that do not match the parameters,
        are not finite, have ``low >= high``, or whose value or range
        ``high - low`` is not finite in the leaf's dtype (``1e5`` on a float16
        leaf, ``(-3e38, 3e38)`` in float32).
    """
    full_def = jax.tree.structure(template)
    n = full_def.num_leaves
    if bounds is None:
        lows = highs = [None] * n
    else:
        check_pair(bounds)

        def per_leaf(b, which):
            if b is None or _is_scalar(b):
                return [b] * n  # one value for every leaf
            try:
                return full_def.flatten_up_to(b)
            except (ValueError, TypeError):
                raise ValueError(
                    f"bounds {which} has structure {jax.tree.structure(b)}, which "
                    f"does not match the parameters' {full_def}"
                ) from None

        lows, highs = per_leaf(bounds[0], "low"), per_leaf(bounds[1], "high")
    masks = jax.tree.leaves(mask_tree)
    pairs = [
        _leaf_bounds(path, t, lo, hi) if m else (None, None)
        for path, t, lo, hi, m in zip(
            leaf_paths(template),
            jax.tree.leaves(template),
            lows,
            highs,
            masks,
            strict=True,
        )
    ]
    swarmed_def = jax.tree.structure(partition(template, mask_tree)[0])
    # Keep only the swarmed positions; None (unbounded) leaves stay None.
    kept = [pair for pair, m in zip(pairs, masks, strict=True) if m]
    return (
        swarmed_def.unflatten([lo for lo, _ in kept]),
        swarmed_def.unflatten([hi for _, hi in kept]),
    )


def _leaf_bounds(path: str, t, lo, hi):
    """One leaf's checked ``(low, high)`` in its dtype, or ``(None, None)``."""
    if lo is None and hi is None:
        return None, None
    if lo is None or hi is None:
        raise ValueError(f"bounds for leaf {path}: give both low and high")
    lo_a = np.asarray(lo, dtype=np.float64)
    hi_a = np.asarray(hi, dtype=np.float64)
    try:
        shape = np.broadcast_shapes(lo_a.shape, hi_a.shape, np.shape(t))
    except ValueError:
        shape = None
    if shape != np.shape(t):
        raise ValueError(
            f"bounds for leaf {path}: low shape {lo_a.shape} and high shape "
            f"{hi_a.shape} do not broadcast to the leaf's shape {np.shape(t)} "
            "(give scalars, or arrays of the parameters' shapes)"
        )
    if not (np.all(np.isfinite(lo_a)) and np.all(np.isfinite(hi_a))):
        raise ValueError(
            f"bounds for leaf {path} must be finite (use None for an unbounded "
            f"leaf), got low={lo_a.min()}, high={hi_a.max()}"
        )
    lo_b, hi_b = np.broadcast_arrays(lo_a, hi_a)
    bad = lo_b >= hi_b
    if np.any(bad):
        i = _first(bad)
        raise ValueError(
            f"bounds for leaf {path}: low must be < high, got low={lo_b[i]} >= "
            f"high={hi_b[i]}{_at(i)}"
        )
    dtype = jnp.result_type(t)
    _check_representable(path, lo_b, hi_b, dtype)
    return jnp.asarray(lo_a, dtype), jnp.asarray(hi_a, dtype)


def _first(bad: np.ndarray) -> tuple[int, ...]:
    """The index of the first True of ``bad``."""
    return tuple(int(j) for j in np.unravel_index(np.argmax(bad), bad.shape))


def _at(i: tuple[int, ...]) -> str:
    """`` at index (1, 2)`` for an element of an array, nothing for a scalar."""
    return f" at index {i}" if i else ""


def _check_representable(path: str, lo: np.ndarray, hi: np.ndarray, dtype) -> None:
    """Raise unless ``lo``, ``hi`` and ``hi - lo`` are finite in the leaf's dtype.

    Bounds that are finite in float64 may not be in the leaf's dtype (``1e5``
    on a float16 leaf, whose max is 65504), and a representable pair may still
    have a range that is not (``(-3e38, 3e38)`` in float32): the initial spread
    ``low + u (high - low)`` and the range velocity clamp would then be inf and
    the swarm dead from its first step.
    """
    fmax = float(jnp.finfo(dtype).max)
    for name, b in (("low", lo), ("high", hi)):
        over = np.abs(b) > fmax
        if np.any(over):
            i = _first(over)
            raise ValueError(
                f"bounds for leaf {path}: {name}={b[i]:.6g}{_at(i)} is not "
                f"finite in the leaf's dtype {np.dtype(dtype).name} (max "
                f"{fmax:.6g}); use smaller bounds or a wider dtype"
            )
    width = hi - lo
    over = width > fmax
    if np.any(over):
        i = _first(over)
        raise ValueError(
            f"bounds for leaf {path}: the range high - low = {width[i]:.6g} (low="
            f"{lo[i]:.6g}, high={hi[i]:.6g}{_at(i)}) is not finite in the "
            f"leaf's dtype {np.dtype(dtype).name} (max {fmax:.6g}); use smaller "
            "bounds or a wider dtype"
        )
