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
- ``"clpso"``: Comprehensive Learning PSO, Liang, Qin, Suganthan & Baskar
  (2006), "Comprehensive learning particle swarm optimizer for global
  optimization of multimodal functions", IEEE TEC 10(3).
  ``v_d <- w v_d + c r_d (pbest_{f(d), d} - x_d)``: every coordinate of a
  particle learns from the personal best of its exemplar ``f(d)``, the
  particle itself with probability ``1 - Pc_i`` or else the winner of a
  tournament between two other particles (``Pc_i`` from 0.05 for the first
  particle to 0.5 for the last; one coordinate is forced to learn from another
  particle when none does). A particle's exemplars are drawn again once its
  personal best has not improved for ``refresh_gap`` (``m = 7``) steps, and on
  the first step. ``cognitive`` is ``c = 1.49445``; the velocity clamp is the
  paper's 0.2 x range; ``social`` is unused; ``topology`` must be ``"global"``
  (the exemplars replace the neighbourhood). The paper decreases ``w`` from
  0.9 to 0.2 over the run: pass ``inertia=optax.linear_schedule(0.9, 0.2,
  num_steps)`` for that (the default is a constant, as the run length is not
  known to the factory). Two departures from the paper: particles are kept in
  the box by ``bound_handling`` (as EvoX's CLPSO clips them), where the paper
  lets them leave it and does not evaluate them there; and the exemplars'
  personal bests are read from the whole swarm, so a sharded CLPSO all-gathers
  the personal bests every step.

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
from pso_jax.types import (
    PRNGKey,
    PyTree,
    check_int,
    check_key,
    is_real_dtype,
    is_tracer,
)

VARIANTS = ("inertia", "constriction", "spso2011", "cso", "clpso")
RANDOM_FACTORS = ("per_dimension", "per_particle")
VELOCITY_CLAMPS = (None, "absolute", "range", "init_spread")
STAGNATION_REMEDIES = (None, "resample", "perturb")
RNG_IMPLS = ("hash", "jax")


@struct.dataclass
class PSOHyperParams:
    """Numeric hyperparameters: traced arrays, so changing them never recompiles.

    Build them with ``opt.default_hparams.replace(...)``. Their valid ranges
    are :func:`validate_hparams`'s, checked wherever concrete values enter
    (``pso``, ``init``, ``step``, ``tell``, ``minimize``).

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
      refresh_gap: ``()`` int32, CLPSO's ``m``: steps without personal-best
        improvement after which a particle's exemplars are drawn again (unused
        by the other variants).
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
    refresh_gap: jax.Array


_HPARAM_NAMES = tuple(f.name for f in dataclasses.fields(PSOHyperParams))
_COMMON_DEFAULTS = dict(
    velocity_clamp=0.5,
    init_scale=0.1,
    init_velocity=0.1,
    stall_tol=0.0,
    stall_patience=50,
    restart_fraction=0.5,
    perturb_scale=0.1,
    refresh_gap=7,
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
    # c = 1.49445 and vmax = 0.2 x range are Liang et al.'s (2006). Their w
    # falls from 0.9 to 0.2 over the run, which needs the run length; the
    # default is a constant in that range. Measured (shifted Rastrigin, 40
    # particles, 10 000 D evaluations, 5 seeds): w in 0.5..0.73 all matched the
    # schedule unrotated (median 0 at D=10 and 30); rotated, D=10, the schedule
    # did better (8.5 vs 11.8..13.8).
    "clpso": dict(inertia=0.7, cognitive=1.49445, social=0.0, velocity_clamp=0.2),
}
# Integer hyperparameters (int32 arrays; a float value is an error).
_INT_HPARAMS = ("stall_patience", "refresh_gap")


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
      exemplars: ``clpso`` only (else ``None``): per swarmed leaf, ``[P, ...]``
        int32 of the leaf's shape, the global index of the particle whose
        personal best each coordinate learns from.
      pbest_stall: ``clpso`` only (else ``None``): ``[P]`` int32, steps since
        each personal best improved (or the exemplars were last drawn).
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
    exemplars: PyTree | None = particle_field()
    pbest_stall: jax.Array | None = particle_field()
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


# --- hyperparameter checks --------------------------------------------------------
# One checker, validate_hparams, used wherever hyperparameters enter: pso()'s
# overrides and schedules, init, step, tell, minimize(hparams=...). It reads
# concrete values on the host (one device_get for all of them) and skips traced
# ones: under jit the check happens where the hparams were built.

_MAX_COEFF = velocity_lib.MAX_COEFFICIENT
_F32_MAX = float(np.finfo(np.float32).max)
# name -> (lowest, highest) of a concrete value. The multipliers are bounded by
# MAX_COEFFICIENT (velocity.py says why); init_scale and stall_tol are absolute
# (parameter and fitness units) and need only be finite in float32.
_HPARAM_RANGES = {
    "inertia": (-_MAX_COEFF, _MAX_COEFF),
    "cognitive": (0.0, _MAX_COEFF),
    "social": (0.0, _MAX_COEFF),
    "velocity_clamp": (0.0, _MAX_COEFF),  # > 0; inf disables the clamp
    "init_scale": (0.0, _F32_MAX),
    "init_velocity": (0.0, _MAX_COEFF),
    "stall_tol": (0.0, _F32_MAX),
    "stall_patience": (1, 2**31 - 1),  # an integer (int32)
    "restart_fraction": (0.0, 1.0),
    "perturb_scale": (0.0, _MAX_COEFF),
    "refresh_gap": (1, 2**31 - 1),  # an integer (int32)
}
# Steps at which pso() evaluates a schedule on the host (it cannot check every
# step): a schedule that leaves the valid range later is not caught.
SCHEDULE_CHECK_STEPS = (0, 1, 10, 100, 1_000, 10_000, 100_000)


def _in_range(name: str, v: float) -> bool:
    lo, hi = _HPARAM_RANGES[name]
    if math.isnan(v):
        return False
    if name == "velocity_clamp":
        return v == math.inf or lo < v <= hi
    if name in _INT_HPARAMS and v != math.floor(v):
        return False
    return lo <= v <= hi


def _expected(name: str) -> str:
    lo, hi = _HPARAM_RANGES[name]
    if name == "velocity_clamp":
        return f"0 < velocity_clamp <= {hi:g} (MAX_COEFFICIENT), or inf (no clamp)"
    if name in _INT_HPARAMS:
        return f"an integer, {lo} <= {name} <= {hi}"
    bound = " (MAX_COEFFICIENT)" if hi == _MAX_COEFF else ""
    return f"a finite number, {lo:g} <= {name} <= {hi:g}{bound}"


def _fmt(name: str, v: float) -> str:
    """A value as the user would write it: ``-1.0``, ``1e+30``, ``nan``, ``0``."""
    if name in _INT_HPARAMS and v.is_integer():
        return str(int(v))
    return repr(float(f"{v:.7g}"))


def _concrete_values(hparams: PSOHyperParams, where: str) -> dict:
    """``{name: float or None}`` (``None``: traced), checking types and shapes."""
    leaves = {}
    for name in _HPARAM_NAMES:
        leaf = getattr(hparams, name)
        dtype = getattr(leaf, "dtype", None)
        numeric = (
            isinstance(leaf, int | float | np.number)
            if dtype is None
            # the dtype.kind test first: is_real_dtype alone costs ~1 us a leaf
            else getattr(dtype, "kind", "") in ("i", "u", "f") or is_real_dtype(dtype)
        )
        if isinstance(leaf, bool | np.bool_) or not numeric:
            raise ValueError(
                f"hparams.{name}={leaf!r}{where}: expected a real number (a "
                "scalar array or a Python number)"
            )
        if np.ndim(leaf) != 0:
            raise ValueError(
                f"hparams.{name}{where} must be a scalar, got shape {np.shape(leaf)}"
            )
        leaves[name] = None if is_tracer(leaf) else leaf
    # Start every device-to-host copy before waiting on any (one round trip on
    # an accelerator); jax.device_get does the same at ~4x the host cost.
    for leaf in leaves.values():
        if isinstance(leaf, jax.Array):
            leaf.copy_to_host_async()
    return {k: None if v is None else float(np.asarray(v)) for k, v in leaves.items()}


def _check_hparams(hparams, variant: str, where: str, warn: bool) -> None:
    """:func:`validate_hparams` of one set of values; ``where`` ends the message."""
    if not isinstance(hparams, PSOHyperParams):
        raise ValueError(
            f"hparams must be a PSOHyperParams (e.g. opt.default_hparams, or "
            f"opt.default_hparams.replace(inertia=0.6)), got {type(hparams).__name__}"
        )
    vals = _concrete_values(hparams, where)
    for name, v in vals.items():
        if v is not None and not _in_range(name, v):
            raise ValueError(
                f"hparams.{name}={_fmt(name, v)}{where}: expected {_expected(name)}"
            )
    if variant == "constriction" and None not in (vals["cognitive"], vals["social"]):
        phi = vals["cognitive"] + vals["social"]
        if phi <= 4.0:
            raise ValueError(
                f"constriction needs cognitive + social > 4, got {phi:.4g}{where} "
                "(Clerc & Kennedy's chi is complex otherwise); try 2.05 + 2.05"
            )
    if warn and None not in (vals["inertia"], vals["cognitive"], vals["social"]):
        velocity_lib.warn_if_unstable(
            variant, vals["inertia"], vals["cognitive"], vals["social"]
        )


def _check_schedules(hparams, variant: str, schedules, warn: bool) -> None:
    """Each schedule's values at :data:`SCHEDULE_CHECK_STEPS`, checked.

    ``warn``: warn about the stability region at step 0 (once).
    """
    for s in SCHEDULE_CHECK_STEPS if schedules else ():
        step = jnp.asarray(s, jnp.int32)
        # Concrete even if pso() is called while tracing.
        with jax.ensure_compile_time_eval():
            upd = {k: jnp.asarray(fn(step), _hparam_dtype(k)) for k, fn in schedules}
        where = f" at step {s} (from its schedule)"
        _check_hparams(hparams.replace(**upd), variant, where, warn and s == 0)


def _hparam_dtype(name: str):
    return jnp.int32 if name in _INT_HPARAMS else jnp.float32


def validate_hparams(
    hparams: PSOHyperParams,
    variant: str = "inertia",
    *,
    schedules: Any = (),
    warn: bool = True,
) -> None:
    """Check hyperparameter values on the host; traced values are skipped.

    The rule, for every concrete value (a traced one is only checked to be a
    scalar):

    - every value is finite (``velocity_clamp`` may be ``inf``: no clamp);
    - ``cognitive``, ``social``, ``init_velocity``, ``perturb_scale``,
      ``init_scale``, ``stall_tol`` are ``>= 0``; ``velocity_clamp > 0``;
      ``stall_patience`` and ``refresh_gap`` integers ``>= 1``;
      ``0 <= restart_fraction <= 1``;
    - the dimensionless multipliers (``inertia`` in magnitude, ``cognitive``,
      ``social``, ``velocity_clamp``, ``init_velocity``, ``perturb_scale``) are
      at most :data:`pso_jax.velocity.MAX_COEFFICIENT` (``1e6``): they scale
      moves relative to the search scale, and a larger one overflows a float32
      swarm within a few steps; ``init_scale`` and ``stall_tol`` (absolute)
      are at most float32's max;
    - ``constriction`` needs ``cognitive + social > 4``.

    :func:`pso` checks its overrides (and each schedule at
    :data:`SCHEDULE_CHECK_STEPS`), ``init``, ``step`` and ``tell`` check the
    hyperparameters they are given when these are concrete (outside ``jit``, or
    closed over), and :func:`pso_jax.minimize` before its loop. Under ``jit``
    traced hyperparameters cannot be read, so call this where they are built.

    Args:
      hparams: a :class:`PSOHyperParams`.
      variant: the variant they are for (one of :data:`VARIANTS`).
      schedules: ``(name, schedule)`` pairs (or a dict): those fields are also
        checked at the schedules' values at each of :data:`SCHEDULE_CHECK_STEPS`.
      warn: warn outside the stability region (``step`` and ``tell`` do not).

    Raises:
      ValueError: naming the field, the value (and for a schedule the step)
        and the expected range.

    Warns:
      PSOConvergenceWarning: when ``(w, c1, c2)`` lie outside Poli's (2009)
        stability region.

    >>> opt = pso(num_particles=4)
    >>> validate_hparams(opt.default_hparams)  # the defaults are valid
    >>> validate_hparams(opt.default_hparams.replace(cognitive=jnp.float32(-1.0)))
    Traceback (most recent call last):
    ...
    ValueError: hparams.cognitive=-1.0: expected a finite number, 0 <= cognitive <= 1e+06 (MAX_COEFFICIENT)
    >>> validate_hparams(opt.default_hparams, schedules={"social": lambda s: 1 - s / 50})
    Traceback (most recent call last):
    ...
    ValueError: hparams.social=-1.0 at step 100 (from its schedule): expected a finite number, 0 <= social <= 1e+06 (MAX_COEFFICIENT)
    """  # noqa: E501
    schedules = tuple(dict(schedules).items())
    _check_hparams(hparams, variant, "", warn and not schedules)
    _check_schedules(hparams, variant, schedules, warn)


def _step_hparams(config: PSOConfig, hparams, warn: bool = False) -> PSOHyperParams:
    """The hyperparameters of ``init``/``step``/``tell``, checked if concrete.

    The optimizer's own defaults were checked by :func:`pso` (no work here). A
    scheduled field is replaced by its schedule's value at the state's step, so
    only the other fields of ``hparams`` are checked. ``warn``: also warn
    outside the stability region (``init`` does; a step would warn every call).
    """
    if hparams is None or hparams is config.default_hparams:
        return config.default_hparams
    checked = hparams
    if config.schedules and isinstance(hparams, PSOHyperParams):
        default = config.default_hparams
        checked = hparams.replace(
            **{k: getattr(default, k) for k, _ in config.schedules}
        )
    _check_hparams(checked, config.variant, "", warn=warn)
    return hparams


def check_step_hparams(config: PSOConfig, hparams) -> PSOHyperParams:
    """What ``step``/``tell`` check: ``hparams`` (if concrete) for ``config``.

    For wrappers that pass hyperparameters on to a traced step (e.g. a sharded
    train step), so the values are checked on the host before tracing.
    """
    return _step_hparams(config, hparams)


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


def _leaf_keys(config: PSOConfig, key, tree, n):
    """``n`` keys per swarmed leaf, as a list aligned with ``jax.tree.leaves``.

    With the hash generator they are the keys' seed words, drawn in one
    vmapped call (``prandom.seeds``: the same numbers as drawing from each key,
    and one threefry loop in the program instead of one per draw, which took
    most of a swarm step's compile time).
    """
    leaves = jax.tree.leaves(tree)
    keys = jax.random.split(key, (len(leaves), n))
    if config.rng == "hash":  # (a callable rng gets the keys themselves)
        keys = prandom.seeds(keys)
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
        k: jnp.asarray(fn(step), jnp.result_type(getattr(hparams, k)))
        for k, fn in config.schedules
    }
    return hparams.replace(**upd)


# --- init ------------------------------------------------------------------------


def _sample_positions(config, key, template_sw, low, high, hp, frozen):
    """Initial-distribution positions ``[n, ...]`` and velocities."""
    axis = config.axis
    key_x, key_v, key_fn = jax.random.split(key, 3)
    kx = _leaf_keys(config, key_x, template_sw, 1)
    kv = _leaf_keys(config, key_v, template_sw, 1)
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


def _own_copy(tree):
    """``tree`` with every array leaf in a buffer of its own (``None`` kept)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _split_template(config, params_template):
    """``(full, swarmed, frozen, mask)`` of a checked template.

    Raises:
      ValueError: naming the leaf, for a leaf that is not an array, or a
        swarmed leaf that is not floating-point or has no element.
    """
    if not jax.tree.leaves(params_template):
        raise ValueError(
            f"params_template has no array leaves, got {params_template!r}: pass "
            "one particle's parameters (e.g. jnp.zeros(3) or a Flax params dict)"
        )
    params_template = jax.tree.map(_template_leaf, params_template)
    mask_tree = resolve_mask(config.mask, params_template)
    template_sw, frozen = partition(params_template, mask_tree)
    for path, t in zip(
        leaf_paths(template_sw), jax.tree.leaves(template_sw), strict=True
    ):
        if not jnp.issubdtype(t.dtype, jnp.floating):
            raise ValueError(
                f"params_template leaf {path} has dtype {t.dtype}: only "
                "floating-point leaves can be swarmed; mask it out or cast it"
            )
        if t.size == 0:
            raise ValueError(
                f"params_template leaf {path} has shape {t.shape} (no element): "
                "a swarmed leaf needs at least one coordinate; mask it out or "
                "remove it"
            )
    if not isinstance(config.bound_handling, str):
        bounds_lib.check_handling(
            bounds_lib.handler_tree(config.bound_handling, template_sw)
        )
    return params_template, template_sw, frozen, mask_tree


def _template_leaf(x):
    """A template leaf as an array, or an error naming it."""
    try:
        return jnp.asarray(x)
    except TypeError:
        raise ValueError(
            f"params_template has a leaf {x!r} of type {type(x).__name__}: "
            "expected arrays or numbers"
        ) from None


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
      hparams: a :class:`PSOHyperParams`; defaults to the variant's. Concrete
        values are checked (:func:`validate_hparams`); traced ones, under
        ``jit``, cannot be.
      config: the static configuration (bound by :func:`pso`).

    Returns:
      A :class:`PSOState`.

    Raises:
      ValueError: naming the argument and the value, for a key that is not one
        PRNG key, out-of-range concrete ``hparams``, a template leaf that is
        not an array, a swarmed leaf that is not floating-point or is empty, a
        mask that is not a (prefix) tree of bools, or bounds that do not fit
        the leaves (shape, order, finiteness in the leaf's dtype).
    """
    check_key(key)
    hparams = _step_hparams(config, hparams, warn=True)
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
        # Copies, never the caller's arrays: a donated state must not delete
        # the user's frozen parameters or bound arrays.
        frozen_params=_own_copy(frozen),
        low=_own_copy(low),
        high=_own_copy(high),
        vscale=_velocity_scale(config, template_sw, positions, low, high),
        links=links,
        exemplars=_own_exemplars(config, positions),
        pbest_stall=(
            jnp.zeros((config.axis.local_size,), jnp.int32)
            if config.variant == "clpso"
            else None
        ),
        step=jnp.zeros((), jnp.int32),
        stall_count=jnp.zeros((), jnp.int32),
        num_restarts=jnp.zeros((), jnp.int32),
    )


def _own_exemplars(config: PSOConfig, positions):
    """CLPSO's exemplars before the first step: every coordinate its own row.

    The first ``tell`` draws them (the personal bests' fitness is known only
    then). ``None`` for the other variants.
    """
    if config.variant != "clpso":
        return None
    own = config.axis.own_rows()
    return jax.tree.map(
        lambda x: jnp.broadcast_to(along_rows(own, x), x.shape).astype(jnp.int32),
        positions,
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


def _check_state(config: PSOConfig, state: Any, whole: bool = False) -> None:
    """Raise unless ``state`` is a :class:`PSOState` of this swarm's size.

    ``whole``: the whole swarm's state (a sharded optimizer's, outside
    ``shard_map``), not this instance's rows.
    """
    if not isinstance(state, PSOState):
        raise ValueError(
            f"state must be a PSOState (from this optimizer's init), got "
            f"{type(state).__name__}"
        )
    n = config.num_particles if whole else config.axis.local_size
    where = "" if whole else config.axis.describe()
    if jnp.shape(state.fitness) != (n,):
        raise ValueError(
            f"state has {jnp.shape(state.fitness)[:1]} particles (state.fitness "
            f"shape {jnp.shape(state.fitness)}), this optimizer ({n},){where}: "
            "was it made by another pso(...)?"
        )


def ask(state: PSOState, *, config: PSOConfig) -> PyTree:
    """Full parameters of every particle, ``[P, ...]`` leaves.

    ``ask`` takes no hyperparameters: there is nothing to check but the state.
    """
    _check_state(config, state)
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
    keys = _leaf_keys(config, key, state.positions, 4)
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
    keys = _leaf_keys(config, key_r, state.positions, 4)
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


def _clpso_draw(config, key, positions, p_score):
    """Fresh CLPSO exemplars for every coordinate of this instance's rows.

    Each coordinate learns from another particle with its particle's
    probability ``Pc``, from the winner of a tournament between two other
    particles (by personal-best score); a particle none of whose coordinates
    learns from another has one coordinate, chosen uniformly over all its
    coordinates (every leaf), forced to.

    Returns:
      per swarmed leaf, ``[n, ...]`` int32 global particle indices.
    """
    axis, P = config.axis, config.num_particles
    score_all = axis.gather_all(p_score)  # [P], the tournaments' scores
    own = axis.own_rows()
    pc = velocity_lib.clpso_learning_probability(own, P)
    key_leaves, key_forced = jax.random.split(key)
    keys = _leaf_keys(config, key_leaves, positions, 3)

    def winners(i, x):
        shape, dtype = x.shape, jnp.float32
        learn = _uniform(config, keys[i][0], shape, dtype) < along_rows(pc, x)
        a, b = velocity_lib.clpso_candidates(
            along_rows(own, x),
            _uniform(config, keys[i][1], shape, dtype),
            _uniform(config, keys[i][2], shape, dtype),
            P,
        )
        return learn, velocity_lib.clpso_tournament(a, b, score_all)

    learn, winner = _map_leaves(winners, positions)
    n = axis.local_size
    learns_any = functools.reduce(
        jnp.logical_or,
        [jnp.any(lf.reshape(n, -1), axis=1) for lf in jax.tree.leaves(learn)],
    )
    sizes = [int(np.prod(x.shape[1:])) for x in jax.tree.leaves(positions)]
    u = _uniform(config, key_forced, (n,), jnp.float32)
    forced = jnp.minimum(jnp.floor(u * sum(sizes)).astype(jnp.int32), sum(sizes) - 1)
    offsets = np.cumsum([0] + sizes[:-1])

    def choose(i, x, lf, w):
        coord = offsets[i] + jnp.arange(sizes[i], dtype=jnp.int32)
        hit = coord.reshape(x.shape[1:])[None] == along_rows(forced, x)
        lf = lf | (hit & ~along_rows(learns_any, x))
        return jnp.where(lf, w, along_rows(own, x)).astype(jnp.int32)

    return _map_leaves(choose, positions, learn, winner)


def _clpso_exemplars(config, key, state, hp, improved, p_score):
    """``(exemplars, pbest_stall)`` after this step's personal-best update.

    A particle's exemplars are drawn again when its personal best has not
    improved for ``refresh_gap`` steps (its stall count then restarts), and
    every particle's on the first step. Fresh exemplars are drawn for every
    row each step and kept where a row refreshes: the same work every step
    (traced, no branch), about three uniforms per coordinate.
    """
    stall = jnp.where(improved, 0, state.pbest_stall + 1)
    refresh = (stall >= hp.refresh_gap) | (state.step == 0)
    drawn = _clpso_draw(config, key, state.positions, p_score)
    exemplars = tree_where(refresh, drawn, state.exemplars)
    return exemplars, jnp.where(refresh, 0, stall)


def _clpso_move(config, key, state, hp, pbest, exemplars):
    """CLPSO's move: each coordinate follows its exemplar's personal best."""
    keys = _leaf_keys(config, key, state.positions, 2)
    handling = bounds_lib.handler_tree(config.bound_handling, state.positions)

    def one(i, x, v, p, ex, lo, hi, vs, h):
        # The exemplars are anywhere in the swarm: the whole swarm's personal
        # bests (an all-gather when sharded).
        target = jnp.take_along_axis(config.axis.gather_all(p), ex, axis=0)
        r = _factors(config, keys[i][0], x)
        v_new = velocity_lib.clpso(x, v, target, r, hp.inertia, hp.cognitive)
        return _finish(config, keys[i][1], x, v_new, lo, hi, vs, h, hp)

    return _map_leaves(
        one,
        state.positions,
        state.velocities,
        pbest,
        exemplars,
        state.low,
        state.high,
        state.vscale,
        handling,
    )


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
        keys = _leaf_keys(config, key, template, 2)

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
      hparams: a :class:`PSOHyperParams` (traced is fine). Concrete values
        are checked on the host first (:func:`validate_hparams`); traced ones
        cannot be, so under ``jit`` check them where they are built.
      config: the static configuration (bound by :func:`pso`).

    Returns:
      ``(new_state, StepInfo)``.

    Raises:
      ValueError: for a key that is not one PRNG key, a state of another swarm,
        ``fitness`` of the wrong shape or dtype, or out-of-range concrete
        ``hparams``, naming the argument and the value.
    """
    check_key(key)
    _check_state(config, state)
    hparams = _step_hparams(config, hparams)
    fitness = jnp.asarray(fitness)
    n = config.axis.local_size
    if fitness.shape != (n,):
        raise ValueError(
            f"fitness must have shape ({n},){config.axis.describe()} (one "
            f"scalar per particle), got {fitness.shape}"
        )
    if not is_real_dtype(fitness.dtype):
        raise ValueError(
            f"fitness has dtype {fitness.dtype}: expected real numbers (float or "
            "int), one per particle"
        )
    return _tell(key, state, fitness, hparams, config)


def _tell(key, state, fitness, hparams, config):
    """:func:`tell` on checked arguments."""
    axis, maximize = config.axis, config.maximize
    hp = _resolve(config, hparams, state.step)
    key_move, key_links, key_remedy = jax.random.split(key, 3)
    f = fitness_lib.sanitize(fitness.astype(jnp.float32), maximize)
    inert = axis.inert_rows()
    if inert is not None:  # padding: always the worst, so never a best
        f = jnp.where(inert, fitness_lib.worst(maximize), f)
    score = functools.partial(fitness_lib.score, maximize=maximize)
    f_score = score(f)
    improved = f_score < score(state.pbest_fitness)
    exemplars, pbest_stall = state.exemplars, state.pbest_stall
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
        if config.variant == "clpso":
            key_ex, key_move = jax.random.split(key_move)
            exemplars, pbest_stall = _clpso_exemplars(
                config, key_ex, state, hp, improved, p_score
            )
            positions, velocities = _clpso_move(
                config, key_move, state, hp, pbest, exemplars
            )
        else:
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
        exemplars=exemplars,
        pbest_stall=pbest_stall,
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

    Raises:
      ValueError: for a state of another swarm or fitness of the wrong shape.
    """
    _check_state(config, state)
    n = config.axis.local_size
    if pbest_fitness is not None and jnp.shape(pbest_fitness) != (n,):
        raise ValueError(
            f"pbest_fitness must have shape ({n},) (one per particle) or be None, "
            f"got {jnp.shape(pbest_fitness)}"
        )
    if jnp.shape(best_fitness) != ():
        raise ValueError(
            f"best_fitness must be a scalar (shape ()), got {jnp.shape(best_fitness)}"
        )
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

    Raises:
      ValueError: without a ``fitness_fn``, or if it does not return one real
        scalar per particle (naming the shape or structure it returned). The
        output's shape is static, so the check costs no device work.
    """
    if fitness_fn is None:
        raise ValueError(
            "this optimizer was built without fitness_fn: pass one to pso(), "
            "or evaluate yourself and call tell()"
        )
    out = fitness_lib.swarm_fitness(
        fitness_fn, state.positions, state.frozen_params, batch
    )
    fitness_lib.check_output(out, config.axis.local_size)
    return config.axis.data_mean(out)


def build_step(config: PSOConfig, fitness_fn: Callable | None) -> Callable:
    """The swarm step: evaluate every particle, update the bests, move the swarm.

    Returns:
      ``step(key, state, batch=None, hparams=None) -> (PSOState, StepInfo)``:
      ``batch`` is passed to ``fitness_fn`` unchanged (shared by all particles);
      ``hparams`` a :class:`PSOHyperParams` (traced is fine). The key, state and
      concrete ``hparams`` are checked on the host before anything is
      evaluated, as by :func:`tell`; under ``jit`` traced hyperparameters are
      not (check them where they are built, with :func:`validate_hparams`).
    """

    def step(key: PRNGKey, state: PSOState, batch: Any = None, hparams=None):
        check_key(key)
        _check_state(config, state)
        hparams = _step_hparams(config, hparams)
        # fitness_fn is deterministic: the whole key moves the swarm.
        fitness = evaluate_swarm(fitness_fn, state, batch, config=config)
        return _tell(key, state, fitness, hparams, config)

    return step


def _check_args(num_particles, hparams, fitness_fn, **settings):
    """The factory's argument checks, before any compilation."""
    variant, rng = settings["variant"], settings["rng"]
    velocity_clamp, bounds = settings["velocity_clamp"], settings["bounds"]
    bound_handling, init_fn = settings["bound_handling"], settings["init_fn"]
    check_int("num_particles", num_particles, minimum=1)
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
    if not isinstance(settings["maximize"], bool | np.bool_):
        raise ValueError(f"maximize={settings['maximize']!r}: expected a bool")


def _default_hparams(variant, hparams):
    """``(PSOHyperParams, schedules)``: the variant's defaults with the overrides.

    The overrides are checked as given (``stall_patience=2.5`` is an error, not
    2), and each schedule at :data:`SCHEDULE_CHECK_STEPS`.
    """
    schedules = tuple(sorted((k, v) for k, v in hparams.items() if callable(v)))
    numbers = {k: v for k, v in hparams.items() if not callable(v)}
    # Scheduled fields keep the variant's default here: their schedules are
    # checked (and step 0 warned about) at SCHEDULE_CHECK_STEPS, named as such.
    base = {**_COMMON_DEFAULTS, **_VARIANT_DEFAULTS[variant], **numbers}
    validate_hparams(PSOHyperParams(**base), variant, schedules=schedules)
    with jax.ensure_compile_time_eval():
        at_0 = {k: fn(jnp.zeros((), jnp.int32)) for k, fn in schedules}
    default_hparams = PSOHyperParams(
        **{k: jnp.asarray(v, _hparam_dtype(k)) for k, v in {**base, **at_0}.items()}
    )
    return default_hparams, schedules


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
    if variant == "clpso" and topology != "global":
        raise ValueError(
            f"variant='clpso' supports topology='global' (its exemplars replace "
            f"the neighbourhood), got {topology!r}"
        )
    if variant == "clpso" and num_particles < 3:
        raise ValueError(
            f"num_particles={num_particles}: clpso's tournaments pick two other "
            "particles, needs >= 3"
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
        ``spso2011`` and ``"global"`` otherwise. ``cso`` and ``clpso`` support
        ``"global"``. (:func:`pso_jax.minimize` defaults differently: von
        Neumann with time-varying coefficients, see
        :func:`pso_jax.minimize.minimize_defaults`; ``pso()``'s own defaults,
        which the network-training hybrid relies on, are unchanged.)
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
        each step from the state's step counter. Numbers are checked by
        :func:`validate_hparams` (finite, in range, multipliers at most
        ``MAX_COEFFICIENT``); a schedule is evaluated on the host at each of
        :data:`SCHEDULE_CHECK_STEPS` and must be valid there.

    Returns:
      A :class:`~pso_jax.base.SwarmOptimizer`. Its ``init``, ``step`` and
      ``tell`` check their key, state and concrete hyperparameters on the host
      (traced hyperparameters, under ``jit``, cannot be read: check them where
      you build them, with :func:`validate_hparams`).

    Raises:
      ValueError: for an invalid argument, naming it and its value, before any
        compilation.

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
    check = functools.partial(_step_hparams, config, warn=True)
    sharded = sharding_lib.shard_optimizer(opt, mesh, PSOState, check_hparams=check)
    # Inside shard_map every argument is traced: check on the host first.
    return sharded._replace(
        step=functools.partial(_sharded_step, sharded.step, config),
        tell=functools.partial(_sharded_tell, sharded.tell, config),
    )


def _sharded_step(step_fn, config, key, state, batch=None, hparams=None):
    """A sharded ``step`` with :func:`tell`'s host-side checks first."""
    check_key(key)
    _check_state(config, state, whole=True)
    _step_hparams(config, hparams)
    return step_fn(key, state, batch, hparams)


def _sharded_tell(tell_fn, config, key, state, fitness, hparams=None):
    """A sharded ``tell`` with :func:`tell`'s host-side checks first."""
    check_key(key)
    _check_state(config, state, whole=True)
    _step_hparams(config, hparams)
    return tell_fn(key, state, fitness, hparams)


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
