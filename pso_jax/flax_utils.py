"""Flax (linen) adapters: swarms of parameter sets for one model.

A swarm of models is one params pytree whose every leaf has a leading particle
axis ``P``; the model itself stays a single-particle ``flax.linen.Module`` and is
evaluated with ``jax.vmap(apply_fn(model), in_axes=(0, None))(swarm_params,
batch)``, every particle seeing the same batch (evosax's
``problems/vision/torchvision.py`` does the same).

To swarm over only part of a pretrained network (the head), build a mask with
:func:`head_mask` and split with :func:`pso_jax.tree_utils.partition`: the frozen
part is stored once, not copied per particle, and vmap computes it once.

NNX models: split at the boundary, ``graphdef, state = nnx.split(model)``, and
vmap ``lambda s, x: nnx.merge(graphdef, s)(x)`` over a stacked ``state``; the
functions here apply to that ``state`` pytree unchanged (flax
``docs_nnx/guides/jax_and_nnx_transforms.rst``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pso_jax.tree_utils import (
    abstract_tree,
    check_tree_matches,
    path_names,
    tree_stack,
    tree_unstack,
)
from pso_jax.types import check_int, check_key

PyTree = Any

__all__ = [
    "COMPUTE_DTYPES",
    "with_compute_dtype",
    "apply_fn",
    "head_mask",
    "init_params",
    "init_swarm_params",
    "load_params",
    "save_params",
    "stack",
    "unstack",
]


def init_params(model: nn.Module, key: jax.Array, sample_input: Any) -> PyTree:
    """Initialise one particle's parameters.

    Uses ``model.lazy_init``: only the parameter initialisers run, not the
    forward pass, so ``sample_input`` costs nothing and may be a
    ``jax.ShapeDtypeStruct``. The values equal ``model.init(key, x)["params"]``.

    Args:
      model: an unbound linen module.
      key: a PRNG key (typed, ``jax.random.key``).
      sample_input: an example input, e.g. one clip ``[1, T, H, W, C]`` (only its
        shape and dtype matter).

    Returns:
      The ``"params"`` collection, no particle axis.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> params = init_params(nn.Dense(3), jax.random.key(0), jnp.ones((1, 2)))
    >>> jax.tree.map(jnp.shape, params)
    {'bias': (3,), 'kernel': (2, 3)}
    """
    return model.lazy_init(key, sample_input)["params"]


def init_swarm_params(
    model: nn.Module, key: jax.Array, num_particles: int, sample_input: Any
) -> PyTree:
    """Initialise ``num_particles`` independent parameter sets, stacked.

    Particle ``i`` is ``init_params(model, jax.random.split(key, P)[i], x)``: the
    same key gives the same swarm, different keys different swarms.

    Args:
      model: an unbound linen module.
      key: a PRNG key.
      num_particles: ``P``.
      sample_input: an example input shared by all particles (no particle axis).

    Returns:
      The params pytree with a leading particle axis: leaves ``[P, ...]``.

    Raises:
      ValueError: for a ``key`` that is not one PRNG key, or ``num_particles``
        that is not an integer >= 1.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> swarm = init_swarm_params(nn.Dense(3), jax.random.key(0), 4, jnp.ones((1, 2)))
    >>> swarm["kernel"].shape
    (4, 2, 3)
    """
    check_key(key)
    num_particles = check_int("num_particles", num_particles, minimum=1)
    keys = jax.random.split(key, num_particles)
    return jax.vmap(lambda k: init_params(model, k, sample_input))(keys)


def stack(params_list: Sequence[PyTree]) -> PyTree:
    """Stack identical params pytrees into one with a leading particle axis.

    Raises:
      ValueError: for an empty list.

    >>> import jax.numpy as jnp
    >>> stack([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}])["w"].shape
    (2, 2)
    """
    params_list = list(params_list)
    if not params_list:
        raise ValueError("params_list is empty: expected at least one params tree")
    return tree_stack(params_list)


def unstack(stacked: PyTree) -> list[PyTree]:
    """Split a stacked params pytree ``[P, ...]`` into a list of ``P`` pytrees.

    >>> import jax.numpy as jnp
    >>> len(unstack({"w": jnp.zeros((3, 2))}))
    3
    """
    return tree_unstack(stacked)


def apply_fn(model: nn.Module) -> Callable[[PyTree, Any], Any]:
    """Return ``fn(params, x) = model.apply({'params': params}, x)``, one particle.

    Vmap it over the particle axis for a swarm: ``jax.vmap(apply_fn(model),
    in_axes=(0, None))(swarm_params, x)``.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> model = nn.Dense(3)
    >>> params = init_params(model, jax.random.key(0), jnp.ones((1, 2)))
    >>> apply_fn(model)(params, jnp.ones((5, 2))).shape
    (5, 3)
    """

    def fn(params: PyTree, x: Any) -> Any:
        return model.apply({"params": params}, x)

    return fn


COMPUTE_DTYPES = ("float32", "bfloat16")


def with_compute_dtype(
    apply_fn: Callable[[PyTree, Any], Any], dtype: str = "bfloat16"
) -> Callable[[PyTree, Any], Any]:
    """``apply_fn`` computing in ``dtype`` (mixed precision), returning float32.

    The parameters and the floating-point inputs are cast to ``dtype`` on the
    way in, the outputs to float32 on the way out. Gradients reach the
    float32 parameters through the casts, so everything a swarm or an optax
    optimizer keeps (positions, velocities, personal bests, Adam's moments)
    stays float32; only the model's forward (and backward) pass runs in
    ``dtype``. ``"float32"`` returns ``apply_fn`` itself.

    >>> import jax.numpy as jnp
    >>> f = with_compute_dtype(lambda p, x: (p["w"] * x).sum(), "bfloat16")
    >>> f({"w": jnp.ones(3)}, jnp.full(3, 1 / 3)).dtype
    dtype('float32')

    Raises:
      ValueError: for a dtype not in :data:`COMPUTE_DTYPES`.
    """
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {COMPUTE_DTYPES}")
    if dtype == "float32":
        return apply_fn
    compute = jnp.dtype(dtype)

    def cast(tree, to):
        return jax.tree.map(
            lambda a: a.astype(to) if jnp.issubdtype(a.dtype, jnp.floating) else a,
            tree,
        )

    def fn(params, x):
        return cast(apply_fn(cast(params, compute), cast(x, compute)), jnp.float32)

    return fn


def head_mask(params: PyTree, head_names: Sequence[str] = ("head",)) -> PyTree:
    """Mark the leaves that belong to the named modules (the head).

    A leaf is selected when any module on its path is named in ``head_names``.
    Use the mask to swarm over the head of a pretrained backbone only, with
    :func:`pso_jax.tree_utils.partition` (swarmed) and ``combine`` (to apply).

    Args:
      params: a params pytree (with or without a particle axis).
      head_names: module names, e.g. ``("head",)`` for
        :func:`pso_jax.models.make_model`'s final Dense.

    Returns:
      A pytree of Python bools with the structure of ``params``.

    Raises:
      ValueError: if no leaf matches (likely a misspelt name).

    >>> params = {"body": {"kernel": 1.0}, "head": {"kernel": 2.0, "bias": 0.0}}
    >>> head_mask(params)
    {'body': {'kernel': False}, 'head': {'bias': True, 'kernel': True}}
    """
    names = set(head_names)
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: bool(names.intersection(path_names(path))), params
    )
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"no parameter lies under a module named in {head_names}")
    return mask


def save_params(
    path: str | os.PathLike, params: PyTree, *, force: bool = False
) -> None:
    """Write a params pytree to a directory with orbax-checkpoint.

    The write is atomic (orbax writes a temporary directory and renames it when
    complete), so a crash never leaves a half-written checkpoint at ``path``.

    Args:
      path: the checkpoint directory; made absolute. Must not exist unless
        ``force``.
      params: a pytree of arrays (any leading particle axis is kept).
      force: overwrite an existing checkpoint.

    Raises:
      FileExistsError: if ``path`` exists and not ``force``.

    >>> import os, tempfile, jax.numpy as jnp
    >>> params = {"head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     save_params(os.path.join(tmp, "head"), params)
    ...     print(sorted(os.listdir(tmp)))
    ['head']
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not force:
        raise FileExistsError(f"checkpoint path {path} exists (pass force=True)")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=force)


def load_params(path: str | os.PathLike, template: PyTree | None = None) -> PyTree:
    """Read params written by :func:`save_params`, e.g. a pretrained backbone.

    Args:
      path: the checkpoint directory.
      template: optional pytree of arrays or ``jax.ShapeDtypeStruct`` with the
        expected structure, shapes and dtypes (e.g. ``init_params(...)`` or its
        ``jax.eval_shape``); the result then has exactly its structure.

    Returns:
      The params pytree (``jax.Array`` leaves).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the checkpoint does not match ``template``; the message names
        the first mismatching key path.

    >>> import os, tempfile, jax.numpy as jnp
    >>> params = {"head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     save_params(os.path.join(tmp, "head"), params)
    ...     restored = load_params(os.path.join(tmp, "head"), template=params)
    >>> restored["head"]["kernel"].shape, float(restored["head"]["kernel"].sum())
    ((4, 2), 8.0)
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        if template is None:
            return ckptr.restore(path)
        stored = ckptr.metadata(path).item_metadata
        check_tree_matches(stored, template, f"params at {path}")
        return ckptr.restore(path, abstract_tree(template))
