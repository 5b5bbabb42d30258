"""What a pretext run (``cfg.objective``, ``pso-jax pretrain``) measures and writes.

The training loop is :func:`pso_jax.experiment.train`'s, with the task's loss
as the fitness (:mod:`pso_jax.pretext`); what differs is read here:

- ``_pretext_loss``: the task's loss of one model on a split's clips (inputs
  and targets drawn with a fixed key: every evaluation sees the same masks
  and shuffles), and, for ``"order"``, its accuracy.
- ``_validation_record``: ``metrics.jsonl``'s record every ``eval_every``
  steps (``val_loss``).
- ``_constant_loss``: the loss of the best constant guess, the bar a model
  must pass to have learned anything from the clips.
- ``_finish_pretext``: the summary's test loss of the returned model (the
  swarm's best) against the starting model's and the constant guess's, and
  ``backbone/``
  (:mod:`pso_jax.experiment.pretrained`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax import particle_space
from pso_jax.experiment.input_pipeline import _eval_batches, _source
from pso_jax.experiment.pretrained import BACKBONE, _save_backbone
from pso_jax.experiment.run import _Run
from pso_jax.train import TrainState

# The key of the evaluation's masks and shuffles (fixed: comparable losses).
_EVAL_SEED = 20261203


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_loss(model_fn, task, params, key, video):
    batch = task.make_batch(key, video)
    outputs = model_fn(params, batch["video"])
    loss = task.loss(outputs, batch["label"])
    correct = jnp.zeros(())
    if task.classes:
        correct = jnp.sum(jnp.argmax(outputs, -1) == batch["label"])
    return loss, correct


def _pretext_loss(run: _Run, params, source, batch_size: int = 100) -> dict:
    """``{"loss", "accuracy"}`` of ``params`` (one model) on ``source``'s clips.

    The mean of the per-batch losses weighted by their sizes; ``accuracy``
    (``"order"`` only, else ``None``): the share of clips whose order the
    model tells right. No label is read.
    """
    task = run.task
    ds = _eval_batches(run.cfg, source, batch_size, labels=False)
    key = jax.random.key(_EVAL_SEED)
    total = correct = n = 0.0
    for i, batch in enumerate(ds):
        video = jnp.asarray(batch["video"])
        loss, right = _batch_loss(
            run.model_fn, task, params, jax.random.fold_in(key, i), video
        )
        total += float(loss) * len(video)
        correct += float(right)
        n += len(video)
    return {
        "loss": total / n,
        "accuracy": correct / n if task.classes else None,
    }


@functools.partial(jax.jit, static_argnums=0)
def _batch_targets(task, key, video):
    return task.make_batch(key, video)["label"]


def _constant_loss(run: _Run, source, batch_size: int = 100) -> float:
    """The loss of the best constant guess on ``source``: what a model that
    ignores its input scores (the targets' mean over the split's clips; for
    ``"order"`` the classes' log frequencies, the labels' entropy).

    The same inputs and targets as :func:`_pretext_loss` draws; a pretext
    model is only learning from the clips where it scores below this.
    """
    task = run.task
    key = jax.random.key(_EVAL_SEED)
    ds = _eval_batches(run.cfg, source, batch_size, labels=False)
    targets = [
        np.asarray(_batch_targets(task, jax.random.fold_in(key, i), b["video"]))
        for i, b in enumerate(ds)
    ]
    every = np.concatenate(targets)
    if task.classes:
        freq = np.bincount(every, minlength=task.num_outputs) / len(every)
        guess = np.log(np.maximum(freq, 1e-12)).astype(np.float32)
    else:
        guess = every[:, : task.num_outputs].mean(0)
    total = sum(
        float(task.loss(jnp.broadcast_to(guess, (len(t), guess.size)), t)) * len(t)
        for t in targets
    )
    return total / len(every)


def _returned(run: _Run, state: TrainState):
    """The returned model's parameters: the swarm's best (host arrays)."""
    gathered = run.eval_state(state, 1)
    best = particle_space.decode_best(run.space, gathered.swarm)
    return jax.tree.map(np.asarray, best)


def _validation_record(run: _Run, state: TrainState, source, step: int) -> dict:
    """The ``eval_every`` record: the swarm best's loss on validation."""
    res = _pretext_loss(run, _returned(run, state), source)
    record = {"step": step, "val_loss": res["loss"]}
    if res["accuracy"] is not None:
        record["val_accuracy"] = res["accuracy"]
    return record


def _finish_pretext(
    run: _Run, state: TrainState, workdir: Path, save: bool = True
) -> dict:
    """The summary's pretext metrics; ``workdir/backbone`` written if ``save``.

    ``initial_test_loss`` is the starting model's (the init, or the
    ``pretrained`` backbone with a fresh head): what the run improved on.
    """
    test = _source(run.cfg, "test")
    params = _returned(run, state)
    start = run.space.decode(run.template)
    final, initial = _pretext_loss(run, params, test), _pretext_loss(run, start, test)
    constant = _constant_loss(run, test)
    if save:
        _save_backbone(workdir, params)
    return {
        "objective": run.cfg.objective,
        "test_loss": final["loss"],
        "initial_test_loss": initial["loss"],
        # What a model that ignores its input scores (the best constant guess).
        "constant_test_loss": constant,
        # "order" only: how often the returned model tells the order right.
        "test_accuracy": final["accuracy"],
        "backbone": BACKBONE,
        "best_train_fitness": float(state.swarm.best_fitness),
    }
