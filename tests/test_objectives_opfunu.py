"""pso_jax.objectives against opfunu's CEC definitions, where the two coincide.

opfunu (Van Thieu, "Opfunu: an open-source Python library for optimization
benchmark functions", JORS 2024) implements the CEC 2005-2022 suites. Compared
here, at random points, to float32 tolerance:

- the basic functions of ``opfunu.utils.operator`` that CEC composes its problems
  from (sphere, Rastrigin, Rosenbrock, Ackley, Griewank, Levy, and the CEC
  "modified Schwefel" with its out-of-box fold and penalty), and the
  name-based ``Ackley01`` and ``Griewank``;
- whole CEC problems whose transform is ours, ``f(R (x - o) + x*) + bias``:
  CEC 2005 F1 (shifted sphere), F6 (shifted Rosenbrock, ``x* = 1``), F9
  (shifted Rastrigin) and CEC 2014 F5 (shifted and rotated Ackley), each with
  opfunu's own shift vectors and rotation matrices.

CEC problems that scale ``x - o`` first (e.g. CEC 2014 F7, Griewank, by 6) do not
coincide with ``shift_rotate`` and are not compared.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pso_jax import objectives

with warnings.catch_warnings():
    # opfunu 1.0.4 imports pkg_resources, which warns that it is deprecated.
    warnings.simplefilter("ignore")
    opfunu = pytest.importorskip("opfunu")
    from opfunu.utils import operator as cec_ops

DIMS = (2, 10, 30)
# float32 against opfunu's float64: a few ulps of the largest term summed.
RTOL, ATOL = 2e-5, 1e-4


def _points(seed, num_dims, low, high, num_points=16):
    """Random points in [low, high]^D, float32, shape [num_points, D]."""
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, (num_points, num_dims)).astype(np.float32)


def _ours(fn, points):
    return np.asarray(jax.vmap(fn)(jnp.asarray(points)), np.float64)


def _theirs(fn, points):
    # opfunu evaluates in float64 at the float32 points ours sees.
    return np.array([fn(p.astype(np.float64)) for p in points])


BASIC = {
    # name: (ours, opfunu, low, high)
    "sphere": (objectives.sphere, cec_ops.sphere_func, -100.0, 100.0),
    "rastrigin": (objectives.rastrigin, cec_ops.rastrigin_func, -5.12, 5.12),
    "rosenbrock": (objectives.rosenbrock, cec_ops.rosenbrock_func, -5.0, 10.0),
    "ackley": (objectives.ackley, cec_ops.ackley_func, -32.768, 32.768),
    "griewank": (objectives.griewank, cec_ops.griewank_func, -600.0, 600.0),
    "levy": (objectives.levy, cec_ops.levy_func, -10.0, 10.0),
}


@pytest.mark.parametrize("num_dims", DIMS)
@pytest.mark.parametrize("name", sorted(BASIC))
def test_basic_function_matches_opfunu(name, num_dims):
    ours, theirs, low, high = BASIC[name]
    x = _points(num_dims, num_dims, low, high)
    np.testing.assert_allclose(_ours(ours, x), _theirs(theirs, x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("num_dims", DIMS)
def test_schwefel_matches_cec_modified_schwefel(num_dims):
    # CEC's modified Schwefel takes z and evaluates at z + 420.9687...; its
    # points outside [-500, 500] are folded back and penalised, as ours are.
    # Spread over [-1000, 1000] so that many coordinates leave the box.
    z = _points(num_dims, num_dims, -1000.0, 1000.0)
    x = z + np.float32(420.9687462275036)
    theirs = _theirs(cec_ops.modified_schwefel_func, x - 420.9687462275036)
    # float32 x loses ~3e-5 per coordinate near 1000; sin' <= 1/(2 sqrt|x|) * |x|.
    np.testing.assert_allclose(
        _ours(objectives.schwefel, x), theirs, rtol=1e-4, atol=0.05
    )


@pytest.mark.parametrize("num_dims", (2, 10))
@pytest.mark.parametrize(
    "ours, cls",
    [
        (objectives.ackley, "Ackley01"),
        (objectives.griewank, "Griewank"),
    ],
)
def test_name_based_functions_match_opfunu(ours, cls, num_dims):
    problem = getattr(opfunu.name_based, cls)(ndim=num_dims)
    low, high = problem.bounds[0]
    x = _points(7, num_dims, low, high)
    np.testing.assert_allclose(
        _ours(ours, x), _theirs(problem.evaluate, x), rtol=RTOL, atol=ATOL
    )


def _cec(cls, num_dims):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(ndim=num_dims)


@pytest.mark.parametrize("num_dims", (10, 30))
@pytest.mark.parametrize(
    "cec_name, ours, base_optimum, domain",
    [
        ("F12005", objectives.sphere, None, (-100.0, 100.0)),
        ("F62005", objectives.rosenbrock, 1.0, (-100.0, 100.0)),
        ("F92005", objectives.rastrigin, None, (-5.0, 5.0)),
    ],
)
def test_cec2005_shifted_functions_match(
    cec_name, ours, base_optimum, domain, num_dims
):
    problem = _cec(getattr(opfunu.cec_based, cec_name), num_dims)
    shift = np.asarray(problem.f_shift, np.float32)
    fn = objectives.shift_rotate(
        ours,
        shift=jnp.asarray(shift),
        base_optimum=None
        if base_optimum is None
        else jnp.full((num_dims,), base_optimum, jnp.float32),
        bias=float(problem.f_bias),
    )
    # Points near the optimum (where the values are small enough for float32 to
    # resolve the difference) and across the domain.
    near = shift + _points(1, num_dims, -1.0, 1.0)
    far = _points(2, num_dims, *domain)
    for x in (near, far):
        theirs = _theirs(problem.evaluate, x)
        np.testing.assert_allclose(_ours(fn, x), theirs, rtol=RTOL, atol=ATOL)
    # The argmin and the optimum value agree.
    np.testing.assert_allclose(
        float(fn(jnp.asarray(shift))), problem.f_global, rtol=1e-6, atol=1e-3
    )


@pytest.mark.parametrize("num_dims", (10, 30))
def test_cec2014_shifted_rotated_ackley_matches(num_dims):
    problem = _cec(opfunu.cec_based.F52014, num_dims)
    shift = jnp.asarray(problem.f_shift, jnp.float32)
    rotation = jnp.asarray(problem.f_matrix, jnp.float32)
    fn = objectives.shift_rotate(
        objectives.ackley, shift=shift, rotation=rotation, bias=float(problem.f_bias)
    )
    x = _points(3, num_dims, -100.0, 100.0)
    np.testing.assert_allclose(
        _ours(fn, x), _theirs(problem.evaluate, x), rtol=RTOL, atol=ATOL
    )
