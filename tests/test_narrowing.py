"""Successive halving: the swarm narrows to its validation winners (narrow_at)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pso_jax import checkpoint as ckpt
from pso_jax import cli, experiment, population
from pso_jax.experiment.config import (
    ConfigError,
    particle_steps,
    particles_at,
    read_config,
)
from pso_jax.experiment.input_pipeline import _source
from pso_jax.experiment.run import _Run
from pso_jax.pso import pso


def test_particles_at_and_particle_steps_known_answers():
    cfg = experiment.get_config("smoke", particles=8, steps=100)
    cfg = dataclasses.replace(cfg, narrow_at=((10, 4), (30, 1)))
    assert [particles_at(cfg, s) for s in (0, 9, 10, 29, 30, 99)] == [8, 8, 4, 4, 1, 1]
    # 8 x 10 + 4 x 20 + 1 x 70.
    assert particle_steps(cfg) == 230
    assert particle_steps(cfg, 20) == 8 * 10 + 4 * 10
    assert particle_steps(dataclasses.replace(cfg, narrow_at=())) == 800


@pytest.mark.parametrize(
    "pairs",
    [
        ((0, 2),),  # step 0: nothing run yet
        ((3, 4),),  # keeps all 4
        ((3, 0),),  # keeps nobody
        ((3, 2), (2, 1)),  # steps not increasing
        ((2, 2), (3, 2)),  # keep not decreasing
        ((3.0, 2),),
        ((3, True),),
        ((3,),),
        "3:1",
    ],
)
def test_bad_narrow_at_names_the_field(pairs):
    cfg = dataclasses.replace(experiment.get_config("smoke"), narrow_at=pairs)
    with pytest.raises(ConfigError, match=r"narrow_at=.*\(step, keep\) pairs"):
        experiment.validate_config(cfg)


def test_a_narrowing_after_the_end_is_valid_and_never_reached():
    cfg = experiment.get_config("smoke", narrow_at=((6, 2), (40, 1)))  # 6 steps
    experiment.validate_config(cfg)
    assert particles_at(cfg, 5) == 4 and particle_steps(cfg) == 4 * 6


def test_narrow_at_on_several_devices_is_refused_early(monkeypatch):
    cfg = experiment.get_config("smoke", narrow_at=((3, 2),))
    parallel = experiment.Parallelism(devices=2)
    monkeypatch.setattr(experiment.Parallelism, "num_devices", lambda self: 2)
    with pytest.raises(ValueError, match=r"narrow_at=\[\[3, 2\]\].*one device"):
        experiment.config._check_layout(cfg, parallel)


def test_narrow_at_round_trips_through_config_json(tmp_path):
    cfg = experiment.get_config("smoke", narrow_at=((2, 2), (4, 1)))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert json.loads(path.read_text())["narrow_at"] == [[2, 2], [4, 1]]
    assert read_config(path) == cfg
    # A config.json written before narrow_at existed reads as no narrowing.
    old = cfg.to_dict()
    del old["narrow_at"]
    path.write_text(json.dumps(old))
    assert read_config(path).narrow_at == ()


@pytest.mark.parametrize(
    "move, keep, want",
    [
        ("exploit", 2, (0, "exploit")),  # 0.25 x 2 particles clones nobody
        ("both", 2, (3, "pso")),  # the PSO move of the learning rates goes on
        ("pso", 2, (3, "pso")),
        ("both", 1, (0, "exploit")),  # one particle moves nothing
    ],
)
def test_a_narrowed_phase_exploits_only_where_someone_is_cloned(move, keep, want):
    from pso_jax.experiment.run import _phase_config

    cfg = experiment.get_config(
        "smoke", lr_range=(1e-3, 1e-2), exploit_every=3, hparam_move=move
    )
    phase = _phase_config(cfg, keep)
    assert (phase.exploit_every, phase.hparam_move) == want
    assert phase.particles == keep and phase.narrow_at == ()
    experiment.validate_config(phase)
    assert _phase_config(cfg, cfg.particles) is cfg


def test_cli_parses_narrow_at():
    args = cli._parser().parse_args(["train", "--narrow-at", "40:2,80:1"])
    assert args.narrow_at == ((40, 2), (80, 1))
    assert cli._parser().parse_args(["train", "--narrow-at", ""]).narrow_at == ()
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["train", "--narrow-at", "40"])


def _swarm(n, key=0, topology="global"):
    opt = pso(num_particles=n, topology=topology)
    template = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    state = opt.init(jax.random.key(key), template)
    return opt, state


def test_narrow_keeps_the_rows_and_the_swarm_wide_fields():
    _, big = _swarm(5, key=1, topology="random")
    big = big.replace(
        fitness=jnp.arange(5.0), pbest_fitness=jnp.arange(5.0) + 10, step=jnp.int32(7)
    )
    _, fresh = _swarm(2, key=2, topology="random")
    small = population.narrow(big, [3, 1], fresh)
    for name in ("positions", "velocities", "pbest_params"):
        want = jax.tree.map(lambda a: a[jnp.array([3, 1])], getattr(big, name))
        chex.assert_trees_all_equal(getattr(small, name), want)
    np.testing.assert_array_equal(small.fitness, [3.0, 1.0])
    np.testing.assert_array_equal(small.pbest_fitness, [13.0, 11.0])
    chex.assert_trees_all_equal(small.best_params, big.best_params)
    assert int(small.step) == 7
    # Random links index particles: the smaller swarm's own, [2, 2].
    chex.assert_trees_all_equal(small.links, fresh.links)
    assert small.links.shape == (2, 2)


@pytest.mark.parametrize("rows", [[0], [1, 1], [0, 5], [-1, 0], [[0, 1]], [0.0, 1.0]])
def test_narrow_refuses_bad_rows(rows):
    _, big = _swarm(5)
    _, fresh = _swarm(2)
    with pytest.raises(
        ValueError, match=r"rows=.*2 distinct particle indices in \[0, 5\)"
    ):
        population.narrow(big, rows, fresh)


def _records(workdir):
    return [
        {k: v for k, v in json.loads(x).items() if k != "wall_seconds"}
        for x in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


def test_a_narrowed_run_keeps_its_validation_winner_and_resumes_exactly(
    data_dir, tmp_path
):
    cfg = experiment.get_config(
        "smoke",
        data_dir=data_dir,
        narrow_at=((3, 1),),
        eval_every=3,
        lr_range=(1e-3, 1e-2),
        checkpoint_every=3,
    )
    full = experiment.train(cfg, tmp_path / "full", progress=False)
    records = _records(tmp_path / "full")
    (narrowed,) = [r for r in records if "narrowed_to" in r]
    assert narrowed["step"] == 3 and narrowed["narrowed_to"] == 1
    acc = narrowed["particle_val_accuracy"]
    assert len(acc) == 4 and narrowed["kept"] == [int(np.argmax(acc))]
    lr = narrowed["kept_grad_hparams"]["learning_rate"]
    assert full["grad_hparams_best_first"]["learning_rate"] == lr
    assert [r["step"] for r in records if "best_fitness" in r] == [1, 2, 3, 4, 5, 6]
    assert full["ensemble_size"] == 1
    # The checkpoint after the narrowing holds the one particle.
    run = _Run(cfg, _source(cfg, "train"), particles=1)
    state, _ = ckpt.restore(tmp_path / "full/checkpoints", run.abstract_state())
    assert state.swarm.fitness.shape == (1,)
    assert (tmp_path / "full/convergence.png").stat().st_size > 0

    def kill_at_3(step, state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    part = experiment.train(cfg, tmp_path / "part", progress=False, on_step=kill_at_3)
    assert part["interrupted"] and part["steps"] == 3
    again = experiment.train(cfg, tmp_path / "part", resume=True, progress=False)
    got, _ = ckpt.restore(tmp_path / "part/checkpoints", run.abstract_state())
    chex.assert_trees_all_equal(got, state)
    assert _records(tmp_path / "part") == records
    for key in ("test_accuracy", "returned_model", "candidates_val_accuracy"):
        assert again[key] == full[key], key
    # pso-jax evaluate rebuilds the narrowed run from config.json.
    result = experiment.evaluate_workdir(tmp_path / "full")
    assert result["test_accuracy"] == full["test_accuracy"]


def test_particle_scores_are_each_particles_own():
    from pso_jax import train

    def apply_fn(params, video):
        return video.reshape(video.shape[0], -1) @ params["w"]

    tr = train.make_train_step(apply_fn, pso(num_particles=3), best_refresh="none")
    state = tr.init(jax.random.key(0), {"w": jnp.zeros((2, 2))})
    # Particle 0 always says class 0, particle 1 class 1, particle 2 is NaN.
    w = jnp.array([[[5.0, 0.0], [5.0, 0.0]], [[0.0, 5.0], [0.0, 5.0]]])
    w = jnp.concatenate([w, jnp.full((1, 2, 2), jnp.nan)])
    state = state.replace(swarm=state.swarm.replace(positions={"w": w}))
    video = jnp.ones((4, 2))
    batches = [
        {"video": video, "label": jnp.array([0, 0, 0, 1])},
        {"video": video[:2], "label": jnp.array([1, 0])},
    ]
    acc, loss = train.particle_scores(tr, state, batches, num_classes=2)
    np.testing.assert_allclose(acc[:2], [4 / 6, 2 / 6])
    # Cross-entropy of logits (10, 0): ~0 when right, 10 when wrong.
    np.testing.assert_allclose(loss[:2], [10 * 2 / 6, 10 * 4 / 6], atol=1e-3)
    assert loss[2] == np.inf
    with pytest.raises(ValueError, match="label 2, outside"):
        train.particle_scores(
            tr, state, [{"video": video, "label": jnp.array([0, 2, 0, 0])}], 2
        )
    with pytest.raises(ValueError, match="no batches"):
        train.particle_scores(tr, state, [], 2)
