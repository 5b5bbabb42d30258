"""Run configurations: what defines a training run, and where it computes.

- :class:`TrainConfig`: every field that defines a run's result (stored as
  ``config.json``; a resume must match it), :data:`CONFIGS` (the named presets),
  :func:`get_config` (a preset with overrides) and :func:`validate_config`.
- :class:`Parallelism`: the device layout (devices, a ``"data"`` axis, padding),
  which is not part of a run's result and so not of ``config.json``; and
  ``_check_layout``, which rejects a layout before any data or compilation.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax

from pso_jax import sharding
from pso_jax.models import MODELS, STEMS
from pso_jax.population import check_ranges
from pso_jax.pso import VARIANTS
from pso_jax.topology import TOPOLOGIES
from pso_jax.train import BEST_REFRESH, FITNESS_FNS

__all__ = [
    "CONFIGS",
    "Parallelism",
    "TrainConfig",
    "get_config",
    "validate_config",
]


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
        ``steps * local_steps`` gradient steps) or ``"constant"``.
      weight_decay: AdamW's decoupled weight decay (0: plain Adam).
      lr_range, wd_range: ``(low, high)``: every particle draws its own (peak)
        learning rate / weight decay log-uniformly over the range (Population
        Based Training; :func:`pso_jax.train.make_train_step`'s
        ``grad_hparams``); ``None``: every particle uses ``learning_rate`` /
        ``weight_decay``.
      exploit_every: every this many steps the worst ``exploit_fraction`` of
        the particles clone good ones, hyperparameters perturbed (PBT); 0: never.
      exploit_fraction: see ``exploit_every`` (in ``(0, 0.5]``).
      select_on: the batch the swarm's fitness is measured on: ``"batch"`` (the
        one the gradient steps just fitted) or ``"next"`` (the next training
        batch, which they have not seen: selection on held-out data).
      time_budget: stop training after this many wall seconds (``steps`` is
        then an upper bound; the learning-rate schedule still spans ``steps``),
        then evaluate. Runs stopped by the clock are not repeatable step for
        step.
      batch_size: clips per step, shared by every particle.
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
      pretrained: path of params saved with
        :func:`pso_jax.flax_utils.save_params` to start every particle from.
      swarm_over: ``"all"`` parameters, or only the ``"head"`` (the rest frozen,
        stored once, not per particle; needs ``pretrained``).
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
    weight_decay: float = 0.0
    lr_range: tuple[float, float] | None = None
    wd_range: tuple[float, float] | None = None
    exploit_every: int = 0
    exploit_fraction: float = 0.25
    select_on: str = "batch"
    time_budget: float | None = None
    batch_size: int = 32
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
    seed: int = 0

    def __post_init__(self):
        # From JSON (config.json) or the command line, a list: store a tuple.
        for name in ("patch", "lr_range", "wd_range"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples as lists, as JSON reads them back)."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()
        }


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
    # `make demo`: the hybrid on moving_shapes/small in a few minutes on 2 cores.
    # Gentle PSO coefficients: after k Adam steps, the textbook w=0.73,
    # c1=c2=1.5 pull throws each particle about its bests by a large share of
    # their distance, per coordinate, and undoes Adam's progress: at 150 steps,
    # validation accuracy 0.26 with them, 0.68 with 0.3/0.3/0.3, 0.63 with no
    # swarm update at all (independent Adam particles); same machine and run.
    "demo": TrainConfig(
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
        inertia=0.3,  # the hybrid's gentle coefficients, as in "demo"
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
    """Raise a ValueError naming the first bad field of ``cfg``."""

    def positive(name):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an int >= 1")

    for name in ("width", "particles", "steps", "batch_size", "steps_per_call"):
        positive(name)
    patch = cfg.patch
    if (
        not isinstance(patch, tuple)
        or len(patch) != 3
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in patch)
        or min(patch) < 1
    ):
        raise ValueError(f"patch={patch!r}: must be three ints >= 1 (pt, ph, pw)")
    for name in ("local_steps", "eval_every", "checkpoint_every"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}: must be an int >= 0")
    for name, allowed in (
        ("model", tuple(MODELS)),
        ("stem", STEMS),
        ("variant", VARIANTS),
        ("fitness", FITNESS_FNS),
        ("best_refresh", BEST_REFRESH),
        ("init", ("independent", "perturb")),
        ("swarm_over", ("all", "head")),
        ("lr_schedule", ("cosine", "constant")),
    ):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: choose from {allowed}")
    if cfg.topology is not None and cfg.topology not in TOPOLOGIES:
        raise ValueError(f"topology={cfg.topology!r}: choose from {TOPOLOGIES}")
    if not (cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate)):
        raise ValueError(f"learning_rate={cfg.learning_rate!r}: must be > 0")
    _validate_population(cfg)
    if cfg.top_k < 1:
        raise ValueError(f"top_k={cfg.top_k!r}: must be >= 1")
    if cfg.swarm_over == "head" and cfg.pretrained is None:
        raise ValueError(
            "swarm_over='head' needs pretrained= (the backbone's saved params)"
        )
    if cfg.pretrained is not None and not os.path.isdir(cfg.pretrained):
        raise ValueError(f"pretrained={cfg.pretrained!r}: no such directory")


def _validate_population(cfg: TrainConfig) -> None:
    """The per-particle hyperparameter, exploit, selection and budget fields."""
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise ValueError(f"weight_decay={cfg.weight_decay!r}: must be >= 0")
    ranges = {"lr_range": cfg.lr_range, "wd_range": cfg.wd_range}
    for name, rng in ranges.items():
        if rng is None:
            continue
        try:
            check_ranges({name: rng})
        except ValueError:
            raise ValueError(
                f"{name}={rng!r}: expected two numbers 0 < low <= high"
            ) from None
    value = cfg.exploit_every
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"exploit_every={value!r}: must be an int >= 0")
    if not 0 < cfg.exploit_fraction <= 0.5:
        raise ValueError(
            f"exploit_fraction={cfg.exploit_fraction!r}: must be in (0, 0.5]"
        )
    if cfg.exploit_every and cfg.particles < 2:
        raise ValueError("exploit_every needs particles >= 2 (clones need a source)")
    if cfg.select_on not in ("batch", "next"):
        raise ValueError(f"select_on={cfg.select_on!r}: choose from ('batch', 'next')")
    budget = cfg.time_budget
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"time_budget={budget!r}: must be > 0 seconds")


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
    shards = parallel.particle_shards(num_devices)
    try:
        sharding.padded_num_particles(cfg.particles, shards, parallel.pad)
    except ValueError as e:
        message = str(e).replace("pass pad=True", "pass pad=True (--pad)")
        raise ValueError(f"particles={cfg.particles}: {message}") from None
    if cfg.batch_size % parallel.data:
        raise ValueError(
            f"batch_size={cfg.batch_size} does not divide over data={parallel.data} "
            "devices; choose a batch size that is a multiple of it"
        )
