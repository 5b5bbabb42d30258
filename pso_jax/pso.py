"""Particle swarm optimization over arbitrary parameter pytrees.

Kennedy & Eberhart (1995), "Particle swarm optimization", with the inertia weight
of Shi & Eberhart (1998). Each particle is one full set of parameters (any pytree:
a vector, a Flax params dict); per-particle leaves carry a leading particle axis
``P``. Per coordinate (one ``r1``, ``r2`` per coordinate by default):

    v <- w v + c1 r1 (pbest - x) + c2 r2 (nbest - x),    x <- x + v

Variants (``variant=``):

- ``"inertia"``: Shi & Eberhart (1998); defaults ``w = 0.7298``,
  ``c1 = c2 = 1.49618`` (the constriction-equivalent setting).
- ``"constriction"``: Clerc & Kennedy (2002); ``c1 = c2 = 2.05``, ``chi ~ 0.7298``
  (``inertia`` is ignored).
- ``"spso2011"``: Standard PSO 2011 (Clerc, 2011; Zambrano-Bigiarini, Clerc &
  Rojas, CEC 2013): ``w = 1/(2 ln 2)``, ``c = 1/2 + ln 2``, adaptive random
  informants, and the rotation-invariant update that samples the new point
  uniformly in a hypersphere around the centre of gravity ``G`` of ``x``, the
  personal and the neighbourhood best.
- ``"cso"``: Competitive Swarm Optimizer, Cheng & Jin (2015), "A competitive swarm
  optimizer for large scale optimization". No personal bests are stored, so its
  state is a third smaller: each step pairs particles at random, the loser of
  each pair learns from the winner and the swarm mean,
  ``v_l <- r1 v_l + r2 (x_w - x_l) + phi r3 (xbar - x_l)``, and the winner passes
  unchanged. ``social`` is ``phi``; ``inertia``/``cognitive`` are unused.

Minimisation by default; ``maximize=True`` for accuracy-like fitness. Non-finite
fitness is the worst value and never becomes a personal or swarm best.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pso_jax import bounds as bounds_lib
from pso_jax import fitness as fitness_lib
from pso_jax import random as prandom
from pso_jax import sharding as sharding_lib
from pso_jax import topology as topology_lib
from pso_jax import velocity as velocity_lib
from pso_jax.base import StepInfo, SwarmOptimizer, particle_field
from pso_jax.swarm_axis import LocalAxis
from pso_jax.tree_utils import (
    along_rows,
    combine,
    leaf_paths,
    partition,
    resolve_mask,
    tree_where,
)
from pso_jax.types import PRNGKey, PyTree

VARIANTS = ("inertia", "constriction", "spso2011", "cso")
RANDOM_FACTORS = ("per_dimension", "per_particle")
VELOCITY_CLAMPS = (None, "absolute", "range", "init_spread")
STAGNATION_REMEDIES = (None, "resample", "perturb")
RNG_IMPLS = ("hash", "jax")


@struct.dataclass
class PSOHyperParams:
    """Numeric hyperparameters: traced arrays, so changing them never recompiles.

    Attributes:
      inertia: ``w``, inertia weight (unused by ``constriction`` and ``cso``).
      cognitive: ``c1``, pull towards the personal best.
      social: ``c2``, pull towards the neighbourhood best (``phi`` for ``cso``).
      velocity_clamp: ``vmax`` as a multiple of each leaf's velocity scale (see
        ``velocity_clamp`` of :func:`pso`); ``inf`` disables it.
      init_scale: std of the Gaussian spread of unbounded leaves around the
        template at ``init``.
      init_velocity: initial velocities are ``U(-1, 1)`` times this times the
        bound range (or ``init_scale`` for unbounded leaves).
      stall_tol: the best must improve by more than this to reset the stall count.
      stall_patience: ``()`` int32, steps without such improvement before a
        stagnation remedy is applied.
      restart_fraction: fraction of particles (the worst) that a remedy re-places.
      perturb_scale: std of the ``"perturb"`` remedy around the best, as a
        multiple of each leaf's velocity scale (or ``init_scale`` if it has none).
    """

    inertia: jax.Array
    cognitive: jax.Array
    social: jax.Array
    velocity_clamp: jax.Array
    init_scale: jax.Array
    init_velocity: jax.Array
    stall_tol: jax.Array
    stall_patience: jax.Array
    restart_fraction: jax.Array
    perturb_scale: jax.Array


_HPARAM_NAMES = tuple(f.name for f in dataclasses.fields(PSOHyperParams))
_COMMON_DEFAULTS = dict(
    velocity_clamp=0.5,
    init_scale=0.1,
    init_velocity=0.1,
    stall_tol=0.0,
    stall_patience=50,
    restart_fraction=0.5,
    perturb_scale=0.1,
)
_VARIANT_DEFAULTS = {
    "inertia": dict(inertia=0.7298, cognitive=1.49618, social=1.49618),
    "constriction": dict(inertia=1.0, cognitive=2.05, social=2.05),
    "spso2011": dict(
        inertia=1.0 / (2.0 * math.log(2.0)),
        cognitive=0.5 + math.log(2.0),
        social=0.5 + math.log(2.0),
    ),
    "cso": dict(inertia=1.0, cognitive=1.0, social=0.1),
}


@struct.dataclass
class PSOState:
    """The swarm: a pytree of arrays.

    Per-particle leaves have a leading axis ``P`` (the fields made with
    :func:`pso_jax.base.particle_field`, which a sharded swarm splits over its
    devices). Leaves the mask leaves out are ``None`` in every per-particle tree
    and stored once in ``frozen_params``.

    Attributes:
      positions: ``[P, ...]`` per swarmed leaf, the points the next step evaluates.
      velocities: ``[P, ...]`` per swarmed leaf.
      fitness: ``[P]``, the last evaluated fitness (worst value before the first).
      pbest_params: ``[P, ...]`` personal bests; ``None`` for ``cso``, which needs
        none.
      pbest_fitness: ``[P]``, fitness of the personal bests (for ``cso``: the best
        fitness each particle has had).
      best_params: swarmed leaves of the best point found so far (no ``P`` axis).
      best_fitness: ``()``, its fitness (worst value until the first step).
      frozen_params: leaves the swarm does not move, once (``None`` elsewhere).
      low, high: per swarmed leaf, position bounds broadcastable to one
        particle's leaf, or ``None`` for an unbounded leaf (``None`` is structure,
        so which leaves are bounded is static under ``jit``).
      vscale: per swarmed leaf, the velocity scale that ``velocity_clamp``
        multiplies, or ``None`` when velocities are not clamped.
      links: ``[P, P]`` bool informant links of the random topology, else ``None``.
      step: ``()`` int32, steps taken.
      stall_count: ``()`` int32, steps since the best improved by > ``stall_tol``.
      num_restarts: ``()`` int32, stagnation remedies applied.
    """

    positions: PyTree = particle_field()
    velocities: PyTree = particle_field()
    fitness: jax.Array = particle_field()
    pbest_params: PyTree | None = particle_field()
    pbest_fitness: jax.Array = particle_field()
    best_params: PyTree
    best_fitness: jax.Array
    frozen_params: PyTree
    low: PyTree
    high: PyTree
    vscale: PyTree
    links: jax.Array | None = particle_field()
    step: jax.Array
    stall_count: jax.Array
    num_restarts: jax.Array


@dataclasses.dataclass(frozen=True)
class PSOConfig:
    """Static configuration captured by :func:`pso` (changing it recompiles).

    The arguments of :func:`pso` of the same names, resolved (the topology's
    default chosen, ``bound_handling`` checked), and:

    Attributes:
      axis: the swarm axis the functions run on: a
        :class:`~pso_jax.swarm_axis.LocalAxis` (the whole swarm), or a
        :class:`~pso_jax.swarm_axis.ShardedAxis` when the swarm is split over a
        mesh (the functions are then per-shard kernels inside ``shard_map``).
      halo_tables: ``(halo, [S, P / S, M] tables)`` of a fixed topology
        (:func:`pso_jax.topology.shard_tables`), else ``None``.
      default_hparams: the variant's :class:`PSOHyperParams` with the overrides.
    """

    num_particles: int
    variant: str
    topology: str
    ring_neighbors: int
    num_informants: int
    random_factors: str
    bound_handling: Any
    velocity_clamp: str | None
    maximize: bool
    stagnation: str | None
    rng: str | Callable
    schedules: tuple[tuple[str, Callable], ...]
    axis: LocalAxis
    halo_tables: tuple[int, np.ndarray] | None
    default_hparams: PSOHyperParams
    bounds: Any = None
    mask: Any = None
    init_fn: Callable | None = None


def _concrete_float(x) -> float | None:
    """``float(x)`` for a concrete scalar, ``None`` under tracing."""
    try:
        return float(x)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None


_HPARAM_CHECKS = {
    "cognitive": lambda v: v >= 0,
    "social": lambda v: v >= 0,
    "velocity_clamp": lambda v: v > 0,
    "init_scale": lambda v: v >= 0,
    "init_velocity": lambda v: v >= 0,
    "stall_tol": lambda v: v >= 0,
    "stall_patience": lambda v: v >= 1,
    "restart_fraction": lambda v: 0 <= v <= 1,
    "perturb_scale": lambda v: v >= 0,
}


def validate_hparams(hparams: PSOHyperParams, variant: str = "inertia") -> None:
    """Check concrete hyperparameter values; traced ones are skipped.

    Raises:
      ValueError: naming the field and value that is out of range.

    Warns:
      PSOConvergenceWarning: when ``(w, c1, c2)`` lie outside Poli's (2009)
        stability region.

    >>> opt = pso(num_particles=4)
    >>> validate_hparams(opt.default_hparams)  # the defaults are valid
    >>> validate_hparams(opt.default_hparams.replace(cognitive=jnp.float32(-1.0)))
    Traceback (most recent call last):
    ...
    ValueError: hparams.cognitive=-1.0 is out of range
    """
    vals = {}
    for name in _HPARAM_NAMES:
        leaf = getattr(hparams, name)
        if jnp.ndim(leaf) != 0:
            raise ValueError(f"hparams.{name} must be a scalar, got shape {leaf.shape}")
        vals[name] = _concrete_float(leaf)
    for name, ok in _HPARAM_CHECKS.items():
        v = vals[name]
        if v is not None and not (ok(v) and not math.isnan(v)):
            raise ValueError(f"hparams.{name}={v} is out of range")
    if vals["inertia"] is not None and not math.isfinite(vals["inertia"]):
        raise ValueError(f"hparams.inertia={vals['inertia']} must be finite")
    if variant == "constriction" and None not in (vals["cognitive"], vals["social"]):
        phi = vals["cognitive"] + vals["social"]
        if phi <= 4.0:
            raise ValueError(
                f"constriction needs cognitive + social > 4, got {phi:.4g} "
                "(Clerc & Kennedy's chi is complex otherwise); try 2.05 + 2.05"
            )
    if None not in (vals["inertia"], vals["cognitive"], vals["social"]):
        velocity_lib.warn_if_unstable(
            variant, vals["inertia"], vals["cognitive"], vals["social"]
        )


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")


# --- random draws ----------------------------------------------------------------
# Every draw is per particle (axis 0 = this instance's rows), so a shard draws its
# own rows of the unsharded swarm's draw (row_offset).


def _uniform(config: PSOConfig, key, shape, dtype):
    """Uniforms in [0, 1) from the configured generator."""
    if callable(config.rng):
        return jnp.asarray(config.rng(key, shape, dtype), dtype)
    if config.rng == "jax":
        return jax.random.uniform(key, shape, dtype)
    return prandom.uniform(key, shape, dtype, row_offset=config.axis.row0())


def _normal(config: PSOConfig, key, shape, dtype):
    if not callable(config.rng) and config.rng == "jax":
        return jax.random.normal(key, shape, dtype)
    return prandom.normal(key, shape, dtype, row_offset=config.axis.row0())


def _factors(config: PSOConfig, key, leaf):
    """The random factors ``r`` of one ``[n, ...]`` leaf."""
    if config.random_factors == "per_particle":
        r = _uniform(config, key, (config.axis.local_size,), leaf.dtype)
        return along_rows(r, leaf)
    return _uniform(config, key, leaf.shape, leaf.dtype)


def _leaf_keys(key, tree, n):
    """``n`` keys per swarmed leaf, as a list aligned with ``jax.tree.leaves``."""
    leaves = jax.tree.leaves(tree)
    keys = jax.random.split(key, (len(leaves), n))
    return [keys[i] for i in range(len(leaves))]


def _map_leaves(fn, first, *others):
    """Map ``fn(i, leaf, *aligned)`` over the swarmed leaves of ``first``.

    ``others`` are trees of the same swarmed structure whose leaves may be
    ``None`` (an unbounded leaf, no velocity clamp), or ``None`` as a whole.
    A tuple returned by ``fn`` becomes a tuple of trees.
    """
    treedef = jax.tree.structure(first)
    leaves = treedef.flatten_up_to(first)
    aligned = [
        [None] * len(leaves) if t is None else treedef.flatten_up_to(t) for t in others
    ]
    outs = [fn(i, leaf, *[a[i] for a in aligned]) for i, leaf in enumerate(leaves)]
    if outs and isinstance(outs[0], tuple):
        return tuple(
            treedef.unflatten([o[j] for o in outs]) for j in range(len(outs[0]))
        )
    return treedef.unflatten(outs)


def _resolve(config: PSOConfig, hparams: PSOHyperParams, step) -> PSOHyperParams:
    """``hparams`` with the scheduled ones evaluated at ``step``."""
    if not config.schedules:
        return hparams
    upd = {
        k: jnp.asarray(fn(step), getattr(hparams, k).dtype)
        for k, fn in config.schedules
    }
    return hparams.replace(**upd)


# --- init ------------------------------------------------------------------------


def _sample_positions(config, key, template_sw, low, high, hp, frozen):
    """Initial-distribution positions ``[n, ...]`` and velocities."""
    axis = config.axis
    key_x, key_v, key_fn = jax.random.split(key, 3)
    kx = _leaf_keys(key_x, template_sw, 1)
    kv = _leaf_keys(key_v, template_sw, 1)
    drawn_sw = None
    if config.init_fn is not None:
        keys_fn = axis.own_slice(jax.random.split(key_fn, config.num_particles))
        drawn = jax.vmap(config.init_fn, in_axes=(0, None))(
            keys_fn, combine(template_sw, frozen)
        )
        drawn_sw = partition(drawn, swarm_mask(template_sw))[0]

    def one(i, t, lo, hi, d):
        shape = (axis.local_size,) + jnp.shape(t)
        dtype = jnp.result_type(t)
        u = _uniform(config, kx[i][0], shape, dtype)
        w = 2 * _uniform(config, kv[i][0], shape, dtype) - 1
        if lo is not None:
            x = lo + u * (hi - lo)
            v = w * hp.init_velocity * (hi - lo)
        else:
            if d is not None:
                x = d
            else:
                x = t + hp.init_scale * _normal(config, kx[i][0], shape, dtype)
            v = w * hp.init_velocity * hp.init_scale
        return x.astype(dtype), v.astype(dtype)

    return _map_leaves(one, template_sw, low, high, drawn_sw)


def _velocity_scale(config, template_sw, positions, low, high):
    """Per swarmed leaf, what ``velocity_clamp`` multiplies (``None``: no clamp)."""
    bounded = [
        lo is not None for lo in jax.tree.structure(template_sw).flatten_up_to(low)
    ]
    mode = config.velocity_clamp
    if mode == "auto":
        mode = "range" if bounded and all(bounded) else None
    if mode == "range" and not all(bounded):
        raise ValueError("velocity_clamp='range' needs bounds on every swarmed leaf")
    if mode is None:
        return jax.tree.map(lambda _: None, template_sw)
    if mode == "absolute":
        return jax.tree.map(lambda t: jnp.ones((), jnp.result_type(t)), template_sw)
    if mode == "range":
        return _map_leaves(
            lambda i, t, lo, hi: (hi - lo).astype(t.dtype), template_sw, low, high
        )

    def spread(x):  # "init_spread"
        s = config.axis.std(x)
        return jnp.where(s > 0, s, 1.0).astype(x.dtype)

    return jax.tree.map(spread, positions)


def _split_template(config, params_template):
    """``(swarmed, frozen, mask)`` of a checked template."""
    if not jax.tree.leaves(params_template):
        raise ValueError("params_template has no array leaves")
    params_template = jax.tree.map(jnp.asarray, params_template)
    mask_tree = resolve_mask(config.mask, params_template)
    template_sw, frozen = partition(params_template, mask_tree)
    for path, t in zip(
        leaf_paths(template_sw), jax.tree.leaves(template_sw), strict=True
    ):
        if not jnp.issubdtype(t.dtype, jnp.floating):
            raise ValueError(
                f"swarmed leaf {path} has dtype {t.dtype}: only floating-point "
                "leaves can be swarmed; mask it out or cast it"
            )
    if not isinstance(config.bound_handling, str):
        bounds_lib.check_handling(
            bounds_lib.handler_tree(config.bound_handling, template_sw)
        )
    return params_template, template_sw, frozen, mask_tree


def init(
    key: PRNGKey,
    params_template: PyTree,
    hparams: PSOHyperParams | None = None,
    *,
    config: PSOConfig,
) -> PSOState:
    """Build the initial swarm around ``params_template`` (one particle).

    Args:
      key: a ``jax.random.key``.
      params_template: one particle's parameters: shapes, dtypes, and the
        centre of the initial spread of unbounded leaves.
      hparams: a :class:`PSOHyperParams`; defaults to the variant's.
      config: the static configuration (bound by :func:`pso`).

    Returns:
      A :class:`PSOState`.
    """
    if hparams is None:
        hparams = config.default_hparams
    validate_hparams(hparams, config.variant)
    hp = _resolve(config, hparams, jnp.zeros((), jnp.int32))
    full, template_sw, frozen, mask_tree = _split_template(config, params_template)
    low, high = bounds_lib.normalize(config.bounds, full, mask_tree)
    key_init, key_links = jax.random.split(key)
    positions, velocities = _sample_positions(
        config, key_init, template_sw, low, high, hp, frozen
    )
    fitness = jnp.full(
        (config.axis.local_size,), fitness_lib.worst(config.maximize), jnp.float32
    )
    links = None
    if config.topology == "random":
        links = _draw_links(config, key_links)
    return PSOState(
        positions=positions,
        velocities=velocities,
        fitness=fitness,
        # Distinct buffers (copies), so the whole state can be donated.
        pbest_params=(
            None if config.variant == "cso" else jax.tree.map(jnp.copy, positions)
        ),
        pbest_fitness=jnp.copy(fitness),
        best_params=config.axis.take_row(positions, 0),
        best_fitness=jnp.asarray(fitness_lib.worst(config.maximize), jnp.float32),
        frozen_params=frozen,
        low=low,
        high=high,
        vscale=_velocity_scale(config, template_sw, positions, low, high),
        links=links,
        step=jnp.zeros((), jnp.int32),
        stall_count=jnp.zeros((), jnp.int32),
        num_restarts=jnp.zeros((), jnp.int32),
    )


def _draw_links(config: PSOConfig, key):
    """Random-topology links: ``[n, P]``, this instance's rows of ``[P, P]``."""
    axis = config.axis
    return topology_lib.random_links(
        key,
        config.num_particles,
        config.num_informants,
        row_offset=axis.row0(),
        num_rows=axis.local_size,
    )


def ask(state: PSOState, *, config: PSOConfig) -> PyTree:
    """Full parameters of every particle, ``[P, ...]`` leaves."""
    n = config.axis.local_size
    frozen_b = jax.tree.map(
        lambda f: jnp.broadcast_to(f, (n,) + jnp.shape(f)), state.frozen_params
    )
    return combine(state.positions, frozen_b)


# --- moves -----------------------------------------------------------------------


def _finish(config, key, x, v_new, lo, hi, vs, handling, hp):
    """:func:`pso_jax.velocity.finish` with this leaf's clamp and resample draw."""
    vmax = None if vs is None else hp.velocity_clamp * vs
    u = None
    if lo is not None and handling == "resample":
        u = _uniform(config, key, x.shape, x.dtype)
    return velocity_lib.finish(x, v_new, vmax, lo, hi, handling, u)


def _move(config, key, state, hp, pbest, p_score, improved, g, g_row):
    """Velocity and position update of the variants with personal bests."""
    w, c1, c2 = velocity_lib.effective_coefficients(
        config.variant, hp.inertia, hp.cognitive, hp.social
    )
    # Neighbourhood bests are read from the *new* personal bests. Reading rows
    # of the old ones instead (where(improved, x, p_old)[g]) keeps the old
    # buffer alive past its in-place update, and XLA then copies the whole
    # [P, ...] array every step (measured: +1 copy, ~1.5x slower step).
    nbest, n_is_self = topology_lib.neighbour_bests(
        config.axis,
        config.topology,
        config.halo_tables,
        state.links,
        pbest,
        p_score,
        g,
        g_row,
    )
    keys = _leaf_keys(key, state.positions, 4)
    handling = bounds_lib.handler_tree(config.bound_handling, state.positions)
    if config.variant == "spso2011":
        return _spso2011_move(
            config, keys, state, hp, (w, c1, c2), improved, nbest, n_is_self, handling
        )

    def one(i, x, v, p_old, n, lo, hi, vs, h):
        # The new personal best, computed inline rather than read back: the
        # update then reads x, v and the old pbest once, in one fusion.
        p = jnp.where(along_rows(improved, x), x, p_old)
        r1 = _factors(config, keys[i][0], x)
        r2 = _factors(config, keys[i][1], x)
        v_new = velocity_lib.inertia(x, v, p, n, r1, r2, w, c1, c2)
        return _finish(config, keys[i][3], x, v_new, lo, hi, vs, h, hp)

    return _map_leaves(
        one,
        state.positions,
        state.velocities,
        state.pbest_params,
        nbest,
        state.low,
        state.high,
        state.vscale,
        handling,
    )


def _per_particle_sq(tree, n):
    """``[n]`` squared norm of every particle over all leaves of ``tree``."""
    return sum(
        jnp.sum(jnp.square(a).reshape(n, -1), axis=1) for a in jax.tree.leaves(tree)
    )


def _spso2011_move(
    config, keys, state, hp, coeffs, improved, nbest, n_is_self, handling
):
    """SPSO-2011: a uniform point in the hypersphere around the centre ``G``."""
    w, c1, c2 = coeffs
    n = config.axis.local_size
    x_tree = state.positions

    def centre(i, x, p_old, nb):
        p = jnp.where(along_rows(improved, x), x, p_old)
        r1 = _factors(config, keys[i][0], x)
        r2 = _factors(config, keys[i][1], x)
        return velocity_lib.spso2011_centre(
            x, p, nb, r1, r2, c1, c2, along_rows(n_is_self, x)
        )

    g_tree = _map_leaves(centre, x_tree, state.pbest_params, nbest)
    dirs = _map_leaves(
        lambda i, x: _normal(config, keys[i][2], x.shape, x.dtype), x_tree
    )
    radius = jnp.sqrt(
        _per_particle_sq(jax.tree.map(lambda a, b: a - b, g_tree, x_tree), n)
    )
    dir_norm = jnp.sqrt(_per_particle_sq(dirs, n))
    num_dims = sum(int(np.prod(a.shape[1:])) for a in jax.tree.leaves(x_tree))
    # (keys[0][3] is also leaf 0's "resample" key: kept for a stable trajectory.)
    u = _uniform(config, keys[0][3], (n,), jnp.float32)
    scale = radius * u ** (1.0 / num_dims) / jnp.maximum(dir_norm, 1e-30)

    def one(i, x, v, gc, d, lo, hi, vs, h):
        s = along_rows(scale, x).astype(x.dtype)
        v_new = velocity_lib.spso2011(x, v, gc, d, s, w)
        return _finish(config, keys[i][3], x, v_new, lo, hi, vs, h, hp)

    return _map_leaves(
        one,
        x_tree,
        state.velocities,
        g_tree,
        dirs,
        state.low,
        state.high,
        state.vscale,
        handling,
    )


def _cso_pairs(config, key, f_score):
    """CSO's random pairing: this instance's ``(partner, is_loser)`` rows."""
    axis, P = config.axis, config.num_particles
    # The pairing is drawn over the whole swarm (the same on every shard).
    perm = jax.random.permutation(key, P)
    half = P // 2
    a, b = perm[:half], perm[half : 2 * half]
    f_all = axis.gather_all(f_score)
    loser = jnp.where(f_all[a] <= f_all[b], b, a)
    partner = jnp.arange(P).at[a].set(b).at[b].set(a)
    is_loser = jnp.zeros((P,), bool).at[loser].set(True)
    return axis.own_slice(partner), axis.own_slice(is_loser)


def _cso_move(config, key, state, hp, f_score):
    """Competitive Swarm Optimizer: each pair's loser learns from its winner."""
    key_pair, key_r = jax.random.split(key)
    partner, is_loser = _cso_pairs(config, key_pair, f_score)
    x_partner = config.axis.gather_rows(state.positions, partner)
    keys = _leaf_keys(key_r, state.positions, 4)
    handling = bounds_lib.handler_tree(config.bound_handling, state.positions)

    def one(i, x, v, xp, lo, hi, vs, h):
        r1 = _factors(config, keys[i][0], x)
        r2 = _factors(config, keys[i][1], x)
        r3 = _factors(config, keys[i][2], x)
        v_l = velocity_lib.cso(x, v, xp, config.axis.mean(x), r1, r2, r3, hp.social)
        x_l, v_l = _finish(config, keys[i][3], x, v_l, lo, hi, vs, h, hp)
        c = along_rows(is_loser, x)
        return jnp.where(c, x_l, x), jnp.where(c, v_l, v)

    positions, velocities = _map_leaves(
        one,
        state.positions,
        state.velocities,
        x_partner,
        state.low,
        state.high,
        state.vscale,
        handling,
    )
    return positions, velocities, is_loser


def _remedy(config, key, state, hp, swarm, f_score):
    """Re-place the worst ``restart_fraction`` of particles (stagnation).

    ``swarm`` is ``(positions, velocities, pbest, pbest_fitness)``; returns it
    with the chosen rows re-drawn.
    """
    positions, velocities, pbest, pbest_fitness = swarm
    axis, P = config.axis, config.num_particles
    f_all = axis.gather_all(f_score)  # the ranking is over the whole swarm
    if axis.num_inert:  # padding is never chosen (and does not count)
        f_all = jnp.where(np.arange(P) >= axis.num_real, -jnp.inf, f_all)
    order = jnp.argsort(-f_all, stable=True)  # worst first
    rank = jnp.zeros((P,), jnp.int32).at[order].set(jnp.arange(P, dtype=jnp.int32))
    n_sel = jnp.ceil(hp.restart_fraction * axis.num_real).astype(jnp.int32)
    sel = axis.own_slice(rank) < n_sel
    template = state.best_params
    if config.stagnation == "resample":
        new_x, new_v = _sample_positions(
            config, key, template, state.low, state.high, hp, state.frozen_params
        )
    else:
        keys = _leaf_keys(key, template, 2)

        def around_best(i, b, vs, lo, hi, v_old):
            scale = hp.init_scale if vs is None else vs
            x = b[None] + hp.perturb_scale * scale * _normal(
                config, keys[i][0], v_old.shape, v_old.dtype
            )
            if lo is not None:
                x = jnp.clip(x, lo, hi)
            return x.astype(v_old.dtype), jnp.zeros_like(v_old)

        new_x, new_v = _map_leaves(
            around_best, template, state.vscale, state.low, state.high, velocities
        )
    positions = tree_where(sel, new_x, positions)
    velocities = tree_where(sel, new_v, velocities)
    if pbest is not None:
        pbest = tree_where(sel, new_x, pbest)
    pbest_fitness = jnp.where(sel, fitness_lib.worst(config.maximize), pbest_fitness)
    return positions, velocities, pbest, pbest_fitness


# --- tell and step -----------------------------------------------------------------


def _stagnation(config, key, state, hp, swarm, f_score, stall_count):
    """Apply the stagnation remedy if the best stalled; count it."""
    if config.stagnation is None:
        return swarm, stall_count, state.num_restarts, jnp.zeros((), bool)
    restarted = stall_count >= hp.stall_patience
    swarm = jax.lax.cond(
        restarted,
        lambda: _remedy(config, key, state, hp, swarm, f_score),
        lambda: swarm,
    )
    stall_count = jnp.where(restarted, 0, stall_count)
    return (
        swarm,
        stall_count,
        state.num_restarts + restarted.astype(jnp.int32),
        restarted,
    )


def _step_info(config, f, improved, best_fitness, stall_count, restarted):
    """The step's :class:`~pso_jax.base.StepInfo` (swarm-wide counts and means)."""
    axis = config.axis
    nonfinite = ~jnp.isfinite(f)
    inert = axis.inert_rows()
    if inert is not None:
        nonfinite = nonfinite & ~inert
    # From the whole [P] vector, so the sum is the unsharded one bit for bit.
    f_all = axis.gather_all(f)
    finite_all = jnp.isfinite(f_all)
    return StepInfo(
        fitness=f,
        best_fitness=best_fitness,
        mean_fitness=jnp.sum(jnp.where(finite_all, f_all, 0.0)) / jnp.sum(finite_all),
        num_nonfinite=axis.sum(jnp.sum(nonfinite).astype(jnp.int32)),
        num_improved=axis.sum(jnp.sum(improved).astype(jnp.int32)),
        stall_count=stall_count,
        restarted=restarted,
    )


def tell(
    key: PRNGKey,
    state: PSOState,
    fitness: jax.Array,
    hparams: PSOHyperParams | None = None,
    *,
    config: PSOConfig,
) -> tuple[PSOState, StepInfo]:
    """Update bests with ``fitness`` of ``state.positions`` and move the swarm.

    Args:
      key: a ``jax.random.key``.
      state: the current :class:`PSOState`.
      fitness: ``[P]`` float, the fitness of ``ask(state)`` (NaN/inf allowed:
        they count as the worst value).
      hparams: a :class:`PSOHyperParams` (traced is fine).
      config: the static configuration (bound by :func:`pso`).

    Returns:
      ``(new_state, StepInfo)``.
    """
    axis, maximize = config.axis, config.maximize
    if hparams is None:
        hparams = config.default_hparams
    fitness = jnp.asarray(fitness)
    if fitness.shape != (axis.local_size,):
        raise ValueError(
            f"fitness must have shape ({axis.local_size},){axis.describe()} (one "
            f"scalar per particle), got {fitness.shape}"
        )
    hp = _resolve(config, hparams, state.step)
    key_move, key_links, key_remedy = jax.random.split(key, 3)
    f = fitness_lib.sanitize(fitness.astype(jnp.float32), maximize)
    inert = axis.inert_rows()
    if inert is not None:  # padding: always the worst, so never a best
        f = jnp.where(inert, fitness_lib.worst(maximize), f)
    score = functools.partial(fitness_lib.score, maximize=maximize)
    f_score = score(f)
    improved = f_score < score(state.pbest_fitness)
    pbest_fitness = jnp.where(improved, f, state.pbest_fitness)
    if config.variant == "cso":
        pbest = None
        positions, velocities, is_loser = _cso_move(
            config, key_move, state, hp, f_score
        )
        # The best is a winner (ties go to winners), which did not move: read
        # it from the new positions so the old buffer can be updated in place.
        g, cand_fit = axis.argmin(jnp.where(is_loser, jnp.inf, f_score), f)
        cand_params = axis.take_row(positions, g)
    else:
        p_score = score(pbest_fitness)
        g, cand_fit = axis.argmin(p_score, pbest_fitness)
        pbest = tree_where(improved, state.positions, state.pbest_params)
        cand_params = axis.take_row(pbest, g)
        positions, velocities = _move(
            config, key_move, state, hp, pbest, p_score, improved, g, cand_params
        )
    better = score(cand_fit) < score(state.best_fitness)
    best_fitness = jnp.where(better, cand_fit, state.best_fitness)
    best_params = tree_where(better, cand_params, state.best_params)
    # Stall count: steps since the best improved by more than stall_tol.
    gain = score(state.best_fitness) - score(best_fitness)
    progressed = (gain > hp.stall_tol) | (jnp.isinf(score(state.best_fitness)) & better)
    stall_count = jnp.where(progressed, 0, state.stall_count + 1)
    swarm = (positions, velocities, pbest, pbest_fitness)
    swarm, stall_count, num_restarts, restarted = _stagnation(
        config,
        key_remedy,
        state.replace(best_params=best_params),
        hp,
        swarm,
        f_score,
        stall_count,
    )
    positions, velocities, pbest, pbest_fitness = swarm
    links = state.links
    if config.topology == "random":
        links = jnp.where(better, links, _draw_links(config, key_links))
    new_state = state.replace(
        positions=positions,
        velocities=velocities,
        fitness=f,
        pbest_params=pbest,
        pbest_fitness=pbest_fitness,
        best_params=best_params,
        best_fitness=best_fitness,
        links=links,
        step=state.step + 1,
        stall_count=stall_count,
        num_restarts=num_restarts,
    )
    return new_state, _step_info(
        config, f, improved, best_fitness, stall_count, restarted
    )


def rescore(
    state: PSOState,
    pbest_fitness: jax.Array | None,
    best_fitness: jax.Array,
    *,
    config: PSOConfig,
) -> PSOState:
    """The personal and swarm bests' fitness measured again (e.g. a new batch).

    Minibatch fitness is noisy: a best scored on one lucky batch would hold the
    swarm for good. Bests already found take the new values (non-finite ones
    become the worst); bests not yet found keep the worst value.

    Args:
      state: a :class:`PSOState`.
      pbest_fitness: ``[P]`` the personal bests' new fitness, or ``None`` to
        keep them (CSO stores no personal-best parameters to re-evaluate).
      best_fitness: ``()`` the swarm best's new fitness.
      config: the static configuration (bound by :func:`pso`).
    """
    maximize = config.maximize
    if pbest_fitness is not None:
        started = jnp.isfinite(state.pbest_fitness)
        state = state.replace(
            pbest_fitness=jnp.where(
                started,
                fitness_lib.sanitize(pbest_fitness, maximize),
                state.pbest_fitness,
            )
        )
    return state.replace(
        best_fitness=jnp.where(
            jnp.isfinite(state.best_fitness),
            fitness_lib.sanitize(best_fitness, maximize),
            state.best_fitness,
        )
    )


def evaluate_swarm(fitness_fn, state: PSOState, batch: Any, *, config: PSOConfig):
    """``[P]`` fitness of every particle's position on ``batch``.

    ``fitness_fn(params, batch) -> ()`` for one particle, vmapped
    (:func:`pso_jax.fitness.swarm_fitness`); on a data axis, the mean over the
    batch's slices.
    """
    if fitness_fn is None:
        raise ValueError(
            "this optimizer was built without fitness_fn: pass one to pso(), "
            "or evaluate yourself and call tell()"
        )
    out = fitness_lib.swarm_fitness(
        fitness_fn, state.positions, state.frozen_params, batch
    )
    if jnp.shape(out) != (config.axis.local_size,):
        raise ValueError(
            "fitness_fn must return a scalar for one particle; it returned shape "
            f"{jnp.shape(out)[1:]} per particle"
        )
    return config.axis.data_mean(out)


def build_step(config: PSOConfig, fitness_fn: Callable | None) -> Callable:
    """The swarm step: evaluate every particle, update the bests, move the swarm.

    Returns:
      ``step(key, state, batch=None, hparams=None) -> (PSOState, StepInfo)``:
      ``batch`` is passed to ``fitness_fn`` unchanged (shared by all particles);
      ``hparams`` a :class:`PSOHyperParams` (traced is fine).
    """

    def step(key: PRNGKey, state: PSOState, batch: Any = None, hparams=None):
        # fitness_fn is deterministic: the whole key moves the swarm.
        fitness = evaluate_swarm(fitness_fn, state, batch, config=config)
        return tell(key, state, fitness, hparams, config=config)

    return step


def _check_args(num_particles, hparams, fitness_fn, **settings):
    """The factory's argument checks, before any compilation."""
    variant, rng = settings["variant"], settings["rng"]
    velocity_clamp, bounds = settings["velocity_clamp"], settings["bounds"]
    bound_handling, init_fn = settings["bound_handling"], settings["init_fn"]
    if isinstance(num_particles, bool) or not isinstance(
        num_particles, int | np.integer
    ):
        raise ValueError(f"num_particles must be an int, got {num_particles!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles={num_particles}: must be >= 1")
    _check_choice("variant", variant, VARIANTS)
    _check_choice("random_factors", settings["random_factors"], RANDOM_FACTORS)
    _check_choice("stagnation", settings["stagnation"], STAGNATION_REMEDIES)
    if not callable(rng):
        _check_choice("rng", rng, RNG_IMPLS)
    if velocity_clamp != "auto" and velocity_clamp not in VELOCITY_CLAMPS:
        raise ValueError(
            f"velocity_clamp={velocity_clamp!r}: expected 'auto' or one of "
            f"{VELOCITY_CLAMPS}"
        )
    if velocity_clamp == "range" and bounds is None:
        raise ValueError("velocity_clamp='range' needs bounds")
    if isinstance(bound_handling, str):
        bounds_lib.check_handling(bound_handling)
    if bounds is not None:  # plain numbers now; pytrees leaf by leaf at init
        bounds_lib.check_pair(bounds)
    unknown = set(hparams) - set(_HPARAM_NAMES)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {sorted(unknown)}; valid: {_HPARAM_NAMES}"
        )
    if fitness_fn is not None and not callable(fitness_fn):
        raise ValueError(f"fitness_fn must be callable, got {fitness_fn!r}")
    if init_fn is not None and not callable(init_fn):
        raise ValueError(f"init_fn must be callable, got {init_fn!r}")


def _default_hparams(variant, hparams):
    """``(PSOHyperParams, schedules)``: the variant's defaults with the overrides."""
    schedules = {k: v for k, v in hparams.items() if callable(v)}
    defaults = {**_COMMON_DEFAULTS, **_VARIANT_DEFAULTS[variant]}
    for k, v in hparams.items():
        defaults[k] = schedules[k](0) if k in schedules else v
    default_hparams = PSOHyperParams(
        **{
            k: jnp.asarray(v, jnp.int32 if k == "stall_patience" else jnp.float32)
            for k, v in defaults.items()
        }
    )
    validate_hparams(default_hparams, variant)
    return default_hparams, tuple(sorted(schedules.items()))


def _swarm_axis(num_particles, mesh, pad, rng):
    """The swarm axis: the whole swarm, or one shard of it on ``mesh``."""
    if mesh is None:
        if pad:
            raise ValueError("pad=True needs a mesh= to pad the particle count for")
        return LocalAxis(int(num_particles))
    if rng != "hash":
        raise ValueError(
            f"rng={rng!r} cannot be sharded: a sharded swarm needs rng='hash', "
            "whose draws for a shard's rows equal the unsharded swarm's"
        )
    return sharding_lib.swarm_axis(mesh, int(num_particles), pad)


def _make_config(num_particles, mesh, pad, hparams, *, fitness_fn, **settings):
    """Check :func:`pso`'s arguments and resolve them into a :class:`PSOConfig`."""
    variant, topology = settings["variant"], settings["topology"]
    _check_args(num_particles, hparams, fitness_fn, **settings)
    axis = _swarm_axis(num_particles, mesh, pad, settings["rng"])
    num_particles = axis.num_particles  # padding included
    if topology is None:
        topology = "random" if variant == "spso2011" else "global"
    ring = settings["ring_neighbors"]
    topology_lib.validate(topology, num_particles, ring, settings["num_informants"])
    if variant == "cso" and topology != "global":
        raise ValueError(f"variant='cso' supports topology='global', got {topology!r}")
    if variant == "cso" and num_particles < 2:
        raise ValueError(
            f"num_particles={num_particles}: cso pairs particles, needs >= 2"
        )
    default_hparams, schedules = _default_hparams(variant, hparams)
    table = topology_lib.neighbour_table(topology, num_particles, ring)
    halo_tables = None
    if table is not None:
        halo_tables = topology_lib.shard_tables(table, axis.num_shards)
    return PSOConfig(
        **{**settings, "topology": topology},
        num_particles=num_particles,
        schedules=schedules,
        axis=axis,
        halo_tables=halo_tables,
        default_hparams=default_hparams,
    )


def pso(
    fitness_fn: Callable[[PyTree, Any], jax.Array] | None = None,
    *,
    num_particles: int,
    variant: str = "inertia",
    topology: str | None = None,
    ring_neighbors: int = 1,
    num_informants: int = 3,
    random_factors: str = "per_dimension",
    bounds: tuple[Any, Any] | None = None,
    bound_handling: str | PyTree = "reflect",
    velocity_clamp: str | None = "auto",
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    init_fn: Callable[[PRNGKey, PyTree], PyTree] | None = None,
    maximize: bool = False,
    stagnation: str | None = None,
    rng: str = "hash",
    mesh: jax.sharding.Mesh | None = None,
    pad: bool = False,
    **hparams: float | Callable[[jax.Array], jax.Array],
) -> SwarmOptimizer:
    """Build a particle swarm optimizer: a pair of pure ``init``/``step`` functions.

    Args:
      fitness_fn: ``fitness_fn(params, batch) -> ()`` for ONE particle's full
        parameters; ``step`` vmaps it over the swarm. Optional if only ``tell`` is
        used.
      num_particles: swarm size ``P`` (static).
      variant: one of :data:`VARIANTS` (see the module docstring).
      topology: one of ``topology.TOPOLOGIES``; default ``"random"`` for
        ``spso2011`` and ``"global"`` otherwise. ``cso`` supports ``"global"``.
      ring_neighbors: ``k`` of the ring topology (``2k + 1`` particles with self).
      num_informants: ``K`` of the random topology.
      random_factors: ``"per_dimension"`` (one ``r1, r2`` per coordinate, the
        textbook rule) or ``"per_particle"`` (one pair per particle, as evosax).
      bounds: ``(low, high)``: scalars for every leaf, or pytrees matching the
        parameters whose leaves broadcast to the leaf (``None`` leaves are
        unbounded). Bounded leaves start uniform in the box.
      bound_handling: a name from ``bounds.BOUND_HANDLERS``, or a pytree of names.
      velocity_clamp: ``None``, ``"absolute"`` (``vmax = velocity_clamp``),
        ``"range"`` (``vmax = velocity_clamp * (high - low)``), or
        ``"init_spread"`` (``vmax = velocity_clamp *`` each leaf's initial std).
        ``"auto"``: ``"range"`` if every swarmed leaf is bounded, else ``None``.
      mask: a pytree of bools (or a function of the params returning one): the
        swarm moves only the True leaves; the others are stored once, not per
        particle.
      init_fn: ``init_fn(key, template) -> params`` for one particle (e.g. a Flax
        ``model.init``), used for unbounded leaves instead of Gaussian noise
        around the template.
      maximize: maximise the fitness instead of minimising it.
      stagnation: ``None``, ``"resample"`` (re-draw the worst
        ``restart_fraction`` of particles from the initial distribution) or
        ``"perturb"`` (re-place them around the best), applied after
        ``stall_patience`` steps without improvement.
      rng: ``"hash"`` (the fast counter-based generator of ``pso_jax.random``),
        ``"jax"`` (``jax.random``'s default), or a function
        ``rng(key, shape, dtype) -> uniforms in [0, 1)`` for the random factors
        (Gaussian draws then use ``"hash"``).
      mesh: a ``jax.sharding.Mesh`` with a ``"particles"`` axis (and optionally
        a ``"data"`` axis), e.g. from :func:`pso_jax.sharding.make_mesh`: shard
        the swarm over its devices. Every per-particle leaf of the state is then
        split on the particle axis (each device stores and updates only its own
        ``num_particles / devices`` particles, inside ``jax.shard_map``); the
        global best and neighbourhood bests cross shards by collectives, so the
        trajectory does not depend on the device count. A ``"data"`` axis splits
        the batch's leading axis, and the fitness of a particle is the mean of
        ``fitness_fn`` over the data shards (so ``fitness_fn`` must be a mean
        over the batch). Needs ``rng="hash"``. The result is a
        :class:`~pso_jax.sharding.ShardedSwarmOptimizer`.
      pad: with ``mesh``, when ``num_particles`` does not divide by the devices
        of the particle axis, add inert particles up to the next multiple (they
        are evaluated and move, but their fitness always counts as the worst, so
        they never become personal, neighbourhood or swarm bests). Without
        ``pad`` such a count raises an error naming the valid counts.
      **hparams: overrides of :class:`PSOHyperParams` defaults: numbers, or
        schedules ``step -> value`` (e.g. ``optax.linear_schedule``) evaluated
        each step from the state's step counter.

    Returns:
      A :class:`~pso_jax.base.SwarmOptimizer`.

    Raises:
      ValueError: for an invalid argument, naming it, before any compilation.

    >>> import jax, jax.numpy as jnp
    >>> opt = pso(lambda x, _: jnp.sum(x**2), num_particles=16, bounds=(-5.0, 5.0))
    >>> state = opt.init(jax.random.key(0), jnp.zeros(3), opt.default_hparams)
    >>> for i in range(100):
    ...     state, info = opt.step(jax.random.key(i), state, None, opt.default_hparams)
    >>> bool(state.best_fitness < 1e-3)
    True
    """
    config = _make_config(
        num_particles,
        mesh,
        pad,
        hparams,
        fitness_fn=fitness_fn,
        variant=variant,
        topology=topology,
        ring_neighbors=ring_neighbors,
        num_informants=num_informants,
        random_factors=random_factors,
        bounds=bounds,
        bound_handling=bound_handling,
        velocity_clamp=velocity_clamp,
        mask=mask,
        init_fn=init_fn,
        maximize=maximize,
        stagnation=stagnation,
        rng=rng,
    )
    opt = SwarmOptimizer(
        init=functools.partial(init, config=config),
        step=build_step(config, fitness_fn),
        tell=functools.partial(tell, config=config),
        ask=functools.partial(ask, config=config),
        rescore=functools.partial(rescore, config=config),
        default_hparams=config.default_hparams,
        num_particles=config.num_particles,
        config=config,
    )
    if mesh is None:
        return opt
    check = functools.partial(validate_hparams, variant=variant)
    return sharding_lib.shard_optimizer(opt, mesh, PSOState, check_hparams=check)


def swarm_mask(swarmed: PyTree) -> PyTree:
    """The bool mask (full structure) of a swarmed tree: False where ``None``."""
    return jax.tree.map(lambda s: s is not None, swarmed, is_leaf=lambda x: x is None)


def best_solution(state: PSOState) -> PyTree:
    """The full best parameters: the swarmed ``state.best_params`` and the frozen.

    >>> import jax, jax.numpy as jnp
    >>> params = {"body": jnp.ones(3), "head": jnp.zeros(2)}
    >>> opt = pso(lambda p, _: jnp.sum((p["head"] - 1.0) ** 2), num_particles=8,
    ...           mask={"body": False, "head": True})
    >>> state = opt.init(jax.random.key(0), params)
    >>> state, _ = opt.step(jax.random.key(1), state)
    >>> best = best_solution(state)  # the swarmed head and the frozen body, together
    >>> best["head"].shape, best["body"].tolist()
    ((2,), [1.0, 1.0, 1.0])
    """
    return combine(state.best_params, state.frozen_params)
