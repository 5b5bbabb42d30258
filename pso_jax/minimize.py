"""Loops over swarm steps on the device, and a one-call ``minimize``.

- :func:`scan_steps`: a fixed number of steps under ``lax.scan``, returning every
  step's :class:`~pso_jax.base.StepInfo`.
- :func:`run`: steps under ``lax.while_loop`` until a step budget, a target
  fitness, or a stall (best improving by less than ``ftol`` for ``patience``
  steps), recording the best fitness after every step.
- :func:`minimize`: ``scipy.optimize.minimize``-style entry point, with optional
  IPOP-style restarts (Auger & Hansen, 2005, "A restart CMA evolution strategy with
  increasing population size"): on a stall, start again with a swarm
  ``restart_growth`` times larger, keeping the best found so far.

Defaults of :func:`minimize` (:func:`minimize_defaults`): with
``variant="inertia"`` and nothing else said, it runs the von Neumann topology
with time-varying coefficients over the first 40 % of its ``num_steps`` and
their end values after (``w`` 0.9 -> 0.4, ``c1`` 2.5 -> 0.5, ``c2`` 0.5 -> 2.5:
:func:`pso_jax.velocity.time_varying_coefficients`, Ratnaweera et al., 2004),
bounded or not. :func:`pso_jax.pso` keeps its own
defaults (global topology, constant ``w = 0.7298``, ``c1 = c2 = 1.49618``): it
does not know the run length, and the network-training hybrid relies on them.
Measured in ``benchmarks/results/search_quality.md`` (row "pso_jax default").

Step ``i`` of a swarm always uses the key ``jax.random.fold_in(key, state.step)``,
so a host loop, ``scan_steps``, ``run`` and a run resumed from a saved state give
the same trajectory.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax import fitness as fitness_lib
from pso_jax import velocity as velocity_lib
from pso_jax.base import SwarmOptimizer
from pso_jax.pso import PSOState, best_solution, pso, validate_hparams
from pso_jax.tree_utils import leaf_paths
from pso_jax.types import (
    PRNGKey,
    PyTree,
    check_int,
    check_key,
    check_real,
    is_tracer,
)

STOP_REASONS = ("max_steps", "target", "stall")


class RunInfo(NamedTuple):
    """What :func:`run` returns besides the state.

    Attributes:
      history: ``[num_steps]`` float32, best fitness after each step; NaN after
        the loop stopped.
      num_steps: ``()`` int32, steps taken.
      stop_reason: ``()`` int32 index into :data:`STOP_REASONS`.
    """

    history: jax.Array
    num_steps: jax.Array
    stop_reason: jax.Array


class MinimizeResult(NamedTuple):
    """Result of :func:`minimize`.

    Attributes:
      best_params: the best parameters found (the template's structure).
      best_fitness: their fitness, a Python float.
      history: ``[steps]`` numpy array, best fitness so far after each step
        (across restarts).
      num_steps: steps taken in all.
      num_evaluations: fitness evaluations in all.
      num_restarts: IPOP restarts performed.
      stop_reason: one of :data:`STOP_REASONS`.
      state: the final swarm state of the last restart.
    """

    best_params: PyTree
    best_fitness: float
    history: np.ndarray
    num_steps: int
    num_evaluations: int
    num_restarts: int
    stop_reason: str
    state: PSOState


def step_key(key: PRNGKey, state: PSOState) -> PRNGKey:
    """The key of the step the state is about to take.

    >>> import jax, jax.numpy as jnp
    >>> from pso_jax.pso import pso
    >>> opt = pso(lambda x, _: jnp.sum(x**2), num_particles=4)
    >>> state = opt.init(jax.random.key(0), jnp.zeros(2))
    >>> key = jax.random.key(1)
    >>> bool((jax.random.key_data(step_key(key, state))
    ...       == jax.random.key_data(jax.random.fold_in(key, 0))).all())
    True
    """
    return jax.random.fold_in(key, state.step)


def scan_steps(
    key: PRNGKey,
    optimizer: SwarmOptimizer,
    state: PSOState,
    hparams: Any,
    num_steps: int,
    batch: Any = None,
):
    """Run ``num_steps`` steps under ``lax.scan`` (same batch every step).

    Args:
      key: a ``jax.random.key``; step ``i`` uses :func:`step_key`.
      optimizer: from :func:`~pso_jax.pso.pso`.
      state: the starting state.
      hparams: a ``PSOHyperParams`` (traced is fine; concrete ones are checked
        by the optimizer's ``step``).
      num_steps: steps to run, an integer ``>= 0`` (static: the scan's length).
      batch: passed to the fitness function every step.

    Returns:
      ``(state, infos)``: the final state and the stacked per-step ``StepInfo``.

    Raises:
      ValueError: for ``num_steps`` that is not an integer ``>= 0`` or a
        ``key`` that is not one PRNG key.

    >>> import jax, jax.numpy as jnp
    >>> from pso_jax.pso import pso
    >>> opt = pso(lambda x, _: jnp.sum(x**2), num_particles=8, bounds=(-1.0, 1.0))
    >>> hp = opt.default_hparams
    >>> state = opt.init(jax.random.key(0), jnp.zeros(3), hp)
    >>> go = jax.jit(lambda st: scan_steps(jax.random.key(1), opt, st, hp, 50))
    >>> state, infos = go(state)
    >>> infos.best_fitness.shape, bool(infos.best_fitness[-1] <= infos.best_fitness[0])
    ((50,), True)
    """

    num_steps = check_int("num_steps", num_steps, minimum=0)
    check_key(key)

    def body(st, _):
        return optimizer.step(step_key(key, st), st, batch, hparams)

    return jax.lax.scan(body, state, None, length=num_steps)


def _check_stopping(target_fitness, ftol, patience) -> None:
    """Check the stopping rules of :func:`run` and :func:`minimize`.

    Traced values (``run`` under ``jit``) are skipped: :func:`minimize` checks
    its own before tracing.

    Raises:
      ValueError: for a ``target_fitness`` that is not ``None`` or a finite real
        (NaN would never be reached), an ``ftol`` that is not a finite real
        ``>= 0`` (NaN would count every step as a stall), or a ``patience`` that
        is not ``None`` or an integer ``>= 1`` (0 would stop after one step).
    """
    if target_fitness is not None and not is_tracer(target_fitness):
        check_real("target_fitness", target_fitness)
    if not is_tracer(ftol):
        check_real("ftol", ftol, minimum=0.0)
    if patience is not None and not is_tracer(patience):
        check_int("patience", patience, minimum=1)


def run(
    key: PRNGKey,
    optimizer: SwarmOptimizer,
    state: PSOState,
    hparams: Any,
    *,
    num_steps: int,
    batch: Any = None,
    target_fitness: float | jax.Array | None = None,
    ftol: float | jax.Array = 0.0,
    patience: int | jax.Array | None = None,
) -> tuple[PSOState, RunInfo]:
    """Step the swarm on the device until a budget, a target, or a stall.

    Args:
      key: a ``jax.random.key``; step ``i`` uses ``fold_in(key, state.step)``.
      optimizer: from :func:`~pso_jax.pso.pso`.
      state: the starting state.
      hparams: a ``PSOHyperParams``.
      num_steps: the step budget (static: it sizes the history buffer).
      batch: passed to the fitness function every step.
      target_fitness: stop once the best is at least this good (finite, or
        ``None`` for no target).
      ftol: a step "improves" only if the best gains more than this (finite,
        ``>= 0``).
      patience: stop after this many steps without such improvement (an
        integer ``>= 1``, or ``None``: never).

    Returns:
      ``(state, RunInfo)``.

    Raises:
      ValueError: for an invalid ``num_steps``, ``key`` or stopping rule
        (concrete values only: traced ones are not checked), naming it.

    >>> import jax, jax.numpy as jnp
    >>> from pso_jax.pso import pso
    >>> opt = pso(lambda x, _: jnp.sum(x**2), num_particles=16, bounds=(-5.0, 5.0))
    >>> hp = opt.default_hparams
    >>> state = opt.init(jax.random.key(0), jnp.zeros(3), hp)
    >>> go = jax.jit(lambda st: run(jax.random.key(1), opt, st, hp, num_steps=500,
    ...                             target_fitness=1e-4))
    >>> state, info = go(state)
    >>> STOP_REASONS[int(info.stop_reason)], bool(info.num_steps < 500)
    ('target', True)
    """
    num_steps = check_int("num_steps", num_steps, minimum=1)
    check_key(key)
    _check_stopping(target_fitness, ftol, patience)
    maximize = optimizer.config.maximize
    sign = -1.0 if maximize else 1.0
    target = -jnp.inf if target_fitness is None else sign * jnp.float32(target_fitness)
    patience_ = jnp.int32(2**31 - 1 if patience is None else patience)
    ftol = jnp.float32(ftol)

    def score(f):
        return fitness_lib.score(f, maximize)

    def cond(carry):
        _, i, stall, _, reason = carry
        return (i < num_steps) & (reason == 0)

    def body(carry):
        st, i, stall, hist, _ = carry
        prev = score(st.best_fitness)
        st, _ = optimizer.step(step_key(key, st), st, batch, hparams)
        now = score(st.best_fitness)
        gained = (prev - now > ftol) | (jnp.isinf(prev) & jnp.isfinite(now))
        stall = jnp.where(gained, 0, stall + 1)
        hist = hist.at[i].set(st.best_fitness)
        reason = jnp.where(now <= target, 1, jnp.where(stall >= patience_, 2, 0))
        return st, i + 1, stall, hist, reason.astype(jnp.int32)

    hist = jnp.full((num_steps,), jnp.nan, jnp.float32)
    init = (state, jnp.int32(0), jnp.int32(0), hist, jnp.int32(0))
    state, n, _, hist, reason = jax.lax.while_loop(cond, body, init)
    return state, RunInfo(history=hist, num_steps=n, stop_reason=reason)


class Bounds(NamedTuple):
    """Box bounds ``(low, high)``: arrays or pytrees with the parameters' shapes."""

    low: Any
    high: Any


def _is_scalar(x) -> bool:
    return isinstance(x, int | float | np.number) or (
        isinstance(x, np.ndarray | jax.Array) and x.ndim == 0
    )


def _split_init_or_bounds(init_or_bounds, num_dims):
    """Return ``(template, bounds or None)``."""
    if num_dims is not None:
        num_dims = check_int("num_dims", num_dims, minimum=1)
    if isinstance(init_or_bounds, Bounds) or (
        isinstance(init_or_bounds, tuple) and len(init_or_bounds) == 2
    ):
        low, high = init_or_bounds
        if _is_scalar(low) and _is_scalar(high):
            if num_dims is None:
                raise ValueError(
                    f"scalar bounds {tuple(init_or_bounds)} need num_dims= (or give "
                    "low/high as arrays of the parameters' shape)"
                )
            low = jnp.full((num_dims,), low, jnp.float32)
            high = jnp.full((num_dims,), high, jnp.float32)
        elif num_dims is not None:
            raise ValueError(
                f"num_dims={num_dims} is only for scalar bounds; these bounds "
                "have shapes"
            )
        return _bounds_centre(low, high), (low, high)
    template = jax.tree.map(jnp.asarray, init_or_bounds)
    if num_dims is not None:
        raise ValueError(
            f"num_dims={num_dims} is only for scalar bounds; the initial point "
            "has a shape"
        )
    return template, None


def _bounds_centre(low, high):
    """The centre of ``(low, high)`` as the template; their leaves must match."""
    try:
        lows = jax.tree.structure(low).flatten_up_to(high)
    except (ValueError, TypeError):
        raise ValueError(
            "bounds low and high must have the same structure, got "
            f"{jax.tree.structure(low)} and {jax.tree.structure(high)}"
        ) from None
    for path, lo, hi in zip(leaf_paths(low), jax.tree.leaves(low), lows, strict=True):
        if np.shape(lo) != np.shape(hi) and not (_is_scalar(lo) or _is_scalar(hi)):
            raise ValueError(
                f"bounds for leaf {path}: low has shape {np.shape(lo)}, high "
                f"{np.shape(hi)}: expected the same shape (or a scalar)"
            )
    return jax.tree.map(
        lambda lo, hi: (jnp.asarray(lo, jnp.float32) + jnp.asarray(hi)) / 2,
        low,
        high,
    )


def _check_minimize_args(fitness_fn, key, num_steps, restarts, restart_growth):
    """:func:`minimize`'s own arguments (the swarm's are :func:`pso`'s)."""
    if not callable(fitness_fn):
        raise ValueError(f"fitness_fn must be callable, got {fitness_fn!r}")
    check_key(key)
    check_int("num_steps", num_steps, minimum=1)
    check_int("restarts", restarts, minimum=0)
    check_int("restart_growth", restart_growth, minimum=1)


# minimize()'s defaults for variant="inertia" (see minimize_defaults). Measured
# on the 18 cells of benchmarks/search_quality.py (6 shifted rotated functions,
# D = 10, 30, 100, 40 particles, 10 000 D evaluations, 10 seeds): the global
# topology with constant coefficients (pso()'s defaults) lost to the best PSO
# peer on 6 of 18 cells; of the single factors pyswarms differs in (no velocity
# clamp, smaller initial velocities, periodic walls) none closed the gap, and
# periodic walls made it worse. The von Neumann topology fixed the multimodal
# cells but was slow on Rosenbrock. Von Neumann + TVAC over the whole run: 16 of
# 18, behind on Rosenbrock D=10 (0.97 vs pyswarms' 0.50) and Ackley D=10 (2e-6
# vs 0: float32 noise). TVAC over the first 40 % of the run, then held at its
# end values (a longer converging phase, which Rosenbrock's valley needs):
# 18 of 18 (spans 0.3 and 0.5: 17, Ackley D=10 the miss); on a second set of
# instances (problem seed 2027) it beat the whole-run schedule on 9 cells and
# lost on 4 (Rastrigin at every D: less exploring time).
DEFAULT_TOPOLOGY = "von_neumann"
DEFAULT_TVAC_SPAN = 0.4
_COEFFICIENTS = ("inertia", "cognitive", "social")


def minimize_defaults(
    num_steps: int,
    *,
    variant: str = "inertia",
    topology: str | None = None,
    hparams: Any = None,
    **pso_kwargs: Any,
) -> dict:
    """The :func:`~pso_jax.pso.pso` arguments :func:`minimize` adds by default.

    For ``variant="inertia"`` only (the other variants keep their own
    defaults): ``topology=DEFAULT_TOPOLOGY`` unless one is given, and the
    :func:`~pso_jax.velocity.time_varying_coefficients` of a ``num_steps`` run
    with ``span=DEFAULT_TVAC_SPAN`` (the schedules take its first 40 % and
    their end values hold after) unless ``hparams`` or any of ``inertia``,
    ``cognitive``, ``social`` is given (then none of the three is scheduled).

    Args:
      num_steps: the run's length in steps.
      variant, topology, hparams, **pso_kwargs: as given to :func:`minimize`.

    Returns:
      ``{"topology": ..., "inertia": fn, "cognitive": fn, "social": fn}``, or
      a subset (empty when nothing is added).

    >>> sorted(minimize_defaults(100))
    ['cognitive', 'inertia', 'social', 'topology']
    >>> minimize_defaults(100, topology="ring", inertia=0.5)
    {}
    >>> minimize_defaults(100, variant="cso")
    {}
    """
    if variant != "inertia":
        return {}
    out: dict[str, Any] = {}
    if topology is None:
        out["topology"] = DEFAULT_TOPOLOGY
    if hparams is None and not any(k in pso_kwargs for k in _COEFFICIENTS):
        out.update(velocity_lib.time_varying_coefficients(num_steps, DEFAULT_TVAC_SPAN))
    return out


@contextlib.contextmanager
def _quiet(scheduled: bool):
    """Silence the stability warning for the default schedules only.

    TVAC starts outside the order-2 region on purpose (see
    :func:`~pso_jax.velocity.time_varying_coefficients`).
    """
    with warnings.catch_warnings():
        if scheduled:
            warnings.simplefilter("ignore", velocity_lib.PSOConvergenceWarning)
        yield


def _build(fit, size, num_steps, settings, kw):
    """The swarm of one :func:`minimize` attempt (``num_steps`` long), and
    whether its coefficients are the default schedules.

    ``settings``: ``(variant, topology, bounds, maximize, hparams)``.
    """
    variant, topology, bounds, maximize, hparams = settings
    defaults = minimize_defaults(
        num_steps, variant=variant, topology=topology, hparams=hparams, **kw
    )
    args = dict(topology=topology, **kw) | defaults
    scheduled = "inertia" in defaults
    with _quiet(scheduled):
        opt = pso(
            fit,
            num_particles=size,
            variant=variant,
            bounds=bounds,
            maximize=maximize,
            **args,
        )
    return opt, scheduled


def minimize(
    fitness_fn: Callable[[PyTree], jax.Array],
    init_or_bounds: Any,
    *,
    key: PRNGKey,
    num_particles: int = 32,
    num_steps: int = 1000,
    num_dims: int | None = None,
    variant: str = "inertia",
    topology: str | None = None,
    target_fitness: float | None = None,
    ftol: float = 0.0,
    patience: int | None = None,
    restarts: int = 0,
    restart_growth: int = 2,
    maximize: bool = False,
    hparams: Any = None,
    **pso_kwargs: Any,
) -> MinimizeResult:
    """Minimise (or maximise) ``fitness_fn`` with a particle swarm, in one call.

    Args:
      fitness_fn: ``fitness_fn(params) -> ()`` for ONE particle.
      init_or_bounds: a :class:`Bounds` or ``(low, high)`` pair (the swarm starts
        uniform in the box and stays in it), or an initial point (any pytree)
        around which the swarm starts with spread ``init_scale``.
      key: a ``jax.random.key``.
      num_particles: swarm size (of the first run, with restarts).
      num_steps: total step budget, across restarts.
      num_dims: dimension, when the bounds are scalars.
      variant, topology: see :func:`~pso_jax.pso.pso`. Unlike ``pso()``, with
        ``variant="inertia"`` the default topology is ``"von_neumann"`` and
        the coefficients follow TVAC over the first 40 % of the run (see
        :func:`minimize_defaults`; an attempt after a restart schedules them
        over the steps left).
      target_fitness: stop once the best reaches it.
      ftol, patience: stop (or restart) after ``patience`` steps in which the
        best improved by no more than ``ftol``.
      restarts: IPOP restarts allowed on a stall (needs ``patience``).
      restart_growth: swarm size factor per restart.
      maximize: maximise instead.
      hparams: a ``PSOHyperParams``; default: the variant's (for
        ``"inertia"``, scheduled as :func:`minimize_defaults` says). Giving
        ``hparams``, or ``inertia``/``cognitive``/``social`` in
        ``pso_kwargs``, turns the schedules off.
      **pso_kwargs: other arguments of :func:`~pso_jax.pso.pso` (bound handling,
        velocity clamp, hyperparameter overrides, ...). ``mesh=`` (from
        :func:`pso_jax.sharding.make_mesh`) shards the swarm over devices, with
        the same result as on one device; ``pad=True`` pads a swarm size (also
        the restarts' larger ones) that does not divide the devices.

    Returns:
      A :class:`MinimizeResult`.

    Raises:
      ValueError: for invalid arguments (naming them): a key that is not one
        PRNG key, non-integer or out-of-range counts, a NaN or infinite
        ``target_fitness`` or ``ftol``, ``patience < 1``, out-of-range
        ``hparams`` (checked by :func:`~pso_jax.pso.validate_hparams` on the
        host, before the loop), or a ``fitness_fn`` that does not return a real
        scalar (found by ``jax.eval_shape``), all before anything is compiled.

    >>> import jax, jax.numpy as jnp
    >>> res = minimize(lambda x: jnp.sum(x**2), (-5.0, 5.0), num_dims=5,
    ...                key=jax.random.key(0), num_particles=20, num_steps=200)
    >>> res.best_fitness < 1e-6, res.history.shape
    (True, (200,))
    """
    _check_minimize_args(fitness_fn, key, num_steps, restarts, restart_growth)
    _check_stopping(target_fitness, ftol, patience)
    if restarts and patience is None:
        raise ValueError("restarts need patience= (steps without improvement)")
    if hparams is not None:
        validate_hparams(hparams, variant)
    template, bounds = _split_init_or_bounds(init_or_bounds, num_dims)
    fitness_lib.check_output(jax.eval_shape(fitness_fn, template))

    def fit(params, _batch):
        return fitness_fn(params)

    sign = -1.0 if maximize else 1.0
    history: list[np.ndarray] = []
    best, best_fit = None, math.inf * sign
    steps_left, steps_done, evals, size = num_steps, 0, 0, num_particles
    reason, restarts_done, state = "max_steps", 0, None
    for attempt in range(restarts + 1):
        opt, scheduled = _build(
            fit,
            size,
            steps_left,
            (variant, topology, bounds, maximize, hparams),
            pso_kwargs,
        )
        hp = opt.default_hparams if hparams is None else hparams
        key_run = jax.random.fold_in(key, attempt)
        with _quiet(scheduled):
            state = jax.jit(opt.init)(key_run, template, hp)

        def go(k, st, h, target, tol, _opt=opt, _n=steps_left):
            return run(
                k,
                _opt,
                st,
                h,
                num_steps=_n,
                target_fitness=target,
                ftol=tol,
                patience=patience,
            )

        # No target: one that can never be reached (-inf when minimising).
        target = jnp.float32(
            -sign * math.inf if target_fitness is None else target_fitness
        )
        with _quiet(scheduled):
            run_fn = jax.jit(go, donate_argnums=1)
            state, info = run_fn(key_run, state, hp, target, ftol)
        n = int(info.num_steps)
        hist = np.asarray(info.history[:n])
        f_run = float(state.best_fitness)
        if sign * f_run < sign * best_fit or best is None:
            best, best_fit = best_solution(state), f_run
        history.append(hist)
        steps_done += n
        steps_left -= n
        evals += n * size
        reason = STOP_REASONS[int(info.stop_reason)]
        if reason != "stall" or steps_left <= 0 or attempt == restarts:
            break
        restarts_done += 1
        size *= restart_growth
    hist_all = np.concatenate(history)
    hist_all = (
        np.maximum.accumulate(hist_all) if maximize else np.minimum.accumulate(hist_all)
    )
    return MinimizeResult(
        best_params=best,
        best_fitness=float(best_fit),
        history=hist_all,
        num_steps=steps_done,
        num_evaluations=evals,
        num_restarts=restarts_done,
        stop_reason=reason,
        state=state,
    )


def scan_chunks(
    key: PRNGKey,
    optimizer: SwarmOptimizer,
    state: PSOState,
    hparams: Any,
    num_steps: int,
    *,
    chunk: int = 50,
    batch: Any = None,
):
    """Run ``num_steps`` steps as jitted :func:`scan_steps` chunks, yielding each.

    A host loop over device loops, for logging and progress bars: every chunk of
    at most ``chunk`` steps is one jitted ``lax.scan`` call that donates the
    incoming state's buffers, followed by one host sync (the chunk's infos
    copied to the host). Step ``i`` uses :func:`step_key`'s key as everywhere,
    so the trajectory is that of one :func:`scan_steps` over ``num_steps``,
    whatever ``chunk`` is.

    Args:
      key: the run's key; each step derives its own from it and the step count.
      optimizer: a swarm optimizer, e.g. from :func:`pso_jax.pso`.
      state: the initial state. Its buffers are donated to the first chunk: do
        not use it afterwards.
      hparams: the optimizer's hyperparameters (``optimizer.default_hparams``);
        an argument of the jitted call, not a constant compiled into it.
      num_steps: steps in all (0: nothing is yielded).
      chunk: the most steps per jitted call. Each distinct chunk length
        compiles once per call of ``scan_chunks``: at most twice (the last
        chunk may be shorter).
      batch: the fitness function's batch, the same at every step.

    Yields:
      ``(state, infos, steps_done)`` after each chunk: the state after
      ``steps_done`` steps (on the device, and donated to the next chunk: use or
      copy it before resuming the generator), and the chunk's stacked
      :class:`~pso_jax.base.StepInfo` as host numpy arrays (leading axis: the
      chunk's steps).

    Raises:
      ValueError: for ``chunk`` not an integer ``>= 1``, ``num_steps`` not an
        integer ``>= 0``, or a bad ``key`` (on the first ``next``, as for any
        generator).

    >>> import jax, jax.numpy as jnp
    >>> from pso_jax.pso import pso
    >>> opt = pso(lambda x, _: jnp.sum(x**2), num_particles=8, bounds=(-1.0, 1.0))
    >>> hp = opt.default_hparams
    >>> state = opt.init(jax.random.key(0), jnp.zeros(3), hp)
    >>> for state, infos, done in scan_chunks(jax.random.key(1), opt, state, hp, 120):
    ...     print(done, infos.best_fitness.shape)
    50 (50,)
    100 (50,)
    120 (20,)
    """
    chunk = check_int("chunk", chunk, minimum=1)
    num_steps = check_int("num_steps", num_steps, minimum=0)
    check_key(key)

    def advance(key, state, hparams, batch, n):
        return scan_steps(key, optimizer, state, hparams, n, batch)

    run_chunk = jax.jit(advance, static_argnums=4, donate_argnums=1)
    done = 0
    while done < num_steps:
        n = min(chunk, num_steps - done)
        state, infos = run_chunk(key, state, hparams, batch, n)
        infos = jax.device_get(infos)  # the chunk's one host sync
        done += n
        yield state, infos, done
