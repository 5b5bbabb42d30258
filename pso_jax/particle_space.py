"""Particle spaces: what a particle's coordinates are, and how they become a model.

By default (``"full"``) a particle is one whole set of model parameters, so the
swarm's state is ``3 P D`` floats (position, velocity, personal best) and pure
PSO searches all ``D`` weights at once. The two other spaces let ``P`` particles
share one stored set of weights, the *base* ``θ₀``, and give each particle a few
coordinates:

- ``subspace`` (Li et al., 2018, "Measuring the intrinsic dimension of
  objective landscapes"): ``θ_i = θ₀ + s ⊙ (M z_i)`` with ``z_i ∈ R^d``. ``M``
  (``D x d``, entries ``N(0, 1/d)``) is never stored: every forward pass draws
  it block by block from :func:`pso_jax.random.normal`'s counter-based
  generator (the same numbers every time, from the space's ``seed`` and the
  base's ``epoch``). ``s`` is each leaf's standard deviation in ``θ₀`` (0.1 for
  a constant leaf: biases, norm scales), so a unit step of ``z`` moves every
  layer by its own scale. State: ``O(P d)``.
- ``lowrank`` (the LoRA / EGGROLL form; Hu et al., 2021; "Evolution
  Strategies at the Hyperscale", 2025): every kernel of two or more axes,
  reshaped to ``[m, n]`` (a dense kernel ``[in, out]`` as it is; a 3-D conv
  kernel ``[kt, kh, kw, Ci, Co]`` as ``[kh kw Ci, kt Co]`` by default, so each
  temporal slice gets its own rank-``r`` product and the factors are fewer
  numbers: ``layout="out"`` gives ``[kt kh kw Ci, Co]``), becomes ``W₀ + (s/√r) A
  Bᵀ`` with per-particle factors ``A [m, r]``, ``B [n, r]``; the base's ``A``
  are fixed ``N(0, 1)`` directions and ``B = 0``, so the base particle *is*
  the base model. Leaves of fewer axes (biases, norms) are swarmed whole, as
  an offset ``s δ``. State: ``O(P r (m + n))`` per kernel.

A space plugs into the rest of the library through a wrapper tree, so masks,
topologies, variants, sharding and checkpoints need nothing new: the swarm is
built over ``template = space.template(params)``, ``{"base": params, "coords":
coords}``, with ``mask=space.mask(template)`` (the base is frozen: stored once,
in ``PSOState.frozen_params``), and evaluates ``space.wrap(apply_fn)``, which
decodes ``base`` and ``coords`` into the model's parameters. The model the run
returns is ``space.decode(tree)`` (:func:`decode_best`).

:func:`recenter` (``subspace`` only) folds the swarm's best into the base and
re-expresses every particle around it (``z - z_best``): each particle's function
is unchanged up to float rounding. With ``redraw=True`` the subspace is drawn
anew through the new centre (``epoch + 1``): the best keeps its function, the
others keep their coordinates in fresh directions, and their personal bests are
forgotten (each is re-scored at its next evaluation). A swarm that re-centres
every few steps searches one random subspace after another around a centre that
keeps improving, instead of one fixed ``d``-dimensional slice through ``θ₀``.
A rank-``r`` product cannot re-express every particle around a new centre
exactly, so ``lowrank`` has no re-centring.

>>> import jax, jax.numpy as jnp
>>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
>>> space = subspace(4)
>>> tree = space.template(params)
>>> jax.tree.map(jnp.shape, tree["coords"])
{'z': (4,)}
>>> bool((space.decode(tree)["w"] == params["w"]).all())  # z = 0 is the base
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pso_jax import random as prandom
from pso_jax.fitness import worst
from pso_jax.pso import best_solution
from pso_jax.swarm_axis import invariant
from pso_jax.types import PyTree, check_int

PARTICLE_SPACES = ("full", "lowrank", "subspace")
# How lowrank factors a 3-D conv kernel [kt, kh, kw, Ci, Co] (see lowrank).
LOWRANK_LAYOUTS = ("time_out", "out")

# The scale of a leaf that is constant in the base (zero biases, unit norm
# scales): its standard deviation is 0, so it gets this one.
CONSTANT_LEAF_SCALE = 0.1

# Rows of M drawn at once in the subspace decode: bounds its transient memory
# to _BLOCK_ROWS x (the largest leaf) floats, whatever d is.
_BLOCK_ROWS = 128


class ParticleSpace(NamedTuple):
    """A particle space (:func:`make_space`).

    Attributes:
      name: one of :data:`PARTICLE_SPACES`.
      template: ``template(params) -> {"base": ..., "coords": ...}``: the
        wrapper tree of the base particle (``params`` itself for ``"full"``).
      decode: ``decode(tree) -> params``: one particle's model parameters.
      config: the space's static settings (rank, dimension, seed).
    """

    name: str
    template: Callable[[PyTree], PyTree]
    decode: Callable[[PyTree], PyTree]
    config: dict

    def mask(self, template: PyTree) -> PyTree | None:
        """The swarm's mask over ``template``: the coordinates move, the base
        is frozen (``None`` for ``"full"``: everything moves)."""
        if self.name == "full":
            return None
        return {
            "base": jax.tree.map(lambda _: False, template["base"]),
            "coords": jax.tree.map(lambda _: True, template["coords"]),
        }

    def wrap(self, apply_fn: Callable[[PyTree, Any], Any]) -> Callable:
        """``apply_fn(params, x)`` of one particle as a function of its tree."""
        if self.name == "full":
            return apply_fn
        decode = self.decode

        def apply_tree(tree, x):
            return apply_fn(decode(tree), x)

        return apply_tree


def make_space(
    name: str = "full",
    *,
    rank: int = 1,
    dim: int = 256,
    seed: int = 0,
    layout: str = "time_out",
) -> ParticleSpace:
    """The particle space ``name`` (see the module docstring).

    Args:
      name: ``"full"``, ``"lowrank"`` or ``"subspace"``.
      rank: ``r`` of ``lowrank`` (>= 1).
      dim: ``d`` of ``subspace`` (>= 1).
      seed: draws ``lowrank``'s base directions ``A`` and ``subspace``'s ``M``.
      layout: how ``lowrank`` factors 3-D conv kernels (:func:`lowrank`).

    Raises:
      ValueError: naming the bad value.
    """
    if name not in PARTICLE_SPACES:
        raise ValueError(f"particle space {name!r}: expected one of {PARTICLE_SPACES}")
    rank = check_int("rank", rank, minimum=1)
    dim = check_int("dim", dim, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    if name == "full":
        return ParticleSpace("full", lambda p: p, lambda t: t, {})
    if name == "subspace":
        return subspace(dim, seed=seed)
    return lowrank(rank, seed=seed, layout=layout)


def _scale(leaf: jax.Array) -> jax.Array:
    """``s``: the leaf's standard deviation, or :data:`CONSTANT_LEAF_SCALE`."""
    std = jnp.std(jnp.asarray(leaf, jnp.float32))
    return jnp.where(std > 0, std, CONSTANT_LEAF_SCALE)


def _base(params: PyTree) -> dict:
    return {
        "params": params,
        "scale": jax.tree.map(_scale, params),
        "epoch": jnp.zeros((), jnp.int32),
    }


def subspace(dim: int, *, seed: int = 0) -> ParticleSpace:
    """``θ = θ₀ + s ⊙ (M z)``, ``z ∈ R^dim`` (see the module docstring)."""

    def template(params):
        return {"base": _base(params), "coords": {"z": jnp.zeros((dim,), jnp.float32)}}

    def decode(tree):
        base, z = tree["base"], tree["coords"]["z"]
        key = jax.random.fold_in(jax.random.key(seed), base["epoch"])
        leaves, treedef = jax.tree.flatten(base["params"])
        scales = jax.tree.leaves(base["scale"])
        out = [
            leaf
            + (s * _project(jax.random.fold_in(key, i), z, leaf.size))
            .reshape(leaf.shape)
            .astype(leaf.dtype)
            for i, (leaf, s) in enumerate(zip(leaves, scales, strict=True))
        ]
        return jax.tree.unflatten(treedef, out)

    return ParticleSpace("subspace", template, decode, {"dim": dim, "seed": seed})


def _project(key, z: jax.Array, size: int) -> jax.Array:
    """``z @ M`` for this leaf's ``M [d, size]`` (entries ``N(0, 1/d)``), drawn
    :data:`_BLOCK_ROWS` rows at a time (``row_offset``: the same rows as one
    draw of the whole matrix), so no ``[d, size]`` array is ever held."""
    d = z.shape[0]
    z = z.astype(jnp.float32) / math.sqrt(d)
    if d <= _BLOCK_ROWS:
        return z @ prandom.normal(key, (d, size))
    blocks = -(-d // _BLOCK_ROWS)
    zb = jnp.pad(z, (0, blocks * _BLOCK_ROWS - d)).reshape(blocks, _BLOCK_ROWS)

    def body(acc, i):
        rows = prandom.normal(key, (_BLOCK_ROWS, size), row_offset=i * _BLOCK_ROWS)
        return acc + zb[i] @ rows, None

    acc, _ = jax.lax.scan(body, jnp.zeros((size,), jnp.float32), jnp.arange(blocks))
    return acc


def _factored(leaf) -> bool:
    return jnp.ndim(leaf) >= 2


def _time_out(shape: tuple[int, ...], layout: str) -> bool:
    """Whether a kernel of ``shape`` is factored as ``[kh kw Ci, kt Co]``."""
    return layout == "time_out" and len(shape) == 5


def _matrix_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """``(m, n)`` of the matrix a kernel of ``shape`` is factored as."""
    if _time_out(shape, layout):
        return math.prod(shape[1:-1]), shape[0] * shape[-1]
    return math.prod(shape[:-1]), shape[-1]


def _to_kernel(delta: jax.Array, shape: tuple[int, ...], layout: str) -> jax.Array:
    """The ``[m, n]`` product of :func:`_matrix_shape` back in the kernel's axes."""
    if _time_out(shape, layout):
        kt, kh, kw, ci, co = shape
        return delta.reshape(kh, kw, ci, kt, co).transpose(3, 0, 1, 2, 4)
    return delta.reshape(shape)


def lowrank(rank: int, *, seed: int = 0, layout: str = "time_out") -> ParticleSpace:
    """``W = W₀ + (s/√r) A Bᵀ`` per kernel, offsets for the rest (module docstring).

    ``layout`` is how a 3-D conv kernel ``[kt, kh, kw, Ci, Co]`` becomes the
    ``[m, n]`` matrix that is factored: ``"time_out"`` (default)
    ``[kh kw Ci, kt Co]``, ``"out"`` ``[kt kh kw Ci, Co]`` (every other kernel,
    dense or not 5-D, is ``[prod(shape[:-1]), shape[-1]]`` in both).
    """
    if layout not in LOWRANK_LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LOWRANK_LAYOUTS}")

    def template(params):
        leaves, treedef = jax.tree.flatten(params)
        key = jax.random.key(seed)
        coords = []
        for i, leaf in enumerate(leaves):
            if _factored(leaf):
                m, n = _matrix_shape(leaf.shape, layout)
                a = prandom.normal(jax.random.fold_in(key, i), (m, rank))
                coords.append({"a": a, "b": jnp.zeros((n, rank), jnp.float32)})
            else:
                coords.append({"delta": jnp.zeros(jnp.shape(leaf), jnp.float32)})
        return {"base": _base(params), "coords": jax.tree.unflatten(treedef, coords)}

    def decode(tree):
        base = tree["base"]
        leaves, treedef = jax.tree.flatten(base["params"])
        scales = jax.tree.leaves(base["scale"])
        coords = treedef.flatten_up_to(tree["coords"])
        out = []
        for leaf, s, c in zip(leaves, scales, coords, strict=True):
            if "a" in c:
                product = (s / math.sqrt(rank)) * (c["a"] @ c["b"].T)
                delta = _to_kernel(product, leaf.shape, layout)
            else:
                delta = s * c["delta"]  # the leaf's own shape
            out.append(leaf + delta.astype(leaf.dtype))
        return jax.tree.unflatten(treedef, out)

    config = {"rank": rank, "seed": seed, "layout": layout}
    return ParticleSpace("lowrank", template, decode, config)


def decode_best(space: ParticleSpace, swarm) -> PyTree:
    """The model parameters of a swarm's best point (``PSOState``)."""
    return space.decode(best_solution(swarm))


def recenter(space: ParticleSpace, swarm, *, redraw: bool = False, maximize=False):
    """Fold the swarm's best into the base; every particle re-expressed around it.

    ``swarm`` is a ``PSOState`` built over ``space.template(...)`` with
    ``space.mask``. Without ``redraw`` every particle's parameters are unchanged
    (up to float rounding); with it the subspace is drawn anew through the new
    base: the best keeps its parameters exactly (its coordinates become 0), the
    others keep their coordinates (so the swarm keeps its spread) in new
    directions, and every personal best but the swarm's is forgotten (fitness
    set to the worst value, so the next evaluation replaces it).

    Raises:
      ValueError: for a space other than ``"subspace"``.
    """
    if space.name != "subspace":
        raise ValueError(
            f"recenter: particle space {space.name!r} cannot be re-centred "
            "exactly; only 'subspace' can"
        )
    frozen = swarm.frozen_params
    best_z = swarm.best_params["coords"]["z"]  # [d]
    new_params = space.decode({"base": frozen["base"], "coords": {"z": best_z}})
    # In shard_map the best is typed as varying over the particles (equal on
    # every device): the base stays replicated, exactly.
    new_params = jax.tree.map(invariant, new_params)
    base = dict(frozen["base"], params=new_params)
    if redraw:
        base["epoch"] = frozen["base"]["epoch"] + 1

    def shift(tree):
        if tree is None:
            return None
        z = tree["coords"]["z"]
        return {"base": tree["base"], "coords": {"z": z - best_z}}

    out = swarm.replace(
        positions=shift(swarm.positions),
        pbest_params=shift(swarm.pbest_params),
        best_params=shift(swarm.best_params),
        frozen_params={"base": base, "coords": frozen["coords"]},
    )
    if redraw:
        bad = jnp.full_like(swarm.fitness, worst(maximize))
        out = out.replace(fitness=bad, pbest_fitness=bad)
    return out


def state_floats_per_particle(space: ParticleSpace, params: PyTree) -> int:
    """Floats one particle adds to a swarm's state: its coordinates, 3 times
    (position, velocity, personal best); the base is stored once."""
    tree = jax.eval_shape(space.template, params)
    coords = tree if space.name == "full" else tree["coords"]
    return 3 * sum(math.prod(x.shape) for x in jax.tree.leaves(coords))
