"""Training runs end to end: configs, the host loop, checkpoints, reports.

:func:`train` is what ``pso-jax train`` runs: it loads the data (preparing the
procedural ``moving_shapes`` dataset if needed), builds the model, the swarm and
the fused train step (:func:`pso_jax.train.make_train_step`), then runs
``steps_per_call`` steps per jitted ``lax.scan`` call with the state donated,
logging every step to ``metrics.jsonl``, checkpointing with orbax, and finally
evaluating the best particle and the top-k ensemble on the test split.

Exact resumes: the batch of step ``s`` is element ``s`` of a seeded, repeated
grain dataset (random access, no iterator state), every random draw derives from
the state's key and step, and checkpoints fall on call boundaries, so a run that
is interrupted (SIGTERM, Ctrl-C) and resumed ends bit for bit where the
uninterrupted run ends.

Several devices and hosts: ``parallel=Parallelism(devices=4)`` (``pso-jax train
--devices 4``) shards the swarm over a mesh (:mod:`pso_jax.sharding`): each device
holds and trains ``particles / devices`` particles in the same jitted
``lax.scan``; the run's numbers are those of the one-device run up to float
rounding. The layout is not part of ``config.json``: a run checkpointed on 8
devices resumes on 2 or on 1. In a multi-process run (after
:func:`pso_jax.sharding.initialize_distributed`) every process runs
:func:`train` alike; checkpoints are written by all of them together (the work
directory must be shared), everything else by process 0 only.

Work directory::

    config.json        the run's TrainConfig (a resume must match it)
    metrics.jsonl      one record per step (and per validation)
    checkpoints/<s>/   orbax checkpoints of the full TrainState
    summary.json       test metrics, timings, throughput (atomic)
    convergence.png    best / mean fitness and validation accuracy vs step
    confusion.png      the best particle's test confusion matrix

>>> cfg = get_config("smoke", steps=4)
>>> cfg.model, cfg.particles, cfg.steps
('c3d', 4, 4)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax import checkpoint as ckpt
from pso_jax.train import BEST_REFRESH, FITNESS_FNS, EvalResult, TrainState

__all__ = [
    "CONFIGS",
    "Parallelism",
    "TrainConfig",
    "evaluate_workdir",
    "get_config",
    "train",
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
        if isinstance(self.patch, (list, tuple)):
            object.__setattr__(self, "patch", tuple(self.patch))

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
    from pso_jax.models import MODELS, STEMS
    from pso_jax.pso import VARIANTS
    from pso_jax.topology import TOPOLOGIES

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
    if cfg.top_k < 1:
        raise ValueError(f"top_k={cfg.top_k!r}: must be >= 1")
    if cfg.swarm_over == "head" and cfg.pretrained is None:
        raise ValueError(
            "swarm_over='head' needs pretrained= (the backbone's saved params)"
        )
    if cfg.pretrained is not None and not os.path.isdir(cfg.pretrained):
        raise ValueError(f"pretrained={cfg.pretrained!r}: no such directory")


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


# -- data ---------------------------------------------------------------------


def _source(cfg: TrainConfig, split: str):
    from pso_jax.data import load_moving_shapes, load_real

    if cfg.dataset == "moving_shapes":
        return load_moving_shapes(
            cfg.dataset_config, split=split, data_dir=cfg.data_dir
        )
    return load_real(cfg.dataset, split=split, data_dir=cfg.data_dir)


def _num_classes(cfg: TrainConfig, source) -> int:
    if cfg.num_classes is not None:
        return cfg.num_classes
    if cfg.dataset == "moving_shapes":
        from pso_jax.data import NUM_CLASSES

        return NUM_CLASSES
    info = getattr(source, "dataset_info", None)
    try:
        return int(info.features["label"].num_classes)
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(
            f"cannot read the number of classes of {cfg.dataset!r}; pass "
            "num_classes (--num-classes)"
        ) from e


def _train_batches(cfg: TrainConfig, source):
    """Random access: element ``s`` is the batch of step ``s`` (exact resumes)."""
    from pso_jax.data import make_dataset

    return make_dataset(
        source,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        num_epochs=None,
        num_frames=cfg.num_frames,
        float_video=False,  # uint8 to the device; converted there (4x less copy)
    )


def _eval_batches(cfg: TrainConfig, source, batch_size: int = 100) -> Iterator[dict]:
    from pso_jax.data import make_dataset

    ds = make_dataset(
        source,
        batch_size=min(batch_size, len(source)),
        seed=cfg.seed,
        shuffle=False,
        num_frames=cfg.num_frames,
        drop_remainder=False,
        float_video=True,
    )
    return iter(ds)


def _to_float(batch: dict) -> dict:
    return {**batch, "video": batch["video"].astype(jnp.float32) / 255.0}


# -- the run -------------------------------------------------------------------


class _Run:
    """What :func:`train` and :func:`evaluate_workdir` build from a config.

    ``mesh`` is ``None`` on one device (the unsharded train step), else the
    swarm's mesh: the optimizer, the trainer (``init``, ``step`` and the
    ``lax.scan`` chunk) and the state are then sharded over it.
    """

    def __init__(self, cfg: TrainConfig, source, parallel: Parallelism | None = None):
        import optax

        from pso_jax import flax_utils, pso, sharding, train
        from pso_jax.data import augment_batch
        from pso_jax.data.augment import augment as augment_clip
        from pso_jax.models import make_model

        self.cfg = cfg
        self.parallel = parallel = parallel or Parallelism()
        num_devices = parallel.num_devices()
        self.mesh = None
        if num_devices > 1:
            self.mesh = sharding.make_mesh(num_devices, data=parallel.data)
        self.num_classes = _num_classes(cfg, source)
        model = make_model(
            cfg.model,
            self.num_classes,
            width=cfg.width,
            stem=cfg.stem,
            patch=cfg.patch,
        )
        dummy = jnp.zeros((1, *_clip_shape(cfg, source)), jnp.float32)
        template = model.init(jax.random.key(0), dummy)["params"]
        mask = None
        if cfg.pretrained is not None:
            template = flax_utils.load_params(cfg.pretrained, template)
        if cfg.swarm_over == "head":
            mask = flax_utils.head_mask(template)
        init_fn = None
        if cfg.init == "independent" and cfg.pretrained is None:

            def init_fn(key, _template):
                return model.init(key, dummy)["params"]

        hparams = {
            k: getattr(cfg, k)
            for k in ("inertia", "cognitive", "social", "init_scale")
            if getattr(cfg, k) is not None
        }
        layout = {}
        if self.mesh is not None:
            layout = dict(mesh=self.mesh, pad=parallel.pad)
        self.optimizer = pso(
            num_particles=cfg.particles,
            variant=cfg.variant,
            topology=cfg.topology,
            maximize=cfg.fitness == "macro_f1",
            mask=mask,
            init_fn=init_fn,
            **layout,
            **hparams,
        )
        # With padding, the swarm's size on the device (cfg.particles + inert).
        self.swarm_size = self.optimizer.num_particles
        batch_fn = None
        data = 1 if self.mesh is None else parallel.data
        if cfg.augment and data == 1:

            def batch_fn(key, batch):
                video, label = augment_batch(key, batch["video"], batch["label"])
                return {**batch, "video": video, "label": label}

        elif cfg.augment:

            def batch_fn(key, batch):
                # This device's slice of the batch on the "data" axis: its clips'
                # keys of the whole batch's draw, so that every clip gets the
                # augmentation it gets on one device (augment_batch's keys).
                n = batch["video"].shape[0]
                keys = jax.random.split(key, n * data)
                row0 = jax.lax.axis_index(sharding.DATA_AXIS) * n
                keys = jax.lax.dynamic_slice_in_dim(keys, row0, n)
                video, label = jax.vmap(augment_clip)(
                    keys, batch["video"], batch["label"]
                )
                return {**batch, "video": video, "label": label}

        def apply_fn(params, video):
            return model.apply({"params": params}, video)

        make_train_step = (
            train.make_train_step if self.mesh is None else sharding.make_train_step
        )
        self.trainer = make_train_step(
            apply_fn,
            self.optimizer,
            fitness=cfg.fitness,
            local_steps=cfg.local_steps,
            grad_optimizer=optax.adam(_learning_rate(cfg)),
            best_refresh=cfg.best_refresh,
            batch_fn=batch_fn,
        )
        self.template = template
        trainer = self.trainer

        def chunk(state, batches):
            return trainer.scan(state, jax.vmap(_to_float)(batches))

        # Sharded, trainer.scan is a lax.scan over the sharded step: still one
        # jitted call per chunk.
        self.chunk = jax.jit(chunk, donate_argnums=0)
        self.init = jax.jit(lambda key: trainer.init(key, template))
        self._top = None

    def abstract_state(self) -> TrainState:
        """The state's shapes and dtypes, with the mesh's shardings if sharded.

        The restore target: a checkpoint written on any device count is read
        straight into this run's layout.
        """
        from pso_jax import sharding

        abstract = jax.eval_shape(self.init, jax.random.key(self.cfg.seed))
        if self.mesh is None:
            return abstract
        return sharding.abstract_state(abstract, self.mesh)

    def device_batches(self, batches: dict) -> dict:
        """Host batches ``[k, B, ...]`` as the chunk's input.

        Sharded: global arrays, replicated or split on ``B`` over ``"data"``
        (each process supplies its devices' parts of the same host batch).
        """
        if self.mesh is None:
            return batches
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from pso_jax import sharding

        spec = P() if self.parallel.data == 1 else P(None, sharding.DATA_AXIS)
        where = NamedSharding(self.mesh, spec)
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(x.shape, where, lambda i: x[i]),
            batches,
        )

    def eval_state(self, state: TrainState, top_k: int) -> TrainState:
        """What :func:`pso_jax.train.evaluate` reads, on this process's host.

        Unsharded: ``state``. Sharded: the best particle and the ``top_k`` best
        personal bests (in the order ``evaluate`` ranks them, so the ensemble is
        the one-device run's), gathered and replicated; the test evaluation then
        runs on one device of each process, as on one device.
        """
        if self.mesh is None:
            return state
        if self._top is None:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            from pso_jax.train import top_particles

            maximize = self.trainer.maximize

            def top(swarm, k):
                # Padding never gets a finite fitness: it ranks last.
                picked, fit = top_particles(swarm, k, maximize)
                return picked, fit, swarm.best_params, swarm.frozen_params

            replicated = NamedSharding(self.mesh, P())
            self._top = jax.jit(top, static_argnums=1, out_shardings=replicated)
        swarm = state.swarm
        picked, fit, best, frozen = jax.tree.map(np.asarray, self._top(swarm, top_k))
        swarm = swarm.replace(
            positions=picked,
            pbest_params=None if swarm.pbest_params is None else picked,
            fitness=fit,
            pbest_fitness=fit,
            best_params=best,
            frozen_params=frozen,
        )
        return state.replace(swarm=swarm, opt_state=None)


def _learning_rate(cfg: TrainConfig):
    import optax

    if cfg.lr_schedule == "constant" or cfg.local_steps == 0:
        return cfg.learning_rate
    return optax.cosine_decay_schedule(
        cfg.learning_rate, decay_steps=max(cfg.steps * cfg.local_steps, 1), alpha=0.05
    )


def _clip_shape(cfg: TrainConfig, source) -> tuple[int, ...]:
    """The model's input clip shape ``[T, H, W, C]``."""
    video = np.asarray(source[0]["video"])
    if video.ndim == 3:
        video = video[..., None]
    if cfg.num_frames is not None:
        video = video[: cfg.num_frames]
    return tuple(video.shape)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)  # atomic


def _check_resume_config(workdir: Path, cfg: TrainConfig) -> None:
    stored = json.loads((workdir / "config.json").read_text())
    differ = {
        k: (stored.get(k), v) for k, v in cfg.to_dict().items() if stored.get(k) != v
    }
    if differ:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"--resume with a configuration different from {workdir}/config.json "
            f"({detail}); resume with the same flags or use another --workdir"
        )


class _Interrupt:
    """Turn SIGTERM/SIGINT into a flag the loop checks between calls."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread no handler can be set: run without.
            with contextlib.suppress(ValueError):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def _metric_records(metrics, first_step: int, wall: float) -> list[dict]:
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


def train(
    cfg: TrainConfig,
    workdir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, TrainState], None] | None = None,
    parallel: Parallelism | None = None,
) -> dict[str, Any]:
    """Train a swarm of video classifiers; write the work directory.

    Args:
      cfg: the run's configuration (:func:`get_config`).
      workdir: the work directory (created).
      resume: continue from the newest checkpoint in ``workdir``; its
        ``config.json`` must equal ``cfg`` (the device layout may differ).
      progress: show a ``rich`` progress bar (on stderr; process 0 only).
      on_step: ``on_step(step, state)`` called on the host after every jitted
        call (for tests and notebooks).
      parallel: the device layout (default: one device, or every device of a
        multi-process run); see :class:`Parallelism`.

    Returns:
      The summary dict (also written to ``summary.json``). If a SIGTERM/SIGINT
      arrived, the run checkpoints, returns early with ``"interrupted": True``
      and writes no summary.

    Raises:
      FileExistsError: ``workdir`` already holds checkpoints and not ``resume``.
      pso_jax.checkpoint.CheckpointError: ``resume`` without a usable checkpoint.
      ValueError: a bad config, or ``resume`` with a different config, or a
        layout that does not fit (too many devices, a particle count that does
        not divide without ``pad``: raised before any data or compilation).
    """
    validate_config(cfg)
    parallel = parallel or Parallelism()
    _check_layout(cfg, parallel)
    main = jax.process_index() == 0  # the process that writes files and logs
    workdir = Path(workdir)
    ckdir = workdir / "checkpoints"
    metrics_path = workdir / "metrics.jsonl"
    existing = ckpt.latest_step(ckdir)
    if resume:
        if existing is None:
            raise ckpt.CheckpointError(f"--resume: no checkpoint in {ckdir}")
        _check_resume_config(workdir, cfg)
    elif existing is not None:
        raise FileExistsError(
            f"{workdir} already holds checkpoints (newest: step {existing}); pass "
            "--resume to continue that run, or choose another --workdir"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train_source = _first_source(cfg, "train")
    batches = _train_batches(cfg, train_source)
    data_seconds = time.perf_counter() - t_start
    run = _Run(cfg, train_source, parallel)
    key = jax.random.key(cfg.seed)
    wall_before = 0.0
    if resume:
        state, meta = _restore(run, ckdir)
        start = int(state.swarm.step)
        wall_before = float(meta.get("wall_seconds", 0.0))
        if main:
            _truncate_metrics(metrics_path, start)
    else:
        if main:
            _write_json(workdir / "config.json", cfg.to_dict())
            metrics_path.write_text("")
        state = run.init(key)
        start = 0
    k = cfg.steps_per_call
    every = cfg.checkpoint_every
    if every:
        every = -(-every // k) * k  # checkpoints fall on call boundaries
    # The newest step on disk; tracked here rather than listed again, as every
    # process of a multi-process run must make the same save calls.
    saved = start if resume else None

    def save(state, step, wall):
        nonlocal saved
        if saved != step:
            # Every process calls it: orbax writes each one's shards.
            ckpt.save(
                ckdir,
                step,
                state,
                meta={
                    "wall_seconds": wall,
                    "config": cfg.to_dict(),
                    "swarm_size": run.swarm_size,
                },
            )
            saved = step

    val_source = _source(cfg, "validation") if cfg.eval_every else None
    compile_seconds = None  # of the first call, which also compiles
    t_loop, loop_start = time.perf_counter(), start
    step = start
    stop = None  # the signal number that stops the run (any process's)
    with (
        _Interrupt() as interrupt,
        open(metrics_path if main else os.devnull, "a") as log,
        _Progress(progress and main, cfg.steps, start, cfg.particles) as bar,
    ):
        while step < cfg.steps and stop is None:
            n = min(k - step % k, cfg.steps - step)
            stacked = jax.tree.map(
                lambda *xs: np.stack(xs), *(batches[step + i] for i in range(n))
            )
            t0 = time.perf_counter()
            state, metrics = run.chunk(state, run.device_batches(stacked))
            # One host sync per chunk (also what keeps simulated CPU devices'
            # collectives from piling up).
            jax.block_until_ready(metrics)
            if compile_seconds is None:
                compile_seconds = time.perf_counter() - t0
                t_loop, loop_start = time.perf_counter(), step + n
            wall = wall_before + time.perf_counter() - t_start
            records = _metric_records(metrics, step, wall)
            for r in records:
                log.write(json.dumps(r) + "\n")
            step += n
            if cfg.eval_every and (step % cfg.eval_every < n or step == cfg.steps):
                res, _ = _evaluate(run, state, val_source, top_k=1)
                log.write(
                    json.dumps({"step": step, "val_accuracy": res.accuracy}) + "\n"
                )
            log.flush()
            bar(step, records[-1])
            if every and step % every == 0:
                save(state, step, wall)
            if on_step is not None:
                on_step(step, state)
            stop = _stop_signal(interrupt)
    wall = wall_before + time.perf_counter() - t_start
    if stop is not None:
        save(state, step, wall)
        return {"interrupted": True, "signal": stop, "steps": step}
    save(state, step, wall)
    timed_steps = step - loop_start
    loop_seconds = time.perf_counter() - t_loop
    summary = _finish(run, state, workdir)
    summary.update(
        steps=step,
        wall_seconds=wall,
        data_seconds=data_seconds,
        compile_seconds=compile_seconds,
        particle_evals_per_second=(
            timed_steps * cfg.particles / loop_seconds if timed_steps else None
        ),
        seconds_per_step=loop_seconds / timed_steps if timed_steps else None,
        config=cfg.to_dict(),
        parallel=_layout(run),
    )
    if main:
        _write_json(workdir / "summary.json", summary)
        _plot_convergence(metrics_path, workdir / "convergence.png", cfg)
    return summary


def _check_layout(cfg: TrainConfig, parallel: Parallelism) -> None:
    """Raise the layout's ValueError now, before data and compilation."""
    from pso_jax import sharding

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


def _layout(run: _Run) -> dict[str, Any]:
    """The run's device layout, for reports (not part of the config)."""
    return {
        "devices": 1 if run.mesh is None else run.mesh.size,
        "data": 1 if run.mesh is None else run.parallel.data,
        "processes": jax.process_count(),
        "swarm_size": run.swarm_size,  # particles + inert padding
    }


def _first_source(cfg: TrainConfig, split: str):
    """``_source``; in a multi-process run process 0 prepares the data first."""
    if jax.process_count() == 1:
        return _source(cfg, split)
    from jax.experimental import multihost_utils

    source = _source(cfg, split) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("pso_jax.experiment data prepared")
    return source if source is not None else _source(cfg, split)


def _stop_signal(interrupt: _Interrupt) -> int | None:
    """The signal that stops the run: this process's, or any process's."""
    if jax.process_count() == 1:
        return interrupt.signum
    from jax.experimental import multihost_utils

    # All processes stop at the same call, or the others would wait forever in
    # the next step's collectives.
    signums = multihost_utils.process_allgather(np.int32(interrupt.signum or 0))
    return int(np.max(signums)) or None


def _restore(run: _Run, ckdir: Path, step: int | None = None):
    """Restore a checkpoint into ``run``'s layout (any device count it was saved on).

    Raises:
      pso_jax.checkpoint.CheckpointError: as ``checkpoint.restore``, or for a
        checkpoint whose swarm was padded to another size than this layout's.
    """
    meta = ckpt.read_meta(ckdir, step=step)
    stored = meta.get("swarm_size", run.swarm_size)
    if stored != run.swarm_size:
        raise ckpt.CheckpointError(
            f"checkpoint in {ckdir} holds a swarm of {stored} particles "
            f"({run.cfg.particles} + {stored - run.cfg.particles} inert padding), "
            f"this layout gives {run.swarm_size}: restore it on a device count "
            "that pads to the same size (the one it was written on, with --pad)"
        )
    return ckpt.restore(ckdir, run.abstract_state(), step=step)


def _evaluate(run: _Run, state: TrainState, source, *, top_k: int):
    from pso_jax.train import evaluate

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


def _finish(run: _Run, state: TrainState, workdir: Path) -> dict[str, Any]:
    """Test metrics of the best particle and the top-k ensemble; confusion plot."""
    from pso_jax.data import LABEL_NAMES

    best, ens = _evaluate(run, state, _source(run.cfg, "test"), top_k=run.cfg.top_k)
    names = LABEL_NAMES if run.cfg.dataset == "moving_shapes" else None
    if jax.process_index() == 0:
        _plot_confusion(best, workdir / "confusion.png", names)
    return {
        "test_accuracy": best.accuracy,
        "test_macro_f1": best.macro_f1,
        "test_per_class_recall": best.per_class_recall,
        "test_confusion": best.confusion,
        "ensemble_size": min(run.cfg.top_k, run.cfg.particles),
        "ensemble_test_accuracy": ens.accuracy,
        "ensemble_test_macro_f1": ens.macro_f1,
        "best_train_fitness": float(state.swarm.best_fitness),
    }


def evaluate_workdir(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    parallel: Parallelism | None = None,
) -> dict[str, Any]:
    """Re-evaluate a saved swarm on the test split (``pso-jax evaluate``).

    Rebuilds the run from ``config.json``, restores checkpoint ``step`` (default:
    the newest), evaluates the best particle and the top-k ensemble, writes
    ``evaluation.json`` and ``confusion.png``, and returns the metrics.

    Args:
      workdir: a run's work directory.
      step: the checkpoint step (default: the newest).
      parallel: the device layout to restore onto (any device count: the
        checkpoint holds global arrays); the swarm must keep the padded size it
        was saved with. Default as for :func:`train`.

    Raises:
      FileNotFoundError: no ``config.json`` in ``workdir``.
      pso_jax.checkpoint.CheckpointError: no usable checkpoint.
      ValueError: a layout that does not fit (see :func:`train`).
    """
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: is {workdir} a run?")
    cfg = TrainConfig(**json.loads(config_path.read_text()))
    parallel = parallel or Parallelism()
    _check_layout(cfg, parallel)
    run = _Run(cfg, _first_source(cfg, "train"), parallel)
    state, _ = _restore(run, workdir / "checkpoints", step=step)
    result = _finish(run, state, workdir)
    result["steps"] = int(state.swarm.step)
    result["parallel"] = _layout(run)
    if jax.process_index() == 0:
        _write_json(workdir / "evaluation.json", result)
    return result


# -- reporting -----------------------------------------------------------------


class _Progress:
    """A rich progress bar (step, best/mean fitness, evals/s, ETA), or nothing."""

    def __init__(self, enabled: bool, total: int, start: int, particles: int):
        self.enabled, self.total, self.start = enabled, total, start
        self.particles = particles

    def __enter__(self):
        if not self.enabled:
            return lambda step, record: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("best {task.fields[best]} mean {task.fields[mean]}"),
            TextColumn("{task.fields[rate]} evals/s"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.progress.__enter__()
        task = self.progress.add_task(
            "train",
            total=self.total,
            completed=self.start,
            best="-",
            mean="-",
            rate="-",
        )
        t0, s0 = time.perf_counter(), self.start

        def update(step, record):
            dt = time.perf_counter() - t0
            rate = f"{(step - s0) * self.particles / dt:.3g}" if step > s0 else "-"
            self.progress.update(
                task,
                completed=step,
                best=f"{record['best_fitness']:.4g}",
                mean=f"{record['mean_fitness']:.4g}",
                rate=rate,
            )

        return update

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)


def _plot_convergence(metrics_path: Path, out: Path, cfg: TrainConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, best, mean, vsteps, vacc = [], [], [], [], []
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        if "val_accuracy" in r:
            vsteps.append(r["step"])
            vacc.append(r["val_accuracy"])
        else:
            steps.append(r["step"])
            best.append(r["best_fitness"])
            mean.append(r["mean_fitness"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(steps, best, label="swarm best")
    ax.plot(steps, mean, label="swarm mean", alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel(cfg.fitness)
    ax.set_title(
        f"{cfg.model} x {cfg.particles} particles, k={cfg.local_steps}, "
        f"{cfg.dataset}/{cfg.dataset_config}"
    )
    if vacc:
        ax2 = ax.twinx()
        ax2.plot(vsteps, vacc, "k.--", label="val accuracy (best)")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("validation accuracy")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_confusion(result: EvalResult, out: Path, names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(result.confusion)
    c = cm.shape[0]
    labels = list(names) if names is not None and len(names) == c else range(c)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(c), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(c), labels, fontsize=8)
    for i in range(c):
        for j in range(c):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test accuracy {result.accuracy:.3f}, macro-F1 {result.macro_f1:.3f}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
