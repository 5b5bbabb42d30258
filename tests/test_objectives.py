"""Tests for pso_jax.objectives: known values, optima, transforms, jax transforms."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pso_jax import objectives

NAMES = sorted(objectives.OBJECTIVES)
# Eager jnp dispatch compiles every primitive separately, which costs more than
# one jit per shape, so most tests evaluate through these.
FN = {name: jax.jit(objectives.get(name).fn) for name in NAMES}
BATCHED = {name: jax.jit(jax.vmap(objectives.get(name).fn)) for name in NAMES}
SCHWEFEL_C = 418.98288727243374  # max of u sin(sqrt|u|) on [-500, 500]


@pytest.fixture
def x64():
    """Enables float64 for one test and restores the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def _dims(name):
    return (objectives.get(name).min_num_dims, 10, 30)


def _uniform(key, shape, bounds, dtype=jnp.float32):
    low, high = bounds
    return jax.random.uniform(key, shape, dtype=dtype, minval=low, maxval=high)


# Independent float64 references, written from the textbook formulas with
# explicit loops (Jamil & Yang 2013; Surjanovic & Bingham for Levy).


def np_sphere(x):
    return sum(xi * xi for xi in x)


def np_rastrigin(x):
    return 10 * len(x) + sum(xi**2 - 10 * math.cos(2 * math.pi * xi) for xi in x)


def np_rosenbrock(x):
    return sum(
        100 * (x[i + 1] - x[i] ** 2) ** 2 + (1 - x[i]) ** 2 for i in range(len(x) - 1)
    )


def np_ackley(x):
    d = len(x)
    mean_sq = sum(xi * xi for xi in x) / d
    mean_cos = sum(math.cos(2 * math.pi * xi) for xi in x) / d
    return -20 * math.exp(-0.2 * math.sqrt(mean_sq)) - math.exp(mean_cos) + 20 + math.e


def np_griewank(x):
    prod = 1.0
    for i, xi in enumerate(x, start=1):
        prod *= math.cos(xi / math.sqrt(i))
    return 1 + sum(xi * xi for xi in x) / 4000 - prod


def np_schwefel(x):
    # Textbook constant; differs from the library's by 1.27e-5 per dimension.
    return 418.9829 * len(x) - sum(xi * math.sin(math.sqrt(abs(xi))) for xi in x)


def np_levy(x):
    w = [1 + (xi - 1) / 4 for xi in x]
    total = math.sin(math.pi * w[0]) ** 2
    for wi in w[:-1]:
        total += (wi - 1) ** 2 * (1 + 10 * math.sin(math.pi * wi + 1) ** 2)
    return total + (w[-1] - 1) ** 2 * (1 + math.sin(2 * math.pi * w[-1]) ** 2)


NP_REFERENCE = {
    "sphere": np_sphere,
    "rastrigin": np_rastrigin,
    "rosenbrock": np_rosenbrock,
    "ackley": np_ackley,
    "griewank": np_griewank,
    "schwefel": np_schwefel,
    "levy": np_levy,
}


# ---------------------------------------------------------------- registry


def test_registry_contents():
    assert set(NAMES) == set(NP_REFERENCE)
    expected_bounds = {
        "sphere": (-5.12, 5.12),
        "rastrigin": (-5.12, 5.12),
        "rosenbrock": (-5.0, 10.0),
        "ackley": (-32.768, 32.768),
        "griewank": (-600.0, 600.0),
        "schwefel": (-500.0, 500.0),
        "levy": (-10.0, 10.0),
    }
    expected_argmin = {"rosenbrock": 1.0, "levy": 1.0, "schwefel": 420.9687462275036}
    for name in NAMES:
        objective = objectives.get(name)
        assert objective.name == name
        assert objective.bounds == expected_bounds[name]
        assert all(type(b) is float for b in objective.bounds)
        assert objective.optimum_value == 0.0
        np.testing.assert_allclose(
            objective.optimum_fn(3), np.full(3, expected_argmin.get(name, 0.0))
        )


# ------------------------------------------------------------ known values


@pytest.mark.parametrize("name", NAMES)
def test_value_at_optimum(x64, name):
    objective = objectives.get(name)
    cases = [("float64", num_dims) for num_dims in _dims(name)] + [("float32", 30)]
    for dtype, num_dims in cases:
        optimum = objective.optimum_fn(num_dims, dtype)
        value = FN[name](optimum)
        assert value.shape == ()
        assert value.dtype == jnp.dtype(dtype)
        # Schwefel sums D terms of size ~419, so its rounding error scales so.
        scale = SCHWEFEL_C * num_dims if name == "schwefel" else 1.0
        tol = (1e-6 if dtype == "float32" else 1e-13) * scale
        assert abs(float(value) - objective.optimum_value) <= tol, (num_dims, value)


HAND_VALUES = [
    ("sphere", [1.0, 2.0, 3.0], 14.0),
    ("sphere", [-0.5], 0.25),
    ("rastrigin", [1.0, 1.0], 2.0),
    ("rastrigin", [0.5], 10 + 0.25 + 10),  # cos(pi) = -1
    ("rosenbrock", [0.0, 0.0], 1.0),
    ("rosenbrock", [1.0, 2.0], 100.0),
    ("rosenbrock", [-1.0, 1.0, 1.0], 4.0 + 0.0),
    ("ackley", [1.0, 1.0], 20 - 20 * math.exp(-0.2)),  # cos(2 pi) = 1
    ("ackley", [0.5, -0.5], -20 * math.exp(-0.1) - math.exp(-1) + 20 + math.e),
    ("griewank", [10.0], 1 + 100 / 4000 - math.cos(10)),
    ("griewank", [math.pi, math.sqrt(2) * math.pi], 3 * math.pi**2 / 4000),
    ("schwefel", [0.0, 0.0], 2 * SCHWEFEL_C),
    ("schwefel", [1.0], SCHWEFEL_C - math.sin(1)),
    ("schwefel", [-4.0], SCHWEFEL_C + 4 * math.sin(2)),
    ("levy", [1.0, 1.0], 0.0),
    ("levy", [0.0], 0.5 + 0.0625 * 2),  # w = 0.75: sin^2(.75 pi) = .5
    (
        "levy",
        [0.0, 0.0],
        0.5 + 0.0625 * (1 + 10 * math.sin(0.75 * math.pi + 1) ** 2) + 0.125,
    ),
]


@pytest.mark.parametrize(("name", "x", "expected"), HAND_VALUES)
def test_hand_computed_values(x64, name, x, expected):
    value = FN[name](jnp.asarray(x, dtype=jnp.float64))
    np.testing.assert_allclose(float(value), expected, rtol=1e-12, atol=1e-12)


def test_hand_values_agree_with_numpy_reference():
    # Guards the references themselves, so test_matches_numpy_reference is
    # comparing against something that is right.
    for name, x, expected in HAND_VALUES:
        atol = 2e-5 * len(x) if name == "schwefel" else 1e-12
        np.testing.assert_allclose(NP_REFERENCE[name](x), expected, atol=atol)


@pytest.mark.parametrize("num_dims", [2, 7])
@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_reference(x64, name, num_dims):
    objective = objectives.get(name)
    points = _uniform(
        jax.random.key(num_dims), (20, num_dims), objective.bounds, jnp.float64
    )
    values = np.asarray(BATCHED[name](points))
    expected = np.array([NP_REFERENCE[name](list(map(float, p))) for p in points])
    atol = 2e-5 * num_dims if name == "schwefel" else 1e-10
    np.testing.assert_allclose(values, expected, rtol=1e-11, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_optimum_beats_random_points(name):
    objective = objectives.get(name)
    num_dims = 10
    points = _uniform(jax.random.key(1), (200, num_dims), objective.bounds)
    values = BATCHED[name](points)
    best = FN[name](objective.optimum_fn(num_dims))
    assert float(best) < float(jnp.min(values))


def test_schwefel_outside_domain_is_penalised_not_lower(x64):
    # Raw formula at 713 (sin(sqrt(713)) ~ 1) would give 418.98 - 713 < 0.
    assert np_schwefel([713.0]) < -290
    # Folded: u = 500 - (713 mod 500) = 287, penalty 213^2 / 10000.
    u = 287.0
    expected = SCHWEFEL_C - u * math.sin(math.sqrt(u)) + 213.0**2 / 1e4
    expected_negative = SCHWEFEL_C + u * math.sin(math.sqrt(u)) + 213.0**2 / 1e4
    # Continuous at the box edges: just inside vs just outside.
    edges = [500 * (1 - 1e-12), 500 * (1 + 1e-12), -500 * (1 - 1e-12)]
    edges.append(-500 * (1 + 1e-12))
    values = BATCHED["schwefel"](jnp.array([[713.0], [-713.0], *([e] for e in edges)]))
    np.testing.assert_allclose(values[:2], [expected, expected_negative], rtol=1e-12)
    np.testing.assert_allclose(values[2], values[3], atol=1e-6)
    np.testing.assert_allclose(values[4], values[5], atol=1e-6)
    # Nonnegative far outside the box.
    points = _uniform(jax.random.key(2), (500, 4), (-5000.0, 5000.0), jnp.float64)
    assert float(jnp.min(BATCHED["schwefel"](points))) >= 0.0


# ---------------------------------------------------------- jax transforms


@pytest.mark.parametrize("name", [*NAMES, "shifted_rotated_rastrigin"])
def test_vmap_matches_loop_and_jit_matches_eager(name):
    if name == "shifted_rotated_rastrigin":
        fn = objectives.make_problem(
            "rastrigin", 5, key=jax.random.key(3), shift=True, rotate=True
        ).fn
        bounds = objectives.get("rastrigin").bounds
    else:
        fn, bounds = objectives.get(name).fn, objectives.get(name).bounds
    points = _uniform(jax.random.key(4), (4, 5), bounds)
    # Eager (no jit) and one particle at a time: the reference.
    looped = jnp.stack([fn(p) for p in points])
    jitted = jax.jit(fn)
    chex.assert_trees_all_close(
        jnp.stack([jitted(p) for p in points]), looped, rtol=1e-6, atol=1e-5
    )
    batched = jax.jit(jax.vmap(fn))(points)
    assert batched.shape == (4,)
    chex.assert_trees_all_close(batched, looped, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite_at_and_near_optimum(x64, name, dtype):
    objective = objectives.get(name)
    grad_fn = jax.jit(jax.vmap(jax.grad(objective.fn)))
    for num_dims in (objective.min_num_dims, 10):
        optimum = np.asarray(objective.optimum_fn(num_dims, jnp.float64))
        points = jnp.asarray(
            np.stack(
                [
                    optimum,
                    optimum + 1e-30,
                    optimum + 1e-6,
                    np.zeros(num_dims),
                    np.full(num_dims, 1e-30),
                ]
            ),
            dtype=dtype,
        )
        grads = grad_fn(points)
        assert grads.dtype == jnp.dtype(dtype)
        chex.assert_tree_all_finite(grads)
        if dtype == "float64":
            # Every optimum is a stationary point (Ackley's cone: subgradient 0).
            assert np.max(np.abs(np.asarray(grads)[0])) < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences(x64, name):
    objective = objectives.get(name)
    num_points, num_dims, step = 3, 4, 1e-6
    low, high = objective.bounds
    # Up to 1.5x the box, so Schwefel's out-of-domain branch is covered too.
    rng = np.random.default_rng(5)
    x = rng.uniform(1.5 * low, 1.5 * high, (num_points, 1, num_dims))
    eye = np.eye(num_dims)
    probes = np.concatenate([x + step * eye, x - step * eye], axis=1)

    @jax.jit
    def evaluate(x, probes):
        grads = jax.vmap(jax.grad(objective.fn))(x)
        return grads, jax.vmap(jax.vmap(objective.fn))(probes)

    grads, values = map(np.asarray, evaluate(x[:, 0], probes))
    numeric = (values[:, :num_dims] - values[:, num_dims:]) / (2 * step)
    scale = np.max(np.abs(numeric)) + 1.0
    np.testing.assert_allclose(grads, numeric, atol=1e-6 * scale)


def test_schwefel_gradient_finite_everywhere_branches_meet(x64):
    # 0 and +-500 are where sqrt and the fold would produce inf * 0 = NaN.
    values = jnp.array([0.0, 500.0, -500.0, 1000.0, -1500.0, 1e-300, -1e-300])
    grads = jax.jit(jax.vmap(jax.grad(objectives.schwefel)))(values[:, None])
    chex.assert_tree_all_finite(grads)


# ----------------------------------------------------- shift and rotation


@pytest.mark.parametrize("name", NAMES)
def test_shift_rotate_moves_optimum_to_shift(name):
    num_dims = 10
    objective = objectives.get(name)
    problem = objectives.make_problem(
        name, num_dims, key=jax.random.key(6), shift=True, rotate=True
    )
    assert problem.name == f"shifted_rotated_{name}"
    assert problem.num_dims == num_dims
    assert problem.bounds == objective.bounds
    chex.assert_trees_all_equal(problem.optimum, problem.shift)
    shift = np.asarray(problem.shift)
    # The shift lies in the central 80% of the domain, away from the base argmin.
    low, high = objective.bounds
    margin = 0.1 * (high - low)
    assert np.all((shift >= low + margin) & (shift <= high - margin))
    assert np.min(np.abs(shift - np.asarray(objective.optimum_fn(num_dims)))) > 0
    points = _uniform(jax.random.key(7), (200, num_dims), problem.bounds)

    @jax.jit
    def evaluate(optimum, points):
        batch = jax.vmap(problem.fn)(points)
        return problem.fn(optimum), jnp.min(batch), jax.grad(problem.fn)(optimum)

    value, batch_min, grad = evaluate(problem.optimum, points)
    tol = 1e-6 * (SCHWEFEL_C * num_dims if name == "schwefel" else 1.0)
    assert abs(float(value) - objective.optimum_value) < tol
    # Still the best point, although rotation maps some box points outside the
    # base domain (Schwefel's penalty covers that).
    assert float(value) < float(batch_min)
    chex.assert_tree_all_finite(grad)


def test_rotation_is_orthogonal_and_not_identity():
    problem = objectives.make_problem("sphere", 6, key=jax.random.key(8), rotate=True)
    assert problem.rotation.shape == (6, 6)
    assert problem.rotation.dtype == jnp.float32
    rotation = np.asarray(problem.rotation, np.float64)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(6), atol=1e-5)
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(6), atol=1e-5)
    assert np.max(np.abs(rotation - np.eye(6))) > 0.1
    # Only rotated: the optimum stays at the base argmin, no shift drawn.
    assert problem.shift is None
    np.testing.assert_array_equal(problem.optimum, np.zeros(6))


def test_random_rotation_sign_fix_makes_diagonal_unbiased():
    # Without the sign fix, jnp.linalg.qr returns R with a negative-diagonal
    # convention; Haar matrices have E[Q_11] = 0 and E[det Q] = 0.
    # (Unfixed: mean Q_11 ~ -0.52 and det Q = 1 always, for this seed.)
    keys = jax.random.split(jax.random.key(9), 500)
    rotations = jax.jit(jax.vmap(lambda k: objectives.random_rotation(k, 3)))(keys)
    assert abs(float(jnp.mean(rotations[:, 0, 0]))) < 0.1  # std error 0.026
    dets = np.linalg.det(np.asarray(rotations, np.float64))
    np.testing.assert_allclose(np.abs(dets), 1.0, atol=1e-4)
    assert abs(float(np.mean(dets))) < 0.2  # std error 0.045


def test_rotated_schwefel_keeps_optimum_at_base_argmin():
    problem = objectives.make_problem(
        "schwefel", 5, key=jax.random.key(10), rotate=True
    )
    chex.assert_trees_all_close(problem.optimum, jnp.full(5, 420.9687462275036))
    assert abs(float(jax.jit(problem.fn)(problem.optimum))) < 1e-2


def test_rotated_schwefel_box_point_mapped_outside_domain_is_not_better(x64):
    # Pick x in the box whose rotated image z = R (x - o) + x* has one
    # coordinate at 713, outside [-500, 500]: the textbook formula would score
    # it below the optimum's 0; the library's fold-and-penalty must not.
    num_dims = 10
    problem = objectives.make_problem(
        "schwefel",
        num_dims,
        key=jax.random.key(16),
        shift=True,
        rotate=True,
        dtype=jnp.float64,
    )
    shift, rotation = np.asarray(problem.shift), np.asarray(problem.rotation)
    x_star = np.full(num_dims, 420.9687462275036)
    step = 713.0 - x_star[0]
    candidates = [shift + step * rotation[i] for i in range(num_dims)]
    in_box = [x for x in candidates if np.all(np.abs(x) <= 500.0)]
    assert in_box, "no candidate inside the box for this key"
    x = in_box[0]
    z = rotation @ (x - shift) + x_star
    assert np.max(np.abs(z)) > 700 and np_schwefel(list(z)) < -200
    assert float(jax.jit(problem.fn)(jnp.asarray(x))) > 100.0


def test_same_key_same_problem_different_key_different():
    kwargs = dict(shift=True, rotate=True)
    a = objectives.make_problem("ackley", 4, key=jax.random.key(11), **kwargs)
    b = objectives.make_problem("ackley", 4, key=jax.random.key(11), **kwargs)
    c = objectives.make_problem("ackley", 4, key=jax.random.key(12), **kwargs)
    chex.assert_trees_all_equal((a.shift, a.rotation), (b.shift, b.rotation))
    assert np.min(np.abs(np.asarray(a.shift) - np.asarray(c.shift))) > 0
    assert np.max(np.abs(np.asarray(a.rotation) - np.asarray(c.rotation))) > 0.01
    x = jnp.array([1.0, -2.0, 3.0, 0.5])
    values = jax.jit(lambda x: jnp.stack([a.fn(x), b.fn(x), c.fn(x)]))(x)
    assert values[0] == values[1]
    assert values[0] != values[2]


def test_shift_rotate_formula_against_numpy(x64):
    rng = np.random.default_rng(13)
    shift = rng.uniform(-3.0, 3.0, 5)
    rotation, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    x = rng.uniform(-5.0, 5.0, 5)
    fn = objectives.shift_rotate(objectives.rastrigin, shift, rotation, bias=100.0)
    sphere_fn = objectives.shift_rotate(objectives.sphere, shift, rotation)
    # base_optimum recentres Rosenbrock so its argmin is the shift.
    rosen = objectives.shift_rotate(
        objectives.rosenbrock, shift, rotation, base_optimum=np.ones(5)
    )

    @jax.jit
    def evaluate(x, shift):
        return (
            fn(x),
            sphere_fn(x),
            rosen(shift),
            rosen(jnp.ones(5)),
            fn(x.astype(jnp.float32)),
        )

    values = evaluate(jnp.asarray(x), jnp.asarray(shift))
    np.testing.assert_allclose(
        float(values[0]), np_rastrigin(list(rotation @ (x - shift))) + 100.0, rtol=1e-12
    )
    # Sphere is rotation invariant, so only the shift matters.
    np.testing.assert_allclose(float(values[1]), np.sum((x - shift) ** 2), rtol=1e-12)
    assert abs(float(values[2])) < 1e-20
    assert float(values[3]) > 1.0
    # dtype follows x, not the stored arrays.
    assert values[0].dtype == jnp.float64
    assert values[4].dtype == jnp.float32


def test_bias_shifts_value():
    problem = objectives.make_problem(
        "griewank", 3, key=jax.random.key(14), shift=True, bias=100.0
    )
    plain = objectives.make_problem("sphere", 2, bias=-3.0)
    assert problem.optimum_value == 100.0
    assert plain.optimum_value == -3.0
    assert plain.name == "sphere"
    values = jax.jit(lambda o, x: (problem.fn(o), plain.fn(x)))(
        problem.optimum, jnp.array([1.0, 2.0])
    )
    np.testing.assert_allclose(values, (100.0, 2.0), rtol=1e-6)


def test_make_problem_float64(x64):
    problem = objectives.make_problem(
        "levy", 3, key=jax.random.key(15), shift=True, dtype=jnp.float64
    )
    assert problem.optimum.dtype == jnp.float64
    value = jax.jit(problem.fn)(problem.optimum)
    assert value.dtype == jnp.float64
    assert abs(float(value)) < 1e-15


# ------------------------------------------------------------------ errors


def test_bad_name_lists_valid_names():
    with pytest.raises(KeyError, match="'rastrigni'.*rastrigin"):
        objectives.get("rastrigni")
    with pytest.raises(KeyError, match="'nope'.*sphere"):
        objectives.make_problem("nope", 3)


@pytest.mark.parametrize(
    "kwargs", [dict(shift=True), dict(rotate=True), dict(shift=True, rotate=True)]
)
def test_missing_key_is_an_error(kwargs):
    with pytest.raises(ValueError, match="needs a PRNG key"):
        objectives.make_problem("sphere", 3, **kwargs)


def test_too_few_dims_is_an_error():
    with pytest.raises(ValueError, match=r"D >= 2.*got D=1"):
        objectives.rosenbrock(jnp.ones(1))
    with pytest.raises(ValueError, match=r"D >= 2.*got D=1"):
        jax.jit(objectives.rosenbrock)(jnp.ones(1))
    with pytest.raises(ValueError, match=r"num_dims >= 2; got num_dims=1"):
        objectives.make_problem("rosenbrock", 1)
    with pytest.raises(ValueError, match=r"num_dims >= 1; got num_dims=0"):
        objectives.make_problem("sphere", 0)
    with pytest.raises(ValueError, match=r"D >= 1.*got D=0"):
        objectives.sphere(jnp.ones(0))


def test_wrong_shapes_are_errors():
    with pytest.raises(ValueError, match=r"shape \[D\]; got shape \(2, 3\)"):
        objectives.sphere(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="disagree on D"):
        objectives.shift_rotate(objectives.sphere, jnp.ones(3), jnp.eye(4))
    with pytest.raises(ValueError, match=r"\[D, D\]"):
        objectives.shift_rotate(objectives.sphere, rotation=jnp.ones((2, 3)))
    problem = objectives.make_problem("sphere", 3, key=jax.random.key(0), shift=True)
    with pytest.raises(ValueError, match=r"expects x of shape \(3,\); got \(1,\)"):
        problem.fn(jnp.ones(1))


def test_cos_2pi_matches_cos_in_float32():
    from pso_jax.objectives import cos_2pi

    x = np.concatenate(
        [
            np.linspace(-6, 6, 100_001),
            np.random.default_rng(0).uniform(-1e3, 1e3, 100_000),
            [0.0, 0.25, 0.5, -0.25, 1e-30, 0.75, 1.0],
        ]
    ).astype(np.float32)
    got = np.asarray(cos_2pi(jnp.asarray(x)))
    # Reference in float64 on the float32 inputs (exact argument).
    want = np.cos(2 * np.pi * x.astype(np.float64))
    assert got.dtype == np.float32
    assert np.max(np.abs(got - want)) < 3e-7
    g = jax.grad(lambda v: cos_2pi(v))(jnp.float32(0.1))
    assert abs(float(g) - (-2 * np.pi * np.sin(0.2 * np.pi))) < 1e-4
