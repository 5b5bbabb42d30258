"""The pso-jax command line, end to end (small sizes)."""

from __future__ import annotations

import json

import pytest

from pso_jax import cli


def test_minimize_writes_metrics_summary_and_plot(tmp_path):
    rc = cli.main(
        [
            "minimize",
            "--objective",
            "sphere",
            "--dims",
            "3",
            "--particles",
            "8",
            "--steps",
            "60",
            "--workdir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    (run,) = summary["runs"]
    assert run["steps"] == 60 and run["best_fitness"] < 1e-2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 60
    bests = [json.loads(x)["best_fitness"] for x in lines]
    assert bests == sorted(bests, reverse=True)
    assert (tmp_path / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_runs_every_variant(tmp_path):
    assert (
        cli.main(["demo", "--rastrigin", "--steps", "20", "--workdir", str(tmp_path)])
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["variant"] for r in summary["runs"]] == [
        "inertia",
        "constriction",
        "spso2011",
        "cso",
        "clpso",
    ]


def test_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["minimize", "--particles", "0"])
    assert "must be >= 1" in capsys.readouterr().err
    assert (
        cli.main(["minimize", "--objective", "nope", "--workdir", str(tmp_path)]) == 2
    )
    assert "nope" in capsys.readouterr().err
