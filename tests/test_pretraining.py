"""Pretraining on unlabeled clips and fine-tuning its backbone, end to end."""

from __future__ import annotations

import dataclasses
import json
import shutil

import chex
import jax
import numpy as np
import pytest

from pso_jax import checkpoint as ckpt
from pso_jax import cli, experiment, flax_utils
from pso_jax.experiment import loop, pretraining
from pso_jax.experiment.input_pipeline import _labeled_subset, _source
from pso_jax.experiment.run import _Run

PRE = ["--config", "smoke", "--steps", "3", "--no-progress"]


def _cfg(data_dir, **kw):
    return experiment.get_config("smoke", data_dir=data_dir, **kw)


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """A ``pso-jax pretrain --objective masked`` work directory (3 steps)."""
    workdir = tmp_path_factory.mktemp("pre") / "masked"
    argv = ["pretrain", *PRE, "--objective", "masked", "--data-dir", data_dir]
    assert cli.main([*argv, "--workdir", str(workdir)]) == 0
    return workdir


class _NoLabels:
    """A split whose clips carry no label at all: reading one is a KeyError."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return {k: v for k, v in self.source[i].items() if k != "label"}


def test_pretraining_never_reads_a_label(pretrained, data_dir, tmp_path, monkeypatch):
    cfg = experiment.read_config(pretrained / "config.json")
    assert cfg.objective == "masked"
    for module, name in ((loop, "_first_source"), (loop, "_source")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda c, s, f=real: _NoLabels(f(c, s)))
    real = pretraining._source
    monkeypatch.setattr(pretraining, "_source", lambda c, s: _NoLabels(real(c, s)))
    summary = experiment.train(cfg, tmp_path / "blind", progress=False)
    # Without any label in the data, the very same backbone and test loss.
    want = json.loads((pretrained / "summary.json").read_text())
    assert summary["test_loss"] == want["test_loss"]
    assert summary["test_loss"] < summary["initial_test_loss"]
    # The bar of a model that ignores its input: finite, what the docs quote.
    assert 0 < summary["constant_test_loss"] < summary["initial_test_loss"]
    chex.assert_trees_all_equal(
        flax_utils.load_params(tmp_path / "blind" / "backbone"),
        flax_utils.load_params(pretrained / "backbone"),
    )


def test_cli_finetunes_the_backbone_head_only(pretrained, data_dir, tmp_path, capsys):
    workdir = tmp_path / "head"
    argv = ["train", *PRE, "--data-dir", data_dir, "--workdir", str(workdir)]
    argv += ["--pretrained", str(pretrained), "--swarm-over", "head"]
    assert cli.main([*argv, "--label-fraction", "0.1"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    cfg = experiment.read_config(workdir / "config.json")
    assert cfg.label_fraction == 0.1
    run = _Run(cfg, _source(cfg, "train"))
    state, _ = ckpt.restore(workdir / "checkpoints", run.abstract_state())
    swarm = state.swarm
    # The backbone frozen as pretrained, bit for bit; a 10-class head swarmed.
    backbone = flax_utils.load_params(pretrained / "backbone")["body"]
    chex.assert_trees_all_equal(swarm.frozen_params["body"], backbone)
    assert swarm.positions["head"]["kernel"].shape[::2] == (cfg.particles, 10)
    # The pretext run evaluates as such.
    assert cli.main(["evaluate", "--workdir", str(pretrained)]) == 0
    evaluation = json.loads((pretrained / "evaluation.json").read_text())
    assert evaluation["objective"] == "masked"
    assert np.isfinite(evaluation["test_loss"])


def test_a_backbone_of_another_model_is_refused(pretrained, data_dir, tmp_path):
    bad = _cfg(data_dir, width=16, pretrained=str(pretrained))
    with pytest.raises(experiment.ConfigError, match=r"width=8.*--width 8"):
        experiment.train(bad, tmp_path / "w16", progress=False)
    # A work directory of a supervised run, and a pretraining without backbone/.
    for name, objective, match in (
        ("supervised", None, "a training work directory"),
        ("unfinished", "masked", "has no backbone/"),
    ):
        fake = tmp_path / name
        fake.mkdir()
        saved = experiment.read_config(pretrained / "config.json").to_dict()
        (fake / "config.json").write_text(json.dumps({**saved, "objective": objective}))
        cfg = _cfg(data_dir, pretrained=str(fake))
        with pytest.raises(experiment.ConfigError, match=match):
            experiment.train(cfg, tmp_path / f"{name}_run", progress=False)
    # Saved params of another model size: the key path named.
    whole = tmp_path / "whole"
    flax_utils.save_params(whole, {"head": {"kernel": np.zeros((3, 2))}})
    with pytest.raises(experiment.ConfigError, match="pretrained="):
        experiment.train(
            _cfg(data_dir, pretrained=str(whole)), tmp_path / "x", progress=False
        )
    assert not (tmp_path / "x" / "checkpoints").exists()
    shutil.rmtree(whole)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"objective": "jigsaw"}, "objective='jigsaw'"),
        ({"objective": "masked", "mask_ratio": 1.0}, r"mask_ratio=1.0"),
        ({"label_fraction": 0.0}, r"label_fraction=0.0: must be a finite number"),
        ({"label_fraction": 1.5}, r"label_fraction=1.5: must be in \(0, 1\]"),
        ({"objective": "order", "narrow_at": ((2, 1),)}, r"narrow_at=\[\[2, 1\]\]"),
        ({"objective": "order", "augment": True}, "rewrite labels"),
        ({"objective": "order", "fitness": "error_rate"}, "the task's loss"),
    ],
)
def test_bad_pretext_configs_name_the_value(override, match):
    with pytest.raises(experiment.ConfigError, match=match):
        experiment.validate_config(experiment.get_config("smoke", **override))


def test_an_objective_the_clips_cannot_serve_fails_before_any_data(tmp_path):
    # 8 frames in 4-frame tubelets: two time steps, which only a reversal can
    # shuffle (moving_shapes is checked from its config, nothing generated).
    cfg = _cfg(str(tmp_path / "tfds"), objective="order", patch=(4, 4, 4))
    with pytest.raises(experiment.DataError, match="at least 3 time steps"):
        experiment.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "tfds").exists()


def test_label_fraction_is_a_fixed_draw_of_the_seed():
    source = [{"video": np.zeros(1), "label": i} for i in range(100)]
    cfg = experiment.get_config("smoke", label_fraction=0.1, batch_size=4)
    sub = _labeled_subset(cfg, source)
    labels = [sub[i]["label"] for i in range(len(sub))]
    assert len(labels) == 10 == len(set(labels)) and labels == sorted(labels)
    again = _labeled_subset(cfg, source)
    assert [again[i]["label"] for i in range(10)] == labels
    other = _labeled_subset(experiment.get_config("smoke", label_fraction=0.1), source)
    assert len(other) == 10  # smoke's batch of 8 fits in 10 clips
    reseeded = _labeled_subset(
        experiment.get_config("smoke", label_fraction=0.1, seed=1), source
    )
    assert [reseeded[i]["label"] for i in range(10)] != labels
    # Never fewer clips than one batch.
    tiny = experiment.get_config("smoke", label_fraction=0.01, batch_size=8)
    assert len(_labeled_subset(tiny, source)) == 8
    assert _labeled_subset(experiment.get_config("smoke"), source) is source


def test_jax_sees_no_host_label_in_a_pretext_batch(data_dir):
    cfg = _cfg(data_dir, objective="next_frame")
    batches = loop._train_batches(cfg, _source(cfg, "train"))
    assert set(batches[0]) == {"video"}
    assert jax.tree.leaves(batches[0])[0].dtype == np.uint8


def test_a_resumed_pretext_run_ends_where_the_uninterrupted_one_does(
    data_dir, tmp_path
):
    # The masks and shuffles are drawn from each step's key: a resume repeats
    # them. select_on="next": the fitness on the next batch's clips, their own
    # draws.
    cfg = _cfg(data_dir, objective="order", select_on="next", steps=6)
    whole = experiment.train(cfg, tmp_path / "whole", progress=False)
    half = dataclasses.replace(cfg, steps=3, schedule_steps=6)
    experiment.train(half, tmp_path / "parts", progress=False)
    resumed = experiment.train(cfg, tmp_path / "parts", resume=True, progress=False)
    assert resumed["test_loss"] == whole["test_loss"]
    chex.assert_trees_all_equal(
        flax_utils.load_params(tmp_path / "parts" / "backbone"),
        flax_utils.load_params(tmp_path / "whole" / "backbone"),
    )


def test_cli_pretrain_of_a_supervised_preset_is_a_pretext_run(tmp_path, capsys):
    # --config demo has no objective: pretrain gives it the default task, whose
    # checks then refuse the demo's narrowing, before anything is written.
    argv = ["pretrain", "--config", "demo", "--workdir", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "narrow_at=[[20, 1]]: not with objective='masked'" in err
    assert not (tmp_path / "run").exists()


def test_a_dense_decoder_pretrains_a_backbone_that_a_classifier_loads(
    data_dir, tmp_path
):
    pre = tmp_path / "dense"
    argv = ["pretrain", *PRE, "--objective", "next_frame", "--decoder", "dense"]
    assert cli.main([*argv, "--data-dir", data_dir, "--workdir", str(pre)]) == 0
    cfg = experiment.read_config(pre / "config.json")
    assert cfg.decoder == "dense"
    summary = json.loads((pre / "summary.json").read_text())
    assert np.isfinite(summary["test_loss"])
    assert summary["test_loss"] < summary["initial_test_loss"]
    # One Dense per feature-map cell: its outputs are the grid cells under it.
    run = _Run(cfg, _source(cfg, "train"))
    t, h, w = run.task.grid
    assert t == 1 and run.num_classes == h * w * 3
    assert run.template["head"]["kernel"].shape[1] < run.num_classes
    # A classifier starts from the same body.
    clf = _Run(_cfg(data_dir, pretrained=str(pre)), _source(cfg, "train"))
    backbone = flax_utils.load_params(pre / "backbone")["body"]
    chex.assert_trees_all_equal(clf.template["body"], backbone)
    assert clf.template["head"]["kernel"].shape[1] == clf.num_classes == 10
