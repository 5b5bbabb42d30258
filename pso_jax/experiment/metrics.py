"""What a run records: the metrics log, evaluations, the summary's test metrics.

- ``_metric_records``: one ``metrics.jsonl`` record per step of a chunk;
  ``_truncate_metrics``: drop the records a resumed run will redo.
- ``_evaluate``: the best particle and the top-k ensemble on a split;
  ``_finish``: their test metrics (the summary's and ``evaluation.json``'s) and
  the confusion plot.
- ``_write_json``: the work directory's JSON files, written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pso_jax.experiment.input_pipeline import _eval_batches, _label_names, _source
from pso_jax.experiment.report import _plot_confusion
from pso_jax.experiment.run import _Run
from pso_jax.experiment.selection import _choose, _Elite
from pso_jax.fitness import score
from pso_jax.train import TrainState, evaluate


def _metric_records(metrics, first_step: int, wall: float) -> list[dict]:
    """A chunk's stacked metrics as one ``metrics.jsonl`` record per step."""
    host = jax.tree.map(np.asarray, metrics._asdict())
    n = len(host["best_fitness"])
    return [
        {
            "step": first_step + i + 1,
            **{k: v[i].item() for k, v in host.items()},
            "wall_seconds": wall,
        }
        for i in range(n)
    ]


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after ``last_step`` (steps a resumed run will redo)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file, renamed)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)  # atomic


def _evaluate(run: _Run, state: TrainState, source, *, top_k: int):
    """The best particle's and the top-k ensemble's ``EvalResult`` on ``source``."""
    # Never more than the real particles: with padding, the inert ones rank last
    # (their personal bests never get a finite fitness) and stay out.
    top_k = max(1, min(top_k, run.cfg.particles))
    return evaluate(
        run.trainer,
        run.eval_state(state, top_k),
        _eval_batches(run.cfg, source),
        run.num_classes,
        top_k=top_k,
    )


def _finish(run: _Run, state: TrainState, workdir: Path, elite: _Elite) -> dict:
    """Test metrics of the returned model and the top-k ensemble; confusion plot.

    With validation (``eval_every``), the returned model is the candidate that
    wins on validation (:func:`pso_jax.experiment.selection._choose`: the
    elite, the best particle, the soups, the ensemble); otherwise the swarm's
    best particle.
    """
    cfg = run.cfg
    extra = {}
    if cfg.eval_every:
        chosen = _choose(run, state, elite)
        best, ens = chosen["returned_result"], chosen["ensemble_result"]
        extra = {
            "returned_model": chosen["returned"],
            "candidates_val_accuracy": chosen["val_accuracy"],
            "candidates_test_accuracy": chosen["test_accuracy"],
            "best_particle_test_accuracy": chosen["best_result"].accuracy,
            "greedy_soup_size": chosen["greedy_soup_size"],
            "elite_val_accuracy": elite.meta and elite.meta["val_accuracy"],
            "elite_step": elite.meta and elite.meta["step"],
        }
    else:
        best, ens = _evaluate(run, state, _source(cfg, "test"), top_k=cfg.top_k)
    if jax.process_index() == 0:
        _plot_confusion(best, workdir / "confusion.png", _label_names(cfg))
    return {
        "test_accuracy": best.accuracy,
        "test_macro_f1": best.macro_f1,
        "test_per_class_recall": best.per_class_recall,
        "test_confusion": best.confusion,
        "ensemble_size": min(cfg.top_k, cfg.particles),
        "ensemble_test_accuracy": ens.accuracy,
        "ensemble_test_macro_f1": ens.macro_f1,
        "best_train_fitness": float(state.swarm.best_fitness),
        **extra,
        **_grad_hparams(run, state),
    }


def _grad_hparams(run: _Run, state: TrainState) -> dict[str, Any]:
    """The per-particle hyperparameters (PBT) of the particles, best first."""
    if state.grad_hparams is None or jax.process_count() > 1:
        return {}
    order = np.argsort(
        np.asarray(score(state.swarm.pbest_fitness, run.trainer.maximize)),
        kind="stable",
    )[: run.cfg.particles]
    return {
        "grad_hparams_best_first": {
            name: np.asarray(v)[order].tolist()
            for name, v in state.grad_hparams.items()
        }
    }
