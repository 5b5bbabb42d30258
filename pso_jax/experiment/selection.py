"""What a run keeps and returns: the models that win on validation.

- ``_narrowed``: successive halving (``cfg.narrow_at``): every particle is
  scored on validation and the best ``keep`` go on alone, in a run of fewer
  particles (:func:`pso_jax.population.narrow`).

- ``_Elite``: ESGD's back-off (Cui et al., 2018): at every validation the swarm's
  best particle is scored, and the best so far is kept (on disk, in
  ``elite/``, so a resumed run returns what the uninterrupted one does).
- ``_choose``: at the end, the candidates (the elite, the final best particle,
  the top-k ensemble, the uniform and the greedy weight soups of the top-k,
  Wortsman et al., 2022, "Model soups") are scored on validation and the best is
  returned; ties go to the first listed (a single model before a soup before an
  ensemble). Every candidate's test accuracy is reported beside it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax import flax_utils, population
from pso_jax.experiment.config import RunFileError, _load_json
from pso_jax.experiment.input_pipeline import _eval_batches, _source
from pso_jax.experiment.run import _Run
from pso_jax.pso import best_solution
from pso_jax.train import (
    EvalResult,
    TrainState,
    evaluate,
    particle_scores,
    top_particles,
)


def _split_batches(run: _Run, split: str) -> list[dict]:
    """A split's evaluation batches, read once (host arrays), labels checked."""
    source = _source(run.cfg, split)
    return list(
        _eval_batches(run.cfg, source, num_classes=run.num_classes, split=split)
    )


def _score(run: _Run, state: TrainState, params, batches) -> EvalResult:
    """``params`` (swarmed leaves, one model) scored on ``batches``."""
    swarm = state.swarm.replace(best_params=params)
    best, _ = evaluate(
        run.trainer, state.replace(swarm=swarm), batches, run.num_classes, top_k=1
    )
    return best


def _narrowed(
    run: _Run, state: TrainState, keep: int, val: list[dict]
) -> tuple[_Run, TrainState, dict[str, Any]]:
    """The ``keep`` particles with the best validation accuracy, in their own run.

    Each particle's current weights are scored on the validation batches
    ``val`` (:func:`pso_jax.train.particle_scores`): the best accuracy wins;
    ties (early, every particle may still predict one class) go to the lower
    validation loss, then the lower index. The winners keep everything they
    had (:func:`pso_jax.population.narrow`) in a :class:`_Run` of ``keep``
    particles, whose train step compiles anew.

    Returns:
      ``(run, state, record)``: the smaller run and its state, and what the
      narrowing chose (for ``metrics.jsonl``).
    """
    acc, loss = particle_scores(run.trainer, state, val, run.num_classes)
    order = sorted(range(run.particles), key=lambda i: (-acc[i], loss[i], i))
    rows = order[:keep]
    smaller = _Run(run.cfg, run.source, run.parallel, particles=keep)
    fresh = smaller.init(jax.random.key(run.cfg.seed))
    narrowed = population.narrow(state, rows, fresh)
    record = {
        "narrowed_to": keep,
        "kept": rows,
        "particle_val_accuracy": acc.tolist(),
        "particle_val_loss": loss.tolist(),
    }
    if state.grad_hparams is not None:
        record["kept_grad_hparams"] = {
            name: np.asarray(v)[rows].tolist() for name, v in state.grad_hparams.items()
        }
    return smaller, narrowed, record


class _Elite:
    """The best model the validations saw (``workdir/elite``), kept across resumes."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "elite"
        self.meta = None
        meta_path = self.dir / "elite.json"
        if meta_path.exists():
            meta = _load_json(meta_path)
            if not (isinstance(meta, dict) and {"val_accuracy", "step"} <= meta.keys()):
                raise RunFileError(
                    f"{meta_path}: expected an object with val_accuracy and step; "
                    "the elite is damaged: delete elite/ to drop it"
                )
            self.meta = meta

    @property
    def val_accuracy(self) -> float:
        return -1.0 if self.meta is None else self.meta["val_accuracy"]

    def offer(
        self, gathered: TrainState, val_accuracy: float, step: int, whole: bool
    ) -> None:
        """Keep the gathered state's best particle if it beats the elite
        (``whole``: with the swarm's frozen leaves, see :func:`_elite_tree`)."""
        if val_accuracy <= self.val_accuracy:
            return
        if jax.process_index() == 0:
            tmp = self.dir.with_name("elite.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            params = jax.tree.map(np.asarray, _elite_tree(gathered.swarm, whole))
            flax_utils.save_params(tmp / "params", params)
            meta = {"val_accuracy": val_accuracy, "step": step}
            # Strict JSON (an accuracy is always finite: allow_nan=False guards).
            (tmp / "elite.json").write_text(json.dumps(meta, allow_nan=False))
            shutil.rmtree(self.dir, ignore_errors=True)
            os.replace(tmp, self.dir)  # never half-written
        self.meta = {"val_accuracy": val_accuracy, "step": step}

    def params(self, template):
        """The elite's leaves (``None`` if there is none)."""
        if self.meta is None or not (self.dir / "params").exists():
            return None
        return flax_utils.load_params(self.dir / "params", template=template)


def _elite_tree(swarm, whole: bool):
    """What the elite stores of a swarm's best: its swarmed leaves, or with
    ``whole`` every leaf (a swarm that re-centres changes its frozen base, so
    the best's coordinates alone would not rebuild it later)."""
    return best_solution(swarm) if whole else swarm.best_params


def _soups(run: _Run, state: TrainState, picked, val) -> dict[str, Any]:
    """Uniform and greedy soups of the ``[k, ...]`` ``picked`` (best first)."""
    k = jax.tree.leaves(picked)[0].shape[0]
    rows = [jax.tree.map(lambda a, i=i: a[i], picked) for i in range(k)]
    uniform = jax.tree.map(lambda a: jnp.mean(a, axis=0), picked)
    # Greedy: ingredients by their own validation accuracy; each joins the soup
    # if the soup's accuracy does not drop (Wortsman et al., 2022, Recipe 1).
    own = [_score(run, state, r, val).accuracy for r in rows]
    order = sorted(range(k), key=lambda i: -own[i])
    chosen = [order[0]]
    best_acc = own[order[0]]
    for i in order[1:]:
        trial = [rows[j] for j in chosen + [i]]
        soup = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), 0), *trial)
        acc = _score(run, state, soup, val).accuracy
        if acc >= best_acc:
            chosen, best_acc = chosen + [i], acc
    greedy = jax.tree.map(
        lambda *xs: jnp.mean(jnp.stack(xs), 0), *[rows[j] for j in chosen]
    )
    return {"uniform_soup": uniform, "greedy_soup": greedy, "greedy_size": len(chosen)}


def _choose(run: _Run, state: TrainState, elite: _Elite) -> dict[str, Any]:
    """Score every candidate on validation; the winner's and all test metrics."""
    cfg = run.cfg
    k = max(1, min(cfg.top_k, run.particles))
    gathered = run.eval_state(state, k)
    picked, _ = top_particles(gathered.swarm, k, run.trainer.maximize)
    val, test = _split_batches(run, "validation"), _split_batches(run, "test")
    soups = _soups(run, gathered, picked, val)
    candidates = {"best_particle": gathered.swarm.best_params}
    whole = bool(cfg.recenter_every)
    elite_params = elite.params(_elite_tree(gathered.swarm, whole))
    if elite_params is not None:
        candidates["elite"] = elite_params
    candidates["greedy_soup"] = soups["greedy_soup"]
    candidates["uniform_soup"] = soups["uniform_soup"]
    val_acc = {n: _score(run, gathered, p, val).accuracy for n, p in candidates.items()}
    test_res = {n: _score(run, gathered, p, test) for n, p in candidates.items()}
    _, ens_val = evaluate(run.trainer, gathered, val, run.num_classes, top_k=k)
    _, ens_test = evaluate(run.trainer, gathered, test, run.num_classes, top_k=k)
    val_acc["ensemble"] = ens_val.accuracy
    test_res["ensemble"] = ens_test
    returned = max(val_acc, key=lambda n: val_acc[n])  # first among equals
    return {
        "returned": returned,
        "returned_result": test_res[returned],
        "val_accuracy": val_acc,
        "test_accuracy": {n: r.accuracy for n, r in test_res.items()},
        "greedy_soup_size": soups["greedy_size"],
        "ensemble_result": ens_test,
        "best_result": test_res["best_particle"],
    }
