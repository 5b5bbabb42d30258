"""Velocity rules, coefficients and their stability region.

The update rules are pure functions of one leaf (``[P, ...]`` arrays, one row per
particle, or broadcastable): the random factors are drawn by the caller
(:mod:`pso_jax.pso`), so each rule here is the paper's equation and nothing else.

- :func:`inertia`: ``v <- w v + c1 r1 (p - x) + c2 r2 (n - x)`` (also constriction,
  with the coefficients of :func:`effective_coefficients`).
- :func:`spso2011_centre`, :func:`spso2011`: the rotation-invariant SPSO-2011 move.
- :func:`cso`: the Competitive Swarm Optimizer's loser update.
- :func:`clpso`, :func:`clpso_learning_probability`, :func:`clpso_candidates`,
  :func:`clpso_tournament`: Comprehensive Learning PSO's update and the rule
  that picks each coordinate's exemplar (the particle whose personal best it
  learns from).
- :func:`finish`: shared by all: clamp the velocity, move, enforce the bounds.
- Schedules (``step -> value`` functions, for ``pso(inertia=..., ...)``):
  :func:`time_varying_coefficients` (optax linear schedules), the linearly
  decreasing inertia with time-varying acceleration coefficients that
  :func:`pso_jax.minimize` uses by default.

- Inertia weight: Shi & Eberhart (1998), "A modified particle swarm optimizer".
  ``v <- w v + c1 r1 (p - x) + c2 r2 (n - x)``.
- Constriction: Clerc & Kennedy (2002), "The particle swarm - explosion,
  stability, and convergence in a multidimensional complex space".
  ``v <- chi (v + c1 r1 (p - x) + c2 r2 (n - x))`` with
  ``chi = 2 / |2 - phi - sqrt(phi^2 - 4 phi)|``, ``phi = c1 + c2 > 4``; for
  ``c1 = c2 = 2.05``, ``chi ~= 0.7298``. It is the inertia rule with
  ``(w, c1, c2) = (chi, chi c1, chi c2)``, which is how it is computed here.
- Comprehensive learning: Liang, Qin, Suganthan & Baskar (2006),
  "Comprehensive learning particle swarm optimizer for global optimization of
  multimodal functions", IEEE TEC 10(3). ``v_d <- w v_d + c r_d (p_{f(d), d} -
  x_d)``: each coordinate ``d`` of particle ``i`` follows the personal best of
  its exemplar ``f_i(d)``, itself with probability ``1 - Pc_i``, else the
  winner of a tournament between two other particles.
- Time-varying acceleration coefficients (TVAC): Ratnaweera, Halgamuge &
  Watson (2004), "Self-organizing hierarchical particle swarm optimizer with
  time-varying acceleration coefficients", IEEE TEC 8(3): ``c1`` falls from
  2.5 to 0.5 and ``c2`` rises from 0.5 to 2.5 over the run, with the inertia
  falling linearly from 0.9 to 0.4 (Shi & Eberhart, 1999, "Empirical study of
  particle swarm optimization"): explore first, converge at the end. Here the
  schedules may take only the first part of the run (``span``) and hold.
- Order-2 stability region: Poli (2009), "Mean and variance of the sampling
  distribution of particle swarm optimizers during stagnation":
  ``|w| < 1`` and ``c1 + c2 < 24 (1 - w^2) / (7 - 5 w)``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import optax

from pso_jax import bounds as bounds_lib

# The largest magnitude a dimensionless coefficient (w, c1, c2, and the
# multipliers velocity_clamp, init_velocity, perturb_scale) may have. They scale
# a move relative to the search scale (a leaf's bound range, initial spread or
# init_scale): one above 1e6 moves a particle more than a million search widths
# in one step, and since (1e6)^7 > 3.4e38 (float32's max) even a unit-scale
# swarm overflows within a few steps. No such swarm can give a finite result,
# so these values are rejected rather than warned about.
MAX_COEFFICIENT = 1e6


class PSOConvergenceWarning(UserWarning):
    """(w, c1, c2) lie outside the order-2 stability region (Poli, 2009)."""


def constriction_factor(c1, c2):
    """Clerc-Kennedy constriction ``chi`` for ``phi = c1 + c2`` (NaN if phi <= 4).

    >>> round(float(constriction_factor(2.05, 2.05)), 4)
    0.7298
    """
    phi = jnp.asarray(c1 + c2, jnp.float32)
    disc = jnp.maximum(phi * phi - 4.0 * phi, 0.0)
    chi = 2.0 / jnp.abs(2.0 - phi - jnp.sqrt(disc))
    return jnp.where(phi > 4.0, chi, jnp.nan)


def effective_coefficients(variant: str, inertia, cognitive, social):
    """The ``(w, c1, c2)`` that the inertia-form update uses for a variant.

    >>> w, c1, c2 = effective_coefficients("constriction", 1.0, 2.05, 2.05)
    >>> round(float(w), 4), round(float(c1), 4)  # chi and chi * 2.05
    (0.7298, 1.4962)
    >>> effective_coefficients("inertia", 0.7, 1.5, 1.5)
    (0.7, 1.5, 1.5)
    """
    if variant == "constriction":
        chi = constriction_factor(cognitive, social)
        return chi, chi * cognitive, chi * social
    return inertia, cognitive, social


def in_stability_region(w: float, c1: float, c2: float) -> bool:
    """Whether ``(w, c1, c2)`` satisfy Poli's (2009) order-2 stability condition.

    >>> in_stability_region(0.7298, 1.49618, 1.49618)
    True
    >>> in_stability_region(0.9, 2.0, 2.0)
    False
    """
    if not -1.0 < w < 1.0:
        return False
    return c1 + c2 < 24.0 * (1.0 - w * w) / (7.0 - 5.0 * w)


def warn_if_unstable(variant: str, w: float, c1: float, c2: float) -> None:
    """Warn (:class:`PSOConvergenceWarning`) outside the stability region.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_if_unstable("inertia", 1.0, 2.0, 2.0)  # the original PSO of 1995
    >>> caught[0].category.__name__
    'PSOConvergenceWarning'
    """
    if variant not in ("inertia", "constriction", "spso2011"):
        return
    # Concrete inputs (the only ones that reach here) stay concrete under jit:
    # constriction's chi is computed with jnp, which would otherwise trace.
    with jax.ensure_compile_time_eval():
        coefficients = effective_coefficients(variant, w, c1, c2)
        we, c1e, c2e = (float(v) for v in coefficients)
    if not in_stability_region(we, c1e, c2e):
        warnings.warn(
            f"(w, c1, c2) = ({we:.4g}, {c1e:.4g}, {c2e:.4g}) (effective, variant "
            f"{variant!r}) lie outside the order-2 stability region |w| < 1, "
            "c1 + c2 < 24(1 - w^2)/(7 - 5w) (Poli, 2009): the swarm may diverge",
            PSOConvergenceWarning,
            stacklevel=3,
        )


def clamp(v, vmax):
    """Clamp velocity componentwise to ``[-vmax, vmax]`` (``vmax`` may be inf).

    >>> import jax.numpy as jnp
    >>> clamp(jnp.array([-3.0, 0.5, 3.0]), 1.0).tolist()
    [-1.0, 0.5, 1.0]

    Written with selects, not ``jnp.clip``: the same numbers (NaN stays NaN),
    but XLA:CPU's fusion pass duplicates an effectively-unary ``min``/``max``
    into both of its consumers (the stored velocity and ``x + v``), so the
    whole velocity rule ran twice, each time reading x, v and the bests, and x
    and v were copied once more; a select of two large operands is
    materialised once (``benchmarks/results/bound_cost.md``: a clamped,
    unbounded step took 2.0x the unclamped one with ``jnp.clip``, 0.98x now).
    """
    return jnp.where(v > vmax, vmax, jnp.where(v < -vmax, -vmax, v))


def inertia(x, v, pbest, nbest, r1, r2, w, c1, c2):
    """The inertia-weight velocity (Shi & Eberhart, 1998).

    ``v <- w v + c1 r1 (pbest - x) + c2 r2 (nbest - x)``.

    Args:
      x, v: ``[P, ...]`` positions and velocities of one leaf.
      pbest: ``[P, ...]`` personal bests; nbest: neighbourhood bests,
        ``[P, ...]`` or ``[1, ...]`` (the global best, broadcast).
      r1, r2: uniforms in ``[0, 1)`` broadcastable to ``x``.
      w, c1, c2: inertia, cognitive and social coefficients (traced scalars).

    >>> import jax.numpy as jnp
    >>> float(inertia(jnp.float32(0), 1.0, 1.0, 2.0, 1.0, 1.0, 0.5, 1.0, 1.0)[()])
    3.5
    """
    return w * v + c1 * r1 * (pbest - x) + c2 * r2 * (nbest - x)


def spso2011_centre(x, pbest, nbest, r1, r2, c1, c2, nbest_is_self):
    """SPSO-2011's centre of gravity ``G`` of ``x``, ``p'`` and ``l'``.

    ``p' = x + c1 r1 (p - x)``, ``l' = x + c2 r2 (l - x)``; ``G`` is the mean of
    the three, or of ``x`` and ``p'`` where the particle is its own neighbourhood
    best (``nbest_is_self``, broadcastable to ``x``). Clerc (2011).
    """
    pp = x + c1 * r1 * (pbest - x)
    ll = x + c2 * r2 * (nbest - x)
    return jnp.where(nbest_is_self, (x + pp) / 2, (x + pp + ll) / 3)


def spso2011(x, v, centre, direction, scale, w):
    """SPSO-2011's velocity: ``w v + G + s d - x``.

    The new point ``G + s d`` is uniform in the hypersphere around ``centre``
    (``G``): ``direction`` a Gaussian draw, ``scale`` its per-particle length
    (radius ``|G - x|`` times ``u^(1/D)`` over ``|d|``).
    """
    return w * v + centre + scale * direction - x


def cso(x, v, x_winner, x_mean, r1, r2, r3, phi):
    """The Competitive Swarm Optimizer's loser update (Cheng & Jin, 2015).

    ``v_l <- r1 v_l + r2 (x_w - x_l) + phi r3 (xbar - x_l)``.
    """
    return r1 * v + r2 * (x_winner - x) + phi * r3 * (x_mean - x)


# CLPSO's learning-probability curve (Liang et al., 2006, eq. 8): from
# CLPSO_PC_LOW for the first particle to CLPSO_PC_LOW + CLPSO_PC_SPAN for the
# last, exponentially (CLPSO_PC_RATE), so the swarm holds particles that mostly
# exploit their own best and particles that mostly learn from others.
CLPSO_PC_LOW = 0.05
CLPSO_PC_SPAN = 0.45
CLPSO_PC_RATE = 10.0


def clpso_learning_probability(index, num_particles: int):
    """CLPSO's learning probability ``Pc`` of the particles at ``index``.

    ``Pc_i = 0.05 + 0.45 (exp(10 (i - 1) / (P - 1)) - 1) / (exp(10) - 1)`` for
    the paper's 1-based ``i``; ``index`` is 0-based (``i - 1``).

    Args:
      index: int array of global particle indices in ``[0, P)``.
      num_particles: ``P >= 2``.

    Returns:
      float32 array of ``index``'s shape.

    >>> import jax.numpy as jnp
    >>> pc = clpso_learning_probability(jnp.arange(3), 3)
    >>> [round(float(p), 4) for p in pc]
    [0.05, 0.053, 0.5]
    """
    t = jnp.asarray(index, jnp.float32) / (num_particles - 1)
    ramp = jnp.expm1(CLPSO_PC_RATE * t) / jnp.expm1(jnp.float32(CLPSO_PC_RATE))
    return CLPSO_PC_LOW + CLPSO_PC_SPAN * ramp


def clpso_candidates(own, u_a, u_b, num_particles: int):
    """Two distinct particles other than ``own`` for a CLPSO tournament.

    Args:
      own: int32 global index of the learning particle, broadcastable to ``u_a``.
      u_a, u_b: uniforms in ``[0, 1)`` of one shape (one pair per coordinate).
      num_particles: ``P >= 3``.

    Returns:
      ``(a, b)``, int32 global indices, uniform over the ordered pairs of
      distinct particles other than ``own``.
    """
    n = num_particles
    # Offsets from own: a in 1..P-1, b in 1..P-2 with a's offset skipped.
    off_a = 1 + jnp.clip(jnp.floor(u_a * (n - 1)).astype(jnp.int32), 0, n - 2)
    off_b = 1 + jnp.clip(jnp.floor(u_b * (n - 2)).astype(jnp.int32), 0, n - 3)
    off_b = jnp.where(off_b >= off_a, off_b + 1, off_b)
    return (own + off_a) % n, (own + off_b) % n


def clpso_tournament(a, b, score):
    """The tournament winner: ``a`` or ``b``, whichever has the lower ``score``.

    ``score``: ``[P]`` personal-best scores of the whole swarm (lower is
    better, never NaN); ties go to ``a``.
    """
    return jnp.where(score[a] <= score[b], a, b)


def clpso(x, v, exemplar_pbest, r, w, c):
    """CLPSO's velocity (Liang et al., 2006, eq. 7).

    ``v <- w v + c r (pbest_{f(d)} - x)``, with ``exemplar_pbest`` the personal
    best of each coordinate's exemplar (``[P, ...]``, like ``x``).

    >>> import jax.numpy as jnp
    >>> float(clpso(jnp.float32(0), 1.0, 2.0, 0.5, 0.5, 1.0)[()])
    1.5
    """
    return w * v + c * r * (exemplar_pbest - x)


def finish(x, v_new, vmax, low, high, handling, u=None):
    """Clamp the velocity to ``vmax``, move, and enforce the leaf's bounds.

    Args:
      x: ``[P, ...]`` positions before the move.
      v_new: the new velocities.
      vmax: the velocity clamp (broadcastable), or ``None`` for none.
      low, high: the leaf's bounds, or ``None`` for an unbounded leaf.
      handling: the leaf's bound handler (:data:`pso_jax.bounds.BOUND_HANDLERS`).
      u: uniforms of ``x``'s shape, for the ``"resample"`` handler only.

    Returns:
      ``(x_new, v_new)`` in ``x``'s dtype.
    """
    if vmax is not None:
        v_new = clamp(v_new, vmax)
    x_new = x + v_new
    if low is not None:
        x_new, v_new = bounds_lib.apply(handling, x_new, v_new, low, high, u)
    return x_new.astype(x.dtype), v_new.astype(x.dtype)


# (start, end) of each coefficient under TVAC (Ratnaweera et al., 2004), with
# the linearly decreasing inertia of Shi & Eberhart (1999).
TVAC = {"inertia": (0.9, 0.4), "cognitive": (2.5, 0.5), "social": (0.5, 2.5)}


def time_varying_coefficients(num_steps: int, span: float = 1.0) -> dict:
    """``w``, ``c1``, ``c2`` schedules of TVAC over a run of ``num_steps`` steps.

    ``w`` falls 0.9 -> 0.4, ``c1`` 2.5 -> 0.5, ``c2`` rises 0.5 -> 2.5
    (:data:`TVAC`) over the first ``span`` fraction of the run (at least one
    step), and the end values hold after it. The start lies outside the
    order-2 stability region on purpose (a widely exploring swarm); from about
    a quarter of the schedule on it is inside, and it ends with a strong pull
    to the neighbourhood best.

    Args:
      num_steps: the run's length in steps, an int >= 1.
      span: the fraction of the run the schedules take, in (0, 1].

    Returns:
      ``{"inertia": fn, "cognitive": fn, "social": fn}``, to pass as
      ``pso(..., **time_varying_coefficients(n))``.

    Raises:
      ValueError: ``num_steps`` < 1 or ``span`` outside (0, 1].

    >>> sched = time_varying_coefficients(1000)
    >>> [round(float(sched[k](1000)), 3) for k in ("inertia", "cognitive", "social")]
    [0.4, 0.5, 2.5]
    >>> half = time_varying_coefficients(1000, span=0.5)
    >>> [round(float(half["inertia"](t)), 3) for t in (250, 500, 1000)]
    [0.65, 0.4, 0.4]
    """
    if int(num_steps) < 1:
        raise ValueError(f"num_steps={num_steps!r}: expected an int >= 1")
    if not 0.0 < float(span) <= 1.0:
        raise ValueError(f"span={span!r}: expected a fraction in (0, 1]")
    length = max(1, round(float(span) * int(num_steps)))
    return {k: optax.linear_schedule(a, b, length) for k, (a, b) in TVAC.items()}
