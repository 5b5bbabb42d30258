"""Per-particle hyperparameters, PBT's exploit/explore, swarm diversity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pso_jax
from pso_jax import population, train
from pso_jax.swarm_axis import LocalAxis


def test_init_hparams_cover_the_log_range_once_per_slice():
    ranges = {"learning_rate": (1e-4, 1e-2), "weight_decay": (1e-6, 1e-6)}
    hp = population.init_hparams(jax.random.key(0), ranges, LocalAxis(8))
    lr = np.asarray(hp["learning_rate"])
    assert lr.shape == (8,) and np.all((lr >= 1e-4) & (lr <= 1e-2))
    # Latin hypercube: one particle in each eighth of the log range.
    slices = np.floor((np.log(lr) - np.log(1e-4)) / (np.log(100) / 8)).astype(int)
    assert sorted(slices.tolist()) == list(range(8))
    np.testing.assert_allclose(hp["weight_decay"], 1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"grad_hparams\['lr'\]=\(1, 0\)"):
        population.check_ranges({"lr": (1, 0)})


def test_exploit_clones_the_best_into_the_worst_and_perturbs():
    axis = LocalAxis(8)
    score = jnp.array([5.0, 0.0, 7.0, 1.0, 6.0, 2.0, 9.0, 3.0])  # best: 1, 3
    rows = {"w": jnp.arange(8.0)[:, None] * jnp.ones((8, 2))}
    hp = {"lr": jnp.full((8,), 0.1)}
    new, new_hp, replaced = population.exploit(
        jax.random.key(0), axis, score, 0.25, (0.5, 2.0), rows, hp
    )
    # The two worst (6 and 2) took rows of the two best (1 or 3).
    assert np.flatnonzero(replaced).tolist() == [2, 6]
    for i in (2, 6):
        assert new["w"][i, 0] in (1.0, 3.0)
        assert float(new_hp["lr"][i]) in (pytest.approx(0.05), pytest.approx(0.2))
    keep = np.array([0, 1, 3, 4, 5, 7])
    np.testing.assert_array_equal(new["w"][keep], rows["w"][keep])
    np.testing.assert_array_equal(new_hp["lr"][keep], hp["lr"][keep])


def test_diversity_known_answers():
    axis = LocalAxis(2)
    c = jnp.array([3.0, 4.0])  # |c| = 5
    same = {"x": jnp.stack([c, c])}
    assert float(population.diversity(axis, same, {"x": c})) == 0.0
    # Particles at c and at 2c: RMS distance sqrt((0 + 25) / 2) over |c| = 5.
    got = population.diversity(axis, {"x": jnp.stack([c, 2 * c])}, {"x": c})
    assert float(got) == pytest.approx(np.sqrt(0.5))


def apply_fn(params, video):
    return video.reshape(video.shape[0], -1) @ params["w"]


@pytest.fixture
def data():
    video = jax.random.normal(jax.random.key(1), (6, 2, 2, 2, 1))
    return {"video": video, "label": jnp.arange(6) % 3}, {"w": jnp.zeros((8, 3))}


def test_each_particle_takes_adam_steps_with_its_own_learning_rate(data):
    batch, template = data
    # No swarm move (coefficients 0), so positions are the gradient steps' alone.
    opt = pso_jax.pso(num_particles=4, inertia=0.0, cognitive=0.0, social=0.0)
    tr = train.make_train_step(
        apply_fn, opt, local_steps=2, grad_hparams={"learning_rate": (1e-3, 1e-1)}
    )
    st = jax.jit(tr.init)(jax.random.key(0), template)
    lrs = np.asarray(st.grad_hparams["learning_rate"])
    assert len(set(lrs.tolist())) == 4
    new, metrics = jax.jit(tr.step)(None, st, batch)
    for i in range(4):
        p = jax.tree.map(lambda x, i=i: x[i], st.swarm.positions)
        tx = optax.adamw(float(lrs[i]), weight_decay=0.0)
        s = tx.init(p)
        for _ in range(2):
            g = jax.grad(
                lambda q: train.cross_entropy(
                    apply_fn(q, batch["video"]), batch["label"]
                )
            )(p)
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        np.testing.assert_allclose(
            new.swarm.positions["w"][i], p["w"], rtol=2e-5, atol=1e-7
        )
    assert int(metrics.num_exploited) == 0


def test_exploit_step_in_the_train_step_and_selection_batch(data):
    batch, template = data
    opt = pso_jax.pso(num_particles=8, inertia=0.0, cognitive=0.0, social=0.0)
    tr = train.make_train_step(
        apply_fn,
        opt,
        local_steps=1,
        exploit_every=2,
        exploit_fraction=0.25,
        grad_hparams={"learning_rate": (1e-3, 1e-1)},
    )
    st = tr.init(jax.random.key(0), template)
    step = jax.jit(tr.step)
    st1, m1 = step(None, st, batch)
    assert int(m1.num_exploited) == 0  # step 1: no exploit
    st2, m2 = step(None, st1, batch)
    assert int(m2.num_exploited) == 2
    w = np.asarray(st2.swarm.positions["w"])
    lr1, lr2 = (
        np.asarray(st1.grad_hparams["learning_rate"]),
        np.asarray(st2.grad_hparams["learning_rate"]),
    )
    changed = np.flatnonzero(lr1 != lr2)
    assert len(changed) == 2
    for i in changed:  # a clone sits on its source's position, lr perturbed
        src = [j for j in range(8) if j not in changed and np.array_equal(w[i], w[j])]
        assert src, i
        assert lr2[i] / lr1[src[0]] in (pytest.approx(0.8), pytest.approx(1.25))
    # The fitness is measured on the selection clips when the batch has them.
    other = {"video": -batch["video"], "label": (batch["label"] + 1) % 3}
    sel = {**batch, "select_video": other["video"], "select_label": other["label"]}
    _, m_sel = step(None, st, sel)
    plain = train.make_train_step(
        apply_fn,
        opt,
        local_steps=1,
        grad_hparams={"learning_rate": (1e-3, 1e-1)},
        exploit_every=2,
    )
    _, m_plain = jax.jit(plain.step)(None, st, batch)
    assert float(m_sel.mean_fitness) != pytest.approx(float(m_plain.mean_fitness))


def test_an_exploit_that_would_clone_nobody_is_an_error(data):
    _, _ = data
    opt = pso_jax.pso(num_particles=2)
    with pytest.raises(ValueError, match="exploit_fraction=0.25 of 2 particles"):
        train.make_train_step(apply_fn, opt, local_steps=1, exploit_every=5)
    with pytest.raises(ValueError, match=r"got GradientTransformation"):
        train.make_train_step(
            apply_fn,
            pso_jax.pso(num_particles=4),
            local_steps=1,
            grad_optimizer=optax.sgd(0.1),
            grad_hparams={"learning_rate": (1e-3, 1e-2)},
        )


def test_move_hparams_moves_towards_the_best_in_log_space():
    axis = LocalAxis(4)
    hp = {"lr": jnp.array([1e-4, 1e-3, 1e-2, 1e-1])}
    score = jnp.array([3.0, 0.5, 2.0, jnp.inf])  # particle 1 best; 3 diverged
    hs = population.init_hparam_swarm(hp)
    # Social term only (w = c1 = 0): u + r2 (u_best - u), r2 in [0, 1).
    new, hs2 = population.move_hparams(
        jax.random.key(0), axis, score, hp, hs, {"lr": (1e-4, 1e-1)}, (0.0, 0.0, 1.0)
    )
    u, u_new = np.log(np.asarray(hp["lr"])), np.log(np.asarray(new["lr"]))
    best = np.log(1e-3)
    assert u_new[1] == pytest.approx(best)  # the best stays
    for i in (0, 2, 3):  # the others move part of the way to the best
        lo, hi = sorted((u[i], best))
        assert lo - 1e-6 <= u_new[i] <= hi + 1e-6 and u_new[i] != pytest.approx(u[i])
    # Velocities are clamped to half the range's log width (ln 1000 / 2).
    assert np.all(np.abs(np.asarray(hs2["velocity"]["lr"])) <= np.log(1e3) / 2 + 1e-6)
    # Personal bests: the finite scores improved on +inf; the diverged did not.
    np.testing.assert_array_equal(hs2["pbest_score"], [3.0, 0.5, 2.0, np.inf])
    np.testing.assert_array_equal(hs2["pbest"]["lr"][:3], hp["lr"][:3])
    # Momentum alone (w = 1, c = 0) carries a velocity on, within the reach.
    hs3 = {**hs, "velocity": {"lr": jnp.full((4,), 10.0)}}
    far, _ = population.move_hparams(
        jax.random.key(1), axis, score, hp, hs3, {"lr": (1e-4, 1e-1)}, (1.0, 0, 0)
    )
    # clamped step ln(1000)/2, then the bound: 100x the range's top.
    np.testing.assert_allclose(
        np.asarray(far["lr"]),
        np.minimum(np.asarray(hp["lr"]) * np.sqrt(1e3), 1e-1 * population.HPARAM_REACH),
        rtol=1e-5,
    )


@pytest.mark.parametrize("move", ["pso", "both"])
def test_hparam_move_in_the_train_step(data, move):
    batch, template = data
    opt = pso_jax.pso(num_particles=8, inertia=0.0, cognitive=0.0, social=0.0)
    tr = train.make_train_step(
        apply_fn,
        opt,
        local_steps=1,
        exploit_every=2,
        grad_hparams={"learning_rate": (1e-3, 1e-1)},
        hparam_move=move,
    )
    st = tr.init(jax.random.key(0), template)
    step = jax.jit(tr.step)
    st1, m1 = step(None, st, batch)
    np.testing.assert_array_equal(
        st1.grad_hparams["learning_rate"], st.grad_hparams["learning_rate"]
    )  # step 1: nothing moves
    st2, m2 = step(None, st1, batch)
    lr1 = np.asarray(st1.grad_hparams["learning_rate"])
    lr2 = np.asarray(st2.grad_hparams["learning_rate"])
    assert int(m2.num_exploited) == (2 if move == "both" else 0)
    assert np.sum(lr1 != lr2) >= 6  # all but the best (and maybe a clone) move
    assert np.all(np.isfinite(lr2)) and np.all(lr2 > 0)
    if move == "pso":  # nobody's weights were replaced by another's
        w2 = np.asarray(st2.swarm.positions["w"])
        assert len({w2[i].tobytes() for i in range(8)}) == 8
    # jit == no jit
    st2n, _ = tr.step(None, st1, batch)
    np.testing.assert_allclose(st2n.grad_hparams["learning_rate"], lr2, rtol=1e-6)


def test_hparam_move_needs_hparams_and_an_interval(data):
    opt = pso_jax.pso(num_particles=4)
    with pytest.raises(ValueError, match=r"hparam_move='sgd': choose from"):
        train.make_train_step(apply_fn, opt, local_steps=1, hparam_move="sgd")
    with pytest.raises(ValueError, match=r"hparam_move='pso' moves per-particle"):
        train.make_train_step(apply_fn, opt, local_steps=1, hparam_move="pso")


def test_diversity_of_huge_weights_does_not_overflow():
    axis = LocalAxis(2)
    c = jnp.array([3e30, 4e30])  # |c|^2 overflows float32
    got = population.diversity(axis, {"x": jnp.stack([c, 2 * c])}, {"x": c})
    assert float(got) == pytest.approx(np.sqrt(0.5), rel=1e-5)
