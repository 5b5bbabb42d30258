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
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pso_jax import bounds as bounds_lib
from pso_jax import random as prandom
from pso_jax import topology as topology_lib
from pso_jax import velocity as velocity_lib
from pso_jax.base import StepInfo, SwarmOptimizer
from pso_jax.tree_utils import combine, partition, resolve_mask, tree_where
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

    Per-particle leaves have a leading axis ``P``. Leaves the mask leaves out are
    ``None`` in every per-particle tree and stored once in ``frozen_params``.

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

    positions: PyTree
    velocities: PyTree
    fitness: jax.Array
    pbest_params: PyTree | None
    pbest_fitness: jax.Array
    best_params: PyTree
    best_fitness: jax.Array
    frozen_params: PyTree
    low: PyTree
    high: PyTree
    vscale: PyTree
    links: jax.Array | None
    step: jax.Array
    stall_count: jax.Array
    num_restarts: jax.Array


@dataclasses.dataclass(frozen=True)
class PSOConfig:
    """Static configuration captured by :func:`pso` (changing it recompiles)."""

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
    # Sharding (see pso_jax.sharding): the swarm split over `num_shards` devices
    # along the mesh axis `particle_axis`; the functions built from this config
    # are then per-shard kernels with collectives over that axis. `data_axis`
    # splits the batch; the last `num_inert` particles are padding.
    num_shards: int = 1
    particle_axis: str | None = None
    data_axis: str | None = None
    num_inert: int = 0


def _concrete_float(x) -> float | None:
    """``float(x)`` for a concrete scalar, ``None`` under tracing."""
    try:
        return float(x)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None


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
    checks = {
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
    for name, ok in checks.items():
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


def _leaf_paths(tree) -> list[str]:
    return [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _normalize_bounds(bounds, params_template, mask_tree):
    """Per swarmed leaf ``(low, high)`` arrays, or ``None`` for unbounded leaves.

    Returns two trees of the *swarmed* structure (``None`` at frozen leaves too).
    """
    full_def = jax.tree.structure(params_template)
    n = full_def.num_leaves
    if bounds is None:
        lows = highs = [None] * n
    else:
        if not (isinstance(bounds, tuple | list) and len(bounds) == 2):
            raise ValueError(f"bounds must be a (low, high) pair, got {bounds!r}")

        def per_leaf(b, which):
            if b is None or (
                np.ndim(b) == 0 and not isinstance(b, dict | list | tuple)
            ):
                return [b] * n  # one value for every leaf
            try:
                return full_def.flatten_up_to(b)
            except (ValueError, TypeError):
                raise ValueError(
                    f"bounds {which} has structure {jax.tree.structure(b)}, which "
                    f"does not match the parameters' {full_def}"
                ) from None

        lows, highs = per_leaf(bounds[0], "low"), per_leaf(bounds[1], "high")
    out_low, out_high = [], []
    for path, t, lo, hi, m in zip(
        _leaf_paths(params_template),
        jax.tree.leaves(params_template),
        lows,
        highs,
        jax.tree.leaves(mask_tree),
        strict=True,
    ):
        if not m or (lo is None and hi is None):
            out_low.append(None)
            out_high.append(None)
            continue
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
                f"bounds for leaf {path}: shapes {lo_a.shape} and {hi_a.shape} do "
                f"not broadcast to the leaf's shape {np.shape(t)}"
            )
        if not (np.all(np.isfinite(lo_a)) and np.all(np.isfinite(hi_a))):
            raise ValueError(
                f"bounds for leaf {path} must be finite (use None for an unbounded "
                f"leaf), got low={lo_a.min()}, high={hi_a.max()}"
            )
        lo_b, hi_b = np.broadcast_arrays(lo_a, hi_a)
        bad = lo_b >= hi_b
        if np.any(bad):
            i = tuple(int(j) for j in np.unravel_index(np.argmax(bad), bad.shape))
            raise ValueError(
                f"bounds for leaf {path}: low must be < high, got low={lo_b[i]} >= "
                f"high={hi_b[i]} at index {i}"
            )
        dtype = jnp.result_type(t)
        out_low.append(jnp.asarray(lo_a, dtype))
        out_high.append(jnp.asarray(hi_a, dtype))
    swarmed_def = jax.tree.structure(partition(params_template, mask_tree)[0])
    # Rebuild with None (unbounded) leaves, keeping only the swarmed positions.
    sw_low = [
        lo for lo, m in zip(out_low, jax.tree.leaves(mask_tree), strict=True) if m
    ]
    sw_high = [
        hi for hi, m in zip(out_high, jax.tree.leaves(mask_tree), strict=True) if m
    ]
    return swarmed_def.unflatten(sw_low), swarmed_def.unflatten(sw_high)


def _normalize_handling(bound_handling, swarmed_template) -> PyTree:
    """A per-leaf tree of handler names (strings are static pytree leaves here)."""
    if isinstance(bound_handling, str):
        _check_choice("bound_handling", bound_handling, bounds_lib.BOUND_HANDLERS)
        return jax.tree.map(lambda _: bound_handling, swarmed_template)
    full = jax.tree.map(
        lambda t, h: None if t is None else h,
        swarmed_template,
        bound_handling,
        is_leaf=lambda x: x is None,
    )
    for h in jax.tree.leaves(full):
        _check_choice("bound_handling", h, bounds_lib.BOUND_HANDLERS)
    return full


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
    if isinstance(num_particles, bool) or not isinstance(
        num_particles, int | np.integer
    ):
        raise ValueError(f"num_particles must be an int, got {num_particles!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles={num_particles}: must be >= 1")
    num_shards, particle_axis, data_axis, num_inert = 1, None, None, 0
    if mesh is not None:
        # Imported here: sharding builds on this module.
        from pso_jax import sharding as sharding_lib

        num_shards, data_axis = sharding_lib.mesh_axes(mesh)
        particle_axis = sharding_lib.PARTICLE_AXIS
        padded = sharding_lib.padded_num_particles(num_particles, num_shards, pad)
        num_inert = padded - int(num_particles)
        num_particles = padded
        if rng != "hash":
            raise ValueError(
                f"rng={rng!r} cannot be sharded: a sharded swarm needs rng='hash', "
                "whose draws for a shard's rows equal the unsharded swarm's"
            )
    elif pad:
        raise ValueError("pad=True needs a mesh= to pad the particle count for")
    _check_choice("variant", variant, VARIANTS)
    if topology is None:
        topology = "random" if variant == "spso2011" else "global"
    topology_lib.validate(topology, num_particles, ring_neighbors, num_informants)
    if variant == "cso":
        if topology != "global":
            raise ValueError(
                f"variant='cso' supports topology='global', got {topology!r}"
            )
        if num_particles < 2:
            raise ValueError(
                f"num_particles={num_particles}: cso pairs particles, needs >= 2"
            )
    _check_choice("random_factors", random_factors, RANDOM_FACTORS)
    _check_choice("stagnation", stagnation, STAGNATION_REMEDIES)
    if not callable(rng):
        _check_choice("rng", rng, RNG_IMPLS)
    if velocity_clamp == "auto":
        velocity_clamp = "auto"
    elif velocity_clamp not in VELOCITY_CLAMPS:
        raise ValueError(
            f"velocity_clamp={velocity_clamp!r}: expected 'auto' or one of "
            f"{VELOCITY_CLAMPS}"
        )
    if velocity_clamp == "range" and bounds is None:
        raise ValueError("velocity_clamp='range' needs bounds")
    if isinstance(bound_handling, str):
        _check_choice("bound_handling", bound_handling, bounds_lib.BOUND_HANDLERS)
    unknown = set(hparams) - set(_HPARAM_NAMES)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {sorted(unknown)}; valid: {_HPARAM_NAMES}"
        )
    if fitness_fn is not None and not callable(fitness_fn):
        raise ValueError(f"fitness_fn must be callable, got {fitness_fn!r}")
    if init_fn is not None and not callable(init_fn):
        raise ValueError(f"init_fn must be callable, got {init_fn!r}")

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
    # Bounds given as plain numbers can be checked now; pytrees are checked at init.
    if bounds is not None:
        if not (isinstance(bounds, tuple | list) and len(bounds) == 2):
            raise ValueError(f"bounds must be a (low, high) pair, got {bounds!r}")
        lo, hi = bounds
        if (
            lo is not None
            and hi is not None
            and np.ndim(lo) == 0
            and np.ndim(hi) == 0
            and not isinstance(lo, dict | list | tuple)
            and not float(lo) < float(hi)
        ):
            raise ValueError(f"bounds: low must be < high, got low={lo}, high={hi}")

    config = PSOConfig(
        num_particles=int(num_particles),
        variant=variant,
        topology=topology,
        ring_neighbors=ring_neighbors,
        num_informants=num_informants,
        random_factors=random_factors,
        bound_handling=bound_handling,
        velocity_clamp=velocity_clamp,
        maximize=maximize,
        stagnation=stagnation,
        rng=rng,
        schedules=tuple(sorted(schedules.items())),
        num_shards=num_shards,
        particle_axis=particle_axis,
        data_axis=data_axis,
        num_inert=num_inert,
    )
    table = topology_lib.neighbour_table(topology, num_particles, ring_neighbors)
    opt = _build(config, fitness_fn, mask, init_fn, bounds, table, default_hparams)
    if mesh is None:
        return opt
    return sharding_lib.shard_optimizer(opt, mesh)


def _build(config, fitness_fn, mask, init_fn, bounds, table, default_hparams):
    # P is the whole swarm; Pl the particles this function instance holds: all of
    # them, or one shard's when the config is sharded (the functions then run
    # inside shard_map over `axis`, one instance per device).
    P = config.num_particles
    S = config.num_shards
    axis = config.particle_axis
    sharded = axis is not None
    Pl = P // S
    num_real = P - config.num_inert
    worst = -jnp.inf if config.maximize else jnp.inf
    sign = -1.0 if config.maximize else 1.0
    if sharded and table is not None:
        halo, shard_tables = topology_lib.shard_tables(table, S)

    def row0():
        """Global index of this instance's first particle (a Python 0 unsharded)."""
        if not sharded:
            return 0
        return jax.lax.axis_index(axis) * Pl

    def own_rows():
        """``[Pl]`` int32 global indices of this instance's particles."""
        return row0() + jnp.arange(Pl, dtype=jnp.int32)

    def all_gather(x, tiled=False):
        # "invarying": the result is the same on every shard, which shard_map's
        # replication check must know for swarm-wide outputs.
        return jax.lax.all_gather(x, axis, tiled=tiled, to="invarying")

    def gather_all(x):
        """The whole swarm's ``[P]`` vector from every shard's ``[Pl]`` (cheap)."""
        return all_gather(x, tiled=True) if sharded else x

    def global_argmin(key_local, value_local):
        """``(g, value[g])`` with ``g`` the swarm-wide ``argmin`` of ``key``.

        Ties go to the lowest global index, as ``jnp.argmin`` on the whole swarm:
        each shard's first local minimum, then the first shard among equals.
        """
        li = jnp.argmin(key_local)
        if not sharded:
            return li, value_local[li]
        keys = all_gather(key_local[li])  # [S]
        vals = all_gather(value_local[li])
        idx = all_gather(row0() + li.astype(jnp.int32))
        s = jnp.argmin(keys)
        return idx[s], vals[s]

    def broadcast_from(x, mine):
        """``x`` of the one shard where ``mine`` is True, on every shard, exactly.

        A psum of the bit patterns (zeros elsewhere) is exact for any dtype, and
        keeps -0.0 and NaN payloads that a float sum would not.
        """
        uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}
        bits = jax.lax.bitcast_convert_type(x, uint[x.dtype.itemsize])
        bits = jax.lax.psum(jnp.where(mine, bits, jnp.zeros_like(bits)), axis)
        return jax.lax.bitcast_convert_type(bits, x.dtype)

    def take_row(tree, g):
        """Row ``g`` (a global particle index) of ``[Pl, ...]`` leaves, everywhere."""
        if not sharded:
            return jax.tree.map(lambda p: p[g], tree)
        owner = g // Pl
        mine = jax.lax.axis_index(axis) == owner
        return jax.tree.map(lambda p: broadcast_from(p[g - owner * Pl], mine), tree)

    def gather_rows(tree, gidx):
        """Rows ``gidx`` (``[Pl]`` global indices, any shard) of ``[Pl, ...]`` leaves.

        Unsharded a plain gather. Sharded, the blocks travel round the ring of
        shards (S - 1 collective permutes of one block each) and each shard keeps
        the rows it asked for as they pass: the whole swarm crosses the
        interconnect once per call, but it is never gathered on one device.
        """
        if not sharded:
            return jax.tree.map(lambda p: p[gidx], tree)
        me = jax.lax.axis_index(axis)
        owner, lidx = gidx // Pl, gidx % Pl
        shift = [(j, (j - 1) % S) for j in range(S)]  # receive from the next shard

        def one(p):
            sel = (Pl,) + (1,) * (p.ndim - 1)
            out = p[lidx]
            block = p
            for d in range(1, S):
                block = jax.lax.ppermute(block, axis, shift)  # shard me + d's rows
                here = (owner == (me + d) % S).reshape(sel)
                out = jnp.where(here, block[lidx], out)
            return out

        return jax.tree.map(one, tree)

    def halos(x, width):
        """The ``width`` particles before and after this shard's block (wrapping).

        ``x`` is ``[Pl, ...]``; returns ``(left, right)``, each ``[width, ...]``,
        gathered by collective permutes from the neighbouring shards (further
        ones when ``width > Pl``), sending only the rows needed.
        """
        lefts, rights = [], []
        for d in range(1, -(-width // Pl) + 1):
            n = min(Pl, width - (d - 1) * Pl)
            to_next = [(j, (j + d) % S) for j in range(S)]
            to_prev = [(j, (j - d) % S) for j in range(S)]
            lefts.insert(0, jax.lax.ppermute(x[Pl - n :], axis, to_next))
            rights.append(jax.lax.ppermute(x[:n], axis, to_prev))
        return jnp.concatenate(lefts), jnp.concatenate(rights)

    def inert_rows():
        """``[Pl]`` bool: padding particles (``None`` when there are none)."""
        if not config.num_inert:
            return None
        return own_rows() >= num_real

    def score(f):
        """Minimisation key: lower is better, non-finite is +inf."""
        return jnp.where(jnp.isnan(f), jnp.inf, sign * f)

    def sanitize(f):
        return jnp.where(jnp.isfinite(f), f, worst)

    # Every random draw below is per particle (axis 0 = this instance's rows), so
    # a shard draws its own rows of the unsharded swarm's draw by row_offset.
    def uniform(key, shape, dtype):
        """Uniforms in [0, 1) from the configured generator."""
        if callable(config.rng):
            return jnp.asarray(config.rng(key, shape, dtype), dtype)
        if config.rng == "jax":
            return jax.random.uniform(key, shape, dtype)
        return prandom.uniform(key, shape, dtype, row_offset=row0())

    def factors(key, leaf):
        if config.random_factors == "per_particle":
            r = uniform(key, (Pl,), leaf.dtype)
            return r.reshape((Pl,) + (1,) * (leaf.ndim - 1))
        return uniform(key, leaf.shape, leaf.dtype)

    def normal(key, shape, dtype):
        if not callable(config.rng) and config.rng == "jax":
            return jax.random.normal(key, shape, dtype)
        return prandom.normal(key, shape, dtype, row_offset=row0())

    def resolve(hparams, step):
        if not config.schedules:
            return hparams
        upd = {
            k: jnp.asarray(fn(step), getattr(hparams, k).dtype)
            for k, fn in config.schedules
        }
        return hparams.replace(**upd)

    def leaf_keys(key, tree, n):
        """``n`` keys per swarmed leaf, as a list aligned with ``jax.tree.leaves``."""
        leaves = jax.tree.leaves(tree)
        keys = jax.random.split(key, (len(leaves), n))
        return [keys[i] for i in range(len(leaves))]

    def map_leaves(fn, first, *others):
        """Map ``fn(i, leaf, *aligned)`` over the swarmed leaves of ``first``.

        ``others`` are trees of the same swarmed structure whose leaves may be
        ``None`` (an unbounded leaf, no velocity clamp), or ``None`` as a whole.
        A tuple returned by ``fn`` becomes a tuple of trees.
        """
        treedef = jax.tree.structure(first)
        leaves = treedef.flatten_up_to(first)
        aligned = [
            [None] * len(leaves) if t is None else treedef.flatten_up_to(t)
            for t in others
        ]
        outs = [fn(i, leaf, *[a[i] for a in aligned]) for i, leaf in enumerate(leaves)]
        if outs and isinstance(outs[0], tuple):
            return tuple(
                treedef.unflatten([o[j] for o in outs]) for j in range(len(outs[0]))
            )
        return treedef.unflatten(outs)

    def sample_positions(key, template_sw, low, high, hp, frozen):
        """Initial-distribution positions ``[P, ...]`` and velocities."""
        key_x, key_v, key_fn = jax.random.split(key, 3)
        kx = leaf_keys(key_x, template_sw, 1)
        kv = leaf_keys(key_v, template_sw, 1)
        drawn_sw = None
        if init_fn is not None:
            keys_fn = jax.random.split(key_fn, P)
            if sharded:  # this shard's rows of the swarm's keys
                keys_fn = jax.lax.dynamic_slice_in_dim(keys_fn, row0(), Pl)
            drawn = jax.vmap(init_fn, in_axes=(0, None))(
                keys_fn, combine(template_sw, frozen)
            )
            drawn_sw = partition(drawn, swarm_mask(template_sw))[0]

        def one(i, t, lo, hi, d):
            shape = (Pl,) + jnp.shape(t)
            dtype = jnp.result_type(t)
            u = uniform(kx[i][0], shape, dtype)
            w = 2 * uniform(kv[i][0], shape, dtype) - 1
            if lo is not None:
                x = lo + u * (hi - lo)
                v = w * hp.init_velocity * (hi - lo)
            else:
                if d is not None:
                    x = d
                else:
                    x = t + hp.init_scale * normal(kx[i][0], shape, dtype)
                v = w * hp.init_velocity * hp.init_scale
            return x.astype(dtype), v.astype(dtype)

        return map_leaves(one, template_sw, low, high, drawn_sw)

    def init(key: PRNGKey, params_template: PyTree, hparams: PSOHyperParams = None):
        """Build the initial swarm around ``params_template`` (one particle).

        Args:
          key: a ``jax.random.key``.
          params_template: one particle's parameters: shapes, dtypes, and the
            centre of the initial spread of unbounded leaves.
          hparams: a :class:`PSOHyperParams`; defaults to the variant's.

        Returns:
          A :class:`PSOState`.
        """
        if hparams is None:
            hparams = default_hparams
        validate_hparams(hparams, config.variant)
        hp = resolve(hparams, jnp.zeros((), jnp.int32))
        if not jax.tree.leaves(params_template):
            raise ValueError("params_template has no array leaves")
        params_template = jax.tree.map(jnp.asarray, params_template)
        mask_tree = resolve_mask(mask, params_template)
        template_sw, frozen = partition(params_template, mask_tree)
        for path, t in zip(
            _leaf_paths(template_sw), jax.tree.leaves(template_sw), strict=True
        ):
            if not jnp.issubdtype(t.dtype, jnp.floating):
                raise ValueError(
                    f"swarmed leaf {path} has dtype {t.dtype}: only floating-point "
                    "leaves can be swarmed; mask it out or cast it"
                )
        low, high = _normalize_bounds(bounds, params_template, mask_tree)
        _normalize_handling(config.bound_handling, template_sw)
        key_init, key_links = jax.random.split(key)
        positions, velocities = sample_positions(
            key_init, template_sw, low, high, hp, frozen
        )
        bounded = [lo is not None for lo in _flat_aligned(low, template_sw)]
        clamp_mode = config.velocity_clamp
        if clamp_mode == "auto":
            clamp_mode = "range" if bounded and all(bounded) else None
        if clamp_mode == "range" and not all(bounded):
            raise ValueError(
                "velocity_clamp='range' needs bounds on every swarmed leaf"
            )
        if clamp_mode is None:
            vscale = jax.tree.map(lambda _: None, template_sw)
        elif clamp_mode == "absolute":
            vscale = jax.tree.map(
                lambda t: jnp.ones((), jnp.result_type(t)), template_sw
            )
        elif clamp_mode == "range":
            vscale = map_leaves(
                lambda i, t, lo, hi: (hi - lo).astype(t.dtype), template_sw, low, high
            )
        else:

            def spread(x):
                if not sharded:
                    return jnp.std(x)
                # Two-pass std over all shards: equal to jnp.std up to rounding
                # (the sums are taken in a different order).
                n = P * math.prod(x.shape[1:])
                mean = jax.lax.psum(jnp.sum(x), axis) / n
                return jnp.sqrt(jax.lax.psum(jnp.sum(jnp.square(x - mean)), axis) / n)

            vscale = jax.tree.map(
                lambda x: jnp.where(spread(x) > 0, spread(x), 1.0).astype(x.dtype),
                positions,
            )
        fitness = jnp.full((Pl,), worst, jnp.float32)
        links = None
        if config.topology == "random":
            links = draw_links(key_links)
        return PSOState(
            positions=positions,
            velocities=velocities,
            fitness=fitness,
            # Distinct buffers (copies), so the whole state can be donated.
            pbest_params=(
                None if config.variant == "cso" else jax.tree.map(jnp.copy, positions)
            ),
            pbest_fitness=jnp.copy(fitness),
            best_params=take_row(positions, 0),
            best_fitness=jnp.asarray(worst, jnp.float32),
            frozen_params=frozen,
            low=low,
            high=high,
            vscale=vscale,
            links=links,
            step=jnp.zeros((), jnp.int32),
            stall_count=jnp.zeros((), jnp.int32),
            num_restarts=jnp.zeros((), jnp.int32),
        )

    def draw_links(key):
        """Random-topology links: ``[Pl, P]``, this instance's rows of ``[P, P]``."""
        if not sharded:
            return topology_lib.random_links(key, P, config.num_informants)
        return topology_lib.random_links(
            key, P, config.num_informants, row_offset=row0(), num_rows=Pl
        )

    def ask(state: PSOState) -> PyTree:
        """Full parameters of every particle, ``[P, ...]`` leaves."""
        frozen_b = jax.tree.map(
            lambda f: jnp.broadcast_to(f, (Pl,) + jnp.shape(f)), state.frozen_params
        )
        return combine(state.positions, frozen_b)

    def neighbour_bests(state, pbest, p_score, g, g_row):
        """Each particle's neighbourhood best, read from the new personal bests.

        Returns:
          ``(nbest, is_self)``: a tree of ``[Pl, ...]`` leaves (``[1, ...]`` for
          the global topology: the one best ``g_row``, broadcast), and ``[Pl]``
          bool, True where a particle is its own neighbourhood best.
        """
        if not sharded:
            nidx = topology_lib.neighbour_best_index(
                config.topology, p_score, table, state.links
            )
            if nidx is None:
                return jax.tree.map(lambda p: p[g][None], pbest), jnp.arange(P) == g
            return jax.tree.map(lambda p: p[nidx], pbest), nidx == jnp.arange(P)
        if config.topology == "global":
            return jax.tree.map(lambda r: r[None], g_row), own_rows() == g
        if config.topology == "random":
            # Any particle may inform any other: all [P] scores (cheap), then the
            # chosen rows from whichever shard holds them.
            nidx = topology_lib.neighbour_best_index(
                "random", gather_all(p_score), None, state.links, own_rows()
            )
            return gather_rows(pbest, nidx), nidx == own_rows()
        # Ring / von Neumann: neighbours lie within `halo` particles, so a halo
        # from the adjacent shards completes every neighbourhood; the tables
        # index [left halo | own block | right halo] in the unsharded column
        # order, which keeps ties (and so the trajectory) the same.
        tab = jnp.asarray(shard_tables)[jax.lax.axis_index(axis)]  # [Pl, M]
        self_pos = halo + jnp.arange(Pl, dtype=jnp.int32)
        if halo == 0:  # one particle per neighbourhood
            return jax.tree.map(lambda p: p, pbest), jnp.ones((Pl,), bool)
        left, right = halos(p_score, halo)
        ext = jnp.concatenate([left, p_score, right])
        best = jnp.argmin(ext[tab], axis=1)
        pos = jnp.take_along_axis(tab, best[:, None], axis=1)[:, 0]  # [Pl]
        in_left, in_right = pos < halo, pos >= halo + Pl

        def rows(p):
            # Rows of the extended block without materialising it (a copy of
            # the whole block per step otherwise).
            lp, rp = halos(p, halo)
            sel = (Pl,) + (1,) * (p.ndim - 1)
            a = lp[jnp.clip(pos, 0, halo - 1)]
            b = rp[jnp.clip(pos - halo - Pl, 0, halo - 1)]
            c = p[jnp.clip(pos - halo, 0, Pl - 1)]
            return jnp.where(
                in_left.reshape(sel), a, jnp.where(in_right.reshape(sel), b, c)
            )

        return jax.tree.map(rows, pbest), pos == self_pos

    def move(key, state, hp, pbest, pbest_score, improved, g, g_row):
        """Velocity and position update for the pbest-based variants."""
        w, c1, c2 = velocity_lib.effective_coefficients(
            config.variant, hp.inertia, hp.cognitive, hp.social
        )
        x_tree, v_tree, p_old = state.positions, state.velocities, state.pbest_params

        # Neighbourhood bests are read from the *new* personal bests. Reading rows
        # of the old ones instead (where(improved, x, p_old)[g]) keeps the old
        # buffer alive past its in-place update, and XLA then copies the whole
        # [P, ...] array every step (measured: +1 copy, ~1.5x slower step).
        nbest, n_is_self = neighbour_bests(state, pbest, pbest_score, g, g_row)
        keys = leaf_keys(key, x_tree, 4)

        if config.variant == "spso2011":
            return _spso2011_move(
                keys, state, hp, w, c1, c2, improved, nbest, n_is_self
            )

        def one(i, x, v, p_old, n, lo, hi, vs, handling):
            # The new personal best, computed inline rather than read back: the
            # update then reads x, v and the old pbest once, in one fusion.
            p = jnp.where(improved.reshape((Pl,) + (1,) * (x.ndim - 1)), x, p_old)
            r1 = factors(keys[i][0], x)
            r2 = factors(keys[i][1], x)
            v_new = w * v + c1 * r1 * (p - x) + c2 * r2 * (n - x)
            return finish(i, keys, x, v_new, lo, hi, vs, handling, hp)

        return map_leaves(
            one,
            x_tree,
            v_tree,
            p_old,
            nbest,
            state.low,
            state.high,
            state.vscale,
            _normalize_handling(config.bound_handling, x_tree),
        )

    def finish(i, keys, x, v_new, lo, hi, vs, handling, hp):
        """Clamp the velocity, move, and enforce the leaf's bounds."""
        if vs is not None:
            v_new = velocity_lib.clamp(v_new, hp.velocity_clamp * vs)
        x_new = x + v_new
        if lo is not None:
            u = (
                uniform(keys[i][3], x.shape, x.dtype)
                if handling == "resample"
                else None
            )
            x_new, v_new = bounds_lib.apply(handling, x_new, v_new, lo, hi, u)
        return x_new.astype(x.dtype), v_new.astype(x.dtype)

    def _spso2011_move(keys, state, hp, w, c1, c2, improved, nbest, n_is_self):
        x_tree = state.positions

        def centre(i, x, p_old, n):
            p = jnp.where(improved.reshape((Pl,) + (1,) * (x.ndim - 1)), x, p_old)
            pp = x + c1 * factors(keys[i][0], x) * (p - x)
            ll = x + c2 * factors(keys[i][1], x) * (n - x)
            c = n_is_self.reshape((Pl,) + (1,) * (x.ndim - 1))
            return jnp.where(c, (x + pp) / 2, (x + pp + ll) / 3)

        g_tree = map_leaves(centre, x_tree, state.pbest_params, nbest)
        dirs = map_leaves(lambda i, x: normal(keys[i][2], x.shape, x.dtype), x_tree)

        def per_particle_sq(t):
            return sum(
                jnp.sum(jnp.square(a).reshape(Pl, -1), axis=1)
                for a in jax.tree.leaves(t)
            )

        radius = jnp.sqrt(
            per_particle_sq(jax.tree.map(lambda a, b: a - b, g_tree, x_tree))
        )
        dir_norm = jnp.sqrt(per_particle_sq(dirs))
        num_dims = sum(int(np.prod(a.shape[1:])) for a in jax.tree.leaves(x_tree))
        u = uniform(keys[0][3], (Pl,), jnp.float32)
        scale = radius * u ** (1.0 / num_dims) / jnp.maximum(dir_norm, 1e-30)

        def one(i, x, v, gc, d, lo, hi, vs, handling):
            s = scale.reshape((Pl,) + (1,) * (x.ndim - 1)).astype(x.dtype)
            v_new = w * v + gc + s * d - x
            return finish(i, keys, x, v_new, lo, hi, vs, handling, hp)

        return map_leaves(
            one,
            x_tree,
            state.velocities,
            g_tree,
            dirs,
            state.low,
            state.high,
            state.vscale,
            _normalize_handling(config.bound_handling, x_tree),
        )

    def swarm_mean(x):
        """``[1, ...]`` mean over the (real) particles of a ``[Pl, ...]`` leaf."""
        if not sharded:
            return jnp.mean(x, axis=0, keepdims=True)
        # A sum of per-shard sums: the mean up to rounding (another sum order).
        inert = inert_rows()
        if inert is not None:
            x = jnp.where(inert.reshape((Pl,) + (1,) * (x.ndim - 1)), 0, x)
        acc = jnp.promote_types(x.dtype, jnp.float32)
        total = jax.lax.psum(jnp.sum(x, axis=0, keepdims=True, dtype=acc), axis)
        return (total / num_real).astype(x.dtype)

    def cso_move(key, state, hp, f_score):
        key_pair, key_r = jax.random.split(key)
        # The pairing is drawn over the whole swarm (the same on every shard).
        perm = jax.random.permutation(key_pair, P)
        half = P // 2
        a, b = perm[:half], perm[half : 2 * half]
        f_all = gather_all(f_score)
        a_wins = f_all[a] <= f_all[b]
        loser = jnp.where(a_wins, b, a)
        partner = jnp.arange(P).at[a].set(b).at[b].set(a)
        is_loser = jnp.zeros((P,), bool).at[loser].set(True)
        x_partner = None
        if sharded:
            partner = jax.lax.dynamic_slice_in_dim(partner, row0(), Pl)
            is_loser = jax.lax.dynamic_slice_in_dim(is_loser, row0(), Pl)
            x_partner = gather_rows(state.positions, partner)
        keys = leaf_keys(key_r, state.positions, 4)
        phi = hp.social

        def one(i, x, v, xp, lo, hi, vs, handling):
            xbar = swarm_mean(x)
            if xp is None:
                xp = x[partner]
            r1 = factors(keys[i][0], x)
            r2 = factors(keys[i][1], x)
            r3 = factors(keys[i][2], x)
            v_l = r1 * v + r2 * (xp - x) + phi * r3 * (xbar - x)
            x_l, v_l = finish(i, keys, x, v_l, lo, hi, vs, handling, hp)
            c = is_loser.reshape((Pl,) + (1,) * (x.ndim - 1))
            return jnp.where(c, x_l, x), jnp.where(c, v_l, v)

        positions, velocities = map_leaves(
            one,
            state.positions,
            state.velocities,
            x_partner,
            state.low,
            state.high,
            state.vscale,
            _normalize_handling(config.bound_handling, state.positions),
        )
        return positions, velocities, is_loser

    def remedy(key, state, hp, positions, velocities, pbest, pbest_fitness, f_score):
        """Re-place the worst ``restart_fraction`` of particles (stagnation)."""
        f_all = gather_all(f_score)  # the ranking is over the whole swarm
        if config.num_inert:  # padding is never chosen (and does not count)
            f_all = jnp.where(np.arange(P) >= num_real, -jnp.inf, f_all)
        order = jnp.argsort(-f_all, stable=True)  # worst first
        rank = jnp.zeros((P,), jnp.int32).at[order].set(jnp.arange(P, dtype=jnp.int32))
        n_sel = jnp.ceil(hp.restart_fraction * num_real).astype(jnp.int32)
        if sharded:
            rank = jax.lax.dynamic_slice_in_dim(rank, row0(), Pl)
        sel = rank < n_sel
        template = state.best_params
        if config.stagnation == "resample":
            new_x, new_v = sample_positions(
                key, template, state.low, state.high, hp, state.frozen_params
            )
        else:
            keys = leaf_keys(key, template, 2)

            def around_best(i, b, vs, lo, hi, v_old):
                scale = hp.init_scale if vs is None else vs
                x = b[None] + hp.perturb_scale * scale * normal(
                    keys[i][0], v_old.shape, v_old.dtype
                )
                if lo is not None:
                    x = jnp.clip(x, lo, hi)
                return x.astype(v_old.dtype), jnp.zeros_like(v_old)

            new_x, new_v = map_leaves(
                around_best, template, state.vscale, state.low, state.high, velocities
            )
        positions = tree_where(sel, new_x, positions)
        velocities = tree_where(sel, new_v, velocities)
        if pbest is not None:
            pbest = tree_where(sel, new_x, pbest)
        pbest_fitness = jnp.where(sel, worst, pbest_fitness)
        return positions, velocities, pbest, pbest_fitness

    def tell(key: PRNGKey, state: PSOState, fitness: jax.Array, hparams=None):
        """Update bests with ``fitness`` of ``state.positions`` and move the swarm.

        Args:
          key: a ``jax.random.key``.
          state: the current :class:`PSOState`.
          fitness: ``[P]`` float, the fitness of ``ask(state)`` (NaN/inf allowed:
            they count as the worst value).
          hparams: a :class:`PSOHyperParams` (traced is fine).

        Returns:
          ``(new_state, StepInfo)``.
        """
        if hparams is None:
            hparams = default_hparams
        fitness = jnp.asarray(fitness)
        if fitness.shape != (Pl,):
            where = f" (this shard's {Pl} of {P})" if sharded else ""
            raise ValueError(
                f"fitness must have shape ({Pl},){where} (one scalar per particle), "
                f"got {fitness.shape}"
            )
        hp = resolve(hparams, state.step)
        key_move, key_links, key_remedy = jax.random.split(key, 3)
        f = sanitize(fitness.astype(jnp.float32))
        inert = inert_rows()
        if inert is not None:  # padding: always the worst, so never a best
            f = jnp.where(inert, worst, f)
        f_score = score(f)
        improved = f_score < score(state.pbest_fitness)
        pbest_fitness = jnp.where(improved, f, state.pbest_fitness)
        p_score = score(pbest_fitness)

        if config.variant == "cso":
            pbest = None
            positions, velocities, is_loser = cso_move(key_move, state, hp, f_score)
            # The best is a winner (ties go to winners), which did not move: read
            # it from the new positions so the old buffer can be updated in place.
            g, cand_fit = global_argmin(jnp.where(is_loser, jnp.inf, f_score), f)
            cand_params = take_row(positions, g)
        else:
            g, cand_fit = global_argmin(p_score, pbest_fitness)
            pbest = tree_where(improved, state.positions, state.pbest_params)
            cand_params = take_row(pbest, g)
            positions, velocities = move(
                key_move, state, hp, pbest, p_score, improved, g, cand_params
            )
        better = score(cand_fit) < score(state.best_fitness)
        best_fitness = jnp.where(better, cand_fit, state.best_fitness)
        best_params = jax.tree.map(
            lambda c, b: jnp.where(better, c, b), cand_params, state.best_params
        )
        # Stall count: steps since the best improved by more than stall_tol.
        gain = score(state.best_fitness) - score(best_fitness)
        progressed = (gain > hp.stall_tol) | (
            jnp.isinf(score(state.best_fitness)) & better
        )
        stall_count = jnp.where(progressed, 0, state.stall_count + 1)
        restarted = jnp.zeros((), bool)
        num_restarts = state.num_restarts
        if config.stagnation is not None:
            restarted = stall_count >= hp.stall_patience
            tmp = state.replace(best_params=best_params)
            positions, velocities, pbest, pbest_fitness = jax.lax.cond(
                restarted,
                lambda: remedy(
                    key_remedy,
                    tmp,
                    hp,
                    positions,
                    velocities,
                    pbest,
                    pbest_fitness,
                    f_score,
                ),
                lambda: (positions, velocities, pbest, pbest_fitness),
            )
            stall_count = jnp.where(restarted, 0, stall_count)
            num_restarts = num_restarts + restarted.astype(jnp.int32)
        links = state.links
        if config.topology == "random":
            links = jnp.where(better, links, draw_links(key_links))
        finite = jnp.isfinite(f)
        num_nonfinite = jnp.sum(~finite).astype(jnp.int32)
        num_improved = jnp.sum(improved).astype(jnp.int32)
        if sharded:
            if inert is not None:
                num_nonfinite = jnp.sum(~finite & ~inert).astype(jnp.int32)
            num_nonfinite = jax.lax.psum(num_nonfinite, axis)
            num_improved = jax.lax.psum(num_improved, axis)
        # From the whole [P] vector, so the sum is the unsharded one bit for bit.
        f_all = gather_all(f)
        finite_all = jnp.isfinite(f_all)
        mean_fitness = jnp.sum(jnp.where(finite_all, f_all, 0.0)) / jnp.sum(finite_all)
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
        info = StepInfo(
            fitness=f,
            best_fitness=best_fitness,
            mean_fitness=mean_fitness,
            num_nonfinite=num_nonfinite,
            num_improved=num_improved,
            stall_count=stall_count,
            restarted=restarted,
        )
        return new_state, info

    def evaluate(state: PSOState, batch) -> jax.Array:
        """``[P]`` fitness of every particle on ``batch`` (vmapped ``fitness_fn``)."""
        if fitness_fn is None:
            raise ValueError(
                "this optimizer was built without fitness_fn: pass one to pso(), "
                "or evaluate yourself and call tell()"
            )

        def one(p, frozen, b):
            return fitness_fn(combine(p, frozen), b)

        out = jax.vmap(one, in_axes=(0, None, None))(
            state.positions, state.frozen_params, batch
        )
        if jnp.shape(out) != (Pl,):
            raise ValueError(
                "fitness_fn must return a scalar for one particle; it returned shape "
                f"{jnp.shape(out)[1:]} per particle"
            )
        if config.data_axis is not None:
            # Each device saw one slice of the batch: the mean of the slices'
            # fitness is the whole batch's for a fitness that is a batch mean.
            out = jax.lax.pmean(out, config.data_axis)
        return out

    def step(key: PRNGKey, state: PSOState, batch: Any = None, hparams=None):
        """Evaluate every particle on ``batch``, update the bests, move the swarm.

        Args:
          key: a ``jax.random.key``.
          state: the current :class:`PSOState`.
          batch: passed to ``fitness_fn`` unchanged (shared by all particles).
          hparams: a :class:`PSOHyperParams` (traced is fine).

        Returns:
          ``(new_state, StepInfo)``.
        """
        key_vel, key_eval = jax.random.split(key)
        del key_eval  # fitness_fn is deterministic; kept for a stable key layout
        return tell(key_vel, state, evaluate(state, batch), hparams)

    step.evaluate = evaluate
    return SwarmOptimizer(
        init=init,
        step=step,
        tell=tell,
        ask=ask,
        default_hparams=default_hparams,
        num_particles=P,
        config=config,
    )


def swarm_mask(swarmed: PyTree) -> PyTree:
    """The bool mask (full structure) of a swarmed tree: False where ``None``."""
    return jax.tree.map(lambda s: s is not None, swarmed, is_leaf=lambda x: x is None)


def _flat_aligned(tree, template):
    """Leaves of ``tree`` (``None`` kept) aligned with ``template``'s leaves."""
    return jax.tree.structure(template).flatten_up_to(tree)


def best_params(state: PSOState) -> PyTree:
    """The full best parameters (swarmed best merged with the frozen leaves).

    >>> import jax, jax.numpy as jnp
    >>> params = {"body": jnp.ones(3), "head": jnp.zeros(2)}
    >>> opt = pso(lambda p, _: jnp.sum((p["head"] - 1.0) ** 2), num_particles=8,
    ...           mask={"body": False, "head": True})
    >>> state = opt.init(jax.random.key(0), params)
    >>> state, _ = opt.step(jax.random.key(1), state)
    >>> best = best_params(state)  # the swarmed head and the frozen body, together
    >>> best["head"].shape, best["body"].tolist()
    ((2,), [1.0, 1.0, 1.0])
    """
    return combine(state.best_params, state.frozen_params)
