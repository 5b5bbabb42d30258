"""Validation wherever a value enters the library: one table of bad inputs.

Each case builds one bad input and names the exception it must raise and a
regex that the message must match: the argument, the value it got, and (where
there is one) what is expected. The checks run on the host, before anything is
compiled; the tests at the end show that they leave ``jit`` alone.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pso_jax
from pso_jax import flax_utils, topology
from pso_jax.pso import SCHEDULE_CHECK_STEPS, evaluate_swarm, validate_hparams
from pso_jax.pso import _tell as unchecked_tell

NUM_PARTICLES = 4


def sphere(params, _batch=None):
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))


def sphere1(params):
    return sphere(params)


@functools.cache
def _swarm():
    """``(opt, state, hparams)``: a small bounded swarm, built once."""
    opt = pso_jax.pso(sphere, num_particles=NUM_PARTICLES, bounds=(-1.0, 1.0))
    state = opt.init(jax.random.key(0), jnp.zeros(3))
    return opt, state, opt.default_hparams


def _opt():
    return _swarm()[0]


def _state():
    return _swarm()[1]


def _hp(**changes):
    """The default hyperparameters with ``changes`` (as float32/int32 arrays)."""
    hp = _swarm()[2]
    return hp.replace(
        **{
            k: jnp.asarray(v, jnp.result_type(getattr(hp, k)))
            for k, v in changes.items()
        }
    )


def _step(hparams=None, key=None, state=None, batch=None, opt=None):
    opt = opt or _opt()
    key = jax.random.key(1) if key is None else key
    return opt.step(key, _state() if state is None else state, batch, hparams)


def _tell(hparams=None, fitness=None, key=None, state=None):
    key = jax.random.key(1) if key is None else key
    fitness = jnp.zeros(NUM_PARTICLES) if fitness is None else fitness
    return _opt().tell(key, _state() if state is None else state, fitness, hparams)


def _pso(**kwargs):
    return pso_jax.pso(sphere, **{"num_particles": NUM_PARTICLES, **kwargs})


def _init(template, **kwargs):
    return _pso(**kwargs).init(jax.random.key(0), template)


def _minimize(**kwargs):
    args = dict(key=jax.random.key(0), num_dims=2, num_steps=5)
    init_or_bounds = kwargs.pop("init_or_bounds", (-1.0, 1.0))
    fitness_fn = kwargs.pop("fitness_fn", sphere1)
    return pso_jax.minimize(fitness_fn, init_or_bounds, **{**args, **kwargs})


def _run(**kwargs):
    opt, state, hp = _swarm()
    return pso_jax.run(jax.random.key(1), opt, state, hp, **{"num_steps": 5, **kwargs})


def _scan(num_steps):
    opt, state, hp = _swarm()
    return pso_jax.scan_steps(jax.random.key(1), opt, state, hp, num_steps)


def _scan_chunks(**kwargs):
    opt, state, hp = _swarm()
    args = {"num_steps": 4, **kwargs}
    n = args.pop("num_steps")
    return next(pso_jax.scan_chunks(jax.random.key(1), opt, state, hp, n, **args))


def _other_swarm_state():
    opt = pso_jax.pso(sphere, num_particles=8, bounds=(-1.0, 1.0))
    return opt.init(jax.random.key(0), jnp.zeros(3))


def _falling(start, slope):
    """A schedule ``start - slope * step`` (goes negative eventually)."""
    return lambda step: start - slope * step


NAN, INF = math.nan, math.inf

# (id, builds the bad input, exception, regex the message must match)
CASES = [
    # --- hyperparameters at pso(): finite, in range, not absurdly large -------
    (
        "pso-inertia-1e30",
        lambda: _pso(inertia=1e30),
        ValueError,
        r"hparams\.inertia=1e\+30: expected a finite number, -1e\+06 <= inertia",
    ),
    (
        "pso-social-1e30",
        lambda: _pso(social=1e30),
        ValueError,
        r"hparams\.social=1e\+30: expected .* social <= 1e\+06 \(MAX_COEFFICIENT\)",
    ),
    (
        "pso-init-velocity-1e30",
        lambda: _pso(init_velocity=1e30),
        ValueError,
        r"hparams\.init_velocity=1e\+30",
    ),
    (
        "pso-inertia-inf",
        lambda: _pso(inertia=INF),
        ValueError,
        r"hparams\.inertia=inf: expected a finite number",
    ),
    (
        "pso-cognitive-nan",
        lambda: _pso(cognitive=NAN),
        ValueError,
        r"hparams\.cognitive=nan",
    ),
    (  # pso's velocity_clamp= is the clamp's mode; its value is an hparam
        "pso-velocity-clamp-mode",
        lambda: _pso(velocity_clamp=-INF),
        ValueError,
        r"velocity_clamp=-inf: expected 'auto' or one of",
    ),
    (
        "step-velocity-clamp-minus-inf",
        lambda: _step(_hp(velocity_clamp=-INF)),
        ValueError,
        r"hparams\.velocity_clamp=-inf: expected 0 < velocity_clamp .* or inf",
    ),
    (
        "step-velocity-clamp-zero",
        lambda: _step(_hp(velocity_clamp=0.0)),
        ValueError,
        r"hparams\.velocity_clamp=0\.0",
    ),
    (
        "pso-init-scale-inf",
        lambda: _pso(init_scale=INF),
        ValueError,
        r"hparams\.init_scale=inf: expected a finite number, 0 <= init_scale",
    ),
    (
        "pso-init-scale-over-float32",
        lambda: _pso(init_scale=1e39),
        ValueError,
        r"hparams\.init_scale=1e\+39",
    ),
    (
        "pso-stall-tol-nan",
        lambda: _pso(stall_tol=NAN),
        ValueError,
        r"hparams\.stall_tol=nan",
    ),
    (
        "pso-stall-patience-fraction",
        lambda: _pso(stall_patience=2.5),
        ValueError,
        r"hparams\.stall_patience=2\.5: expected an integer",
    ),
    (
        "pso-stall-patience-zero",
        lambda: _pso(stall_patience=0),
        ValueError,
        r"hparams\.stall_patience=0: expected an integer, 1 <= stall_patience",
    ),
    (
        "pso-perturb-scale-negative",
        lambda: _pso(perturb_scale=-0.1),
        ValueError,
        r"hparams\.perturb_scale=-0\.1",
    ),
    (
        "pso-inertia-string",
        lambda: _pso(inertia="0.7"),
        ValueError,
        r"hparams\.inertia='0\.7': expected a real number",
    ),
    (
        "pso-inertia-bool",
        lambda: _pso(inertia=True),
        ValueError,
        r"hparams\.inertia=True: expected a real number",
    ),
    (
        "pso-schedule-goes-negative",
        lambda: _pso(cognitive=_falling(1.0, 0.01)),
        ValueError,
        r"hparams\.cognitive=-9\.0 at step 1000 \(from its schedule\): expected",
    ),
    (
        "pso-schedule-nan-at-step-0",
        lambda: _pso(social=lambda s: s * NAN),
        ValueError,
        r"hparams\.social=nan at step 0 \(from its schedule\)",
    ),
    (
        "pso-schedule-not-scalar",
        lambda: _pso(inertia=lambda s: jnp.ones(2) * 0.5),
        ValueError,
        r"hparams\.inertia at step 0 \(from its schedule\) must be a "
        r"scalar, got shape \(2,\)",
    ),
    (
        "pso-constriction-schedule",
        lambda: _pso(variant="constriction", social=_falling(2.05, 0.001)),
        ValueError,
        r"constriction needs cognitive \+ social > 4, got 4 at step 100 ",
    ),
    # --- hyperparameters at init / step / tell, outside jit --------------------
    (
        "init-init-scale-negative",
        lambda: _opt().init(jax.random.key(0), jnp.zeros(3), _hp(init_scale=-1.0)),
        ValueError,
        r"hparams\.init_scale=-1\.0",
    ),
    (
        "step-inertia-nan",
        lambda: _step(_hp(inertia=NAN)),
        ValueError,
        r"hparams\.inertia=nan: expected a finite number",
    ),
    (
        "step-social-above-max",
        lambda: _step(_hp(social=1e7)),
        ValueError,
        r"hparams\.social=10000000\.0: expected .* <= 1e\+06",
    ),
    (
        "step-restart-fraction-2",
        lambda: _step(_hp(restart_fraction=2.0)),
        ValueError,
        r"hparams\.restart_fraction=2\.0: expected .* 0 <= "
        r"restart_fraction <= 1",
    ),
    (
        "step-stall-patience-zero",
        lambda: _step(_hp(stall_patience=0)),
        ValueError,
        r"hparams\.stall_patience=0: expected an integer",
    ),
    (
        "step-inertia-not-scalar",
        lambda: _step(_hp().replace(inertia=jnp.ones(3))),
        ValueError,
        r"hparams\.inertia must be a scalar, got shape \(3,\)",
    ),
    (
        "step-hparams-dict",
        lambda: _step({"inertia": 0.5}),
        ValueError,
        r"hparams must be a PSOHyperParams .* got dict",
    ),
    (
        "tell-velocity-clamp-minus-1",
        lambda: _tell(_hp(velocity_clamp=-1.0)),
        ValueError,
        r"hparams\.velocity_clamp=-1\.0",
    ),
    (
        "tell-cognitive-minus-1",
        lambda: _tell(_hp(cognitive=-1.0)),
        ValueError,
        r"hparams\.cognitive=-1\.0: expected a finite number, 0 <= cognitive",
    ),
    (
        "tell-init-velocity-inf",
        lambda: _tell(_hp(init_velocity=INF)),
        ValueError,
        r"hparams\.init_velocity=inf",
    ),
    # --- hyperparameters and stopping rules at minimize / run / scans ----------
    (
        "minimize-hparams-cognitive",
        lambda: _minimize(hparams=_hp(cognitive=-1.0)),
        ValueError,
        r"hparams\.cognitive=-1\.0",
    ),
    (
        "minimize-hparams-inertia-nan",
        lambda: _minimize(hparams=_hp(inertia=NAN)),
        ValueError,
        r"hparams\.inertia=nan",
    ),
    (
        "minimize-ftol-nan",
        lambda: _minimize(ftol=NAN, patience=3),
        ValueError,
        r"ftol=nan: expected a finite real number >= 0",
    ),
    (
        "minimize-ftol-inf",
        lambda: _minimize(ftol=INF),
        ValueError,
        r"ftol=inf: expected a finite real number",
    ),
    (
        "minimize-ftol-string",
        lambda: _minimize(ftol="0"),
        ValueError,
        r"ftol='0': expected a finite real number >= 0\.0, got str",
    ),
    (
        "minimize-target-nan",
        lambda: _minimize(target_fitness=NAN),
        ValueError,
        r"target_fitness=nan: expected a finite real number",
    ),
    (
        "minimize-patience-zero",
        lambda: _minimize(patience=0),
        ValueError,
        r"patience=0: expected an integer >= 1",
    ),
    (
        "minimize-patience-fraction",
        lambda: _minimize(patience=2.5),
        ValueError,
        r"patience=2\.5: expected an integer >= 1, got float",
    ),
    (
        "minimize-num-dims-zero",
        lambda: _minimize(num_dims=0),
        ValueError,
        r"num_dims=0: expected an integer >= 1",
    ),
    (
        "minimize-num-steps-bool",
        lambda: _minimize(num_steps=True),
        ValueError,
        r"num_steps=True: expected an integer >= 1, got bool",
    ),
    (
        "minimize-restarts-fraction",
        lambda: _minimize(restarts=1.5, patience=2),
        ValueError,
        r"restarts=1\.5: expected an integer >= 0",
    ),
    (
        "minimize-restart-growth-zero",
        lambda: _minimize(restart_growth=0),
        ValueError,
        r"restart_growth=0: expected an integer >= 1",
    ),
    (
        "minimize-num-particles-zero",
        lambda: _minimize(num_particles=0),
        ValueError,
        r"num_particles=0: expected an integer >= 1",
    ),
    (
        "minimize-int-key",
        lambda: _minimize(key=0),
        ValueError,
        r"key=0: expected one PRNG key",
    ),
    (
        "minimize-bounds-shapes-differ",
        lambda: _minimize(num_dims=None, init_or_bounds=(-jnp.ones(2), jnp.ones(3))),
        ValueError,
        r"bounds for leaf <root>: low has shape \(2,\), high \(3,\)",
    ),
    (
        "minimize-num-dims-with-array-bounds",
        lambda: _minimize(num_dims=2, init_or_bounds=(-jnp.ones(2), jnp.ones(2))),
        ValueError,
        r"num_dims=2 is only for scalar bounds",
    ),
    (
        "run-patience-zero",
        lambda: _run(patience=0),
        ValueError,
        r"patience=0: expected an integer >= 1",
    ),
    ("run-ftol-nan", lambda: _run(ftol=NAN), ValueError, r"ftol=nan"),
    (
        "run-target-nan",
        lambda: _run(target_fitness=NAN),
        ValueError,
        r"target_fitness=nan",
    ),
    (
        "run-num-steps-fraction",
        lambda: _run(num_steps=2.5),
        ValueError,
        r"num_steps=2\.5: expected an integer >= 1",
    ),
    (
        "scan-steps-negative",
        lambda: _scan(-1),
        ValueError,
        r"num_steps=-1: expected an integer >= 0",
    ),
    (
        "scan-steps-fraction",
        lambda: _scan(2.5),
        ValueError,
        r"num_steps=2\.5: expected an integer >= 0, got float",
    ),
    (
        "scan-chunks-chunk-zero",
        lambda: _scan_chunks(chunk=0),
        ValueError,
        r"chunk=0: expected an integer >= 1",
    ),
    (
        "scan-chunks-negative",
        lambda: _scan_chunks(num_steps=-2),
        ValueError,
        r"num_steps=-2: expected an integer >= 0",
    ),
    # --- bounds: representable in the leaf's dtype, the params' shapes --------
    (
        "bounds-float32-range-overflow",
        lambda: _init(jnp.zeros(3), bounds=(-3e38, 3e38)),
        ValueError,
        r"bounds for leaf <root>: the range high - low = 6e\+38 .* not finite in "
        r"the leaf's dtype float32 \(max 3\.40282e\+38\)",
    ),
    (
        "bounds-float16-value-overflow",
        lambda: _init(jnp.zeros(3, jnp.float16), bounds=(-1e5, 1e5)),
        ValueError,
        r"bounds for leaf <root>: low=-100000 is not finite in the leaf's dtype "
        r"float16 \(max 65504\)",
    ),
    (
        "bounds-float16-range-overflow",
        lambda: _init(jnp.zeros(3, jnp.float16), bounds=(-4e4, 4e4)),
        ValueError,
        r"range high - low = 80000 .* float16 \(max 65504\)",
    ),
    (
        "bounds-bfloat16-per-leaf",
        lambda: _init(
            {"w": jnp.zeros(2, jnp.bfloat16), "b": jnp.zeros(1)},
            bounds=({"w": -3e38, "b": -1.0}, {"w": 3e38, "b": 1.0}),
        ),
        ValueError,
        r"bounds for leaf \['w'\]: the range .* bfloat16",
    ),
    (
        "bounds-element-overflow",
        lambda: _init(jnp.zeros(2, jnp.float16), bounds=(jnp.array([-1.0, -7e4]), 1.0)),
        ValueError,
        r"low=-70000 at index \(1,\) is not finite .* float16",
    ),
    (
        "bounds-shape-mismatch",
        lambda: _init(jnp.zeros(3), bounds=(-jnp.ones(2), jnp.ones(2))),
        ValueError,
        r"bounds for leaf <root>: low shape \(2,\) and high shape \(2,\) do not "
        r"broadcast to the leaf's shape \(3,\)",
    ),
    (
        "bounds-tree-mismatch",
        lambda: _init({"a": jnp.zeros(2)}, bounds=({"b": 0.0}, {"b": 1.0})),
        ValueError,
        r"bounds low has structure .* does not match the parameters'",
    ),
    (
        "bounds-scalar-nan",
        lambda: _pso(bounds=(NAN, 1.0)),
        ValueError,
        r"bounds low=nan: expected a finite real number",
    ),
    (
        "bounds-scalar-string",
        lambda: _pso(bounds=("a", 1.0)),
        ValueError,
        r"bounds low='a': expected a finite real number, got str",
    ),
    # --- pytrees: the template and the mask ----------------------------------
    (
        "template-zero-size-leaf",
        lambda: _init({"a": jnp.zeros((0,)), "b": jnp.zeros(2)}),
        ValueError,
        r"params_template leaf \['a'\] has shape \(0,\) \(no element\)",
    ),
    (
        "template-int-leaf",
        lambda: _init({"a": jnp.zeros(2), "n": jnp.arange(2)}),
        ValueError,
        r"params_template leaf \['n'\] has dtype int32: only "
        r"floating-point",
    ),
    (
        "template-string-leaf",
        lambda: _init({"a": jnp.zeros(2), "s": "x"}),
        ValueError,
        r"params_template has a leaf 'x' of type str",
    ),
    (
        "template-empty",
        lambda: _init({}),
        ValueError,
        r"params_template has no array leaves, got \{\}",
    ),
    (
        "mask-int-leaf",
        lambda: _init(
            {"a": jnp.zeros(2), "b": jnp.zeros(1)}, mask={"a": 1, "b": False}
        ),
        ValueError,
        r"mask leaf \['a'\] must be a bool .* got 1",
    ),
    (
        "mask-array-leaf",
        lambda: _init({"a": jnp.zeros(2)}, mask={"a": np.array([True, False])}),
        ValueError,
        r"mask leaf \['a'\] must be a bool",
    ),
    (
        "mask-not-a-prefix",
        lambda: _init(
            {"a": jnp.zeros(2), "b": {"c": jnp.zeros(1)}},
            mask={"a": True, "b": {"x": True}},
        ),
        ValueError,
        r"mask structure .* is not a prefix .* \(they differ at \['b'\]\)",
    ),
    # --- fitness outputs -------------------------------------------------------
    (
        "step-fitness-per-example",
        lambda: pso_jax.pso(
            lambda p, b: jnp.sum(p) * b, num_particles=NUM_PARTICLES
        ).step(jax.random.key(1), _state(), jnp.ones(5)),
        ValueError,
        r"fitness_fn must return a scalar for one particle; it returned shape "
        r"\(5,\) per particle",
    ),
    (
        "step-fitness-tuple",
        lambda: pso_jax.pso(
            lambda p, b: (jnp.sum(p), p), num_particles=NUM_PARTICLES
        ).step(jax.random.key(1), _state()),
        ValueError,
        r"it returned tuple \(\(\), \(3,\)\)",
    ),
    (
        "step-fitness-complex",
        lambda: pso_jax.pso(
            lambda p, b: jnp.sum(p) * 1j, num_particles=NUM_PARTICLES
        ).step(jax.random.key(1), _state()),
        ValueError,
        r"fitness_fn returned dtype complex64: expected a real number",
    ),
    (
        "minimize-fitness-per-example",
        lambda: _minimize(fitness_fn=lambda x: x * 2),
        ValueError,
        r"it returned shape \(2,\) per particle",
    ),
    (
        "minimize-fitness-tuple",
        lambda: _minimize(fitness_fn=lambda x: (jnp.sum(x), x)),
        ValueError,
        r"it returned tuple \(\(\), \(2,\)\)",
    ),
    (
        "tell-fitness-shape",
        lambda: _tell(fitness=jnp.zeros((NUM_PARTICLES, 2))),
        ValueError,
        r"fitness must have shape \(4,\) .* got \(4, 2\)",
    ),
    (
        "tell-fitness-bool",
        lambda: _tell(fitness=jnp.zeros(NUM_PARTICLES, bool)),
        ValueError,
        r"fitness has dtype bool: expected real numbers",
    ),
    # --- topology arguments ------------------------------------------------------
    (
        "ring-neighbors-fraction",
        lambda: _pso(topology="ring", ring_neighbors=1.5),
        ValueError,
        r"ring_neighbors=1\.5: expected an integer >= 1, got float",
    ),
    (
        "ring-neighbors-zero",
        lambda: _pso(topology="ring", ring_neighbors=0),
        ValueError,
        r"ring_neighbors=0: expected an integer >= 1",
    ),
    (
        "informants-fraction",
        lambda: _pso(topology="random", num_informants=2.5),
        ValueError,
        r"num_informants=2\.5: expected an integer >= 1",
    ),
    (
        "topology-list",
        lambda: _pso(topology=["ring"]),
        ValueError,
        r"topology=\['ring'\]: expected one of",
    ),
    (
        "grid-shape-zero",
        lambda: topology.grid_shape(0),
        ValueError,
        r"num_particles=0: expected an integer >= 1",
    ),
    # --- counts, keys, states ----------------------------------------------------
    (
        "num-particles-zero",
        lambda: _pso(num_particles=0),
        ValueError,
        r"num_particles=0: expected an integer >= 1",
    ),
    (
        "num-particles-negative",
        lambda: _pso(num_particles=-3),
        ValueError,
        r"num_particles=-3: expected an integer >= 1",
    ),
    (
        "num-particles-bool",
        lambda: _pso(num_particles=True),
        ValueError,
        r"num_particles=True: expected an integer >= 1, got bool",
    ),
    (
        "maximize-string",
        lambda: _pso(maximize="yes"),
        ValueError,
        r"maximize='yes': expected a bool",
    ),
    (
        "step-int-key",
        lambda: _step(key=3),
        ValueError,
        r"key=3: expected one PRNG key \(jax\.random\.key\(seed\), or a raw uint32 "
        r"key\), got int",
    ),
    (
        "step-batch-of-keys",
        lambda: _step(key=jax.random.split(jax.random.key(0))),
        ValueError,
        r"key: expected one PRNG key .* got key<fry>\[2\]",
    ),
    (
        "init-float-key",
        lambda: _opt().init(jnp.zeros(2), jnp.zeros(3)),
        ValueError,
        r"key: expected one PRNG key .* got float32\[2\]",
    ),
    (
        "tell-state-of-another-swarm",
        lambda: _tell(state=_other_swarm_state()),
        ValueError,
        r"state has \(8,\) particles .* this optimizer \(4,\)",
    ),
    (
        "step-state-dict",
        lambda: _step(state={"positions": jnp.zeros((4, 3))}),
        ValueError,
        r"state must be a PSOState .* got dict",
    ),
    (
        "rescore-pbest-shape",
        lambda: _opt().rescore(_state(), jnp.zeros(3), jnp.float32(0.0)),
        ValueError,
        r"pbest_fitness must have shape \(4,\) .* got \(3,\)",
    ),
    (
        "init-swarm-params-zero",
        lambda: flax_utils.init_swarm_params(None, jax.random.key(0), 0, None),
        ValueError,
        r"num_particles=0: expected an integer >= 1",
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [pytest.param(b, e, m, id=i) for i, b, e, m in CASES],
)
def test_bad_input_raises_naming_argument_and_value(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_the_table_is_large_and_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


# --- what is accepted ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(inertia=-0.3, cognitive=1.0, social=1.0),  # negative w is allowed
        dict(restart_fraction=0.0, stall_tol=0.0),  # closed ends of the ranges
        dict(restart_fraction=1.0, stall_patience=np.int64(3)),
        dict(init_scale=1e30),  # absolute: only finite in float32
        dict(cognitive=lambda s: jnp.maximum(1.5 - 1e-3 * s, 0.5)),  # stays >= 0
    ],
)
def test_valid_edge_values_are_accepted(kwargs):
    opt = _pso(**kwargs)
    validate_hparams(opt.default_hparams)


def test_infinite_velocity_clamp_means_no_clamp():
    hp = _hp(velocity_clamp=INF)  # documented: inf disables the clamp
    validate_hparams(hp)
    opt, state, _ = _swarm()
    new, _ = jax.jit(opt.step)(jax.random.key(1), state, None, hp)
    chex.assert_tree_all_finite(new.positions)


def test_bounds_just_inside_the_dtype_are_accepted():
    st = _init(jnp.zeros(3, jnp.float16), bounds=(-30000.0, 30000.0))
    assert st.low.dtype == jnp.float16
    chex.assert_tree_all_finite((st.positions, st.velocities, st.vscale))


def test_schedules_are_checked_at_the_documented_steps():
    seen = []

    def sched(step):
        seen.append(int(step))
        return jnp.float32(1.0)

    _pso(cognitive=sched)
    assert set(SCHEDULE_CHECK_STEPS) <= set(seen)


def test_prefix_mask_is_accepted_and_freezes_whole_subtrees():
    params = {
        "backbone": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
        "head": {"kernel": jnp.zeros((3, 2))},
    }
    opt = _pso(mask={"backbone": False, "head": True})
    st = opt.init(jax.random.key(0), params)
    assert st.positions["backbone"] == {"kernel": None, "bias": None}
    assert st.positions["head"]["kernel"].shape == (NUM_PARTICLES, 3, 2)
    np.testing.assert_array_equal(st.frozen_params["backbone"]["bias"], 1.0)
    st, _ = opt.step(jax.random.key(1), st)
    full = opt.ask(st)
    assert full["backbone"]["kernel"].shape == (NUM_PARTICLES, 2, 3)
    np.testing.assert_array_equal(full["backbone"]["kernel"], 1.0)


def test_numpy_bool_mask_leaves_are_accepted():
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    st = _init(params, mask={"a": np.True_, "b": np.False_})
    assert st.positions["b"] is None and st.positions["a"].shape == (4, 2)


def test_raw_and_typed_keys_give_the_same_swarm():
    opt = _opt()
    typed = opt.init(jax.random.key(3), jnp.zeros(3))
    raw = opt.init(jax.random.PRNGKey(3), jnp.zeros(3))
    chex.assert_trees_all_equal(typed, raw)
    s_typed, _ = opt.step(jax.random.key(4), typed)
    s_raw, _ = opt.step(jax.random.PRNGKey(4), raw)
    chex.assert_trees_all_equal(s_typed, s_raw)


# --- the checks leave jit alone --------------------------------------------------


def test_jitted_step_with_traced_hparams_equals_eager():
    opt, state, _ = _swarm()
    hp = _hp(inertia=0.6, cognitive=1.2, social=1.3)
    key = jax.random.key(5)
    eager = opt.step(key, state, None, hp)
    jitted = jax.jit(opt.step)(key, state, None, hp)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6)


def test_traced_hparams_are_not_checked_inside_jit():
    """Documented limit: traced values cannot raise; they are checked where built."""
    opt, state, _ = _swarm()
    new, _ = jax.jit(opt.step)(jax.random.key(5), state, None, _hp(inertia=NAN))
    assert bool(jnp.all(jnp.isnan(new.velocities)))  # ran, unchecked


def test_closed_over_concrete_hparams_are_checked_while_tracing():
    opt, state, _ = _swarm()
    bad = _hp(velocity_clamp=-1.0)
    with pytest.raises(ValueError, match=r"hparams\.velocity_clamp=-1\.0"):
        jax.jit(lambda st: opt.step(jax.random.key(5), st, None, bad))(state)


def test_checks_add_no_device_work_to_the_jitted_step():
    """Tracing a checked step gives the jaxpr of the unchecked kernel."""
    opt, state, _ = _swarm()
    hp = _hp(inertia=0.6)  # not the defaults: checked while tracing
    config = opt.config

    def unchecked(key, st):
        fitness = evaluate_swarm(sphere, st, None, config=config)
        return unchecked_tell(key, st, fitness, hp, config)

    key = jax.random.key(5)
    checked = jax.make_jaxpr(lambda k, st: opt.step(k, st, None, hp))(key, state)
    assert str(checked) == str(jax.make_jaxpr(unchecked)(key, state))
