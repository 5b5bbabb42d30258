"""Tests of the swarm engine: known answers, transforms, robustness, errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import VARIANT_TOPOLOGIES, half_rng, sphere

import pso_jax
from pso_jax import PSOConvergenceWarning


def _set(state, x, v):
    """Put explicit positions/velocities into a 1-leaf swarm."""
    return state.replace(positions=x, velocities=v, pbest_params=x)


# --- known answers ---------------------------------------------------------------


def test_inertia_known_answer_two_steps(key):
    """P=3, D=1, r1 = r2 = 0.5, w=0.5, c1=1, c2=2: computed by hand."""
    opt = pso_jax.pso(
        num_particles=3,
        rng=half_rng,
        velocity_clamp=None,
        inertia=0.5,
        cognitive=1.0,
        social=2.0,
    )
    hp = opt.default_hparams
    state = opt.init(key, jnp.zeros(1), hp)
    x = jnp.array([[1.0], [2.0], [4.0]])
    state = _set(state, x, jnp.array([[0.5], [-1.0], [0.0]]))
    state, info = opt.tell(key, state, jnp.square(x[:, 0]), hp)
    # All improve on +inf; gbest = particle 0 (x=1).
    # v = 0.5 v + 0.5 (p - x) + 1.0 (1 - x) = [0.25, -1.5, -3]
    np.testing.assert_allclose(state.velocities[:, 0], [0.25, -1.5, -3.0])
    np.testing.assert_allclose(state.positions[:, 0], [1.25, 0.5, 1.0])
    np.testing.assert_allclose(state.pbest_fitness, [1.0, 4.0, 16.0])
    assert float(state.best_fitness) == 1.0
    assert int(info.num_improved) == 3
    fit = jnp.square(state.positions[:, 0])  # [1.5625, 0.25, 1]
    state, info = opt.tell(key, state, fit, hp)
    # pbest = [1, 0.5, 1], gbest = particle 1 (0.5).
    np.testing.assert_allclose(state.pbest_params[:, 0], [1.0, 0.5, 1.0])
    np.testing.assert_allclose(state.velocities[:, 0], [-0.75, -0.75, -2.0])
    np.testing.assert_allclose(state.positions[:, 0], [0.5, -0.25, -1.0])
    np.testing.assert_allclose(float(state.best_fitness), 0.25)
    np.testing.assert_allclose(state.best_params[0], 0.5)
    assert int(info.num_improved) == 2
    assert int(state.step) == 2


def test_constriction_equals_inertia_with_chi(key):
    chi = float(pso_jax.constriction_factor(2.05, 2.05))
    assert abs(chi - 0.729843788) < 1e-6
    x = jnp.array([[1.0, -2.0], [2.0, 0.5], [4.0, 3.0]])
    v = jnp.array([[0.5, 0.1], [-1.0, 0.2], [0.0, -0.3]])
    out = []
    for variant, kw in [
        ("constriction", dict(cognitive=2.05, social=2.05)),
        ("inertia", dict(inertia=chi, cognitive=chi * 2.05, social=chi * 2.05)),
    ]:
        opt = pso_jax.pso(
            num_particles=3, variant=variant, rng=half_rng, velocity_clamp=None, **kw
        )
        st = _set(opt.init(key, jnp.zeros(2)), x, v)
        st, _ = opt.tell(key, st, jnp.sum(x**2, axis=1))
        out.append(st.positions)
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)


def test_jit_of_init_with_closed_over_constriction_hparams(key):
    """The stability check computes chi eagerly, also while init is traced."""
    opt = pso_jax.pso(
        lambda x, _: jnp.sum(x**2), num_particles=4, variant="constriction"
    )
    jitted = jax.jit(opt.init)(key, jnp.zeros(3))
    chex.assert_trees_all_close(jitted, opt.init(key, jnp.zeros(3)))


def test_cso_known_answer(key):
    """Two particles always pair up; the loser learns from the winner and mean."""
    opt = pso_jax.pso(
        num_particles=2, variant="cso", rng=half_rng, velocity_clamp=None, social=0.1
    )
    st = opt.init(key, jnp.zeros(1))
    assert st.pbest_params is None  # CSO keeps no personal bests
    x = jnp.array([[1.0], [3.0]])
    st = st.replace(positions=x, velocities=jnp.array([[0.0], [1.0]]))
    st, _ = opt.tell(key, st, jnp.array([1.0, 9.0]))
    # loser 1: v = 0.5*1 + 0.5*(1-3) + 0.1*0.5*(2-3) = -0.55; x = 2.45
    np.testing.assert_allclose(st.velocities[:, 0], [0.0, -0.55], rtol=1e-6)
    np.testing.assert_allclose(st.positions[:, 0], [1.0, 2.45], rtol=1e-6)
    assert float(st.best_fitness) == 1.0


def test_maximize_tracks_the_largest(key):
    opt = pso_jax.pso(num_particles=3, maximize=True, rng=half_rng)
    st = opt.init(key, jnp.zeros(1))
    assert float(st.best_fitness) == -np.inf
    st, _ = opt.tell(key, st, jnp.array([0.1, 0.9, 0.5]))
    assert float(st.best_fitness) == pytest.approx(0.9)
    st, _ = opt.tell(key, st, jnp.array([0.2, 0.3, 0.4]))
    np.testing.assert_allclose(st.pbest_fitness, [0.2, 0.9, 0.5])


def test_per_particle_factors_share_r_across_dimensions(key):
    """With per-particle factors and x = pbest, v' - w v is c2 r2 (g - x): one r2."""
    opt = pso_jax.pso(
        num_particles=4, random_factors="per_particle", velocity_clamp=None
    )
    st = opt.init(key, jnp.zeros(6))
    x = jax.random.normal(key, (4, 6))
    st = _set(st, x, jnp.zeros((4, 6)))
    fit = jnp.array([0.0, 1.0, 2.0, 3.0])  # particle 0 is the best
    new, _ = opt.tell(jax.random.key(3), st, fit)
    social = opt.default_hparams.social
    ratio = new.velocities[1:] / (social * (x[0] - x[1:]))  # r2 per coordinate
    np.testing.assert_allclose(ratio, ratio[:, :1] * jnp.ones((1, 6)), rtol=1e-5)
    assert float(jnp.std(ratio[:, 0])) > 0  # but different across particles
    # The default draws one factor per coordinate.
    opt_d = pso_jax.pso(num_particles=4, velocity_clamp=None)
    new_d, _ = opt_d.tell(jax.random.key(3), st, fit)
    ratio_d = new_d.velocities[1:] / (social * (x[0] - x[1:]))
    assert float(jnp.min(jnp.std(ratio_d, axis=1))) > 0.05


# --- transforms and structure ---------------------------------------------------


def _run_steps(opt, state, n, step_fn=None):
    step_fn = step_fn or opt.step
    infos = []
    for i in range(n):
        state, info = step_fn(jax.random.key(100 + i), state, None, opt.default_hparams)
        infos.append(info)
    return state, infos


@pytest.mark.parametrize(("variant", "topology"), VARIANT_TOPOLOGIES)
def test_jit_equals_no_jit_and_structure_is_kept(variant, topology, tree_template):
    opt = pso_jax.pso(
        sphere,
        num_particles=6,
        variant=variant,
        topology=topology,
        bounds=(-2.0, 2.0),
    )
    s0 = opt.init(jax.random.key(1), tree_template)
    s_eager, _ = _run_steps(opt, s0, 2)
    s_jit, _ = _run_steps(opt, s0, 2, jax.jit(opt.step))
    chex.assert_trees_all_close(s_eager, s_jit, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal_shapes_and_dtypes(s0, s_jit)
    assert jax.tree.structure(s0) == jax.tree.structure(s_jit)
    chex.assert_tree_all_finite(s_jit.positions)
    for leaf in jax.tree.leaves(s_jit.positions):
        assert leaf.shape[0] == 6


def test_same_key_same_result_different_keys_differ(tree_template):
    opt = pso_jax.pso(sphere, num_particles=5)
    a = opt.init(jax.random.key(7), tree_template)
    b = opt.init(jax.random.key(7), tree_template)
    chex.assert_trees_all_equal(a, b)
    sa, _ = opt.step(jax.random.key(1), a)
    sb, _ = opt.step(jax.random.key(1), b)
    chex.assert_trees_all_equal(sa, sb)
    sc, _ = opt.step(jax.random.key(2), a)
    for u, w in zip(
        jax.tree.leaves(sa.velocities), jax.tree.leaves(sc.velocities), strict=True
    ):
        assert not np.allclose(u, w)
    c = opt.init(jax.random.key(8), tree_template)
    assert not np.allclose(
        a.positions["dense"]["kernel"], c.positions["dense"]["kernel"]
    )


def test_vmapped_fitness_equals_loop_over_particles(tree_template, key):
    def fitness(p, batch):
        return jnp.sum(p["dense"]["kernel"] @ batch) + jnp.sin(p["scale"])

    opt = pso_jax.pso(fitness, num_particles=5)
    st = opt.init(key, tree_template)
    batch = jnp.arange(2.0)
    got = pso_jax.fitness.swarm_fitness(fitness, st.positions, st.frozen_params, batch)
    params = opt.ask(st)
    want = [
        fitness(jax.tree.map(lambda leaf, i=i: leaf[i], params), batch)
        for i in range(5)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.shape == (5,)


def test_no_retracing_when_hparams_change(key):
    traces = []

    def fitness(x, _):
        traces.append(1)  # runs once per trace
        return jnp.sum(x**2)

    opt = pso_jax.pso(fitness, num_particles=4, bounds=(-1.0, 1.0))
    step = jax.jit(opt.step)
    st = opt.init(key, jnp.zeros(3))
    hp = opt.default_hparams
    st, _ = step(jax.random.key(1), st, None, hp)
    n = len(traces)
    for w in (0.4, 0.6, 0.9):
        st, _ = step(jax.random.key(2), st, None, hp.replace(inertia=jnp.float32(w)))
    st, _ = step(jax.random.key(3), st, None, hp.replace(velocity_clamp=jnp.float32(2)))
    assert len(traces) == n


def test_hparams_change_the_update(key):
    """A traced hyperparameter is really used: a different w, a different move."""
    opt = pso_jax.pso(sphere, num_particles=4)
    st = opt.init(key, jnp.zeros(3))
    a, _ = opt.step(jax.random.key(1), st, None, opt.default_hparams)
    b, _ = opt.step(
        jax.random.key(1), st, None, opt.default_hparams.replace(inertia=jnp.float32(0))
    )
    assert not np.allclose(a.velocities, b.velocities)


def test_schedule_hparam_follows_optax_schedule(key):
    sched = optax.linear_schedule(0.9, 0.4, 10)
    opt = pso_jax.pso(
        num_particles=2,
        rng=half_rng,
        velocity_clamp=None,
        inertia=sched,
        cognitive=0.0,
        social=0.0,
    )
    st = opt.init(key, jnp.zeros(1))
    st = _set(st, jnp.zeros((2, 1)), jnp.ones((2, 1)))
    expected = 1.0
    for i in range(4):
        st, _ = opt.tell(key, st, jnp.zeros(2))
        expected *= float(sched(i))
        np.testing.assert_allclose(st.velocities[0, 0], expected, rtol=1e-6)


def test_eval_shape_of_init_is_abstract(tree_template):
    opt = pso_jax.pso(sphere, num_particles=1000)
    shapes = jax.eval_shape(opt.init, jax.random.key(0), tree_template)
    assert shapes.positions["dense"]["kernel"].shape == (1000, 3, 2)
    assert shapes.fitness.shape == (1000,)


# --- masks --------------------------------------------------------------------


def test_masked_leaves_never_move_and_are_not_copied(tree_template, key):
    mask = {"dense": {"kernel": True, "bias": False}, "scale": False}
    template = jax.tree.map(lambda x: x + 3.0, tree_template)
    opt = pso_jax.pso(sphere, num_particles=7, mask=mask)
    st = opt.init(key, template)
    assert st.positions["dense"]["bias"] is None
    assert st.frozen_params["dense"]["bias"].shape == (2,)  # one copy, no P axis
    st, _ = jax.lax.scan(
        lambda s, i: opt.step(jax.random.fold_in(key, i), s), st, jnp.arange(30)
    )
    np.testing.assert_array_equal(st.frozen_params["dense"]["bias"], 3.0)
    np.testing.assert_array_equal(st.frozen_params["scale"], 3.0)
    full = pso_jax.best_solution(st)
    np.testing.assert_array_equal(full["dense"]["bias"], 3.0)
    assert float(jnp.abs(full["dense"]["kernel"]).max()) < 3.0  # the swarm moved it
    assert opt.ask(st)["scale"].shape == (7,)


def test_mask_errors(tree_template, key):
    with pytest.raises(ValueError, match="mask structure"):
        pso_jax.pso(sphere, num_particles=2, mask={"dense": True}).init(
            key, tree_template
        )
    none = jax.tree.map(lambda _: False, tree_template)
    with pytest.raises(ValueError, match="selects no leaf"):
        pso_jax.pso(sphere, num_particles=2, mask=none).init(key, tree_template)


# --- NaN / inf robustness -----------------------------------------------------------


@pytest.mark.parametrize(("variant", "topology"), VARIANT_TOPOLOGIES)
def test_nan_never_becomes_a_best_and_swarm_recovers(variant, topology, key):
    opt = pso_jax.pso(
        num_particles=8, variant=variant, topology=topology, bounds=(-1.0, 1.0)
    )
    st = opt.init(key, jnp.zeros(3))
    fit = jnp.array([jnp.nan, 0.5, jnp.inf, -jnp.inf, 2.0, jnp.nan, 1.0, 3.0])
    st, info = opt.tell(jax.random.key(1), st, fit)
    assert float(st.best_fitness) == 0.5
    assert int(info.num_nonfinite) == 4
    assert not np.any(np.isnan(st.pbest_fitness))
    # An all-NaN step changes no best and leaves the state finite.
    st, info = opt.tell(jax.random.key(2), st, jnp.full(8, jnp.nan))
    assert float(st.best_fitness) == 0.5
    assert int(info.num_improved) == 0
    chex.assert_tree_all_finite((st.positions, st.velocities, st.best_params))
    # ... and the swarm recovers on the next finite step.
    st, _ = opt.tell(jax.random.key(3), st, jnp.linspace(0.1, 0.8, 8))
    assert float(st.best_fitness) == pytest.approx(0.1)


def test_nan_fitness_function_in_a_full_run(key):
    def fitness(x, _):
        return jnp.where(x[0] > 0.5, jnp.nan, jnp.sum(x**2))

    opt = pso_jax.pso(fitness, num_particles=10, bounds=(-1.0, 1.0))
    st = opt.init(key, jnp.zeros(2))
    st, infos = pso_jax.scan_steps(key, opt, st, opt.default_hparams, 60)
    assert float(st.best_params[0]) <= 0.5
    assert np.isfinite(float(st.best_fitness))
    assert int(infos.num_nonfinite.sum()) > 0  # the NaN branch was really hit


# --- stagnation -------------------------------------------------------------------


@pytest.mark.parametrize("remedy", ["resample", "perturb"])
def test_stagnation_remedy_replaces_worst_particles(remedy, key):
    opt = pso_jax.pso(
        num_particles=8,
        bounds=(-1.0, 1.0),
        stagnation=remedy,
        stall_patience=3,
        restart_fraction=0.25,
    )
    st = opt.init(key, jnp.zeros(2))
    fit = jnp.arange(8.0)
    st, info = opt.tell(key, st, fit)  # first step improves: no stall
    assert int(info.stall_count) == 0
    for i in range(3):
        before = st
        st, info = opt.tell(jax.random.key(i), st, fit)
    assert bool(info.restarted) and int(st.num_restarts) == 1
    assert int(st.stall_count) == 0
    # The two worst (fitness 6, 7) were re-placed: personal bests reset.
    np.testing.assert_array_equal(st.pbest_fitness[6:], np.inf)
    np.testing.assert_array_equal(st.pbest_fitness[:6], fit[:6])
    assert np.all(np.abs(np.asarray(st.positions)) <= 1.0)
    del before


# --- validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_particles=0), "num_particles=0"),
        (dict(num_particles=-3), "num_particles=-3"),
        (dict(num_particles=2.5), "num_particles=2.5"),
        (dict(num_particles=4, variant="foo"), "variant='foo'"),
        (dict(num_particles=4, topology="star"), "topology='star'"),
        (dict(num_particles=4, cognitive=-1.0), "cognitive=-1.0"),
        (dict(num_particles=4, social=-0.5), "social=-0.5"),
        (dict(num_particles=4, bounds=(1.0, 1.0)), "low=1.0, high=1.0"),
        (dict(num_particles=4, bounds=(2.0, -1.0)), "low must be < high"),
        (dict(num_particles=4, velocity_clamp="range"), "needs bounds"),
        (dict(num_particles=4, bound_handling="bounce"), "bound_handling='bounce'"),
        (dict(num_particles=4, random_factors="per_leaf"), "random_factors"),
        (dict(num_particles=4, inertia_weight=0.5), "unknown hyperparameter"),
        (dict(num_particles=4, variant="cso", topology="ring"), "cso"),
        (dict(num_particles=1, variant="cso"), "cso pairs"),
        (dict(num_particles=4, variant="constriction", cognitive=1.0), "> 4"),
        (dict(num_particles=4, restart_fraction=1.5), "restart_fraction=1.5"),
    ],
)
def test_invalid_arguments_raise_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pso_jax.pso(sphere, **kwargs)


def test_bad_bounds_trees_and_shapes(key, tree_template):
    low = {"dense": {"kernel": -1.0, "bias": -1.0}, "scale": 1.0}
    high = {"dense": {"kernel": 1.0, "bias": 1.0}, "scale": 0.0}
    with pytest.raises(ValueError, match=r"\['scale'\]: low must be < high"):
        pso_jax.pso(sphere, num_particles=2, bounds=(low, high)).init(
            key, tree_template
        )
    with pytest.raises(ValueError, match="does not match"):
        pso_jax.pso(sphere, num_particles=2, bounds=({"a": 0.0}, {"a": 1.0})).init(
            key, tree_template
        )
    with pytest.raises(ValueError, match="do not broadcast"):
        pso_jax.pso(sphere, num_particles=2, bounds=(-jnp.ones(5), jnp.ones(5))).init(
            key, jnp.zeros(3)
        )
    with pytest.raises(ValueError, match="index \\(1,\\)"):
        pso_jax.pso(
            sphere, num_particles=2, bounds=(jnp.array([0.0, 2.0]), jnp.ones(2))
        ).init(key, jnp.zeros(2))


def test_non_scalar_fitness_and_wrong_shapes_raise(key):
    opt = pso_jax.pso(lambda x, _: x, num_particles=3)
    st = opt.init(key, jnp.zeros(2))
    with pytest.raises(ValueError, match="scalar for one particle"):
        opt.step(key, st)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        opt.tell(key, st, jnp.zeros(4))
    with pytest.raises(ValueError, match="without fitness_fn"):
        pso_jax.pso(num_particles=3).step(key, st)
    with pytest.raises(ValueError, match="dtype int32"):
        opt.init(key, jnp.zeros(2, jnp.int32))


def test_traced_hparams_out_of_range_are_caught_eagerly(key):
    opt = pso_jax.pso(sphere, num_particles=3)
    with pytest.raises(ValueError, match="velocity_clamp=-1.0"):
        opt.init(key, jnp.zeros(2), opt.default_hparams.replace(velocity_clamp=-1.0))


def test_convergence_region_warning():
    with pytest.warns(PSOConvergenceWarning, match="outside"):
        pso_jax.pso(sphere, num_particles=4, inertia=0.9, cognitive=2.0, social=2.0)
    assert pso_jax.in_stability_region(0.7298, 1.49618, 1.49618)
    assert not pso_jax.in_stability_region(1.0, 0.5, 0.5)
    assert not pso_jax.in_stability_region(0.0, 2.0, 2.0)  # 4 > 24/7
    assert pso_jax.in_stability_region(0.0, 1.7, 1.7)


def test_whole_state_can_be_donated(key, tree_template):
    """No two state leaves share a buffer (donation would fail)."""
    for variant in ("inertia", "cso"):
        opt = pso_jax.pso(sphere, num_particles=4, variant=variant)
        st = opt.init(key, tree_template)
        step = jax.jit(opt.step, donate_argnums=1)
        for i in range(2):
            st, _ = step(jax.random.key(i), st, None, opt.default_hparams)
        st = jax.jit(opt.init)(key, tree_template)
        st, _ = step(jax.random.key(0), st, None, opt.default_hparams)
        assert int(st.step) == 1
