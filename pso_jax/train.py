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

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import PartitionSpec as P

from pso_jax import population, sharding
from pso_jax.base import SwarmOptimizer, particle_field, substate_field
from pso_jax.fitness import score, swarm_fitness
from pso_jax.pso import PSOState, check_step_hparams, pso, validate_hparams
from pso_jax.tree_utils import combine, tree_where
from pso_jax.types import PRNGKey, PyTree, check_int, is_real_dtype

# The swarm coefficients of the gradient + swarm hybrid (what `pso-jax train
# --config demo` uses): gentle pulls, so that the gradient steps do the descent
# and the swarm selects and spreads; particles start within 1% of the template.
HYBRID_DEFAULTS = {"inertia": 0.3, "cognitive": 0.3, "social": 0.3, "init_scale": 0.01}


def hybrid_pso(num_particles: int, **kwargs: Any) -> SwarmOptimizer:
    """The swarm for :func:`make_train_step`'s hybrid (``local_steps >= 1``).

    :func:`pso_jax.pso` with :data:`HYBRID_DEFAULTS` (``inertia = cognitive =
    social = 0.3``, ``init_scale=0.01``) instead of the textbook coefficients,
    which are made for gradient-free search and scatter a trained network.
    Any argument of :func:`pso_jax.pso` overrides them, e.g. ``mesh=``,
    ``mask=``, ``social=0.5``. No fitness is needed: the train step brings its
    own.

    >>> opt = hybrid_pso(4)
    >>> hp = opt.default_hparams
    >>> round(float(hp.inertia), 6), round(float(hp.init_scale), 6)
    (0.3, 0.01)
    """
    return pso(num_particles=num_particles, **{**HYBRID_DEFAULTS, **kwargs})


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
      grad_hparams: ``{name: [P]}``, each particle's hyperparameters of those
        steps (``grad_hparams=`` of :func:`make_train_step`), or ``None``.
      hparam_swarm: the PSO state of those hyperparameters
        (:func:`pso_jax.population.init_hparam_swarm`) when the swarm moves
        them (``hparam_move="pso"`` or ``"both"``), else ``None``.
      key_data: ``uint32`` key data of the run's base key (plain arrays, so
        checkpoints hold it); step ``i`` uses ``fold_in(key, swarm.step)``
        (:func:`step_key`).
    """

    swarm: PSOState = substate_field(PSOState)
    opt_state: PyTree | None = particle_field()
    grad_hparams: dict[str, jax.Array] | None = particle_field()
    key_data: jax.Array = struct.field()
    hparam_swarm: dict | None = particle_field(default=None)


def step_key(state: TrainState) -> PRNGKey:
    """The key of the step ``state`` is about to take: ``fold_in(key, step)``.

    What :attr:`Trainer.scan` passes to every step, so that a resumed run
    repeats the uninterrupted one exactly.
    """
    return jax.random.fold_in(
        jax.random.wrap_key_data(state.key_data), state.swarm.step
    )


class TrainMetrics(NamedTuple):
    """Per-step metrics (arrays; the host reads them every few steps)."""

    best_fitness: jax.Array  # () swarm best (user sign)
    mean_fitness: jax.Array  # () mean of this batch's finite fitness values
    batch_best_fitness: jax.Array  # () best particle fitness on this batch
    batch_accuracy: jax.Array  # () accuracy of this batch's best particle
    grad_loss: jax.Array  # () mean training loss of the gradient steps (0 if none)
    num_nonfinite: jax.Array  # () int32
    diversity: jax.Array  # () RMS distance of the particles from the best / its norm
    num_exploited: jax.Array  # () int32 particles that cloned another this step


class Trainer(NamedTuple):
    """What :func:`make_train_step` returns.

    Attributes:
      init: ``init(key, params_template, hparams) -> TrainState``.
      step: ``step(key, state, batch, hparams) -> (TrainState, TrainMetrics)``;
        ``key`` drives the step's randomness (the swarm move and ``batch_fn``);
        ``None`` means :func:`step_key` ``(state)``, the state's own key, which
        is what :attr:`scan` uses (a restored state then repeats exactly).
      scan: ``scan(state, batches, hparams) -> (TrainState, TrainMetrics)``: ``k``
        steps in one ``lax.scan`` over ``batches`` whose leaves have a leading
        ``k`` axis, step ``i`` keyed by :func:`step_key` (so resumed runs repeat
        exactly); the metrics get that axis too. Jit it with the state donated.
      evaluate_logits: ``(params [P, ...], frozen, video) -> logits [P, B, C]``,
        on one device (for gathered particles).
      maximize: whether the fitness is maximised.
    """

    init: Callable
    step: Callable
    scan: Callable
    evaluate_logits: Callable
    maximize: bool


def _fitness_and_direction(fitness, optimizer) -> tuple[Callable, bool]:
    """``(fitness_fn(logits, labels), maximize)`` of a named or callable fitness."""
    maximize = optimizer.config.maximize
    if isinstance(fitness, str):
        if fitness not in _FITNESS:
            raise ValueError(f"fitness={fitness!r}: expected one of {FITNESS_FNS}")
        fitness_fn, wants_max = _FITNESS[fitness]
        if wants_max != maximize:
            raise ValueError(
                f"fitness={fitness!r} is {'max' if wants_max else 'min'}imised but "
                f"the optimizer has maximize={maximize}"
            )
        return fitness_fn, maximize
    if callable(fitness):
        return fitness, maximize
    raise ValueError(f"fitness must be a name or callable, got {fitness!r}")


def _check_options(local_steps, best_refresh, age_rate) -> None:
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
    if not (isinstance(age_rate, int | float) and math.isfinite(age_rate)) or (
        isinstance(age_rate, bool) or age_rate < 0
    ):
        raise ValueError(f"age_rate={age_rate!r}: must be a finite number >= 0")


def _check_recenter(recenter_fn, recenter_every) -> None:
    every = check_int("recenter_every", recenter_every, minimum=0)
    if every and recenter_fn is None:
        raise ValueError(f"recenter_every={every} needs a recenter_fn")


def _on_data_slices(fitness, grad_loss, axis):
    """Fitness and loss over a batch split on the data axis (identity without).

    ``"macro_f1"`` from the summed confusion matrices (exact); every other
    fitness, and the loss, by the mean over the slices (a callable must then be
    a mean over the batch).
    """
    if axis.data_axis is None:
        return fitness, grad_loss
    if fitness is macro_f1:

        def fitness(logits, labels):
            cm = confusion_matrix(jnp.argmax(logits, -1), labels, logits.shape[-1])
            return macro_f1_from_confusion(jax.lax.psum(cm, axis.data_axis))

    else:
        fitness = _mean_over_slices(fitness, axis)
    return fitness, _mean_over_slices(grad_loss, axis)


def _mean_over_slices(fn, axis):
    def mean_over_slices(logits, labels):
        return axis.data_mean(fn(logits, labels))

    return mean_over_slices


def _local_sgd(apply_fn, grad_loss, tx_fn, local_steps, video_key, label_key):
    """``local_sgd(swarmed, opt_state, hp, frozen, batch)``: steps on ONE particle.

    ``hp`` are the particle's own hyperparameters (``{}`` for none), given to
    ``tx_fn`` to build its optax transformation (traced values: no recompile).
    """

    def local_sgd(swarmed, opt_state, hp, frozen, batch):
        tx = tx_fn(hp)

        def loss(p):
            logits = apply_fn(combine(p, frozen), batch[video_key])
            return grad_loss(logits, batch[label_key])

        def body(carry, _):
            p, s = carry
            value, grads = jax.value_and_grad(loss)(p)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), value

        (p, s), losses = jax.lax.scan(
            body, (swarmed, opt_state), None, length=local_steps
        )
        return p, s, losses.mean()

    return local_sgd


def _transformation_fn(grad_optimizer, grad_hparams):
    """``tx_fn(hp) -> GradientTransformation`` for per-particle ``hp`` (or none)."""
    if not grad_hparams:
        if grad_optimizer is None:
            grad_optimizer = optax.adam(1e-3)
        if not (hasattr(grad_optimizer, "init") and hasattr(grad_optimizer, "update")):
            raise ValueError(
                "grad_optimizer must be an optax.GradientTransformation (a "
                "function of hyperparameters only with grad_hparams=)"
            )
        return lambda hp: grad_optimizer
    if grad_optimizer is None:
        grad_optimizer = _adamw
    if not callable(grad_optimizer) or hasattr(grad_optimizer, "update"):
        raise ValueError(
            "with grad_hparams=, grad_optimizer must be a function of them "
            f"returning an optax transformation, e.g. lambda {', '.join(grad_hparams)}"
            f": optax.adamw(...); got {grad_optimizer!r}"
        )
    try:
        inspect.signature(grad_optimizer).bind(**dict.fromkeys(grad_hparams))
    except TypeError as e:
        raise ValueError(
            f"grad_hparams names {sorted(grad_hparams)}, but grad_optimizer "
            f"{getattr(grad_optimizer, '__name__', grad_optimizer)!r} does not take "
            f"them as keyword arguments ({e}); the default takes learning_rate "
            "and weight_decay"
        ) from None
    except ValueError:  # a callable without a signature (a C function): try it
        pass
    return lambda hp: grad_optimizer(**hp)


def _adamw(learning_rate=1e-3, weight_decay=0.0):
    """The default per-particle transformation: ``optax.adamw``."""
    return optax.adamw(learning_rate, weight_decay=weight_decay)


def check_batch(
    batch,
    video_key: str = "video",
    label_key: str = "label",
    *,
    targets: bool = False,
) -> None:
    """Raise a ``ValueError``/``TypeError`` naming what is wrong with a batch.

    Checks what is known while tracing (keys, dtypes, shapes), so it runs under
    ``jit`` too: a dict with ``video_key`` ``[B, ...]`` and integer
    ``label_key`` ``[B]`` arrays, and ``select_`` entries in pairs. With
    ``targets``, the labels may instead be real-valued targets ``[B, ...]``
    (a callable fitness's, e.g. a :mod:`pso_jax.pretext` task's).
    """
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batch: expected a dict with {video_key!r} and {label_key!r} arrays, "
            f"got {type(batch).__name__}"
        )
    for prefix in ("", "select_"):
        v, lab = f"{prefix}{video_key}", f"{prefix}{label_key}"
        if prefix and v not in batch and lab not in batch:
            continue
        missing = [k for k in (v, lab) if k not in batch]
        if missing:
            raise ValueError(
                f"batch has no {missing[0]!r} (keys: {sorted(batch)}); pass "
                "video_key=/label_key= to make_train_step for other names"
            )
        video, labels = batch[v], batch[lab]
        vs, ls = jnp.shape(video), jnp.shape(labels)
        if targets and not _is_class_ids(labels):
            if not (is_real_dtype(jnp.result_type(labels)) and ls and vs):
                raise TypeError(
                    f"batch[{lab!r}] has dtype {jnp.result_type(labels)} and shape "
                    f"{ls}: expected class ids [B] or real targets [B, ...]"
                )
            if ls[0] != vs[0]:
                raise ValueError(
                    f"batch[{lab!r}] has shape {ls} and batch[{v!r}] {vs}: "
                    "expected targets [B, ...] for video [B, ...]"
                )
            continue
        if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
            raise TypeError(
                f"batch[{lab!r}] has dtype {jnp.result_type(labels)}: class labels "
                "must be integers (e.g. labels.astype(jnp.int32))"
            )
        if len(ls) != 1 or not vs or vs[0] != ls[0]:
            raise ValueError(
                f"batch[{lab!r}] has shape {ls} and batch[{v!r}] {vs}: expected "
                "labels [B] for video [B, ...]"
            )


def _is_class_ids(labels) -> bool:
    """Static: integer labels ``[B]`` (class ids, not regression targets)."""
    return jnp.ndim(labels) == 1 and jnp.issubdtype(
        jnp.result_type(labels), jnp.integer
    )


def check_labels(labels, num_classes: int, where: str) -> None:
    """On the host: a ``ValueError`` unless every label is in ``[0, num_classes)``.

    A label out of range gives a NaN fitness inside the step, where nothing can
    raise, so batches are checked where they are concrete (``evaluate``, the
    experiment's input pipeline). Tracers are skipped.
    """
    if isinstance(labels, jax.core.Tracer):
        return
    arr = np.asarray(labels)
    if arr.size == 0:
        return
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{where} has label {low if low < 0 else high}, outside [0, {num_classes})"
        )


def _check_split(split_batch: bool, axis) -> None:
    if not isinstance(split_batch, bool):
        raise ValueError(f"split_batch={split_batch!r}: expected True or False")
    if split_batch and axis.data_axis is not None:
        raise ValueError(
            f"split_batch=True with the {axis.data_axis!r} mesh axis: the batch is "
            "split over the particles or over the data axis, not both"
        )


def _slice_size(batch, axis) -> int:
    """Clips per particle of a split batch (``B / P``), checked."""
    b = jax.tree.leaves(batch)[0].shape[0]
    if b % axis.num_particles:
        raise ValueError(
            f"split_batch: the batch of {b} clips does not split over "
            f"{axis.num_particles} particles: use a multiple of "
            f"{axis.num_particles} clips"
        )
    return b // axis.num_particles


def _particle_slices(batch, parts, axis) -> dict:
    """Every particle's own ``B / P`` clips of ``batch``: ``[P_local, B / P, ...]``."""
    keys = parts.keys
    per = _slice_size({k: batch[k] for k in keys}, axis)

    def rows(x):
        return axis.own_slice(x.reshape(axis.num_particles, per, *x.shape[1:]))

    return {k: rows(batch[k]) for k in keys}


def _first_slice(batch, axis) -> dict:
    """The first ``B / P`` clips of ``batch`` (a split step's fitness batch)."""
    per = _slice_size(batch, axis)
    return jax.tree.map(lambda x: x[:per], batch)


def _selection_batch(batch, video_key, label_key):
    """The batch the fitness is measured on: ``select_<key>`` entries, if any.

    A selection batch the gradient steps did not fit (e.g. the next training
    batch) makes the swarm's choices those of held-out data, not of the batch
    each particle just memorised.
    """
    sv, sl = f"select_{video_key}", f"select_{label_key}"
    if sv not in batch:
        return batch
    return {video_key: batch[sv], label_key: batch[sl]}


def _refresh(optimizer, swarm, best_refresh, age_rate, evaluate):
    """Re-score the bests for this batch; ``(swarm, fitness [P], logits)``.

    ``"reevaluate"``: positions, personal bests (if the variant keeps them: CSO
    does not) and the swarm best in ONE evaluation of ``2P + 1`` (or ``P + 1``)
    particles, one compiled model body instead of three.
    """
    if best_refresh != "reevaluate":
        fit, logits = evaluate(swarm.positions)
        if best_refresh == "age":
            sign = -1.0 if optimizer.config.maximize else 1.0

            def aged(f):
                return f + sign * age_rate * jnp.abs(f)

            swarm = optimizer.rescore(
                swarm, aged(swarm.pbest_fitness), aged(swarm.best_fitness)
            )
        return swarm, fit, logits
    n = swarm.fitness.shape[0]
    has_pbest = swarm.pbest_params is not None
    parts = [swarm.positions]
    if has_pbest:
        parts.append(swarm.pbest_params)
    parts.append(jax.tree.map(lambda b: b[None], swarm.best_params))
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    all_fit, all_logits = evaluate(stacked)
    pfit = all_fit[n : 2 * n] if has_pbest else None
    swarm = optimizer.rescore(swarm, pfit, all_fit[-1])
    return swarm, all_fit[:n], all_logits[:n]


def make_train_step(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    optimizer: Any,
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
    grad_hparams: Mapping[str, tuple[float, float]] | None = None,
    exploit_every: int = 0,
    exploit_fraction: float = 0.25,
    explore_factors: tuple[float, ...] = (0.8, 1.25),
    hparam_move: str = "exploit",
    recenter_fn: Callable[[PSOState], PSOState] | None = None,
    recenter_every: int = 0,
    split_batch: bool = False,
) -> Trainer:
    """Build the fused swarm train step for a classifier.

    The optimizer's layout decides where it runs: built with ``pso(...,
    mesh=mesh)`` (a :class:`~pso_jax.sharding.ShardedSwarmOptimizer`), each
    device runs the step on its own particles (forward passes, gradient steps,
    swarm update) inside one ``jax.shard_map``, and bests and metrics cross
    devices as the swarm's do. With a ``"data"`` mesh axis each device sees its
    slice of the batch and the fitness is combined over the slices:
    ``"cross_entropy"``, ``"error_rate"``, a callable fitness and ``grad_loss``
    by their mean (so a callable must be a mean over the batch), ``"macro_f1"``
    from the summed confusion matrices (exact). A ``batch_fn`` then sees only
    this device's slice and the same key on every slice, so it must draw per
    clip from the slice's place in the whole batch
    (``jax.lax.axis_index("data")``) to match the unsharded run, as
    :func:`pso_jax.experiment.train` does.

    Args:
      apply_fn: ``apply_fn(params, video [B, ...]) -> logits [B, C]`` for ONE
        particle's full params (e.g. ``lambda p, x: model.apply({"params": p}, x)``).
      optimizer: from :func:`pso_jax.pso` (its ``fitness_fn`` is not used; its
        ``maximize`` must match the fitness), with or without ``mesh=``.
      fitness: ``"cross_entropy"``, ``"error_rate"`` (minimised), ``"macro_f1"``
        (maximised), or ``fn(logits, labels) -> ()`` (minimised unless the
        optimizer maximises); a callable's labels may be real-valued targets
        ``[B, ...]`` instead of class ids (``batch_accuracy`` is then NaN), e.g.
        a :class:`pso_jax.pretext.PretextTask`'s ``loss``, with its
        :func:`~pso_jax.pretext.task_batch_fn` making them.
      local_steps: gradient steps per particle per swarm step (0 = pure PSO).
      grad_optimizer: the optax optimizer of those steps (default Adam 1e-3).
      grad_loss: the differentiable loss of those steps.
      best_refresh: ``"reevaluate"``: personal and swarm bests are re-scored on
        every batch (one more forward per particle); ``"age"``: their fitness
        worsens by ``age_rate * |fitness|`` per step; ``"none"``.
      age_rate: see ``best_refresh``.
      batch_fn: ``batch_fn(key, batch) -> batch`` run on the device at the start
        of every step, e.g. augmentation (:func:`pso_jax.data.augment_batch`);
        its key is split from the step's key, so resumed runs repeat.
      video_key, label_key: batch keys. A batch may also carry
        ``select_<video_key>`` and ``select_<label_key>``: the fitness (and the
        re-scored bests) are then measured on those clips, which the gradient
        steps did not fit (e.g. the next training batch).
      grad_hparams: ``{name: (low, high)}``: per-particle hyperparameters of
        the gradient steps (Population Based Training), drawn log-uniform over
        the ranges (stratified) at ``init`` and kept in the state; then
        ``grad_optimizer`` is a function of them returning the optax
        transformation, e.g. ``lambda learning_rate, weight_decay:
        optax.adamw(learning_rate, weight_decay=weight_decay)`` (the default).
        Their values are traced: changing them never recompiles.
      exploit_every: every this many steps, the worst ``exploit_fraction`` of
        the particles take the weights, optimizer state and hyperparameters of
        one of as many best ones, the hyperparameters multiplied by one of
        ``explore_factors`` (PBT's truncation selection); 0: never.
      exploit_fraction, explore_factors: see ``exploit_every``.
      hparam_move: what happens every ``exploit_every`` steps: ``"exploit"``
        (PBT, above); ``"pso"``: the swarm moves each particle's
        hyperparameters by PSO on their logarithms towards its own best and
        the swarm's best (:func:`pso_jax.population.move_hparams`), every
        particle keeping its weights; ``"both"``: the exploit, then that move.
      recenter_fn, recenter_every: every ``recenter_every`` steps (0: never),
        after the move, ``recenter_fn(swarm) -> swarm``, e.g.
        :func:`pso_jax.particle_space.recenter` (sees the device's particles).
      split_batch: ``False``: every particle's gradient steps fit the whole
        batch of ``B`` clips. ``True``: particle ``i`` fits its own ``B / P``
        clips (rows ``i * B / P`` onwards), and the fitness of every particle
        and best is measured on the first ``B / P`` clips of the selection
        batch: a step of ``P`` models then costs one model's step at batch
        ``B``, and the particles learn from different data. ``B`` must be a
        multiple of ``P`` (padding included); not with a ``"data"`` mesh axis.

    Returns:
      A :class:`Trainer`. Sharded, its ``init``, ``step`` and ``scan`` take and
      return global (sharded) train states, ``step`` the global batch
      (replicated, or split on its leading axis over ``"data"``); the metrics
      equal the unsharded step's (``grad_loss`` up to float rounding).

    Raises:
      ValueError: for an unknown fitness or refresh, negative ``local_steps``, or
        a fitness direction that contradicts the optimizer's ``maximize``.
    """
    fitness_fn, maximize = _fitness_and_direction(fitness, optimizer)
    _check_options(local_steps, best_refresh, age_rate)
    _check_recenter(recenter_fn, recenter_every)
    mesh = getattr(optimizer, "mesh", None)
    swarm_opt = optimizer if mesh is None else optimizer.local
    axis = swarm_opt.config.axis
    _check_population(grad_hparams, exploit_every, exploit_fraction, explore_factors)
    _check_hparam_move(hparam_move, grad_hparams, exploit_every, exploit_fraction, axis)
    grad_hparams = dict(grad_hparams or {})
    tx_fn = _transformation_fn(grad_optimizer, grad_hparams)
    fitness_fn, grad_loss = _on_data_slices(fitness_fn, grad_loss, axis)

    def apply_here(params, video):
        return apply_fn(axis.vary_over_data(params), video)

    def logits_and_fitness(params, batch):
        logits = apply_here(params, batch[video_key])
        return fitness_fn(logits, batch[label_key]), logits

    _check_split(split_batch, axis)
    local_sgd = jax.vmap(
        _local_sgd(apply_here, grad_loss, tx_fn, local_steps, video_key, label_key),
        in_axes=(0, 0, 0, None, 0 if split_batch else None),
    )
    parts = _StepParts(
        swarm_opt=swarm_opt,
        maximize=maximize,
        local_sgd=local_sgd if local_steps else None,
        logits_and_fitness=logits_and_fitness,
        batch_fn=batch_fn,
        best_refresh=best_refresh,
        age_rate=age_rate,
        exploit=(exploit_every, exploit_fraction, tuple(explore_factors)),
        hparam_move=hparam_move,
        hparam_ranges=tuple(sorted(grad_hparams.items())),
        keys=(video_key, label_key),
        targets=callable(fitness),
        recenter=(recenter_every, recenter_fn),
        split_batch=split_batch,
    )

    init = functools.partial(
        _init_state, swarm_opt, grad_hparams, local_steps, tx_fn, hparam_move
    )
    step = functools.partial(_train_step, parts)
    return _trainer(apply_fn, optimizer, mesh, init, step, maximize)


def _init_state(
    swarm_opt,
    grad_hparams,
    local_steps,
    tx_fn,
    hparam_move,
    key,
    params_template,
    hparams=None,
) -> TrainState:
    """A :class:`Trainer`'s ``init(key, params_template, hparams)`` (the leading
    arguments bound by :func:`make_train_step`)."""
    swarm = swarm_opt.init(key, params_template, hparams)
    opt_state = hp = None
    if grad_hparams:
        axis = swarm_opt.config.axis
        hp = population.init_hparams(jax.random.fold_in(key, 1), grad_hparams, axis)
    if local_steps:
        opt_state = jax.vmap(lambda p, h: tx_fn(h).init(p))(swarm.positions, hp or {})
    hswarm = None
    if hparam_move != "exploit":
        hswarm = population.init_hparam_swarm(hp)
    return TrainState(
        swarm=swarm,
        opt_state=opt_state,
        grad_hparams=hp,
        key_data=jax.random.key_data(key),
        hparam_swarm=hswarm,
    )


@dataclasses.dataclass(frozen=True)
class _StepParts:
    """The static pieces of a train step (:func:`make_train_step` builds them)."""

    swarm_opt: Any  # the per-device SwarmOptimizer
    maximize: bool
    local_sgd: Callable | None  # vmapped gradient steps, None for pure PSO
    logits_and_fitness: Callable  # (params, batch) -> (fitness, logits), one particle
    batch_fn: Callable | None
    best_refresh: str
    age_rate: float
    exploit: tuple[int, float, tuple[float, ...]]  # every, fraction, factors
    hparam_move: str  # "exploit", "pso" or "both"
    hparam_ranges: tuple  # ((name, (low, high)), ...) of grad_hparams
    keys: tuple[str, str]  # video, label
    targets: bool  # labels may be real targets [B, ...] (a callable fitness)
    recenter: tuple[int, Callable | None]  # every, fn
    split_batch: bool  # every particle fits its own B / P clips


def _train_step(parts: _StepParts, key, state: TrainState, batch: dict, hparams=None):
    """One fused step: gradient steps, evaluation, re-scored bests, swarm move, PBT."""
    swarm_opt, axis = parts.swarm_opt, parts.swarm_opt.config.axis
    if hparams is None:
        hparams = swarm_opt.default_hparams
    if key is None:
        key = step_key(state)
    swarm = state.swarm
    key_tell = key
    if parts.batch_fn is not None:
        # Checked after: a batch_fn may make the labels (a pretext task's).
        key_tell, key_batch = jax.random.split(key)
        batch = parts.batch_fn(key_batch, batch)
    check_batch(batch, *parts.keys, targets=parts.targets)
    opt_state = state.opt_state
    grad_losses = jnp.zeros((axis.local_size,), jnp.float32)
    if parts.local_sgd is not None:
        positions, opt_state, grad_losses = parts.local_sgd(
            swarm.positions,
            opt_state,
            state.grad_hparams or {},
            swarm.frozen_params,
            _particle_slices(batch, parts, axis) if parts.split_batch else batch,
        )
        swarm = swarm.replace(positions=positions)
    fit_batch = _selection_batch(batch, *parts.keys)
    if parts.split_batch:
        fit_batch = _first_slice(fit_batch, axis)

    def evaluate_stack(swarmed):
        return swarm_fitness(
            parts.logits_and_fitness, swarmed, swarm.frozen_params, fit_batch
        )

    swarm, fit, logits = _refresh(
        swarm_opt, swarm, parts.best_refresh, parts.age_rate, evaluate_stack
    )
    swarm, info = swarm_opt.tell(key_tell, swarm, fit, hparams)
    recenter_every, recenter_fn = parts.recenter
    if recenter_every:
        swarm = jax.lax.cond(
            swarm.step % recenter_every == 0, recenter_fn, lambda s: s, swarm
        )
    state = state.replace(swarm=swarm, opt_state=opt_state)
    replaced = axis.own_rows() < 0  # all False (typed per particle when sharded)
    every, fraction, factors = parts.exploit
    if every:
        state, replaced = jax.lax.cond(
            swarm.step % every == 0,
            lambda: _population_step(parts, key, state, info),
            lambda: (state, replaced),
        )
    labels = fit_batch[parts.keys[1]]
    metrics = _metrics(
        axis, parts.maximize, info, logits, labels, grad_losses, state.swarm, replaced
    )
    return state, metrics


def _population_step(parts: _StepParts, key, state: TrainState, info):
    """Every ``exploit_every`` steps: PBT's exploit and/or the hyperparameter move.

    Returns ``(state, replaced [n])``.
    """
    axis = parts.swarm_opt.config.axis
    _, fraction, factors = parts.exploit
    replaced = axis.own_rows() < 0
    if parts.hparam_move != "pso":
        state, replaced = _exploit(
            jax.random.fold_in(key, 1),
            axis,
            state,
            info,
            parts.maximize,
            fraction,
            factors,
        )
    if parts.hparam_move != "exploit":
        hswarm = population.reset_hparam_swarm(
            state.hparam_swarm, state.grad_hparams, replaced
        )
        hp, hswarm = population.move_hparams(
            jax.random.fold_in(key, 2),
            axis,
            score(info.fitness, parts.maximize),
            state.grad_hparams,
            hswarm,
            dict(parts.hparam_ranges),
        )
        state = state.replace(grad_hparams=hp, hparam_swarm=hswarm)
    return state, replaced


HPARAM_MOVES = ("exploit", "pso", "both")


def _check_hparam_move(hparam_move, grad_hparams, every, fraction, axis) -> None:
    if hparam_move not in HPARAM_MOVES:
        raise ValueError(f"hparam_move={hparam_move!r}: choose from {HPARAM_MOVES}")
    if every and hparam_move != "pso" and int(fraction * axis.num_real) < 1:
        raise ValueError(
            f"exploit_fraction={fraction} of {axis.num_real} particles "
            "clones none: raise it, or use more particles"
        )
    if hparam_move != "exploit" and not (grad_hparams and every):
        raise ValueError(
            f"hparam_move={hparam_move!r} moves per-particle hyperparameters every "
            "exploit_every steps: give grad_hparams= and exploit_every >= 1"
        )


def _check_population(grad_hparams, exploit_every, exploit_fraction, factors):
    if grad_hparams:
        population.check_ranges(grad_hparams)
    if (
        isinstance(exploit_every, bool)
        or not isinstance(exploit_every, int)
        or exploit_every < 0
    ):
        raise ValueError(f"exploit_every={exploit_every!r}: must be an int >= 0")
    if not 0 < exploit_fraction <= 0.5:
        raise ValueError(f"exploit_fraction={exploit_fraction!r}: must be in (0, 0.5]")
    if not factors or not all(math.isfinite(f) and f > 0 for f in factors):
        raise ValueError(f"explore_factors={factors!r}: must be positive numbers")


def _exploit(key, axis, state, info, maximize, fraction, factors):
    """PBT's exploit/explore on a train state; ``(state, replaced [n])``.

    The clones take the source's position, personal best, optimizer state and
    (perturbed) hyperparameters; their velocity restarts at zero.
    """
    swarm = state.swarm
    copied = ("positions", "pbest_params", "pbest_fitness", "fitness")
    rows = {name: getattr(swarm, name) for name in copied}
    rows["opt_state"] = state.opt_state
    rows, hp, replaced = population.exploit(
        key,
        axis,
        score(info.fitness, maximize),
        fraction,
        factors,
        rows,
        state.grad_hparams or {},
    )
    opt_state = rows.pop("opt_state")
    zeros = jax.tree.map(jnp.zeros_like, swarm.velocities)
    velocities = tree_where(replaced, zeros, swarm.velocities)
    swarm = swarm.replace(velocities=velocities, **rows)
    hp = hp or state.grad_hparams
    return state.replace(swarm=swarm, opt_state=opt_state, grad_hparams=hp), replaced


def _metrics(axis, maximize, info, logits, labels, grad_losses, swarm, replaced):
    """This step's metrics: the batch's best particle (over the whole swarm)."""
    positions, best = swarm.positions, swarm.best_params
    if _is_class_ids(labels):
        correct = jnp.argmax(logits, -1) == labels  # [n, B]
        accuracy = axis.data_mean(jnp.mean(correct, axis=1))
    else:  # regression targets: no accuracy
        accuracy = jnp.full(logits.shape[:1], jnp.nan, jnp.float32)
    _, (best_fit, best_acc) = axis.argmin(
        score(info.fitness, maximize), (info.fitness, accuracy)
    )
    return TrainMetrics(
        best_fitness=info.best_fitness,
        mean_fitness=info.mean_fitness,
        batch_best_fitness=best_fit,
        batch_accuracy=best_acc,
        grad_loss=axis.mean(grad_losses)[0],
        num_nonfinite=info.num_nonfinite,
        diversity=population.diversity(axis, positions, best),
        num_exploited=axis.sum(jnp.sum(replaced).astype(jnp.int32)),
    )


def _trainer(apply_fn, optimizer, mesh, init, step, maximize) -> Trainer:
    """The :class:`Trainer` of per-device ``init``/``step``, sharded on ``mesh``."""
    if mesh is not None:
        prefix = sharding.state_prefix(TrainState, sharding.PARTICLE_AXIS)
        default = optimizer.default_hparams
        check = functools.partial(validate_hparams, variant=optimizer.config.variant)
        init = sharding.shard_init(init, mesh, prefix, default, check)
        sharded_step = sharding.shard_step(
            step, mesh, prefix, P(), default, optimizer.config.axis.data_axis
        )

        def step(key, state, batch, hparams=None):
            # Checked on the host (if concrete) before shard_map traces them.
            check_step_hparams(optimizer.local.config, hparams)
            return sharded_step(key, state, batch, hparams)

    def scan(state: TrainState, batches: dict, hparams: Any = None):
        # Still one computation under jit when sharded, and the carry keeps its
        # layout (each step's shard_map takes and gives the same specs).
        return jax.lax.scan(
            lambda s, b: step(step_key(s), s, b, hparams), state, batches
        )

    def evaluate_logits(swarmed, frozen, video):
        """Logits of a stack of particles ``[P, ...]`` on ``video``."""
        return swarm_fitness(apply_fn, swarmed, frozen, video)

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


@functools.partial(jax.jit, static_argnums=0)
def _particle_counts(evaluate_logits, params, frozen, video, labels):
    """``([P] correct clips, [P] summed cross-entropy)`` of one batch."""
    logits = evaluate_logits(params, frozen, video).astype(jnp.float32)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels[None], axis=1)
    losses = jax.vmap(
        lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, labels)
    )(logits)
    return correct, jnp.sum(losses, axis=1)


def particle_scores(
    trainer: Trainer,
    state: TrainState,
    batches,
    num_classes: int,
    *,
    video_key: str = "video",
    label_key: str = "label",
) -> tuple[np.ndarray, np.ndarray]:
    """Every particle's accuracy and mean cross-entropy on ``batches``.

    Of the particles' current positions (the weights their next step starts
    from), all ``P`` in one vmapped evaluation per batch: what a selection
    among the particles reads (e.g. successive halving,
    :func:`pso_jax.population.narrow`). One device (host values).

    Returns:
      ``(accuracy, loss)``: ``[P]`` float64 each; a particle with non-finite
      logits gets loss ``inf``.

    Raises:
      ValueError: no batches, or labels outside ``[0, num_classes)``.
    """
    swarm = state.swarm
    correct, loss, clips = 0, 0, 0
    for i, batch in enumerate(batches):
        check_batch(batch, video_key, label_key)
        check_labels(batch[label_key], num_classes, f"particle_scores: batch {i}")
        hits, losses = _particle_counts(
            trainer.evaluate_logits,
            swarm.positions,
            swarm.frozen_params,
            jnp.asarray(batch[video_key]),
            jnp.asarray(batch[label_key]),
        )
        correct = correct + np.asarray(hits)
        loss = loss + np.asarray(losses, np.float64)
        clips += len(batch[label_key])
    if not clips:
        raise ValueError("particle_scores: no batches (an empty split?)")
    loss = np.where(np.isfinite(loss), loss / clips, np.inf)
    return np.asarray(correct, np.float64) / clips, loss


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

    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes={num_classes!r}: expected an int >= 2")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r}: expected an int >= 2")
    cm_b = jnp.zeros((num_classes, num_classes), jnp.int32)
    cm_e = cm_b
    for i, batch in enumerate(batches):
        check_batch(batch, video_key, label_key)
        check_labels(batch[label_key], num_classes, f"evaluate: batch {i}")
        if i == 0:
            out = jax.eval_shape(
                trainer.evaluate_logits,
                best,
                swarm.frozen_params,
                jnp.asarray(batch[video_key]),
            )
            if out.shape[-1] != num_classes:
                raise ValueError(
                    f"evaluate: the model gives {out.shape[-1]} logits per clip, "
                    f"num_classes={num_classes}"
                )
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
