"""The ViViT-style video Transformer (pso_jax/models/vivit.py)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from pso_jax import experiment, flax_utils
from pso_jax.experiment.input_pipeline import _source
from pso_jax.experiment.run import _Run
from pso_jax.models import MODELS, ViViT, flops_per_clip, make_model, param_count

CLIP = (8, 32, 32, 3)
PATCH = (2, 8, 8)
WIDTH = 32


@pytest.fixture(scope="module")
def clips():
    return jax.random.normal(jax.random.key(1), (4, *CLIP))


def _model(**kwargs):
    return make_model("vivit", 4, width=WIDTH, patch=PATCH, **kwargs)


def _swarm(model, clips, num_particles=3):
    keys = jax.random.split(jax.random.key(2), num_particles)
    return jax.jit(jax.vmap(lambda k: model.init(k, clips)["params"]))(keys)


def test_registered_with_the_common_constructor(clips):
    assert MODELS["vivit"] is ViViT
    model = _model()
    params = jax.jit(model.init)(jax.random.key(0), clips)["params"]
    assert set(params) == {"body", "head"}
    assert jax.jit(model.apply)({"params": params}, clips).shape == (4, 4)
    # Two spatial and two temporal blocks, one head (width 32 // 32).
    body = params["body"]
    assert {"space0", "space1", "time0", "time1"} <= set(body)
    assert body["pos_space"].shape == (16, WIDTH)  # 32/8 * 32/8 tokens per step
    assert body["pos_time"].shape == (4, WIDTH)  # 8/2 time steps


def test_vmapped_swarm_equals_each_particle_and_both_schedules(clips):
    per_particle, one_graph = _model(), _model(map_particles=False)
    swarm = _swarm(per_particle, clips)
    got = jax.jit(jax.vmap(lambda p: per_particle.apply({"params": p}, clips)))(swarm)
    flat = jax.jit(jax.vmap(lambda p: one_graph.apply({"params": p}, clips)))(swarm)
    one = jax.jit(lambda p: per_particle.apply({"params": p}, clips))
    for i in range(3):
        p = jax.tree.map(lambda a, i=i: a[i], swarm)
        want = one(p)
        chex.assert_trees_all_close(got[i], want, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(got, flat, atol=1e-5, rtol=1e-5)


def test_flops_known_answer():
    # Embedding, then per block qkv + q.k + a.v + out + 2 MLP dots, over
    # S sequences of L tokens each; head; a multiply-add is 2 FLOPs.
    t, n, f, d, r, c = 4, 16, 2 * 8 * 8 * 3, WIDTH, 2, 4

    def block(s, seq):
        return 2 * s * seq * d * (3 * d + d + 2 * r * d) + 2 * 2 * s * seq * seq * d

    want = 2 * t * n * f * d + 2 * block(t, n) + 2 * block(1, t) + 2 * d * c
    assert flops_per_clip(_model(), CLIP) == want


def test_bad_configurations_name_the_value(clips):
    with pytest.raises(ValueError, match="stem='conv'"):
        _model(stem="conv").init(jax.random.key(0), clips)
    with pytest.raises(ValueError, match="heads=3 must divide width=32"):
        ViViT(4, width=WIDTH, patch=PATCH, heads=3).init(jax.random.key(0), clips)
    with pytest.raises(ValueError, match="divisible"):
        _model().init(jax.random.key(0), clips[:, :, :30])


def test_gradients_are_finite_and_adam_fits_a_small_batch(clips):
    model = _model()
    params = jax.jit(model.init)(jax.random.key(0), clips)["params"]
    labels = jnp.arange(4) % 4

    def loss_fn(p):
        logits = model.apply({"params": p}, clips)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s, loss, g

    state = opt.init(params)
    _, _, first, grads = step(params, state)
    chex.assert_tree_all_finite(grads)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    for _ in range(30):
        params, state, loss, _ = step(params, state)
    # Four random clips, four labels: memorised (ln 4 = 1.39 at the start).
    assert float(loss) < 0.2 * float(first)


def test_hybrid_head_only_training_run(data_dir, tmp_path):
    # The fused hybrid train step (an Adam step per particle, then the swarm
    # move) on a head-only swarm over a saved ("pretrained") ViViT backbone.
    kw = dict(data_dir=data_dir, model="vivit", width=WIDTH, patch=PATCH, steps=2)
    kw |= dict(steps_per_call=1, checkpoint_every=2)
    base = experiment.get_config("smoke", **kw)
    run = _Run(base, _source(base, "train"))
    assert param_count(run.template) > 10_000
    flax_utils.save_params(tmp_path / "backbone", run.template)
    cfg = experiment.get_config(
        "smoke", **kw, pretrained=str(tmp_path / "backbone"), swarm_over="head"
    )
    assert cfg.local_steps == 1
    summary = experiment.train(cfg, tmp_path / "run", progress=False)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["steps"] == 2
