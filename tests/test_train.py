"""The fused swarm train step on a tiny classifier (fast, synthetic data)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pso_jax
from pso_jax import train


def apply_fn(params, video):
    """A linear classifier on the flattened clip: logits [B, C]."""
    x = video.reshape(video.shape[0], -1)
    return x @ params["w"] + params["b"]


@pytest.fixture
def setup():
    key = jax.random.key(0)
    kx, kw = jax.random.split(key)
    video = jax.random.normal(kx, (12, 2, 3, 3, 1))  # [B, T, H, W, C]
    labels = jnp.argmax(video.reshape(12, -1)[:, :4], axis=1)  # learnable
    template = {"w": jnp.zeros((18, 4)), "b": jnp.zeros(4)}
    batch = {"video": video, "label": labels}
    return template, batch


def _opt(**kw):
    return pso_jax.pso(num_particles=4, velocity_clamp=None, init_scale=0.5, **kw)


def test_step_equals_hand_rolled_loop_over_particles(setup):
    template, batch = setup
    opt = _opt()
    tr = train.make_train_step(apply_fn, opt, best_refresh="none")
    st = tr.init(jax.random.key(1), template)
    new, metrics = tr.step(None, st, batch)
    # By hand: evaluate each particle in a Python loop, then tell.
    fit = [
        train.cross_entropy(
            apply_fn(
                jax.tree.map(lambda a, i=i: a[i], st.swarm.positions), batch["video"]
            ),
            batch["label"],
        )
        for i in range(4)
    ]
    key = jax.random.fold_in(jax.random.wrap_key_data(st.key_data), 0)
    want, _ = opt.tell(key, st.swarm, jnp.stack(fit))
    chex.assert_trees_all_close(new.swarm, want, rtol=1e-5, atol=1e-6)
    assert float(metrics.best_fitness) == pytest.approx(min(map(float, fit)), 1e-5)


def test_hybrid_k1_matches_explicit_optax_step_per_particle(setup):
    template, batch = setup
    opt = _opt()
    sgd = optax.sgd(0.1)
    tr = train.make_train_step(
        apply_fn, opt, local_steps=1, grad_optimizer=sgd, best_refresh="none"
    )
    st = tr.init(jax.random.key(1), template)
    new, metrics = tr.step(None, st, batch)
    moved = []
    for i in range(4):
        p = jax.tree.map(lambda a, i=i: a[i], st.swarm.positions)
        g = jax.grad(
            lambda q: train.cross_entropy(apply_fn(q, batch["video"]), batch["label"])
        )(p)
        upd, _ = sgd.update(g, sgd.init(p), p)
        moved.append(optax.apply_updates(p, upd))
    moved = jax.tree.map(lambda *a: jnp.stack(a), *moved)
    fit = jax.vmap(
        lambda p: train.cross_entropy(apply_fn(p, batch["video"]), batch["label"])
    )(moved)
    key = jax.random.fold_in(jax.random.wrap_key_data(st.key_data), 0)
    want, _ = opt.tell(key, st.swarm.replace(positions=moved), fit)
    chex.assert_trees_all_close(new.swarm, want, rtol=1e-5, atol=1e-6)
    assert float(metrics.grad_loss) > 0
    assert new.opt_state is not None


def test_training_reduces_loss_and_jit_equals_eager(setup):
    template, batch = setup
    tr = train.make_train_step(
        apply_fn, _opt(), local_steps=2, grad_optimizer=optax.adam(0.05)
    )
    st0 = tr.init(jax.random.key(2), template)
    step = jax.jit(tr.step)
    st, m0 = step(None, st0, batch)
    for _ in range(15):
        st, m = step(None, st, batch)
    assert float(m.best_fitness) < 0.5 * float(m0.best_fitness)
    eager, _ = tr.step(None, st0, batch)
    jitted, _ = step(None, st0, batch)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-6)


def test_reevaluate_rescores_bests_on_the_current_batch(setup):
    template, batch = setup
    opt = _opt()
    tr = train.make_train_step(apply_fn, opt, best_refresh="reevaluate")
    st, _ = tr.step(None, tr.init(jax.random.key(3), template), batch)
    # Pretend an earlier lucky batch: bests scored impossibly well.
    lucky = st.replace(
        swarm=st.swarm.replace(
            pbest_fitness=jnp.full(4, -1.0), best_fitness=jnp.float32(-1.0)
        )
    )
    new, _ = tr.step(None, lucky, batch)
    assert float(new.swarm.best_fitness) > 0  # re-scored, not frozen at -1
    frozen = train.make_train_step(apply_fn, opt, best_refresh="none")
    stale, _ = frozen.step(None, lucky, batch)
    assert float(stale.swarm.best_fitness) == -1.0
    aging = train.make_train_step(apply_fn, opt, best_refresh="age", age_rate=0.5)
    aged, _ = aging.step(None, lucky, batch)
    assert float(aged.swarm.pbest_fitness.min()) > -1.0


def test_reevaluate_rescores_the_swarm_best_without_personal_bests(setup):
    """CSO keeps no personal bests: its swarm best is still re-scored."""
    template, batch = setup
    tr = train.make_train_step(apply_fn, _opt(variant="cso"), best_refresh="reevaluate")
    st, _ = tr.step(None, tr.init(jax.random.key(3), template), batch)
    assert st.swarm.pbest_params is None
    lucky = st.replace(swarm=st.swarm.replace(best_fitness=jnp.float32(-1.0)))
    new, metrics = tr.step(None, lucky, batch)
    rescored = train.cross_entropy(
        apply_fn(lucky.swarm.best_params, batch["video"]), batch["label"]
    )
    want = min(float(rescored), float(metrics.batch_best_fitness))
    assert float(new.swarm.best_fitness) == pytest.approx(want, rel=1e-5)
    assert want > 0


def test_same_state_same_result_resume(setup):
    """key=None is the state's own key: a restored state repeats exactly."""
    template, batch = setup
    tr = train.make_train_step(apply_fn, _opt())
    st = tr.init(jax.random.key(4), template)
    a, _ = tr.step(None, st, batch)
    b, _ = tr.step(train.step_key(st), st, batch)
    chex.assert_trees_all_equal(a, b)
    # The caller's key is used, not ignored.
    c, _ = tr.step(jax.random.key(99), st, batch)
    assert not np.array_equal(c.swarm.positions["w"], a.swarm.positions["w"])


def test_scan_equals_loop_of_steps(setup):
    template, batch = setup
    tr = train.make_train_step(
        apply_fn, _opt(), local_steps=1, grad_optimizer=optax.adam(0.05)
    )
    st0 = tr.init(jax.random.key(6), template)
    # Three different batches, stacked on a leading axis for the scan.
    batches = [
        {"video": batch["video"] * (1 + 0.1 * i), "label": batch["label"]}
        for i in range(3)
    ]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
    scanned, metrics = jax.jit(tr.scan)(st0, stacked)
    st = st0
    losses = []
    step = jax.jit(tr.step)
    for b in batches:
        st, m = step(None, st, b)
        losses.append(m.best_fitness)
    chex.assert_trees_all_close(scanned, st, rtol=1e-5, atol=1e-6)
    assert metrics.best_fitness.shape == (3,)
    np.testing.assert_allclose(metrics.best_fitness, jnp.stack(losses), rtol=1e-5)
    assert int(scanned.swarm.step) == 3


def test_batch_fn_is_applied_with_a_state_derived_key(setup):
    template, batch = setup
    seen = []

    def batch_fn(key, b):
        seen.append(key)
        noise = 0.5 * jax.random.normal(key, b["video"].shape)
        return {**b, "video": b["video"] + noise}

    tr = train.make_train_step(apply_fn, _opt(), batch_fn=batch_fn)
    plain = train.make_train_step(apply_fn, _opt())
    st = tr.init(jax.random.key(7), template)
    a, ma = tr.step(None, st, batch)
    b, mb = tr.step(train.step_key(st), st, batch)
    chex.assert_trees_all_equal(a, b)  # same state => same augmentation
    c, mc = plain.step(None, st, batch)
    assert float(ma.mean_fitness) != float(mc.mean_fitness)  # it was applied
    assert len(seen) == 2
    # The next step draws a different augmentation key.
    tr.step(None, a, batch)
    assert not np.array_equal(
        jax.random.key_data(seen[0]), jax.random.key_data(seen[2])
    )


def test_metrics_and_evaluate(setup):
    template, batch = setup
    tr = train.make_train_step(
        apply_fn, _opt(), local_steps=3, grad_optimizer=optax.adam(0.1)
    )
    st = tr.init(jax.random.key(5), template)
    for _ in range(10):
        st, _ = tr.step(None, st, batch)
    best, ens = train.evaluate(tr, st, [batch, batch], num_classes=4, top_k=3)
    assert np.sum(best.confusion) == 24
    assert 0 <= best.accuracy <= 1 and len(best.per_class_recall) == 4
    assert best.accuracy > 0.5  # learnable labels
    assert ens.accuracy >= 0.25
    cm = jnp.array([[2, 0], [1, 1]])
    # F1: class 0 = 2*2/(2+3) = 0.8, class 1 = 2*1/(2+1) = 0.667
    assert float(train.macro_f1_from_confusion(cm)) == pytest.approx(
        (0.8 + 2 / 3) / 2, 1e-5
    )


def test_macro_f1_fitness_is_maximised(setup):
    template, batch = setup
    with pytest.raises(ValueError, match="maximize=False"):
        train.make_train_step(apply_fn, _opt(), fitness="macro_f1")
    tr = train.make_train_step(apply_fn, _opt(maximize=True), fitness="macro_f1")
    st, m = tr.step(None, tr.init(jax.random.key(6), template), batch)
    assert 0.0 <= float(m.best_fitness) <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(fitness="hinge"), "fitness='hinge'"),
        (dict(best_refresh="sometimes"), "best_refresh='sometimes'"),
        (dict(local_steps=-1), "local_steps=-1"),
        (dict(age_rate=-0.1), "age_rate=-0.1"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train.make_train_step(apply_fn, _opt(), **kwargs)


def _tiny_trainer():
    import pso_jax

    def apply_fn(params, video):
        return video.reshape(video.shape[0], -1) @ params["w"]

    opt = pso_jax.hybrid_pso(4)
    tr = train.make_train_step(apply_fn, opt, local_steps=1)
    template = {"w": jnp.zeros((2 * 3, 3))}
    return tr, tr.init(jax.random.key(0), template)


_VIDEO = jnp.ones((4, 2, 3))
_LABELS = jnp.array([0, 1, 2, 0], jnp.int32)


@pytest.mark.parametrize(
    "batch, exc, match",
    [
        ((_VIDEO, _LABELS), TypeError, r"batch: expected a dict with 'video'"),
        ({"video": _VIDEO}, ValueError, r"batch has no 'label'"),
        (
            {"video": _VIDEO, "label": _LABELS.astype(jnp.float32)},
            TypeError,
            r"batch\['label'\] has dtype float32: class labels must be integers",
        ),
        (
            {"video": _VIDEO, "label": _LABELS[:3]},
            ValueError,
            r"batch\['label'\] has shape \(3,\) and batch\['video'\] \(4, 2, 3\)",
        ),
        (
            {"video": _VIDEO, "label": _LABELS, "select_video": _VIDEO},
            ValueError,
            r"batch has no 'select_label'",
        ),
    ],
)
def test_bad_batches_are_named_under_jit_too(batch, exc, match):
    tr, st = _tiny_trainer()
    with pytest.raises(exc, match=match):
        tr.step(None, st, batch)
    with pytest.raises(exc, match=match):
        jax.jit(tr.step)(None, st, batch)


def test_evaluate_refuses_labels_and_classes_that_disagree():
    tr, st = _tiny_trainer()
    ok = {"video": _VIDEO, "label": _LABELS}
    best, _ = train.evaluate(tr, st, [ok], num_classes=3)
    assert sum(map(sum, best.confusion)) == 4  # every clip counted
    bad_label = r"evaluate: batch 0 has label 7, outside \[0, 3\)"
    with pytest.raises(ValueError, match=bad_label):
        train.evaluate(tr, st, [{**ok, "label": _LABELS.at[1].set(7)}], num_classes=3)
    with pytest.raises(ValueError, match=r"gives 3 logits per clip, num_classes=5"):
        train.evaluate(tr, st, [ok], num_classes=5)
    with pytest.raises(ValueError, match=r"num_classes=1: expected an int >= 2"):
        train.evaluate(tr, st, [ok], num_classes=1)


@pytest.mark.parametrize("sharded", [False, True])
def test_train_step_checks_concrete_hparams(sharded):
    import pso_jax
    from pso_jax import sharding

    def apply_fn(params, video):
        return video.reshape(video.shape[0], -1) @ params["w"]

    mesh = sharding.make_mesh(1) if sharded else None
    opt = pso_jax.hybrid_pso(4, mesh=mesh)
    tr = train.make_train_step(apply_fn, opt, local_steps=1)
    st = tr.init(jax.random.key(0), {"w": jnp.zeros((6, 3))})
    batch = {"video": _VIDEO, "label": _LABELS}
    bad = opt.default_hparams.replace(inertia=jnp.float32(jnp.nan))
    with pytest.raises(ValueError, match=r"inertia=nan"):
        tr.step(None, st, batch, bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(local_steps=1, grad_hparams={"lr": (1e-3, 1e-2)}),
            r"grad_hparams names \['lr'\], but grad_optimizer '_adamw' does not",
        ),
        (
            dict(
                local_steps=1,
                grad_hparams={"learning_rate": (1e-3, 1e-2)},
                grad_optimizer=lambda lr: optax.sgd(lr),
            ),
            r"grad_hparams names \['learning_rate'\], but grad_optimizer",
        ),
        (dict(best_refresh="age", age_rate=float("nan")), r"age_rate=nan: must be"),
        (dict(best_refresh="age", age_rate=-0.1), r"age_rate=-0.1: must be"),
    ],
)
def test_make_train_step_names_bad_options(kwargs, match):
    def apply_fn(params, video):
        return video.reshape(video.shape[0], -1) @ params["w"]

    with pytest.raises(ValueError, match=match):
        train.make_train_step(apply_fn, pso_jax.hybrid_pso(4), **kwargs)


def test_split_batch_steps_each_particle_on_its_own_clips(setup):
    """``split_batch``: particle i's gradient step is an optax step on clips
    3i..3i+2 of the 12; the fitness of all is measured on the first 3."""
    template, batch = setup
    opt = _opt(inertia=0.0, cognitive=0.0, social=0.0)  # the step moves nothing
    sgd = optax.sgd(0.5)
    tr = train.make_train_step(
        apply_fn, opt, local_steps=1, grad_optimizer=sgd, split_batch=True
    )
    st = tr.init(jax.random.key(1), template)
    new, _ = jax.jit(tr.step)(None, st, batch)

    def loss(p, rows):
        return train.cross_entropy(
            apply_fn(p, batch["video"][rows]), batch["label"][rows]
        )

    for i in range(4):
        p = jax.tree.map(lambda a, i=i: a[i], st.swarm.positions)
        g = jax.grad(loss)(p, slice(3 * i, 3 * i + 3))
        want = optax.apply_updates(p, sgd.update(g, sgd.init(p), p)[0])
        got = jax.tree.map(lambda a, i=i: a[i], new.swarm.positions)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
        # Its fitness: on the first slice, shared by every particle.
        assert float(new.swarm.fitness[i]) == pytest.approx(
            float(loss(want, slice(0, 3))), rel=1e-5
        )
    # The shared batch would have moved every particle differently.
    shared = train.make_train_step(apply_fn, opt, local_steps=1, grad_optimizer=sgd)
    other, _ = shared.step(None, st, batch)
    assert not np.allclose(other.swarm.positions["w"], new.swarm.positions["w"])


def test_split_batch_errors_name_the_sizes(setup):
    template, batch = setup
    with pytest.raises(ValueError, match=r"split_batch='yes': expected True"):
        train.make_train_step(apply_fn, _opt(), local_steps=1, split_batch="yes")
    tr = train.make_train_step(
        apply_fn, pso_jax.pso(num_particles=5), local_steps=1, split_batch=True
    )
    st = tr.init(jax.random.key(0), template)
    with pytest.raises(ValueError, match=r"batch of 12 clips does not split over 5"):
        tr.step(None, st, batch)
