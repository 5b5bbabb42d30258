"""End-to-end training runs: CLI, checkpoints, exact resume after SIGTERM."""

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
from pso_jax import cli, experiment, flax_utils
from pso_jax.experiment import run as run_mod
from pso_jax.experiment.input_pipeline import _source
from pso_jax.experiment.loop import _check_resume_config
from pso_jax.experiment.run import _Run


def _cfg(data_dir, **kw):
    return experiment.get_config("smoke", data_dir=data_dir, **kw)


def _restore(workdir, cfg, step=None):
    run = _Run(cfg, _source(cfg, "train"))
    return ckpt.restore(
        os.path.join(workdir, "checkpoints"), run.abstract_state(), step=step
    )


def test_cli_train_then_evaluate(data_dir, tmp_path):
    workdir = tmp_path / "run"
    argv = ["train", "--config", "smoke", "--data-dir", data_dir]
    argv += ["--patch", "1,4,4", "--inertia", "0.5", "--social", "0.25"]
    assert cli.main([*argv, "--workdir", str(workdir), "--no-progress"]) == 0
    stored = json.loads((workdir / "config.json").read_text())
    assert (stored["patch"], stored["inertia"], stored["social"]) == (
        [1, 4, 4],
        0.5,
        0.25,
    )
    assert stored["cognitive"] is None  # not given: the variant's default
    summary = json.loads((workdir / "summary.json").read_text())
    for key in (
        "test_accuracy",
        "test_macro_f1",
        "steps",
        "wall_seconds",
        "particle_evals_per_second",
        "ensemble_test_accuracy",
        "compile_seconds",
    ):
        assert key in summary, key
    assert summary["steps"] == 6
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert np.asarray(summary["test_confusion"]).sum() == 500  # the test split
    assert summary["particle_evals_per_second"] > 0
    records = [
        json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["best_fitness"]) for r in records)
    for name in ("convergence.png", "confusion.png", "config.json"):
        assert (workdir / name).stat().st_size > 0
    assert ckpt.all_steps(workdir / "checkpoints") == [3, 6]
    # Re-evaluating the saved swarm reproduces the run's test metrics.
    assert cli.main(["evaluate", "--workdir", str(workdir)]) == 0
    again = json.loads((workdir / "evaluation.json").read_text())
    assert again["test_accuracy"] == summary["test_accuracy"]
    assert again["ensemble_test_accuracy"] == summary["ensemble_test_accuracy"]
    # A second run into the same workdir without --resume refuses to touch it
    # (exit 4: the work directory does not fit the command).
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert cli.main([*argv, "--workdir", str(workdir), "--no-progress"]) == 4
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_sigterm_checkpoints_and_resume_is_exact(data_dir, tmp_path):
    cfg = _cfg(data_dir)
    full = experiment.train(cfg, tmp_path / "full", progress=False)

    def kill_at_3(step, state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    part = experiment.train(cfg, tmp_path / "part", progress=False, on_step=kill_at_3)
    assert part == {"interrupted": True, "signal": signal.SIGTERM, "steps": 3}
    assert ckpt.all_steps(tmp_path / "part" / "checkpoints") == [3]
    assert not (tmp_path / "part" / "summary.json").exists()
    resumed = experiment.train(cfg, tmp_path / "part", resume=True, progress=False)
    # Bit for bit: the same final state, metrics log and test results.
    want, _ = _restore(tmp_path / "full", cfg)
    got, _ = _restore(tmp_path / "part", cfg)
    chex.assert_trees_all_equal(got, want)
    for key in ("test_accuracy", "ensemble_test_accuracy", "best_train_fitness"):
        assert resumed[key] == full[key], key

    def log(name):
        return [
            {k: v for k, v in json.loads(x).items() if k != "wall_seconds"}
            for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]

    assert log("part") == log("full")


def test_pbt_run_returns_the_validation_winner_and_resumes_exactly(data_dir, tmp_path):
    """Per-particle learning rates, exploit, next-batch selection, elitism."""
    cfg = _cfg(
        data_dir,
        steps=6,
        eval_every=3,
        lr_range=(1e-3, 1e-2),
        exploit_every=3,
        select_on="next",
        checkpoint_every=3,
    )
    full = experiment.train(cfg, tmp_path / "full", progress=False)
    val = full["candidates_val_accuracy"]
    assert set(val) == {
        "best_particle",
        "elite",
        "greedy_soup",
        "uniform_soup",
        "ensemble",
    }
    assert val[full["returned_model"]] == max(val.values())
    test = full["candidates_test_accuracy"]
    assert full["test_accuracy"] == test[full["returned_model"]]
    assert full["elite_step"] in (3, 6) and (tmp_path / "full/elite").is_dir()
    lrs = full["grad_hparams_best_first"]["learning_rate"]
    assert len(lrs) == cfg.particles and all(
        1e-3 * 0.8 <= v <= 1e-2 * 1.25 for v in lrs
    )
    records = [
        json.loads(x)
        for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()
    ]
    exploited = [r["num_exploited"] for r in records if "num_exploited" in r]
    assert exploited == [0, 0, 1, 0, 0, 1]  # floor(0.25 * 4) at steps 3 and 6
    assert all(r["diversity"] > 0 for r in records if "diversity" in r)

    def kill_at_3(step, state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    experiment.train(cfg, tmp_path / "part", progress=False, on_step=kill_at_3)
    again = experiment.train(cfg, tmp_path / "part", resume=True, progress=False)
    for key in (
        "returned_model",
        "test_accuracy",
        "candidates_val_accuracy",
        "candidates_test_accuracy",
        "elite_step",
        "grad_hparams_best_first",
    ):
        assert again[key] == full[key], key


def test_resume_errors_are_clear_and_touch_nothing(data_dir, tmp_path):
    cfg = _cfg(data_dir, steps=3)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        experiment.train(cfg, tmp_path, resume=True, progress=False)
    experiment.train(cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"particles: 4 -> 8"):
        experiment.train(
            _cfg(data_dir, steps=3, particles=8), tmp_path, resume=True, progress=False
        )
    with pytest.raises(FileExistsError, match="--resume"):
        experiment.train(cfg, tmp_path, progress=False)
    # A damaged checkpoint: a clear error, and the files stay as they were.
    step_dir = tmp_path / "checkpoints" / "3"
    victims = [p for p in step_dir.rglob("*") if p.is_file() and "state" in str(p)]
    assert victims
    for p in victims:
        p.write_bytes(b"garbage")
    snapshot = {p: p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}
    with pytest.raises(ckpt.CheckpointError, match="checkpoint .*3"):
        experiment.train(cfg, tmp_path, resume=True, progress=False)
    assert {p: p.read_bytes() for p in step_dir.rglob("*") if p.is_file()} == snapshot


def test_head_only_swarm_keeps_the_backbone_shared(data_dir, tmp_path):
    # A "pretrained" backbone: the smoke model's init, saved with save_params.
    cfg = _cfg(data_dir, steps=3)
    run = _Run(cfg, _source(cfg, "train"))
    flax_utils.save_params(tmp_path / "backbone", run.template)
    head_cfg = _cfg(
        data_dir, steps=3, pretrained=str(tmp_path / "backbone"), swarm_over="head"
    )
    experiment.train(head_cfg, tmp_path / "run", progress=False)
    state, _ = _restore(tmp_path / "run", head_cfg)
    swarm = state.swarm
    P = head_cfg.particles
    # Only the head has a particle axis; the backbone is stored once, unchanged.
    swarmed = jax.tree_util.tree_leaves_with_path(swarm.positions)
    assert swarmed
    for path, x in swarmed:
        assert "head" in jax.tree_util.keystr(path)
        assert x.shape[0] == P
    frozen = jax.tree.leaves(swarm.frozen_params)
    assert frozen
    backbone = [
        x
        for p, x in jax.tree_util.tree_leaves_with_path(run.template)
        if "head" not in jax.tree_util.keystr(p)
    ]
    chex.assert_trees_all_equal(frozen, backbone)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"particles": 0}, "particles=0"),
        ({"model": "resnet"}, "model='resnet'"),
        ({"swarm_over": "head"}, "needs pretrained"),
        ({"learning_rate": -1.0}, "learning_rate=-1.0"),
        ({"lr_range": (1e-2, 1e-4)}, r"lr_range=\(0.01, 0.0001\)"),
        ({"exploit_fraction": 0.9}, "exploit_fraction=0.9"),
        ({"select_on": "last"}, "select_on='last'"),
        ({"time_budget": 0.0}, "time_budget=0.0"),
        ({"bogus": 1}, "bogus"),
        ({"patch": (2, 0, 4)}, r"patch=\(2, 0, 4\)"),
        ({"patch": (2, 4)}, r"patch=\(2, 4\)"),
        ({"dtype": "float16"}, "dtype='float16'"),
        ({"lr_warmup": 1.0}, r"lr_warmup=1.0: must be in \[0, 1\)"),
        ({"lr_warmup": -0.1}, "lr_warmup=-0.1"),
        ({"decoder": "conv"}, r"decoder='conv': choose from \('pooled', 'dense'\)"),
        ({"decoder": "dense"}, "not objective=None"),
        ({"decoder": "dense", "objective": "order"}, "not objective='order'"),
        ({"split_batch": "yes"}, "split_batch='yes'"),
        ({"split_batch": True, "batch_size": 10}, "batch_size=10.*among 4"),
        (
            {"split_batch": True, "narrow_at": ((2, 3),)},
            r"batch_size=8.*among 3 particles.*\(4, 3\)",
        ),
    ],
)
def test_bad_configs_name_the_value(override, match):
    with pytest.raises(ValueError, match=match):
        experiment.get_config("smoke", **override)


@pytest.mark.parametrize(
    "kw, parallel, match",
    [
        ({}, {"data": 2}, "split_batch with data=2"),
        ({"particles": 3, "batch_size": 6}, {"pad": True}, "padded to 4"),
    ],
)
def test_split_batch_layout_errors_name_the_sizes(kw, parallel, match, monkeypatch):
    cfg = experiment.get_config("smoke", split_batch=True, **kw)
    monkeypatch.setattr(experiment.Parallelism, "num_devices", lambda self: 4)
    layout = experiment.Parallelism(devices=4, **parallel)
    with pytest.raises(ValueError, match=match):
        experiment.config._check_layout(cfg, layout)
    # The same config on one device is valid.
    experiment.validate_config(cfg)


@pytest.mark.parametrize(
    "flags, given", [([], {}), (["--split-batch"], {"split_batch": True})]
)
def test_cli_split_batch_is_a_config_field_only_when_given(flags, given):
    args = cli._parser().parse_args(["train", *flags])
    assert {k: v for k, v in cli._given_fields(args).items() if k == "split_batch"} == (
        given
    )


def test_a_split_batch_run_trains_with_split_batches(data_dir, tmp_path, monkeypatch):
    seen = []
    real = run_mod.make_train_step

    def spy(*args, **kwargs):
        seen.append(kwargs["split_batch"])
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "make_train_step", spy)
    cfg = experiment.get_config("smoke", data_dir=data_dir, split_batch=True, steps=2)
    summary = experiment.train(cfg, tmp_path / "split", progress=False)
    assert seen and all(seen)
    assert np.isfinite(summary["test_accuracy"])
    assert experiment.read_config(tmp_path / "split" / "config.json").split_batch


def test_lr_warmup_rises_from_zero_then_decays_as_the_cosine():
    # 100 swarm steps x 4 gradient steps: the schedule spans 400 counts.
    cfg = experiment.get_config("hybrid", steps=100, local_steps=4, lr_warmup=0.1)
    peak = cfg.learning_rate
    lr = run_mod._learning_rate(cfg)
    np.testing.assert_allclose(
        [float(lr(c)) for c in (0, 20, 40, 400, 1000)],
        [0.0, peak / 2, peak, 0.05 * peak, 0.05 * peak],
        rtol=1e-6,
    )
    # The same shape for a particle's own peak (PBT), and none without warmup.
    grads = {"w": jnp.ones(3)}
    for warmup, first in ((0.1, 0.0), (0.0, 2e-2)):
        opt = run_mod._adam(dataclasses.replace(cfg, lr_warmup=warmup), 2e-2)
        update, _ = opt.update(grads, opt.init(grads), grads)
        np.testing.assert_allclose(update["w"], -first, rtol=1e-5)
    cold = run_mod._learning_rate(dataclasses.replace(cfg, lr_warmup=0.0))
    assert float(cold(0)) == pytest.approx(peak)
    args = cli._parser().parse_args(["train", "--lr-warmup", "0.1"])
    assert args.lr_warmup == 0.1


def test_cli_train_bad_flag_value_exits_2(capsys):
    assert cli.main(["train", "--config", "smoke", "--local-steps", "-1"]) == 2
    assert "--local-steps -1: must be an int >= 0" in capsys.readouterr().err


def test_config_json_round_trip_keeps_tuples(tmp_path):
    cfg = experiment.get_config("smoke", patch=[1, 2, 2])
    assert cfg.patch == (1, 2, 2)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    again = experiment.TrainConfig(**json.loads((tmp_path / "config.json").read_text()))
    assert again == cfg
    _check_resume_config(tmp_path, cfg)  # equal: no error
    with pytest.raises(ValueError, match=r"patch: \[1, 2, 2\] -> \[2, 4, 4\]"):
        _check_resume_config(tmp_path, experiment.get_config("smoke"))


def test_cli_bad_patch_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", "smoke", "--patch", "2,x,2"])
    assert "expected T,H,W" in capsys.readouterr().err


def test_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
    # A notebook's inline backend must survive a run's plots (they used to
    # switch the whole process to Agg, after which plt.show() showed nothing).
    import matplotlib

    from pso_jax.experiment.report import _plot_confusion
    from pso_jax.train import EvalResult

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend the plots do not use themselves
    try:
        cm = np.eye(3, dtype=np.int64) * 5
        result = EvalResult(1.0, 1.0, [1.0] * 3, cm.tolist())
        _plot_confusion(result, tmp_path / "cm.png", ["a", "b", "c"])
        assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
