"""Training a classifier with a particle swarm: the fused, jitted train step.

Every particle is a whole model. One call of the train step

1. optionally moves every particle by ``local_steps`` optax gradient steps on the
   batch (the gradient + swarm hybrid; ``local_steps=0`` is pure PSO), vmapped
   over particles, with each particle's optimizer state kept in the train state;
2. evaluates every particle on the same batch,
   ``vmap(apply_fn, in_axes=(0, None))``;
3. refreshes the personal and swarm bests' fitness on this batch (minibatch
   fitness is noisy: a best scored on one lucky batch must not freeze the swarm);
4. updates the bests and moves the swarm (:func:`pso_jax.pso`'s ``tell``).

``make_train_step`` returns pure functions; jit them once at the top level, with
the state donated (``jax.jit(step, donate_argnums=1)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from pso_jax.base import SwarmOptimizer
from pso_jax.pso import PSOState
from pso_jax.tree_utils import combine
from pso_jax.types import PRNGKey, PyTree

FITNESS_FNS = ("cross_entropy", "error_rate", "macro_f1")
BEST_REFRESH = ("reevaluate", "age", "none")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy; ``logits [B, C]``, integer ``labels [B]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def error_rate(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of misclassified examples."""
    return jnp.mean(jnp.argmax(logits, -1) != labels)


def confusion_matrix(
    predictions: jax.Array, labels: jax.Array, num_classes: int
) -> jax.Array:
    """``[C, C]`` int32 counts, rows = true class, columns = predicted class."""
    idx = labels * num_classes + predictions
    counts = jnp.bincount(idx, length=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def macro_f1_from_confusion(cm: jax.Array) -> jax.Array:
    """Macro-averaged F1 over the classes present (in labels or predictions)."""
    cm = cm.astype(jnp.float32)
    tp = jnp.diag(cm)
    support = cm.sum(1)
    predicted = cm.sum(0)
    denom = support + predicted
    f1 = jnp.where(denom > 0, 2 * tp / jnp.where(denom > 0, denom, 1.0), 0.0)
    present = denom > 0
    return jnp.sum(f1) / jnp.maximum(jnp.sum(present), 1)


def macro_f1(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Macro-F1 of ``argmax(logits)`` (higher is better)."""
    num_classes = logits.shape[-1]
    cm = confusion_matrix(jnp.argmax(logits, -1), labels, num_classes)
    return macro_f1_from_confusion(cm)


_FITNESS = {
    "cross_entropy": (cross_entropy, False),
    "error_rate": (error_rate, False),
    "macro_f1": (macro_f1, True),
}


@struct.dataclass
class TrainState:
    """Everything a run needs to continue bit for bit.

    Attributes:
      swarm: the :class:`~pso_jax.pso.PSOState`.
      opt_state: per-particle optax state of the hybrid's gradient steps (leading
        ``P`` axis), or ``None`` when ``local_steps == 0``.
      key_data: ``uint32`` key data of the run's base key (plain arrays, so
        checkpoints hold it); step ``i`` uses ``fold_in(key, swarm.step)``.
    """

    swarm: PSOState
    opt_state: PyTree | None
    key_data: jax.Array


class TrainMetrics(NamedTuple):
    """Per-step metrics (arrays; the host reads them every few steps)."""

    best_fitness: jax.Array  # () swarm best (user sign)
    mean_fitness: jax.Array  # () mean of this batch's finite fitness values
    batch_best_fitness: jax.Array  # () best particle fitness on this batch
    batch_accuracy: jax.Array  # () accuracy of this batch's best particle
    grad_loss: jax.Array  # () mean training loss of the gradient steps (0 if none)
    num_nonfinite: jax.Array  # () int32


class Trainer(NamedTuple):
    """What :func:`make_train_step` returns.

    Attributes:
      init: ``init(key, params_template, hparams) -> TrainState``.
      step: ``step(key_unused, state, batch, hparams) -> (TrainState, TrainMetrics)``;
        the key argument is accepted for the common signature, but the state's
        own key drives the step so that resumed runs repeat exactly.
      scan: ``scan(state, batches, hparams) -> (TrainState, TrainMetrics)``: ``k``
        steps in one ``lax.scan`` over ``batches`` whose leaves have a leading
        ``k`` axis; the metrics get that axis too. Jit it with the state donated.
      evaluate_logits: ``(params [P, ...] or one particle, video) -> logits``.
      maximize: whether the fitness is maximised.
    """

    init: Callable
    step: Callable
    scan: Callable
    evaluate_logits: Callable
    maximize: bool


def make_train_step(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    optimizer: SwarmOptimizer,
    *,
    fitness: str | Callable[[jax.Array, jax.Array], jax.Array] = "cross_entropy",
    local_steps: int = 0,
    grad_optimizer: optax.GradientTransformation | None = None,
    grad_loss: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
    best_refresh: str = "reevaluate",
    age_rate: float = 0.05,
    batch_fn: Callable[[PRNGKey, dict], dict] | None = None,
    video_key: str = "video",
    label_key: str = "label",
) -> Trainer:
    """Build the fused swarm train step for a classifier.

    Args:
      apply_fn: ``apply_fn(params, video [B, ...]) -> logits [B, C]`` for ONE
        particle's full params (e.g. ``lambda p, x: model.apply({"params": p}, x)``).
      optimizer: from :func:`pso_jax.pso` (its ``fitness_fn`` is not used; its
        ``maximize`` must match the fitness).
      fitness: ``"cross_entropy"``, ``"error_rate"`` (minimised), ``"macro_f1"``
        (maximised), or ``fn(logits, labels) -> ()`` (minimised unless the
        optimizer maximises).
      local_steps: gradient steps per particle per swarm step (0 = pure PSO).
      grad_optimizer: the optax optimizer of those steps (default Adam 1e-3).
      grad_loss: the differentiable loss of those steps.
      best_refresh: ``"reevaluate"``: personal and swarm bests are re-scored on
        every batch (one more forward per particle); ``"age"``: their fitness
        worsens by ``age_rate * |fitness|`` per step; ``"none"``.
      age_rate: see ``best_refresh``.
      batch_fn: ``batch_fn(key, batch) -> batch`` run on the device at the start
        of every step, e.g. augmentation (:func:`pso_jax.data.augment_batch`);
        its key derives from the state's key and step, so resumed runs repeat.
      video_key, label_key: batch keys.

    Returns:
      A :class:`Trainer`.

    Raises:
      ValueError: for an unknown fitness or refresh, negative ``local_steps``, or
        a fitness direction that contradicts the optimizer's ``maximize``.
    """
    if isinstance(fitness, str):
        if fitness not in _FITNESS:
            raise ValueError(f"fitness={fitness!r}: expected one of {FITNESS_FNS}")
        fitness_fn, maximize = _FITNESS[fitness]
        if maximize != optimizer.config.maximize:
            raise ValueError(
                f"fitness={fitness!r} is {'max' if maximize else 'min'}imised but the "
                f"optimizer has maximize={optimizer.config.maximize}"
            )
    elif callable(fitness):
        fitness_fn, maximize = fitness, optimizer.config.maximize
    else:
        raise ValueError(f"fitness must be a name or callable, got {fitness!r}")
    if best_refresh not in BEST_REFRESH:
        raise ValueError(
            f"best_refresh={best_refresh!r}: expected one of {BEST_REFRESH}"
        )
    if (
        isinstance(local_steps, bool)
        or not isinstance(local_steps, int)
        or local_steps < 0
    ):
        raise ValueError(f"local_steps={local_steps!r}: must be an int >= 0")
    if age_rate < 0:
        raise ValueError(f"age_rate={age_rate}: must be >= 0")
    if grad_optimizer is None:
        grad_optimizer = optax.adam(1e-3)
    sign = -1.0 if maximize else 1.0

    def one_logits(swarmed, frozen, video):
        return apply_fn(combine(swarmed, frozen), video)

    # Particles evaluated on one shared batch: params axis 0, batch broadcast.
    swarm_logits = jax.vmap(one_logits, in_axes=(0, None, None))

    def swarm_fitness(swarmed, frozen, batch):
        logits = swarm_logits(swarmed, frozen, batch[video_key])  # [P, B, C]
        fit = jax.vmap(fitness_fn, in_axes=(0, None))(logits, batch[label_key])
        return fit, logits

    def local_sgd(swarmed, opt_state, frozen, batch):
        """``local_steps`` optax steps on one particle (vmapped over particles)."""

        def loss(p):
            return grad_loss(one_logits(p, frozen, batch[video_key]), batch[label_key])

        def body(carry, _):
            p, s = carry
            value, grads = jax.value_and_grad(loss)(p)
            updates, s = grad_optimizer.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), value

        (p, s), losses = jax.lax.scan(
            body, (swarmed, opt_state), None, length=local_steps
        )
        return p, s, losses.mean()

    def init(key: PRNGKey, params_template: PyTree, hparams: Any = None) -> TrainState:
        swarm = optimizer.init(key, params_template, hparams)
        opt_state = None
        if local_steps:
            opt_state = jax.vmap(grad_optimizer.init)(swarm.positions)
        return TrainState(
            swarm=swarm, opt_state=opt_state, key_data=jax.random.key_data(key)
        )

    def step(key: Any, state: TrainState, batch: dict, hparams: Any = None):
        del key  # the state's key drives the step (exact resumes)
        if hparams is None:
            hparams = optimizer.default_hparams
        swarm = state.swarm
        base = jax.random.wrap_key_data(state.key_data)
        key_tell = jax.random.fold_in(base, swarm.step)
        if batch_fn is not None:
            key_tell, key_batch = jax.random.split(key_tell)
            batch = batch_fn(key_batch, batch)
        opt_state = state.opt_state
        gl = jnp.zeros((), jnp.float32)
        if local_steps:
            positions, opt_state, losses = jax.vmap(
                local_sgd, in_axes=(0, 0, None, None)
            )(swarm.positions, opt_state, swarm.frozen_params, batch)
            swarm = swarm.replace(positions=positions)
            gl = losses.mean()
        if best_refresh == "reevaluate":
            # Positions, personal bests (if the variant keeps them: CSO does not)
            # and the swarm best in ONE evaluation of 2P + 1 (or P + 1)
            # particles: one compiled model body instead of three.
            n = swarm.fitness.shape[0]
            has_pbest = swarm.pbest_params is not None
            parts = [swarm.positions]
            if has_pbest:
                parts.append(swarm.pbest_params)
            parts.append(jax.tree.map(lambda b: b[None], swarm.best_params))
            stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
            all_fit, all_logits = swarm_fitness(stacked, swarm.frozen_params, batch)
            fit, logits = all_fit[:n], all_logits[:n]
            bfit = all_fit[-1]
            worst = -jnp.inf if maximize else jnp.inf
            if has_pbest:
                pfit = all_fit[n : 2 * n]
                started = jnp.isfinite(swarm.pbest_fitness)
                pfit = jnp.where(jnp.isfinite(pfit), pfit, worst)
                swarm = swarm.replace(
                    pbest_fitness=jnp.where(started, pfit, swarm.pbest_fitness)
                )
            swarm = swarm.replace(
                best_fitness=jnp.where(
                    jnp.isfinite(swarm.best_fitness),
                    jnp.where(jnp.isfinite(bfit), bfit, worst),
                    swarm.best_fitness,
                ),
            )
        else:
            fit, logits = swarm_fitness(swarm.positions, swarm.frozen_params, batch)
        if best_refresh == "age":

            def aged(f):
                return f + sign * age_rate * jnp.abs(f)

            swarm = swarm.replace(
                pbest_fitness=aged(swarm.pbest_fitness),
                best_fitness=aged(swarm.best_fitness),
            )
        swarm, info = optimizer.tell(key_tell, swarm, fit, hparams)
        score = jnp.where(jnp.isfinite(info.fitness), sign * info.fitness, jnp.inf)
        b = jnp.argmin(score)
        labels = batch[label_key]
        acc = jnp.mean(jnp.argmax(logits[b], -1) == labels)
        metrics = TrainMetrics(
            best_fitness=info.best_fitness,
            mean_fitness=info.mean_fitness,
            batch_best_fitness=info.fitness[b],
            batch_accuracy=acc,
            grad_loss=gl,
            num_nonfinite=info.num_nonfinite,
        )
        return state.replace(swarm=swarm, opt_state=opt_state), metrics

    def scan(state: TrainState, batches: dict, hparams: Any = None):
        return jax.lax.scan(lambda s, b: step(None, s, b, hparams), state, batches)

    def evaluate_logits(swarmed, frozen, video):
        """Logits of a stack of particles ``[P, ...]`` on ``video``."""
        return swarm_logits(swarmed, frozen, video)

    return Trainer(
        init=init,
        step=step,
        scan=scan,
        evaluate_logits=evaluate_logits,
        maximize=maximize,
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _confusions(evaluate_logits, num_classes, best, ens, frozen, video, labels):
    """Confusion matrices of the best particle and of the ensemble on one batch.

    Module level, with the trainer's ``evaluate_logits`` static, so repeated
    evaluations (validation every few steps) reuse one compiled program.
    """
    lb = evaluate_logits(best, frozen, video)[0]
    le = evaluate_logits(ens, frozen, video).mean(0)
    return (
        confusion_matrix(jnp.argmax(lb, -1), labels, num_classes),
        confusion_matrix(jnp.argmax(le, -1), labels, num_classes),
    )


class EvalResult(NamedTuple):
    """Classification metrics on a dataset (host values)."""

    accuracy: float
    macro_f1: float
    per_class_recall: list[float]
    confusion: list[list[int]]


def _result(cm) -> EvalResult:
    import numpy as np

    cm = np.asarray(cm)
    support = cm.sum(1)
    recall = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), 0.0)
    return EvalResult(
        accuracy=float(np.trace(cm) / max(cm.sum(), 1)),
        macro_f1=float(macro_f1_from_confusion(jnp.asarray(cm))),
        per_class_recall=[float(r) for r in recall],
        confusion=cm.astype(int).tolist(),
    )


def top_particles(swarm, k: int, maximize: bool) -> tuple[Any, jax.Array]:
    """The ``k`` particles with the best personal-best fitness, best first.

    Their personal-best parameters (the positions for a variant without
    personal bests) and fitness; non-finite fitness ranks last.
    """
    sign = -1.0 if maximize else 1.0
    source = swarm.pbest_params if swarm.pbest_params is not None else swarm.positions
    fit = swarm.pbest_fitness
    rows = jnp.argsort(jnp.where(jnp.isfinite(fit), sign * fit, jnp.inf))[:k]
    return jax.tree.map(lambda a: a[rows], source), fit[rows]


def evaluate(
    trainer: Trainer,
    state: TrainState,
    batches,
    num_classes: int,
    *,
    top_k: int = 1,
    video_key: str = "video",
    label_key: str = "label",
) -> tuple[EvalResult, EvalResult]:
    """Evaluate the swarm's best particle and an ensemble of the top-k particles.

    The ensemble averages the logits of the ``top_k`` particles with the best
    personal-best fitness (their personal-best parameters).

    Args:
      trainer: from :func:`make_train_step`.
      state: a :class:`TrainState`.
      batches: an iterable of batches (dicts with video and label arrays).
      num_classes: number of classes.
      top_k: ensemble size (clipped to the swarm size).

    Returns:
      ``(best, ensemble)`` :class:`EvalResult` s.
    """
    swarm = state.swarm
    k = max(1, min(top_k, swarm.fitness.shape[0]))
    best = jax.tree.map(lambda b: b[None], swarm.best_params)
    ens, _ = top_particles(swarm, k, trainer.maximize)

    cm_b = jnp.zeros((num_classes, num_classes), jnp.int32)
    cm_e = cm_b
    for batch in batches:
        b, e = _confusions(
            trainer.evaluate_logits,
            num_classes,
            best,
            ens,
            swarm.frozen_params,
            jnp.asarray(batch[video_key]),
            jnp.asarray(batch[label_key]),
        )
        cm_b, cm_e = cm_b + b, cm_e + e
    return _result(cm_b), _result(cm_e)
