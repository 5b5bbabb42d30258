"""Run configurations: what defines a training run, and where it computes.

- :class:`TrainConfig`: every field that defines a run's result (stored as
  ``config.json``; a resume must match it), :data:`CONFIGS` (the named presets),
  :func:`get_config` (a preset with overrides) and :func:`validate_config`.
- :func:`read_config`: a run's ``config.json`` read back, every problem (missing,
  not JSON, an unknown or missing field, a bad value) one :class:`RunFileError`
  naming the file and the field.
- :class:`ConfigError` (a bad field: its name, value and what is expected) and
  :class:`RunFileError` (a work directory's file that is missing or damaged).
- :class:`Parallelism`: the device layout (devices, a ``"data"`` axis, padding),
  which is not part of a run's result and so not of ``config.json``; and
  ``_check_layout``, which rejects a layout before any data or compilation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax

from pso_jax import sharding
from pso_jax.flax_utils import COMPUTE_DTYPES
from pso_jax.models import MODELS, STEMS
from pso_jax.particle_space import PARTICLE_SPACES
from pso_jax.population import check_ranges
from pso_jax.pretext import TASKS
from pso_jax.pso import VARIANTS
from pso_jax.topology import TOPOLOGIES
from pso_jax.train import BEST_REFRESH, FITNESS_FNS

__all__ = [
    "CONFIGS",
    "RESUME_MAY_CHANGE",
    "ConfigError",
    "Parallelism",
    "RunFileError",
    "TrainConfig",
    "get_config",
    "particle_steps",
    "particles_at",
    "read_config",
    "validate_config",
]

# Heads of the reconstruction pretext tasks (TrainConfig.decoder).
DECODERS = ("pooled", "dense")

# Fields a resumed run may change (``pso-jax train --resume --steps 600``):
# they decide where the data lies, how long and how the loop runs, not what a
# step computes. A
# changed ``steps`` keeps the learning-rate schedule's span
# (``schedule_steps``), so every step computes what it would have computed.
RESUME_MAY_CHANGE = (
    "data_dir",  # the same data, moved
    "steps",
    "time_budget",
    "eval_every",
    "checkpoint_every",
    "steps_per_call",
)

# Fields added after config.json files were written: a file without one reads
# it as its default, which rebuilds the same run.
_LATER_FIELDS = {
    "schedule_steps": None,
    "hparam_move": "exploit",
    "narrow_at": (),
    "particle_space": "full",
    "rank": 1,
    "subspace_dim": 256,
    "recenter_every": 0,
    "dtype": "float32",
    "objective": None,
    "mask_ratio": 0.9,
    "decoder": "pooled",
    "label_fraction": 1.0,
    "lr_warmup": 0.0,
    "split_batch": False,
}


class ConfigError(ValueError):
    """A configuration field with a bad value.

    Attributes:
      field: the field's name (a :class:`TrainConfig` field), or ``None``.
      value: its value.
      expected: what is expected, in words.

    >>> str(ConfigError("particles", 0, "must be an int >= 1"))
    'particles=0: must be an int >= 1'
    """

    def __init__(self, field: str | None, value: Any, expected: str):
        message = expected if field is None else f"{field}={value!r}: {expected}"
        super().__init__(message)
        self.field, self.value, self.expected = field, value, expected


class RunFileError(ValueError):
    """A work directory's file (``config.json``, ``metrics.jsonl``, ...) that is
    missing, damaged or does not fit the command; the message names the file
    (and the line or field)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (stored as ``config.json``).

    Attributes:
      dataset: ``"moving_shapes"``, a TFDS video dataset name (``"ucf101"``;
        needs the ``video-tf`` extra), or a prepared TFDS dataset folder.
      dataset_config: the ``moving_shapes`` config, ``"small"`` or ``"default"``.
      data_dir: TFDS data directory (``None``: TFDS's default).
      num_frames: frames per clip: a random window of the video (``None``: the
        dataset's clip length, which must then be fixed).
      num_classes: number of classes (``None``: from the dataset).
      model: a :data:`pso_jax.models.MODELS` name.
      width: the model's base width.
      stem: ``"tubelet"`` or ``"conv"``.
      patch: tubelet (or conv stem pool) size ``(pt, ph, pw)``; finer patches
        see finer motion at a higher cost (``(2, 2, 2)`` is what the rotation
        classes of ``moving_shapes/small`` need: see the demo's note).
      particles: swarm size ``P`` (each particle is a whole model).
      steps: swarm steps.
      local_steps: gradient steps per particle per swarm step (0: pure PSO).
      learning_rate: Adam's (peak) learning rate for those steps.
      lr_schedule: ``"cosine"`` (optax's cosine decay to 5 % over the run's
        ``schedule_steps * local_steps`` gradient steps, then at that floor)
        or ``"constant"``.
      lr_warmup: the share of the cosine schedule's gradient steps, in
        ``[0, 1)``, over which the learning rate first rises linearly from 0
        to its peak (optax's ``warmup_cosine_decay_schedule``; 0: none). What
        a Transformer needs: ``vivit`` at the hybrid's peak 1e-2 and no warmup
        stays at chance on ``moving_shapes``
        (``benchmarks/results/vivit/lr1e-2/learning_curves.md``).
      schedule_steps: the swarm steps the cosine schedule spans (``None``:
        ``steps``). A run extended on resume (``pso-jax train --resume
        --steps``) keeps its original span here, so the steps already run
        and the ones after keep the schedule they had (at its 5 % floor after
        the original end); see :data:`RESUME_MAY_CHANGE`.
      weight_decay: AdamW's decoupled weight decay (0: plain Adam).
      lr_range, wd_range: ``(low, high)``: every particle draws its own (peak)
        learning rate / weight decay log-uniformly over the range (Population
        Based Training; :func:`pso_jax.train.make_train_step`'s
        ``grad_hparams``); ``None``: every particle uses ``learning_rate`` /
        ``weight_decay``.
      exploit_every: every this many steps the worst ``exploit_fraction`` of
        the particles clone good ones, hyperparameters perturbed (PBT); 0: never.
      exploit_fraction: see ``exploit_every`` (in ``(0, 0.5]``).
      hparam_move: what moves the per-particle hyperparameters every
        ``exploit_every`` steps: ``"exploit"`` (PBT's clone and perturb),
        ``"pso"`` (PSO on their logarithms, weights kept) or ``"both"``
        (:func:`pso_jax.train.make_train_step`).
      select_on: the batch the swarm's fitness is measured on: ``"batch"`` (the
        one the gradient steps just fitted) or ``"next"`` (the next training
        batch, which they have not seen: selection on held-out data).
      narrow_at: successive halving (Jamieson & Talwalkar, 2016; Li et al.,
        2017, "Hyperband"): ``((step, keep), ...)``, steps increasing, ``keep``
        decreasing: after ``step`` steps, the ``keep`` particles with the best
        validation accuracy go on (weights, velocities, optimizer state and
        hyperparameters), the others stop, and the remaining steps cost
        ``keep`` particles each. With ``lr_range`` the swarm races learning
        rates briefly, then spends its compute on the winners; ``()``: never.
        A step at or after ``steps`` is never reached (a shortened run, e.g.
        ``--steps 10``, does not narrow; the run says so). One device only;
        see :func:`particles_at`.
      time_budget: stop training after this many wall seconds (``steps`` is
        then an upper bound; the learning-rate schedule still spans ``steps``),
        then evaluate. Runs stopped by the clock are not repeatable step for
        step.
      batch_size: clips per step, shared by every particle (or split among
        them: ``split_batch``).
      split_batch: every particle's gradient steps fit its own
        ``batch_size / particles`` clips, and the fitness is measured on
        ``batch_size / particles`` clips shared by all: a step of the whole
        swarm costs one model's step at ``batch_size`` (P models for the
        compute of one, each from its own data;
        :func:`pso_jax.train.make_train_step`). After a narrowing the
        survivors share the batch among fewer. ``batch_size`` must be a
        multiple of ``particles``.
      variant, topology: of :func:`pso_jax.pso` (``topology=None``: the
        variant's default).
      inertia, cognitive, social: PSO coefficients (``None``: the variant's).
      init_scale: std of the particles' initial spread around the model's init
        (or the pretrained params) when ``init="perturb"``.
      init: ``"perturb"`` (one Flax init plus Gaussian noise of std
        ``init_scale``: particles start in one basin, so that moving towards
        each other's bests is meaningful) or ``"independent"`` (a fresh Flax
        init per particle: a diverse swarm, but averaging networks initialised
        apart mixes unrelated features; measured slower to learn here).
      fitness: ``"cross_entropy"``, ``"error_rate"`` or ``"macro_f1"``.
      best_refresh: ``"reevaluate"``, ``"age"`` or ``"none"`` (see
        :func:`pso_jax.train.make_train_step`).
      augment: on-device augmentation (resized crop, colour, label-aware flips).
      steps_per_call: swarm steps per jitted ``lax.scan`` call (one host sync).
      eval_every: validate the best particle every this many steps (0: never).
      checkpoint_every: checkpoint every this many steps (0: only at the end);
        rounded up to a multiple of ``steps_per_call``.
      top_k: size of the evaluated ensemble of the best particles.
      pretrained: what every particle starts from: a ``pso-jax pretrain``
        work directory (its ``backbone/``, checked to be of this run's
        ``model``, ``width``, ``stem`` and ``patch``; a fresh head) or params
        of the whole model saved with :func:`pso_jax.flax_utils.save_params`.
      swarm_over: ``"all"`` parameters, or only the ``"head"`` (the rest frozen,
        stored once, not per particle; needs ``pretrained``).
      particle_space: what a particle is (:mod:`pso_jax.particle_space`):
        ``"full"`` (a whole model), ``"lowrank"`` (rank-``rank`` factors per
        kernel around one shared base model) or ``"subspace"`` (``subspace_dim``
        coordinates of a random subspace through the base).
      rank, subspace_dim: of ``lowrank`` and ``subspace``.
      recenter_every: ``subspace`` only: every this many steps the swarm's best
        becomes the base and a fresh random subspace is drawn through it
        (:func:`pso_jax.particle_space.recenter` with ``redraw=True``); 0: never.
      dtype: the models' compute dtype, ``"float32"`` or ``"bfloat16"``
        (mixed precision: the forward and backward passes in bfloat16, the
        swarm state, personal bests and Adam's moments in float32;
        :func:`pso_jax.flax_utils.with_compute_dtype`). What every GPU/TPU
        user sets first; on a CPU bfloat16 is emulated and slower.
      objective: ``None``: learn the labels (``pso-jax train``); or a
        self-supervised pretext task of :mod:`pso_jax.pretext`, ``"masked"``,
        ``"next_frame"`` or ``"order"`` (``pso-jax pretrain``): the train
        split's clips only, no label ever read; the model's head predicts the
        task's targets, and the run writes ``backbone/`` for ``pretrained``.
      mask_ratio: ``objective="masked"``'s share of masked tubelets, in (0, 1).
      decoder: the head of ``"masked"`` and ``"next_frame"``: ``"pooled"``
        (one Dense on the pooled features) or ``"dense"`` (one Dense at every
        cell of the body's feature map, predicting the tubelets under it:
        :func:`pso_jax.models.base.decode_map`). The body, what ``pretrained``
        reuses, is the same either way. ``"order"`` and label runs: ``"pooled"``.
      label_fraction: train on this share of the train split's labeled clips
        (a fixed draw of the seed; the same clips for every run of a seed), in
        (0, 1]; the label-scarce half of a pretrain -> finetune study.
      seed: the run's seed.
    """

    dataset: str = "moving_shapes"
    dataset_config: str = "small"
    data_dir: str | None = None
    num_frames: int | None = None
    num_classes: int | None = None
    model: str = "c3d"
    width: int = 16
    stem: str = "tubelet"
    patch: tuple[int, int, int] = (2, 4, 4)
    particles: int = 8
    steps: int = 300
    local_steps: int = 1
    learning_rate: float = 3e-3
    lr_schedule: str = "cosine"
    lr_warmup: float = 0.0
    schedule_steps: int | None = None
    weight_decay: float = 0.0
    lr_range: tuple[float, float] | None = None
    wd_range: tuple[float, float] | None = None
    exploit_every: int = 0
    exploit_fraction: float = 0.25
    hparam_move: str = "exploit"
    select_on: str = "batch"
    narrow_at: tuple[tuple[int, int], ...] = ()
    time_budget: float | None = None
    batch_size: int = 32
    split_batch: bool = False
    variant: str = "inertia"
    topology: str | None = None
    inertia: float | None = None
    cognitive: float | None = None
    social: float | None = None
    init_scale: float = 0.01
    init: str = "perturb"
    fitness: str = "cross_entropy"
    best_refresh: str = "reevaluate"
    augment: bool = False
    steps_per_call: int = 10
    eval_every: int = 0
    checkpoint_every: int = 100
    top_k: int = 4
    pretrained: str | None = None
    swarm_over: str = "all"
    particle_space: str = "full"
    rank: int = 1
    subspace_dim: int = 256
    recenter_every: int = 0
    dtype: str = "float32"
    objective: str | None = None
    mask_ratio: float = 0.9
    decoder: str = "pooled"
    label_fraction: float = 1.0
    seed: int = 0

    def __post_init__(self):
        # From JSON (config.json) or the command line, a list: store a tuple.
        for name in ("patch", "lr_range", "wd_range"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.narrow_at, (list, tuple)):
            pairs = tuple(
                tuple(p) if isinstance(p, (list, tuple)) else p for p in self.narrow_at
            )
            object.__setattr__(self, "narrow_at", pairs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples as lists, as JSON reads them back)."""
        out = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()
        }
        out["narrow_at"] = [list(p) for p in self.narrow_at]
        return out


CONFIGS: dict[str, TrainConfig] = {
    # Seconds: the CLI and checkpoint tests.
    "smoke": TrainConfig(
        model="c3d",
        width=8,
        particles=4,
        steps=6,
        local_steps=1,
        batch_size=8,
        steps_per_call=3,
        checkpoint_every=3,
        top_k=2,
    ),
    # `make demo`: moving_shapes/small in under 5 minutes on 2 cores. Four
    # particles race their learning rates (one per slice of 1e-3..1e-2) for 20
    # steps, then the validation winner trains alone (successive halving): the
    # compute of the 4-particle "hybrid" below (1,200 particle steps), 0.856
    # test accuracy against its 0.754 (seed 0, 2026-12-02). The gain is the
    # model and the one long run, not the race: on a CPU each particle costs
    # a model, and every model here is still at chance on validation for its
    # first ~250 gradient steps, so a race this short picks on a validation
    # loss within ~0.05 of ln 10, nearly a lottery (hence a range of learning
    # rates that all train: benchmarks/results/swarm_vs_adam_halving*.md).
    # The 2x2x2 tubelets see the rotations that 2x4x4 ones miss; width 8
    # keeps their cost at that of the width-16 model with 2x4x4 tubelets.
    "demo": TrainConfig(
        model="c3d",
        width=8,
        patch=(2, 2, 2),
        particles=4,
        steps=1140,
        local_steps=4,
        learning_rate=3e-3,
        lr_range=(1e-3, 1e-2),
        narrow_at=((20, 1),),
        batch_size=32,
        inertia=0.0,
        cognitive=0.0,
        social=0.0,
        init="perturb",
        init_scale=0.01,
        steps_per_call=10,
        eval_every=100,
        checkpoint_every=100,
    ),
    # `pso-jax pretrain`: the demo's model (c3d, width 8, 2x2x2 tubelets, so
    # that `pso-jax train --config demo --pretrained DIR` fine-tunes it) learns
    # a pretext task from the train split's clips, no labels: 4 particles, 4
    # Adam steps each per swarm step, the hybrid's gentle PSO pull.
    "pretrain": TrainConfig(
        model="c3d",
        width=8,
        patch=(2, 2, 2),
        objective="masked",
        particles=4,
        steps=300,
        local_steps=4,
        learning_rate=3e-3,
        batch_size=32,
        inertia=0.3,
        cognitive=0.3,
        social=0.3,
        steps_per_call=10,
        eval_every=100,
        checkpoint_every=100,
    ),
    # The hybrid: 4 whole models, k Adam steps each per swarm step, then the
    # swarm move (the demo until 2026-12-02; the benchmarks' reference run).
    # Gentle PSO coefficients: after k Adam steps, the textbook w=0.73,
    # c1=c2=1.5 pull throws each particle about its bests by a large share of
    # their distance, per coordinate, and undoes Adam's progress: at 150 steps,
    # validation accuracy 0.26 with them, 0.68 with 0.3/0.3/0.3, 0.63 with no
    # swarm update at all (independent Adam particles); same machine and run.
    "hybrid": TrainConfig(
        model="c3d",
        width=16,
        particles=4,
        steps=300,
        local_steps=4,
        learning_rate=1e-2,
        batch_size=32,
        inertia=0.3,
        cognitive=0.3,
        social=0.3,
        init="perturb",
        init_scale=0.01,
        steps_per_call=10,
        eval_every=50,
        checkpoint_every=50,
    ),
    # The full-size dataset, augmentation, a bigger swarm.
    "default": TrainConfig(
        dataset_config="default",
        model="c3d",
        width=16,
        particles=16,
        steps=2000,
        local_steps=4,
        batch_size=32,
        inertia=0.3,  # the gentle coefficients of "hybrid"
        cognitive=0.3,
        social=0.3,
        augment=True,
        steps_per_call=20,
        eval_every=200,
        checkpoint_every=200,
    ),
}


def get_config(name: str = "demo", **overrides: Any) -> TrainConfig:
    """A named config from :data:`CONFIGS` with some fields replaced.

    ``None`` overrides are ignored (so CLI flags that were not given keep the
    config's value).

    Raises:
      ValueError: for an unknown config name, an unknown field or a bad value.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose from {sorted(CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {unknown}")
    cfg = dataclasses.replace(
        CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None}
    )
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """Raise a :class:`ConfigError` naming the first bad field of ``cfg``.

    Every field is checked for its type and range, numbers also for being
    finite (``inf`` and ``nan`` are refused), names against their choices;
    nothing is read or compiled. What needs the data (the class count, the clip
    shape against the model, the batch size against the split) is checked by
    :func:`pso_jax.experiment.train` before compiling.
    """
    _validate_sizes(cfg)
    _validate_choices(cfg)
    _validate_numbers(cfg)
    _validate_population(cfg)
    _validate_paths(cfg)
    _validate_pretext(cfg)


def _validate_pretext(cfg: TrainConfig) -> None:
    """``objective``, ``mask_ratio``, ``label_fraction``; what pretraining uses."""
    _check_number(cfg, "mask_ratio", low=0.0, above=True)
    if not cfg.mask_ratio < 1:
        raise ConfigError("mask_ratio", cfg.mask_ratio, "must be in (0, 1)")
    _check_number(cfg, "label_fraction", low=0.0, above=True)
    if not cfg.label_fraction <= 1:
        raise ConfigError("label_fraction", cfg.label_fraction, "must be in (0, 1]")
    if cfg.decoder not in DECODERS:
        raise ConfigError("decoder", cfg.decoder, f"choose from {DECODERS}")
    if cfg.decoder != "pooled" and cfg.objective not in ("masked", "next_frame"):
        raise ConfigError(
            "decoder",
            cfg.decoder,
            f"decodes the targets of objective 'masked' or 'next_frame', not "
            f"objective={cfg.objective!r}; leave it at 'pooled'",
        )
    if cfg.objective is None:
        return
    if cfg.objective not in TASKS:
        raise ConfigError("objective", cfg.objective, f"choose from {TASKS}")
    # What pretraining does not use: labels and what selects on them.
    unused = (
        ("fitness", cfg.fitness, "cross_entropy", "the task's loss is the fitness"),
        ("augment", cfg.augment, False, "its flips rewrite labels"),
        ("swarm_over", cfg.swarm_over, "all", "the backbone is what pretrains"),
        ("narrow_at", cfg.narrow_at, (), "it selects on validation accuracy"),
        ("label_fraction", cfg.label_fraction, 1.0, "no label is read"),
    )
    for name, value, default, why in unused:
        if value != default:
            raise ConfigError(
                name,
                _pairs_text(value) if name == "narrow_at" else value,
                f"not with objective={cfg.objective!r} ({why}); leave it at "
                f"{_pairs_text(default) if name == 'narrow_at' else default!r}",
            )


def _check_int(
    cfg: TrainConfig,
    name: str,
    low: int,
    *,
    high: int | None = None,
    optional: bool = False,
) -> None:
    """Raise unless ``cfg.<name>`` is an int in ``[low, high]`` (or ``None``)."""
    value = getattr(cfg, name)
    if optional and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ConfigError(name, value, f"must be {expected}")


def _check_number(
    cfg: TrainConfig,
    name: str,
    *,
    low: float | None = None,
    above: bool = False,
    optional: bool = False,
) -> None:
    """Raise unless ``cfg.<name>`` is a finite number ``>= low`` (``> low``)."""
    value = getattr(cfg, name)
    if optional and value is None:
        return
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )
    if ok and low is not None:
        ok = value > low if above else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if above else '>='} {low:g}"
        raise ConfigError(name, value, f"must be a finite number{bound}")


def _validate_sizes(cfg: TrainConfig) -> None:
    """Counts, sizes and the seed."""
    for name in ("width", "particles", "steps", "batch_size", "steps_per_call"):
        _check_int(cfg, name, 1)
    _check_int(cfg, "top_k", 1)
    for name in ("rank", "subspace_dim"):
        _check_int(cfg, name, 1)
    for name in ("local_steps", "eval_every", "checkpoint_every"):
        _check_int(cfg, name, 0)
    _check_int(cfg, "num_frames", 1, optional=True)
    _check_int(cfg, "schedule_steps", 1, optional=True)
    _check_int(cfg, "num_classes", 2, optional=True)
    # grain's shuffle takes seeds in [0, 2**32).
    _check_int(cfg, "seed", 0, high=2**32 - 1)
    patch = cfg.patch
    if (
        not isinstance(patch, tuple)
        or len(patch) != 3
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in patch)
        or min(patch) < 1
    ):
        raise ConfigError("patch", patch, "must be three ints >= 1 (pt, ph, pw)")


def _validate_choices(cfg: TrainConfig) -> None:
    """Names chosen from a list, and the dataset's."""
    for name, allowed in (
        ("model", tuple(MODELS)),
        ("stem", STEMS),
        ("variant", VARIANTS),
        ("fitness", FITNESS_FNS),
        ("best_refresh", BEST_REFRESH),
        ("init", ("independent", "perturb")),
        ("swarm_over", ("all", "head")),
        ("particle_space", PARTICLE_SPACES),
        ("dtype", COMPUTE_DTYPES),
        ("lr_schedule", ("cosine", "constant")),
    ):
        value = getattr(cfg, name)
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(name, value, f"choose from {allowed}")
    if cfg.topology is not None and cfg.topology not in TOPOLOGIES:
        raise ConfigError("topology", cfg.topology, f"choose from {TOPOLOGIES}")
    for name in ("dataset", "dataset_config"):
        value = getattr(cfg, name)
        if not isinstance(value, str) or not value:
            raise ConfigError(name, value, "must be a non-empty string")
    if not isinstance(cfg.augment, bool):
        raise ConfigError("augment", cfg.augment, "must be true or false")


def _validate_numbers(cfg: TrainConfig) -> None:
    """The learning rate and the PSO coefficients: finite, in range."""
    _check_number(cfg, "learning_rate", low=0.0, above=True)
    _check_number(cfg, "inertia", optional=True)  # w; its stability: pso()'s warning
    _check_number(cfg, "cognitive", low=0.0, optional=True)  # c1
    _check_number(cfg, "social", low=0.0, optional=True)  # c2
    _check_number(cfg, "init_scale", low=0.0)


def _validate_paths(cfg: TrainConfig) -> None:
    """The data directory and the pretrained parameters."""
    for name in ("data_dir", "pretrained"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(name, value, "must be a path (a non-empty string)")
    if cfg.swarm_over == "head" and cfg.pretrained is None:
        raise ConfigError(
            "swarm_over", "head", "needs pretrained= (the backbone's saved params)"
        )
    if cfg.pretrained is not None and not os.path.isdir(cfg.pretrained):
        raise ConfigError("pretrained", cfg.pretrained, "no such directory")


def _validate_population(cfg: TrainConfig) -> None:
    """The per-particle hyperparameter, exploit, selection and budget fields."""
    _check_number(cfg, "weight_decay", low=0.0)
    _check_number(cfg, "lr_warmup", low=0.0)
    if not cfg.lr_warmup < 1:
        raise ConfigError("lr_warmup", cfg.lr_warmup, "must be in [0, 1)")
    ranges = {"lr_range": cfg.lr_range, "wd_range": cfg.wd_range}
    for name, rng in ranges.items():
        if rng is None:
            continue
        try:
            check_ranges({name: rng})
        except (TypeError, ValueError):
            raise ConfigError(
                name, rng, "expected two finite numbers 0 < low <= high"
            ) from None
    _check_int(cfg, "exploit_every", 0)
    _check_number(cfg, "exploit_fraction")
    if not 0 < cfg.exploit_fraction <= 0.5:
        raise ConfigError(
            "exploit_fraction", cfg.exploit_fraction, "must be in (0, 0.5]"
        )
    if cfg.exploit_every and cfg.particles < 2:
        raise ConfigError(
            "exploit_every",
            cfg.exploit_every,
            "needs particles >= 2 (clones need a source)",
        )
    if cfg.hparam_move not in ("exploit", "pso", "both"):
        raise ValueError(
            f"hparam_move={cfg.hparam_move!r}: choose from ('exploit', 'pso', 'both')"
        )
    if cfg.hparam_move != "exploit" and not (
        cfg.exploit_every and (cfg.lr_range or cfg.wd_range)
    ):
        raise ValueError(
            f"hparam_move={cfg.hparam_move!r} needs per-particle hyperparameters "
            "(lr_range or wd_range) and exploit_every >= 1"
        )
    if cfg.select_on not in ("batch", "next"):
        raise ConfigError("select_on", cfg.select_on, "choose from ('batch', 'next')")
    if not isinstance(cfg.split_batch, bool):
        raise ConfigError("split_batch", cfg.split_batch, "expected true or false")
    _check_number(cfg, "time_budget", low=0.0, above=True, optional=True)  # seconds
    _validate_narrowing(cfg)
    counts = (cfg.particles, *(keep for _, keep in cfg.narrow_at))
    uneven = [n for n in counts if cfg.batch_size % n]
    if cfg.split_batch and uneven:
        raise ConfigError(
            "batch_size",
            cfg.batch_size,
            f"split_batch shares it among {uneven[0]} particles: use a multiple "
            f"of every particle count ({', '.join(map(str, counts))})",
        )
    _check_int(cfg, "recenter_every", 0)
    if cfg.particle_space != "full":
        needs = (("swarm_over", cfg.swarm_over, "all"), ("init", cfg.init, "perturb"))
        for name, value, fine in needs:
            if value != fine:
                raise ConfigError(
                    name,
                    value,
                    f"particle_space={cfg.particle_space!r} needs {name}={fine!r} "
                    "(its particles are coordinates around one base model)",
                )
    if cfg.recenter_every and cfg.particle_space != "subspace":
        raise ConfigError(
            "recenter_every",
            cfg.recenter_every,
            f"needs particle_space='subspace' (got {cfg.particle_space!r}: only a "
            "subspace re-centres exactly)",
        )


def _validate_narrowing(cfg: TrainConfig) -> None:
    """``narrow_at``: ``(step, keep)`` pairs, both increasing resp. decreasing."""
    pairs = cfg.narrow_at
    expected = (
        "expected (step, keep) pairs of ints, steps >= 1 and increasing, keep "
        f"decreasing from particles={cfg.particles} to >= 1"
    )
    if not isinstance(pairs, tuple):
        raise ConfigError("narrow_at", pairs, expected)
    last_step, alive = 0, cfg.particles
    for pair in pairs:
        ok = isinstance(pair, tuple) and len(pair) == 2
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        if not ok or not last_step < pair[0] or not 1 <= pair[1] < alive:
            raise ConfigError("narrow_at", _pairs_text(pairs), expected)
        last_step, alive = pair


def _pairs_text(pairs) -> Any:
    """``narrow_at`` as the user wrote it (lists as JSON reads them)."""
    if isinstance(pairs, tuple):
        return [list(p) if isinstance(p, tuple) else p for p in pairs]
    return pairs


def particles_at(cfg: TrainConfig, step: int) -> int:
    """The particles a run trains after ``step`` steps (``narrow_at``).

    A narrowing at step ``s`` happens once ``s`` steps are done: the state of
    step ``s`` (its checkpoint included) holds the ``keep`` particles.
    """
    alive = cfg.particles
    for at, keep in cfg.narrow_at:
        if step >= at:
            alive = keep
    return alive


def particle_steps(cfg: TrainConfig, steps: int | None = None) -> int:
    """Particle steps of the run's first ``steps`` steps (default: all of them).

    The run's compute: ``local_steps`` times this is its gradient steps.
    """
    steps = cfg.steps if steps is None else steps
    total, done, alive = 0, 0, cfg.particles
    for at, keep in cfg.narrow_at:
        upto = min(at, steps)
        total += alive * max(0, upto - done)
        done, alive = max(done, upto), keep
    return total + alive * max(0, steps - done)


def read_config(path: str | os.PathLike) -> TrainConfig:
    """Read a run's ``config.json`` back as a :class:`TrainConfig`.

    Raises:
      RunFileError: one line naming the file and what is wrong: missing, not
        JSON (cut short), not an object, an unknown field (written by another
        version?), a missing field (a field silently taking its default could
        rebuild another run), or a field with a bad value.
    """
    path = Path(path)
    stored = _load_json(path)
    if not isinstance(stored, dict):
        raise RunFileError(
            f"{path}: expected a JSON object of TrainConfig fields, got "
            f"{type(stored).__name__}"
        )
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    again = "written by another version of pso_jax, or edited?"
    unknown = [k for k in stored if k not in names]
    _refuse_fields(path, "unknown", unknown, f"not TrainConfig fields: {again}")
    stored = {**{k: v for k, v in _LATER_FIELDS.items() if k not in stored}, **stored}
    _refuse_fields(path, "missing", [k for k in names if k not in stored], again)
    cfg = TrainConfig(**stored)
    try:
        validate_config(cfg)
    except ValueError as e:
        raise RunFileError(f"{path}: field {e}") from None
    return cfg


def _refuse_fields(path: Path, kind: str, fields: list[str], why: str) -> None:
    """A :class:`RunFileError` naming ``fields`` (unknown or missing), if any."""
    if fields:
        raise RunFileError(
            f"{path}: {kind} field{'s' * (len(fields) > 1)} "
            f"{', '.join(map(repr, fields))} ({why})"
        )


def _load_json(path: Path) -> Any:
    """``path``'s JSON; a :class:`RunFileError` naming the file if it has none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RunFileError(
            f"{path}: not found (is {path.parent} a run's work directory?)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunFileError(f"{path}: cannot be read as text ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        what = "empty" if not text.strip() else "not valid JSON"
        raise RunFileError(
            f"{path}: {what} (line {e.lineno} column {e.colno}: {e.msg}); the "
            "file is damaged, e.g. cut short by a full disk"
        ) from None


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """Where a run computes: devices, a data axis, padding (not in ``config.json``).

    The device layout does not define a run's result (the trajectory is the same
    on any device count, up to float rounding), so it is not a
    :class:`TrainConfig` field: a run resumes on another device count.

    Attributes:
      devices: devices of the mesh, over all processes. ``None`` (default):
        one device in a single-process run (the unsharded train step, exactly
        as without this option) and every device in a multi-process run;
        ``0``: every device (``jax.device_count()``); ``N >= 2``: the first
        ``N`` devices, the swarm sharded over them (:mod:`pso_jax.sharding`).
        A multi-process run uses every device.
      data: size of the mesh's ``"data"`` axis, which splits each batch over
        that many devices (the particles over ``devices // data``); for fewer
        particles than devices. Must divide ``devices`` and the batch size.
      pad: when ``particles`` does not divide by the particle axis
        (``devices // data``), add inert particles up to the next multiple
        (they move like the others but never become bests; test evaluation,
        ensembles and reports leave them out); without it such a count raises
        an error naming the valid counts.

    >>> Parallelism(devices=4, data=2).particle_shards(4)
    2
    """

    devices: int | None = None
    data: int = 1
    pad: bool = False

    def __post_init__(self):
        if self.devices is not None and (
            isinstance(self.devices, bool)
            or not isinstance(self.devices, int)
            or self.devices < 0
        ):
            raise ValueError(
                f"devices={self.devices!r}: must be None, 0 (all) or an int >= 1"
            )
        if (
            isinstance(self.data, bool)
            or not isinstance(self.data, int)
            or self.data < 1
        ):
            raise ValueError(f"data={self.data!r}: must be an int >= 1")

    def num_devices(self) -> int:
        """The mesh's device count here (initialises JAX's backend).

        Raises:
          ValueError: for more devices than available, a multi-process run on
            part of the devices, or a ``data`` size that does not divide it.
        """
        available = jax.device_count()
        processes = jax.process_count()
        n = self.devices
        if n is None:
            n = 1 if processes == 1 else available
        elif n == 0:
            n = available
        if n > available:
            platform = jax.devices()[0].platform
            hint = ""
            if platform == "cpu":
                hint = (
                    f"; for {n} simulated CPU devices start with XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={n}"
                )
            raise ValueError(
                f"devices={n}: only {available} {platform} device(s) available "
                f"({processes} process(es)){hint}"
            )
        if processes > 1 and n != available:
            raise ValueError(
                f"devices={n}: a multi-process run uses every device of every "
                f"process ({available}); omit devices or pass all (0)"
            )
        if n % self.data:
            valid = [d for d in range(1, n + 1) if n % d == 0]
            raise ValueError(
                f"data={self.data} does not divide devices={n}; valid data sizes: "
                f"{valid}"
            )
        return n

    def particle_shards(self, num_devices: int) -> int:
        """Devices on the ``"particles"`` axis of a mesh of ``num_devices``."""
        return num_devices // self.data


def _check_layout(cfg: TrainConfig, parallel: Parallelism) -> None:
    """Raise the layout's ValueError now, before data and compilation."""
    num_devices = parallel.num_devices()
    if num_devices == 1:
        return
    if cfg.narrow_at:
        raise ValueError(
            f"narrow_at={_pairs_text(cfg.narrow_at)}: narrowing the swarm runs on "
            f"one device, this layout has {num_devices}; run it on one device "
            "(--devices 1) or without narrowing (--narrow-at '', or --config "
            "hybrid)"
        )
    shards = parallel.particle_shards(num_devices)
    try:
        padded = sharding.padded_num_particles(cfg.particles, shards, parallel.pad)
    except ValueError as e:
        message = str(e).replace("pass pad=True", "pass pad=True (--pad)")
        raise ValueError(f"particles={cfg.particles}: {message}") from None
    if cfg.batch_size % parallel.data:
        raise ValueError(
            f"batch_size={cfg.batch_size} does not divide over data={parallel.data} "
            "devices; choose a batch size that is a multiple of it"
        )
    if cfg.split_batch and parallel.data > 1:
        raise ValueError(
            f"split_batch with data={parallel.data}: the batch is split over the "
            "particles or over the data axis, not both (--data 1)"
        )
    if cfg.split_batch and cfg.batch_size % padded:
        raise ValueError(
            f"split_batch with particles={cfg.particles} padded to {padded}: "
            f"batch_size={cfg.batch_size} is not a multiple of {padded}"
        )
