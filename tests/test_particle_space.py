"""Particle spaces (pso_jax.particle_space): full, lowrank, subspace."""

import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pso_jax import checkpoint as ckpt
from pso_jax import experiment, pso
from pso_jax import particle_space as ps
from pso_jax import random as prandom
from pso_jax.experiment.input_pipeline import _source
from pso_jax.experiment.run import _Run
from pso_jax.models import make_model
from pso_jax.pso import best_solution
from pso_jax.train import make_train_step
from pso_jax.tree_utils import combine


@pytest.fixture(scope="module")
def model_and_params():
    model = make_model("c3d", 10, width=8, patch=(2, 4, 4))
    x = jax.random.uniform(jax.random.key(1), (4, 8, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, x


def _apply(model):
    return lambda p, x: model.apply({"params": p}, x)


@pytest.mark.parametrize("name", ["lowrank", "subspace"])
def test_base_particle_is_the_base_model_exactly(model_and_params, name):
    model, params, x = model_and_params
    space = ps.make_space(name, rank=2, dim=300)
    tree = space.template(params)
    decoded = space.decode(tree)
    for a, b in zip(jax.tree.leaves(decoded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        space.wrap(_apply(model))(tree, x), _apply(model)(params, x)
    )


def test_full_space_is_the_identity(model_and_params):
    _, params, _ = model_and_params
    space = ps.make_space("full")
    assert space.template(params) is params
    assert space.mask(params) is None


def test_subspace_moves_every_leaf_by_its_scale():
    w = 0.5 * jax.random.normal(jax.random.key(0), (64, 64))
    params = {"w": w, "b": jnp.zeros(64)}
    space = ps.subspace(200)
    tree = space.template(params)
    z = jax.random.normal(jax.random.key(1), (200,))
    moved = space.decode({"base": tree["base"], "coords": {"z": z}})
    # ||z|| ~ sqrt(d): each entry of M z / sqrt(d) is ~N(0, |z|^2 / d) ~ N(0, 1).
    dw = np.asarray(moved["w"] - params["w"])
    db = np.asarray(moved["b"])
    assert 0.4 < dw.std() < 0.6  # the leaf's own std, 0.5
    assert 0.07 < db.std() < 0.13  # a constant leaf: CONSTANT_LEAF_SCALE


def test_subspace_blocks_equal_one_draw():
    # d > _BLOCK_ROWS: M is drawn block by block; the same numbers as one draw.
    d, size = 300, 50
    key = jax.random.key(3)
    z = jax.random.normal(jax.random.key(4), (d,))
    blocked = ps._project(key, z, size)
    whole = (z / np.sqrt(d)) @ prandom.normal(key, (d, size))
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-5)


def test_lowrank_decode_is_the_scaled_product():
    w = jax.random.normal(jax.random.key(0), (3, 3, 4, 6))
    space = ps.lowrank(2)
    tree = space.template({"k": w})
    a = jax.random.normal(jax.random.key(1), (36, 2))
    b = jax.random.normal(jax.random.key(2), (6, 2))
    out = space.decode({"base": tree["base"], "coords": {"k": {"a": a, "b": b}}})
    expected = w + (jnp.std(w) / np.sqrt(2)) * (a @ b.T).reshape(w.shape)
    np.testing.assert_allclose(out["k"], expected, rtol=1e-5, atol=1e-6)


def test_lowrank_time_out_layout_factors_kt_with_the_output_channels():
    # A 3-D conv kernel [kt, kh, kw, Ci, Co] is factored as [kh kw Ci, kt Co].
    w = jax.random.normal(jax.random.key(0), (3, 2, 2, 4, 5))
    space = ps.lowrank(1)
    assert space.config["layout"] == "time_out"
    tree = space.template({"k": w, "d": jnp.ones((7, 3))})
    assert tree["coords"]["k"]["a"].shape == (16, 1)
    assert tree["coords"]["k"]["b"].shape == (15, 1)
    assert tree["coords"]["d"]["a"].shape == (7, 1)  # dense kernels as before
    a = jax.random.normal(jax.random.key(1), (16, 1))
    b = jax.random.normal(jax.random.key(2), (15, 1))
    coords = {"k": {"a": a, "b": b}, "d": tree["coords"]["d"]}
    out = space.decode({"base": tree["base"], "coords": coords})
    prod = (a @ b.T).reshape(2, 2, 4, 3, 5)  # [kh, kw, Ci, kt, Co]
    for t in range(3):  # every temporal slice is its own rank-1 matrix
        expected = w[t] + jnp.std(w) * prod[:, :, :, t, :]
        np.testing.assert_allclose(out["k"][t], expected, rtol=1e-5, atol=1e-6)
    # The "out" layout is the whole kernel as [kt kh kw Ci, Co].
    old = ps.lowrank(1, layout="out").template({"k": w})
    assert old["coords"]["k"]["a"].shape == (48, 1)
    with pytest.raises(ValueError, match="layout='in'"):
        ps.lowrank(1, layout="in")


def _subspace_swarm(model, params, x, num=6):
    space = ps.subspace(40)
    template = space.template(params)
    apply_tree = space.wrap(_apply(model))
    opt = pso(
        lambda t, b: jnp.mean(apply_tree(t, b) ** 2),
        num_particles=num,
        mask=space.mask(template),
        init_scale=1.0,
    )
    state = opt.init(jax.random.key(0), template)
    state, _ = jax.jit(opt.step)(jax.random.key(1), state, x)
    return space, apply_tree, state


def _particle_logits(apply_tree, state, x):
    return jax.vmap(lambda p: apply_tree(combine(p, state.frozen_params), x))(
        state.positions
    )


def test_recenter_keeps_every_particle_function(model_and_params):
    model, params, x = model_and_params
    space, apply_tree, state = _subspace_swarm(model, params, x)
    before = _particle_logits(apply_tree, state, x)
    moved = ps.recenter(space, state)
    after = _particle_logits(apply_tree, moved, x)
    assert float(jnp.abs(before).max()) > 0
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(moved.best_params["coords"]["z"], 0.0)
    np.testing.assert_array_equal(moved.pbest_fitness, state.pbest_fitness)


def test_recenter_with_redraw_keeps_the_best_exactly(model_and_params):
    model, params, x = model_and_params
    space, apply_tree, state = _subspace_swarm(model, params, x)
    moved = ps.recenter(space, state, redraw=True)
    assert int(moved.frozen_params["base"]["epoch"]) == 1
    best_before = space.decode(best_solution(state))
    best_after = space.decode(best_solution(moved))
    chex.assert_trees_all_equal(best_after, best_before)
    # The others are in new directions: their functions change.
    before = _particle_logits(apply_tree, state, x)
    after = _particle_logits(apply_tree, moved, x)
    assert float(jnp.abs(after - before).max()) > 1e-3
    assert np.isinf(np.asarray(moved.pbest_fitness)).all()  # re-scored next step
    assert float(moved.best_fitness) == float(state.best_fitness)


def test_recenter_refuses_lowrank(model_and_params):
    _, params, _ = model_and_params
    with pytest.raises(ValueError, match="'lowrank' cannot be re-centred"):
        ps.recenter(ps.lowrank(1), None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "sparse"}, "particle space 'sparse'"),
        ({"name": "lowrank", "rank": 0}, "rank=0"),
        ({"name": "subspace", "dim": 2.5}, "dim=2.5"),
        ({"name": "subspace", "seed": -1}, "seed=-1"),
    ],
)
def test_bad_space_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ps.make_space(**kwargs)


def test_state_per_particle_of_the_demo_model():
    # The demo's model (c3d width 8, 2x2x2 tubelets): what one particle costs.
    model = make_model("c3d", 10, width=8, patch=(2, 2, 2))
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 32, 32, 3)))["params"]
    )
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    full = ps.state_floats_per_particle(ps.make_space("full"), params)
    assert full == 3 * 17970
    sub = ps.state_floats_per_particle(ps.subspace(256), params)
    low = ps.state_floats_per_particle(ps.lowrank(1), params)
    assert sub == 3 * 256
    assert sub / full < 0.05
    # Rank 1: the kernels' factors plus whole biases/norms, 3 x 612 (the "out"
    # layout, [kt kh kw Ci, Co]: 3 x 948, 5.3 %).
    assert low == 3 * 612
    assert low / full < 0.05
    assert ps.state_floats_per_particle(ps.lowrank(1, layout="out"), params) == 3 * 948
    # The swarm's state agrees: eval_shape of init, per particle.
    space = ps.subspace(256)
    template = space.template(params)
    opt = pso(num_particles=4, mask=space.mask(template))
    state = jax.eval_shape(opt.init, jax.random.key(0), template)
    per = (
        sum(
            x.size
            for f in (state.positions, state.velocities, state.pbest_params)
            for x in jax.tree.leaves(f)
        )
        // 4
    )
    assert per == sub


def test_recentring_subspaces_beat_one_fixed_subspace():
    # 2,000 weights, 32 coordinates, 150 steps of pure PSO: one random subspace
    # through the start barely moves the loss (0.916 -> 0.898); re-centring on
    # the best every 10 steps through fresh subspaces gets 0.818.
    w_true = jax.random.normal(jax.random.key(0), (50, 40))
    x = jax.random.normal(jax.random.key(1), (256, 50))
    y = jnp.tanh(x @ (0.3 * w_true))
    params = {"w": 0.1 * jax.random.normal(jax.random.key(2), (50, 40))}
    space = ps.subspace(32)
    template = space.template(params)

    def loss(tree, batch):
        p = space.decode(tree)
        return jnp.mean((jnp.tanh(batch[0] @ p["w"]) - batch[1]) ** 2)

    opt = pso(loss, num_particles=24, mask=space.mask(template), init_scale=1.0)
    step = jax.jit(opt.step)
    recenter = jax.jit(lambda s: ps.recenter(space, s, redraw=True))
    start = float(loss(template, (x, y)))
    final = {}
    for every in (0, 10):
        state = opt.init(jax.random.key(3), template)
        for i in range(150):
            state, _ = step(jax.random.key(10 + i), state, (x, y))
            if every and (i + 1) % every == 0:
                state = recenter(state)
        final[every] = float(state.best_fitness)
    assert final[0] < start
    assert final[10] < 0.92 * start
    assert final[10] < final[0] - 0.03


def test_train_step_recentres_every_n_steps(model_and_params):
    model, params, x = model_and_params
    space = ps.subspace(16)
    template = space.template(params)
    opt = pso(num_particles=4, mask=space.mask(template), init_scale=1.0)
    trainer = make_train_step(
        space.wrap(_apply(model)),
        opt,
        recenter_fn=lambda s: ps.recenter(space, s, redraw=True),
        recenter_every=2,
    )
    state = trainer.init(jax.random.key(0), template)
    batch = {"video": x, "label": jnp.arange(4) % 10}
    step = jax.jit(trainer.step)
    epochs = []
    for i in range(4):
        state, _ = step(jax.random.key(i), state, batch)
        epochs.append(int(state.swarm.frozen_params["base"]["epoch"]))
    assert epochs == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="recenter_every=2 needs a recenter_fn"):
        make_train_step(space.wrap(_apply(model)), opt, recenter_every=2)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"particle_space": "sparse"}, "particle_space='sparse'"),
        ({"particle_space": "lowrank", "rank": 0}, "rank=0"),
        ({"particle_space": "subspace", "subspace_dim": -4}, "subspace_dim=-4"),
        ({"particle_space": "lowrank", "recenter_every": 5}, "recenter_every=5"),
        ({"particle_space": "subspace", "init": "independent"}, "init='independent'"),
    ],
)
def test_bad_space_configs_name_the_value(override, match):
    with pytest.raises(ValueError, match=match):
        experiment.get_config("smoke", **override)


def test_recentring_subspace_run_resumes_exactly(data_dir, tmp_path):
    # Pure PSO in a 16-dimensional subspace, re-centred every 2 steps: the base
    # (in the checkpointed state) moves, the elite keeps whole trees, and a run
    # stopped at step 3 resumes to the uninterrupted run's state bit for bit.
    cfg = experiment.get_config(
        "smoke",
        data_dir=data_dir,
        local_steps=0,
        particle_space="subspace",
        subspace_dim=16,
        recenter_every=2,
        eval_every=3,
    )
    full = experiment.train(cfg, tmp_path / "full", progress=False)

    def kill_at_3(step, state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    experiment.train(cfg, tmp_path / "part", progress=False, on_step=kill_at_3)
    resumed = experiment.train(cfg, tmp_path / "part", resume=True, progress=False)
    run = _Run(cfg, _source(cfg, "train"))
    want, _ = ckpt.restore(tmp_path / "full" / "checkpoints", run.abstract_state())
    got, _ = ckpt.restore(tmp_path / "part" / "checkpoints", run.abstract_state())
    chex.assert_trees_all_equal(got, want)
    assert int(got.swarm.frozen_params["base"]["epoch"]) == 3  # steps 2, 4, 6
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert (tmp_path / "full" / "elite" / "params").exists()
