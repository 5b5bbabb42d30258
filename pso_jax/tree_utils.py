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
import numpy as np

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


def leaf_paths(tree: PyTree) -> list[str]:
    """``jax.tree_util.keystr`` of every leaf's path, in ``jax.tree.leaves`` order.

    A tree that is a single leaf has the path ``"<root>"`` (for error messages).

    >>> leaf_paths({"a": 1, "b": [2, 3]})
    ["['a']", "['b'][0]", "['b'][1]"]
    >>> leaf_paths(1.0)
    ['<root>']
    """
    return [
        jax.tree_util.keystr(p) or "<root>"
        for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def along_rows(v: jax.Array, like: jax.Array) -> jax.Array:
    """``v`` (``[P]``, one value per particle) shaped to broadcast against ``like``.

    ``like`` is a ``[P, ...]`` leaf; trailing axes of size one are added to ``v``.

    >>> import jax.numpy as jnp
    >>> along_rows(jnp.arange(3), jnp.zeros((3, 4, 5))).shape
    (3, 1, 1)
    """
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def tree_where(cond: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    """Select per particle: ``cond`` is ``[P]`` bool, leaves of x/y are ``[P, ...]``.

    >>> import jax.numpy as jnp
    >>> x, y = {"w": jnp.ones((3, 2))}, {"w": jnp.zeros((3, 2))}
    >>> tree_where(jnp.array([True, False, True]), x, y)["w"][:, 0].tolist()
    [1.0, 0.0, 1.0]
    """

    def sel(a, b):
        return jnp.where(along_rows(cond, a), a, b)

    return jax.tree.map(sel, x, y)


def tree_take(tree: PyTree, index: jax.Array) -> PyTree:
    """Index the particle axis of every leaf: ``leaf[index]``.

    >>> import jax.numpy as jnp
    >>> swarm = {"w": jnp.arange(6.0).reshape(3, 2)}  # 3 particles
    >>> tree_take(swarm, 2)["w"].tolist()
    [4.0, 5.0]
    >>> tree_take(swarm, jnp.array([0, 0]))["w"].shape
    (2, 2)
    """
    return jax.tree.map(lambda a: a[index], tree)


def tree_stack(trees: list[PyTree]) -> PyTree:
    """Stack a list of identical pytrees along a new leading particle axis.

    >>> import jax.numpy as jnp
    >>> tree_stack([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}])["w"].shape
    (2, 2)
    """
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def tree_unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`tree_stack`.

    >>> import jax.numpy as jnp
    >>> [p["w"].tolist() for p in tree_unstack({"w": jnp.arange(4.0).reshape(2, 2)})]
    [[0.0, 1.0], [2.0, 3.0]]
    """
    leaves, treedef = jax.tree.flatten(tree)
    n = leaves[0].shape[0]
    return [treedef.unflatten([leaf[i] for leaf in leaves]) for i in range(n)]


def tree_size(tree: PyTree) -> int:
    """Total number of array elements in a pytree (static).

    >>> import jax.numpy as jnp
    >>> tree_size({"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2), "none": None})
    8
    """
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(tree))


def resolve_mask(mask: PyTree | Callable[[PyTree], PyTree] | None, tree: PyTree):
    """Turn ``None`` / a callable / a bool tree into a bool tree matching ``tree``.

    The mask may be a *prefix* of ``tree``: a bool where ``tree`` has a whole
    subtree applies to every leaf under it, so ``{"backbone": False, "head":
    True}`` selects the head of nested params, and a single ``True`` everything.
    Leaves are Python (or numpy) bools, one per parameter leaf or subtree: the
    mask decides which leaves are stored per particle, so it is static.

    Raises:
      ValueError: if the mask is not a prefix of ``tree``'s structure, a leaf is
        not a bool (naming its path and value), or it selects no leaf.

    >>> params = {"body": {"w": 1.0, "b": 0.0}, "head": 2.0}
    >>> resolve_mask(None, params)
    {'body': {'b': True, 'w': True}, 'head': True}
    >>> resolve_mask({"body": False, "head": True}, params)  # a prefix
    {'body': {'b': False, 'w': False}, 'head': True}
    >>> resolve_mask(lambda p: {"body": {"w": True, "b": False}, "head": False}, params)
    {'body': {'b': False, 'w': True}, 'head': False}
    """
    if mask is None:
        return jax.tree.map(lambda _: True, tree)
    if callable(mask):
        mask = mask(tree)
    for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
        if not isinstance(m, bool | np.bool_):
            raise ValueError(
                f"mask leaf {jax.tree_util.keystr(path) or '<root>'} must be a "
                f"bool (one per parameter leaf or subtree), got {m!r}"
            )
    try:
        full = jax.tree.map(
            lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask, tree
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"mask structure {jax.tree.structure(mask)} is not a prefix of the "
            f"parameters' {jax.tree.structure(tree)}{_mismatch_at(e)}: give one "
            "bool per leaf, or per subtree"
        ) from None
    if not any(jax.tree.leaves(full)):
        raise ValueError("mask selects no leaf: the swarm would have nothing to move")
    return full


def _mismatch_at(error: Exception) -> str:
    """`` (they differ at ['b'])`` from a ``jax.tree.map`` structure error."""
    lines = str(error).splitlines()
    if len(lines) > 1 and lines[1].strip().startswith("tree_map tree"):
        where = lines[1].strip().removeprefix("tree_map tree") or "the root"
        return f" (they differ at {where})"
    return ""


def path_names(path: tuple[Any, ...]) -> list[str]:
    """The names along a key path (dict keys, attribute names, sequence indices).

    >>> [path_names(p) for p, _ in jax.tree_util.tree_leaves_with_path({"a": [1]})]
    [['a', '0']]
    """
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return names


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(path_names(path)) or "<root>"


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], Any]:
    dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
    return tuple(np.shape(x)), np.dtype(dtype)


def abstract_tree(tree: PyTree) -> PyTree:
    """``jax.ShapeDtypeStruct`` leaves (keeping shardings) for a tree of arrays."""

    def one(x):
        shape, dtype = _shape_dtype(x)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


def check_tree_matches(stored: PyTree, template: PyTree, what: str) -> None:
    """Raise a ValueError naming the first key path where two trees differ.

    Leaves are compared by key path, shape and dtype (arrays, metadata objects
    with ``shape``/``dtype``, or ``jax.ShapeDtypeStruct``).

    Args:
      stored: e.g. a checkpoint's metadata tree.
      template: the expected tree.
      what: the subject of the error message, e.g. ``"checkpoint at /x"``.

    Raises:
      ValueError: on missing or extra leaves, or a shape or dtype mismatch.

    >>> a, b = {"a": np.zeros(2)}, {"a": np.zeros(3)}
    >>> check_tree_matches(a, b, "x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: x does not match the template at 'a': it has float64[2], ...
    """
    got = {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(stored)}
    want = {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(template)}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(
            f"{what} does not match the template: missing {missing}, "
            f"not in the template {extra}"
        )
    for key, w in want.items():
        (gs, gd), (ws, wd) = _shape_dtype(got[key]), _shape_dtype(w)
        if gs != ws or gd != wd:
            raise ValueError(
                f"{what} does not match the template at {key!r}: it has "
                f"{gd}{list(gs)}, the template {wd}{list(ws)}"
            )
