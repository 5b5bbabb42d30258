"""Continuous benchmark functions for testing swarm optimizers.

Every objective takes ONE particle ``x`` of shape ``[D]`` (any float dtype) and
returns a scalar of the same dtype, to be MINIMISED. The functions are pure
``jnp`` code: they can be jitted, vmapped over a particle axis and
differentiated, and their gradients stay finite at and near the optimum (the
``sqrt`` in Ackley and Schwefel goes through the double-``where`` trick).

Definitions, search domains and optima follow

* M. Jamil and X.-S. Yang, "A literature survey of benchmark functions for
  global optimization problems", Int. J. Math. Model. Numer. Optim. 4(2),
  150-194, 2013 (arXiv:1308.4008);
* S. Surjanovic and D. Bingham, "Virtual Library of Simulation Experiments:
  Test Functions and Datasets", Simon Fraser University (for Levy).

Shifted and rotated variants follow the CEC benchmark suites,
``F(x) = f(M (x - o)) + F*``:

* J. J. Liang, B. Y. Qu, P. N. Suganthan and A. G. Hernandez-Diaz, "Problem
  definitions and evaluation criteria for the CEC 2013 special session on
  real-parameter optimization", Tech. Rep. 201212, Zhengzhou University and
  Nanyang Technological University, 2013;
* J. J. Liang, B. Y. Qu and P. N. Suganthan, "Problem definitions and
  evaluation criteria for the CEC 2014 special session and competition on
  single objective real-parameter numerical optimization", Tech. Rep. 201311,
  Zhengzhou University and Nanyang Technological University, 2013 (the
  Schwefel boundary handling used here);
* N. H. Awad, M. Z. Ali, J. J. Liang, B. Y. Qu and P. N. Suganthan, "Problem
  definitions and evaluation criteria for the CEC 2017 special session and
  competition on single objective bound constrained real-parameter numerical
  optimization", Tech. Rep., Nanyang Technological University, 2016.

Unlike CEC, which shifts every function as if its argmin were the origin and
then patches Rosenbrock (``+1``) and Schwefel (``+420.97``) by hand, the
transform here is ``f(R (x - o) + x*)`` with ``x*`` the base function's own
argmin, so the argmin of every transformed problem is exactly ``o``.

Example:

>>> import jax
>>> import jax.numpy as jnp
>>> from pso_jax import objectives
>>> swarm = jnp.zeros((4, 3))  # [P, D]
>>> jax.vmap(objectives.rastrigin)(swarm).shape
(4,)
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "OBJECTIVES",
    "Objective",
    "Problem",
    "ackley",
    "cos_2pi",
    "get",
    "griewank",
    "levy",
    "make_problem",
    "random_rotation",
    "rastrigin",
    "rosenbrock",
    "schwefel",
    "shift_rotate",
    "sphere",
]

Array = jax.Array
ObjectiveFn = Callable[[Array], Array]

# max_{|u| <= 500} u sin(sqrt|u|), attained at u = SCHWEFEL_ARGMIN. The textbook
# constant 418.9829 is this value rounded up, which leaves f(x*) = 1.27e-5 * D
# instead of 0; the full-precision value makes the optimum exactly 0.
_SCHWEFEL_MAX = 418.9828872724338
_SCHWEFEL_ARGMIN = 420.9687462275036  # as in the CEC 2014/2017 code
_SCHWEFEL_BOUND = 500.0


def _as_particle(x: Any, fn_name: str, min_dims: int = 1) -> Array:
    """Returns ``x`` as a float array of shape [D], or raises ValueError."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    if x.ndim != 1:
        raise ValueError(
            f"{fn_name} takes one particle of shape [D]; got shape {x.shape}. "
            "Use jax.vmap to evaluate a swarm of shape [P, D]."
        )
    if x.shape[0] < min_dims:
        raise ValueError(
            f"{fn_name} needs D >= {min_dims} dimensions; got D={x.shape[0]}."
        )
    return x


def _safe_sqrt(a: Array) -> Array:
    """Returns sqrt(a) for a >= 0, with gradient 0 instead of inf at a == 0.

    The inner ``where`` keeps the untaken branch away from sqrt's infinite
    derivative at 0, which would otherwise turn into 0 * inf = NaN.
    """
    positive = a > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, a, 1.0)), 0.0)


# cos(2 pi x) by range reduction and a polynomial, for float32 and narrower.
# XLA's CPU ``cos`` costs ~6 ns per element here (../shared/PERF_NOTES.md), which
# dominates a Rastrigin swarm step; cos(2 pi x) is 1-periodic in x, so reducing
# x exactly (r = x - round(x), |r| <= 1/2) and folding to [0, 1/4] leaves a
# short even polynomial: Taylor to theta^12 on [0, pi/2], error < 1e-8, below
# float32 rounding. The reduction is exact, so it is also *more* accurate than
# ``cos(2 * pi * x)`` for large |x|, whose argument rounds. float64 keeps
# ``jnp.cos``.
_COS_TAYLOR = (
    1.0,
    -1.0 / 2,
    1.0 / 24,
    -1.0 / 720,
    1.0 / 40320,
    -1.0 / 3628800,
    1.0 / 479001600,
)


def cos_2pi(x: Array) -> Array:
    """``cos(2 pi x)``, fast for float32 (see the comment above).

    >>> float(cos_2pi(jnp.array(0.25, jnp.float32))) == 0.0
    True
    """
    if jnp.dtype(x.dtype).itemsize > 4:
        return jnp.cos(2.0 * jnp.pi * x)
    r = jnp.abs(x - jnp.floor(x + 0.5))  # [0, 1/2], exact (floor vectorises)
    flip = r > 0.25
    s = jnp.where(flip, 0.5 - r, r)  # cos(2 pi r) = -cos(2 pi (1/2 - r))
    t = (2.0 * jnp.pi * s) ** 2
    acc = jnp.full_like(t, _COS_TAYLOR[-1])
    for c in _COS_TAYLOR[-2::-1]:
        acc = acc * t + c
    return jnp.where(flip, -acc, acc).astype(x.dtype)


def sphere(x: Array) -> Array:
    """Computes the sphere function ``sum_i x_i^2``.

    Domain [-5.12, 5.12]^D; minimum 0 at x = 0. Unimodal and separable.

    Args:
      x: one particle, shape [D], float; no particle axis.

    Returns:
      A scalar of x's dtype.

    >>> float(sphere(jnp.array([1.0, 2.0, 3.0])))
    14.0
    """
    x = _as_particle(x, "sphere")
    return jnp.sum(x * x)


def rastrigin(x: Array) -> Array:
    """Computes the Rastrigin function ``10 D + sum_i [x_i^2 - 10 cos(2 pi x_i)]``.

    Domain [-5.12, 5.12]^D; minimum 0 at x = 0. Highly multimodal (a local
    minimum near every integer point), separable.

    Args:
      x: one particle, shape [D], float; no particle axis.

    Returns:
      A scalar of x's dtype.

    >>> float(rastrigin(jnp.array([1.0, 1.0])))
    2.0
    """
    x = _as_particle(x, "rastrigin")
    a = 10.0  # A
    return a * x.shape[0] + jnp.sum(x * x - a * cos_2pi(x))


def rosenbrock(x: Array) -> Array:
    """Computes the Rosenbrock function.

    ``sum_{i<D} [100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2]``. Domain [-5, 10]^D;
    minimum 0 at x = (1, ..., 1). Unimodal for D <= 3, a narrow curved valley.

    Args:
      x: one particle, shape [D] with D >= 2, float; no particle axis.

    Returns:
      A scalar of x's dtype.

    Raises:
      ValueError: if D < 2 (the sum would be empty).

    >>> float(rosenbrock(jnp.array([0.0, 0.0])))
    1.0
    """
    x = _as_particle(x, "rosenbrock", min_dims=2)
    head, tail = x[:-1], x[1:]
    return jnp.sum(100.0 * (tail - head * head) ** 2 + (1.0 - head) ** 2)


def ackley(x: Array) -> Array:
    """Computes the Ackley function with a = 20, b = 0.2, c = 2 pi.

    ``-a exp(-b sqrt(mean x^2)) - exp(mean cos(c x)) + a + e``. Domain
    [-32.768, 32.768]^D; minimum 0 at x = 0. The sqrt makes the optimum a cone
    point; its gradient there is returned as 0 (a valid subgradient), not NaN.

    Args:
      x: one particle, shape [D], float; no particle axis.

    Returns:
      A scalar of x's dtype.

    >>> round(float(ackley(jnp.array([1.0, 1.0]))), 4)
    3.6254
    """
    x = _as_particle(x, "ackley")
    a, b = 20.0, 0.2  # c = 2 pi, via cos_2pi
    radius = _safe_sqrt(jnp.mean(x * x))
    return -a * jnp.exp(-b * radius) - jnp.exp(jnp.mean(cos_2pi(x))) + a + jnp.e


def griewank(x: Array) -> Array:
    """Computes the Griewank function.

    ``1 + sum_i x_i^2 / 4000 - prod_i cos(x_i / sqrt(i))`` with i = 1..D.
    Domain [-600, 600]^D; minimum 0 at x = 0.

    Args:
      x: one particle, shape [D], float; no particle axis.

    Returns:
      A scalar of x's dtype.

    >>> float(griewank(jnp.zeros(5)))
    0.0
    """
    x = _as_particle(x, "griewank")
    i = jnp.arange(1, x.shape[0] + 1, dtype=x.dtype)
    return 1.0 + jnp.sum(x * x) / 4000.0 - jnp.prod(jnp.cos(x / jnp.sqrt(i)))


def schwefel(x: Array) -> Array:
    """Computes the Schwefel 2.26 function ``418.9829 D - sum_i x_i sin(sqrt|x_i|)``.

    Domain [-500, 500]^D; minimum 0 at x_i = 420.9687462275036. The constant
    418.9829 is used at full precision (418.98288727...), so f(x*) = 0 up to
    rounding rather than 1.27e-5 * D.

    Inside the domain this is exactly the textbook formula. Outside it, the
    textbook formula keeps falling (x sin sqrt|x| grows without bound), so a
    point outside the box, which a rotation or an unclamped particle can
    reach, would beat the "optimum". As in the CEC 2014/2017 code, each
    coordinate with |x_i| > 500 is instead folded back into the domain and
    penalised by (|x_i| - 500)^2 / (10000 D). Thus f >= 0 on all of R^D,
    with its only zero at x*.

    Args:
      x: one particle, shape [D], float; no particle axis.

    Returns:
      A scalar of x's dtype.

    >>> round(float(schwefel(jnp.zeros(2))), 3)
    837.966
    """
    x = _as_particle(x, "schwefel")
    num_dims = x.shape[0]
    magnitude = jnp.abs(x)
    inside = magnitude <= _SCHWEFEL_BOUND
    folded = jnp.sign(x) * (_SCHWEFEL_BOUND - jnp.mod(magnitude, _SCHWEFEL_BOUND))
    u = jnp.where(inside, x, folded)
    penalty = jnp.where(
        inside, 0.0, (magnitude - _SCHWEFEL_BOUND) ** 2 / (10000.0 * num_dims)
    )
    terms = u * jnp.sin(_safe_sqrt(jnp.abs(u))) - penalty
    return _SCHWEFEL_MAX * num_dims - jnp.sum(terms)


def levy(x: Array) -> Array:
    """Computes the Levy function.

    With w_i = 1 + (x_i - 1) / 4: ``sin^2(pi w_1) + sum_{i<D} (w_i - 1)^2
    [1 + 10 sin^2(pi w_i + 1)] + (w_D - 1)^2 [1 + sin^2(2 pi w_D)]``.
    Domain [-10, 10]^D; minimum 0 at x = (1, ..., 1).

    Args:
      x: one particle, shape [D], float; no particle axis.

    Returns:
      A scalar of x's dtype.

    >>> round(float(levy(jnp.ones(3))), 6)
    0.0
    """
    x = _as_particle(x, "levy")
    w = 1.0 + (x - 1.0) / 4.0
    head, last = w[:-1], w[-1]
    first_term = jnp.sin(jnp.pi * w[0]) ** 2
    middle = jnp.sum(
        (head - 1.0) ** 2 * (1.0 + 10.0 * jnp.sin(jnp.pi * head + 1.0) ** 2)
    )
    last_term = (last - 1.0) ** 2 * (1.0 + jnp.sin(2.0 * jnp.pi * last) ** 2)
    return first_term + middle + last_term


def _constant_optimum(value: float, num_dims: int, dtype: Any = None) -> Array:
    """Returns the argmin (value, ..., value), shape [num_dims]."""
    return jnp.full((num_dims,), value, dtype=dtype)


class Objective(NamedTuple):
    """A benchmark function with its usual search domain and known optimum.

    Attributes:
      fn: the function, [D] -> scalar, to be minimised.
      bounds: (low, high) Python floats, the same for every coordinate.
      optimum_fn: ``optimum_fn(num_dims, dtype=None)`` returns the argmin,
        shape [num_dims].
      optimum_value: fn at the argmin.
      name: the registry key.
      min_num_dims: the smallest D the function is defined for.
    """

    fn: ObjectiveFn
    bounds: tuple[float, float]
    optimum_fn: Callable[..., Array]
    optimum_value: float
    name: str
    min_num_dims: int = 1


def _objective(
    fn: ObjectiveFn, bounds: tuple[float, float], argmin: float, min_num_dims: int = 1
) -> Objective:
    return Objective(
        fn=fn,
        bounds=bounds,
        optimum_fn=functools.partial(_constant_optimum, argmin),
        optimum_value=0.0,
        name=fn.__name__,
        min_num_dims=min_num_dims,
    )


OBJECTIVES: dict[str, Objective] = {
    obj.name: obj
    for obj in (
        _objective(sphere, (-5.12, 5.12), 0.0),
        _objective(rastrigin, (-5.12, 5.12), 0.0),
        _objective(rosenbrock, (-5.0, 10.0), 1.0, min_num_dims=2),
        _objective(ackley, (-32.768, 32.768), 0.0),
        _objective(griewank, (-600.0, 600.0), 0.0),
        _objective(schwefel, (-_SCHWEFEL_BOUND, _SCHWEFEL_BOUND), _SCHWEFEL_ARGMIN),
        _objective(levy, (-10.0, 10.0), 1.0),
    )
}


def get(name: str) -> Objective:
    """Looks up a benchmark function by name.

    Args:
      name: a key of ``OBJECTIVES``, e.g. ``"rastrigin"``.

    Returns:
      The registered ``Objective``.

    Raises:
      KeyError: if ``name`` is not registered; the message lists valid names.

    >>> get("rastrigin").bounds
    (-5.12, 5.12)
    """
    try:
        return OBJECTIVES[name]
    except (KeyError, TypeError):
        raise KeyError(
            f"Unknown objective {name!r}; valid names are {sorted(OBJECTIVES)}."
        ) from None


def shift_rotate(
    fn: ObjectiveFn,
    shift: Array | None = None,
    rotation: Array | None = None,
    *,
    base_optimum: Array | None = None,
    bias: float = 0.0,
) -> ObjectiveFn:
    """Wraps ``fn`` as the CEC-style ``x -> fn(R @ (x - o) + x*) + bias``.

    With ``base_optimum`` (x*) left as None this is the plain CEC form
    ``fn(R @ (x - o)) + bias``, whose argmin is ``o`` only when fn's argmin is
    the origin. Passing fn's own argmin as ``base_optimum`` moves the argmin to
    ``o`` for any fn, with value ``fn(x*) + bias``.

    Args:
      fn: base function, [D] -> scalar.
      shift: ``o``, shape [D], float, or None for no shift.
      rotation: ``R``, shape [D, D], float (orthogonal for the standard
        benchmarks, though not checked), or None for no rotation.
      base_optimum: ``x*``, shape [D], float, or None for the origin.
      bias: added to the output (CEC's ``F*``).

    Returns:
      The transformed function, [D] -> scalar of x's dtype. The shift,
      rotation and base optimum are cast to x's dtype at each call.

    Raises:
      ValueError: if the arrays' shapes disagree with each other (when built)
        or with x (when called).

    >>> f = shift_rotate(sphere, shift=jnp.array([1.0, 2.0]), bias=5.0)
    >>> float(f(jnp.array([1.0, 2.0])))
    5.0
    """
    arrays = {
        "shift": None if shift is None else jnp.asarray(shift),
        "base_optimum": None if base_optimum is None else jnp.asarray(base_optimum),
    }
    for arg_name, value in arrays.items():
        if value is not None and value.ndim != 1:
            raise ValueError(f"{arg_name} must have shape [D]; got {value.shape}.")
    if rotation is not None:
        rotation = jnp.asarray(rotation)
        if rotation.ndim != 2 or rotation.shape[0] != rotation.shape[1]:
            raise ValueError(f"rotation must have shape [D, D]; got {rotation.shape}.")
    dims = {name: v.shape[0] for name, v in arrays.items() if v is not None}
    if rotation is not None:
        dims["rotation"] = rotation.shape[0]
    if len(set(dims.values())) > 1:
        raise ValueError(f"shift_rotate arguments disagree on D: {dims}.")
    num_dims = next(iter(dims.values()), None)
    shift, base_optimum = arrays["shift"], arrays["base_optimum"]

    def transformed(x: Array) -> Array:
        x = _as_particle(x, "shift_rotate")
        if num_dims is not None and x.shape[0] != num_dims:
            raise ValueError(
                f"this shifted/rotated function expects x of shape ({num_dims},); "
                f"got {x.shape}."
            )
        z = x if shift is None else x - shift.astype(x.dtype)
        if rotation is not None:
            z = rotation.astype(x.dtype) @ z
        if base_optimum is not None:
            z = z + base_optimum.astype(x.dtype)
        return fn(z) + bias

    return transformed


def random_rotation(key: Array, num_dims: int, dtype: Any = jnp.float32) -> Array:
    """Draws a Haar-uniform random orthogonal matrix.

    QR-decomposes a standard Gaussian matrix and multiplies each column of Q by
    the sign of the matching diagonal entry of R; without that sign fix the
    distribution of Q is not uniform (Mezzadri, Notices AMS 54(5), 2007).

    Args:
      key: a PRNG key.
      num_dims: D.
      dtype: float dtype of the result.

    Returns:
      An orthogonal matrix, shape [D, D], dtype ``dtype``.

    >>> r = random_rotation(jax.random.key(0), 3)
    >>> bool(jnp.allclose(r @ r.T, jnp.eye(3), atol=1e-5))
    True
    """
    gaussian = jax.random.normal(key, (num_dims, num_dims), dtype=dtype)
    q, r = jnp.linalg.qr(gaussian)
    signs = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(dtype)
    return q * signs[None, :]


class Problem(NamedTuple):
    """A benchmark function instantiated for one dimension and transform.

    Attributes:
      fn: the function to minimise, [num_dims] -> scalar.
      bounds: (low, high) Python floats, the same for every coordinate.
      optimum: the argmin in x-space, shape [num_dims]; the shift vector when
        shifted.
      optimum_value: fn at ``optimum``.
      name: e.g. ``"shifted_rotated_rastrigin"``.
      num_dims: D.
      shift: the shift vector ``o``, shape [num_dims], or None.
      rotation: the orthogonal matrix ``R``, shape [num_dims, num_dims], or
        None.
    """

    fn: ObjectiveFn
    bounds: tuple[float, float]
    optimum: Array
    optimum_value: float
    name: str
    num_dims: int
    shift: Array | None = None
    rotation: Array | None = None


def make_problem(
    name: str,
    num_dims: int,
    *,
    key: Array | None = None,
    shift: bool = False,
    rotate: bool = False,
    dtype: Any = jnp.float32,
    bias: float = 0.0,
) -> Problem:
    """Builds a (optionally shifted and rotated) benchmark problem.

    The transformed function is ``fn(R @ (x - o) + x*) + bias`` (see
    ``shift_rotate``), so the argmin is exactly ``o`` for every function. The
    shift ``o`` is uniform in the central 80% of the domain, which keeps the
    optimum inside the bounds; ``R`` comes from ``random_rotation``. Rotation
    can map points of the box outside the base function's domain; all the
    registered functions have their global minimum over all of R^D at x*
    (Schwefel thanks to its out-of-domain penalty), so that never creates a
    better point than ``o``.

    Args:
      name: a key of ``OBJECTIVES``.
      num_dims: D.
      key: PRNG key; required when ``shift`` or ``rotate`` is True. The same
        key gives the same problem.
      shift: whether to move the optimum to a random point.
      rotate: whether to rotate the coordinates randomly.
      dtype: float dtype of the optimum, shift and rotation.
      bias: added to the function value (CEC's ``F*``).

    Returns:
      A ``Problem``.

    Raises:
      KeyError: if ``name`` is unknown.
      ValueError: if ``num_dims`` is too small for the function, or ``key``
        is missing when a transform is requested.

    >>> problem = make_problem(
    ...     "rastrigin", 5, key=jax.random.key(0), shift=True, rotate=True
    ... )
    >>> problem.name, problem.optimum.shape
    ('shifted_rotated_rastrigin', (5,))
    >>> abs(float(problem.fn(problem.optimum)) - problem.optimum_value) < 1e-4
    True
    """
    objective = get(name)
    try:
        num_dims = operator.index(num_dims)
    except TypeError:
        raise ValueError(f"num_dims must be an int; got {num_dims!r}.") from None
    if num_dims < objective.min_num_dims:
        raise ValueError(
            f"{objective.name} needs num_dims >= {objective.min_num_dims}; "
            f"got num_dims={num_dims!r}."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a float dtype; got {dtype!r}.")
    if (shift or rotate) and key is None:
        raise ValueError(
            f"make_problem({name!r}, shift={shift}, rotate={rotate}) needs a PRNG "
            "key, e.g. key=jax.random.key(0)."
        )
    base_optimum = objective.optimum_fn(num_dims, dtype)
    optimum_value = objective.optimum_value + bias
    prefix = "shifted_" * bool(shift) + "rotated_" * bool(rotate)
    problem_name = prefix + objective.name
    if not (shift or rotate):
        fn = objective.fn
        if bias:
            fn = shift_rotate(fn, bias=bias)
        return Problem(
            fn, objective.bounds, base_optimum, optimum_value, problem_name, num_dims
        )

    key_shift, key_rotation = jax.random.split(key)
    shift_vector = rotation = None
    optimum = base_optimum
    if shift:
        low, high = objective.bounds
        center, half_width = (low + high) / 2, 0.8 * (high - low) / 2
        shift_vector = jax.random.uniform(
            key_shift,
            (num_dims,),
            dtype=dtype,
            minval=center - half_width,
            maxval=center + half_width,
        )
        optimum = shift_vector
    if rotate:
        rotation = random_rotation(key_rotation, num_dims, dtype)
    # Without a shift, rotate about x* (o = x*), which keeps the argmin at x*.
    fn = shift_rotate(
        objective.fn,
        shift=optimum,
        rotation=rotation,
        base_optimum=base_optimum,
        bias=bias,
    )
    return Problem(
        fn=fn,
        bounds=objective.bounds,
        optimum=optimum,
        optimum_value=optimum_value,
        name=problem_name,
        num_dims=num_dims,
        shift=shift_vector,
        rotation=rotation,
    )
