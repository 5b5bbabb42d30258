"""What a run records: the metrics log, evaluations, the summary's test metrics.

- ``_metric_records``: one ``metrics.jsonl`` record per step of a chunk;
  ``_read_metrics``: the records back (a torn last line, which an interrupted
  write leaves, skipped with a note; a damaged line before it an error naming
  file and line); ``_truncate_metrics``: drop the records a resumed run will
  redo.
- ``_evaluate``: the best particle and the top-k ensemble on a split;
  ``_finish``: their test metrics (the summary's and ``evaluation.json``'s) and
  the confusion plot.
- ``_json_text`` and ``_write_json``: every JSON file of a work directory
  (``config.json``, ``summary.json``, ``evaluation.json``, each line of
  ``metrics.jsonl``) is strict JSON (RFC 8259, which has no ``Infinity`` or
  ``NaN``): a non-finite number is written as ``null`` and listed in a
  ``"non_finite"`` field, ``{path: "inf" | "-inf" | "nan"}`` (paths dotted:
  ``"runs.0.best_fitness"``), present only when there is one. JSON files are
  written atomically (a temporary file, renamed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pso_jax.experiment.config import RunFileError
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


def _read_metrics(path: Path) -> tuple[list[tuple[str, dict]], str | None]:
    """``metrics.jsonl``'s records, each with its line, and a note or ``None``.

    A last line that is not a JSON object is what a write cut short (SIGKILL, a
    full disk) leaves: it is skipped, and the note names the file and line.

    Raises:
      RunFileError: a line before the last that is not a JSON object (naming
        the file and line): damage that skipping would hide.
    """
    text = path.read_text(errors="replace")  # bad bytes: a line that fails below
    lines = [(i, line) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
    records, note = [], None
    for n, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
            problem = None if isinstance(record, dict) else "not a JSON object"
        except json.JSONDecodeError as e:
            problem = f"{e.msg} at column {e.colno}"
        if problem is None:
            records.append((line, record))
        elif n == len(lines) - 1:
            note = (
                f"{path}:{i}: skipped a torn last line ({problem}), the trace of "
                "an interrupted write"
            )
        else:
            raise RunFileError(
                f"{path}:{i}: not a metrics record ({problem}); only a torn last "
                "line is skipped: repair or delete this line"
            )
    return records, note


def _truncate_metrics(path: Path, last_step: int) -> str | None:
    """Drop records after ``last_step`` (steps a resumed run will redo).

    Returns:
      :func:`_read_metrics`' note (a torn last line, dropped), or ``None``.
    """
    if not path.exists():
        return None
    records, note = _read_metrics(path)
    keep = [line for line, r in records if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return note


def _strict(obj: Any, path: str, found: dict[str, str]) -> Any:
    """``obj`` with non-finite floats as ``None``, each recorded in ``found``."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        found[path] = "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
        return None
    if isinstance(obj, dict):
        return {
            k: _strict(v, f"{path}.{k}" if path else str(k), found)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [
            _strict(v, f"{path}.{i}" if path else str(i), found)
            for i, v in enumerate(obj)
        ]
    return obj


def _json_text(obj: Any, *, indent: int | None = None) -> str:
    """``obj`` as strict JSON: non-finite numbers ``null``, listed in ``non_finite``.

    >>> _json_text({"best": float("inf"), "runs": [{"error": float("nan")}]})
    '{"best": null, "runs": [{"error": null}], "non_finite": {"best": "inf", \
"runs.0.error": "nan"}}'
    """
    found: dict[str, str] = {}
    clean = _strict(obj, "", found)
    if found and isinstance(clean, dict):
        clean = {**clean, "non_finite": {**clean.get("non_finite", {}), **found}}
    # allow_nan=False: a guard, should a non-finite value ever get past _strict.
    return json.dumps(clean, indent=indent, allow_nan=False)


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON to ``path`` atomically (a temporary file,
    renamed); see :func:`_json_text`."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(_json_text(obj, indent=2))
    os.replace(tmp, path)  # atomic


def _evaluate(run: _Run, state: TrainState, source, *, top_k: int):
    """The best particle's and the top-k ensemble's ``EvalResult`` on ``source``."""
    # Never more than the real particles: with padding, the inert ones rank last
    # (their personal bests never get a finite fitness) and stay out.
    top_k = max(1, min(top_k, run.particles))
    return evaluate(
        run.trainer,
        run.eval_state(state, top_k),
        _eval_batches(run.cfg, source, num_classes=run.num_classes),
        run.num_classes,
        top_k=top_k,
    )


def _finish(
    run: _Run,
    state: TrainState,
    workdir: Path,
    elite: _Elite,
    confusion: str = "confusion.png",
) -> dict:
    """Test metrics of the returned model and the top-k ensemble; confusion plot.

    ``confusion``: the plot's file name in ``workdir`` (``pso-jax evaluate``
    writes its own, ``evaluation_confusion.png``, beside the run's). The
    metrics carry ``class_names`` (the dataset's label names, the order of
    the confusion matrix's rows and of the per-class recall), or ``None``.

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
    names = _label_names(cfg)
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != run.num_classes:
            names = None
    if jax.process_index() == 0:
        _plot_confusion(best, workdir / confusion, names)
    return {
        "class_names": names,
        "test_accuracy": best.accuracy,
        "test_macro_f1": best.macro_f1,
        "test_per_class_recall": best.per_class_recall,
        "test_confusion": best.confusion,
        "ensemble_size": min(cfg.top_k, run.particles),
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
    )[: run.particles]
    return {
        "grad_hparams_best_first": {
            name: np.asarray(v)[order].tolist()
            for name, v in state.grad_hparams.items()
        }
    }
