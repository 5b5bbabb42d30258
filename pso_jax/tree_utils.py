"""Pytree helpers: masks, stacking and particle-axis selection (as optax's).

Leaves that the swarm does not move are represented by ``None`` in the swarmed tree
and by their value in the frozen tree, as equinox's ``partition``/``combine`` do, so
a frozen backbone is stored once and never copied per particle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _is_none(x: Any) -> bool:
    return x is None


def partition(tree: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """Split ``tree`` into (swarmed, frozen) by a boolean leaf mask.

    Args:
      tree: any pytree of arrays.
      mask: a pytree of Python bools with the structure of ``tree`` (True = the
        swarm moves this leaf).

    Returns:
      ``(swarmed, frozen)``: two trees of ``tree``'s structure, with ``None`` where
      the leaf belongs to the other part.

    >>> s, f = partition({"a": 1.0, "b": 2.0}, {"a": True, "b": False})
    >>> s, f
    ({'a': 1.0, 'b': None}, {'a': None, 'b': 2.0})
    """
    swarmed = jax.tree.map(lambda x, m: x if m else None, tree, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, tree, mask)
    return swarmed, frozen


def combine(swarmed: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of :func:`partition`: fill one tree's ``None`` leaves from the other.

    >>> combine({"a": 1.0, "b": None}, {"a": None, "b": 2.0})
    {'a': 1.0, 'b': 2.0}
    """
    return jax.tree.map(
        lambda s, f: f if s is None else s, swarmed, frozen, is_leaf=_is_none
    )


def tree_where(cond: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    """Select per particle: ``cond`` is ``[P]`` bool, leaves of x/y are ``[P, ...]``."""

    def sel(a, b):
        c = cond.reshape(cond.shape + (1,) * (a.ndim - cond.ndim))
        return jnp.where(c, a, b)

    return jax.tree.map(sel, x, y)


def tree_take(tree: PyTree, index: jax.Array) -> PyTree:
    """Index the particle axis of every leaf: ``leaf[index]``."""
    return jax.tree.map(lambda a: a[index], tree)


def tree_stack(trees: list[PyTree]) -> PyTree:
    """Stack a list of identical pytrees along a new leading particle axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def tree_unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`tree_stack`."""
    leaves, treedef = jax.tree.flatten(tree)
    n = leaves[0].shape[0]
    return [treedef.unflatten([leaf[i] for leaf in leaves]) for i in range(n)]


def tree_size(tree: PyTree) -> int:
    """Total number of array elements in a pytree (static)."""
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(tree))


def resolve_mask(mask: PyTree | Callable[[PyTree], PyTree] | None, tree: PyTree):
    """Turn ``None`` / a callable / a bool tree into a bool tree matching ``tree``.

    Raises:
      ValueError: if the mask's structure does not match ``tree`` or a leaf is not
        a Python bool.
    """
    if mask is None:
        return jax.tree.map(lambda _: True, tree)
    if callable(mask):
        mask = mask(tree)
    tree_def = jax.tree.structure(tree)
    mask_def = jax.tree.structure(mask)
    if tree_def != mask_def:
        raise ValueError(
            f"mask structure {mask_def} does not match the parameters' {tree_def}"
        )
    for m in jax.tree.leaves(mask):
        if not isinstance(m, bool):
            raise ValueError(f"mask leaves must be Python bools, got {m!r}")
    if not any(jax.tree.leaves(mask)):
        raise ValueError("mask selects no leaf: the swarm would have nothing to move")
    return mask
