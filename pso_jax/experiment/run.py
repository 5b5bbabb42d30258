"""What a run builds from its config: model, swarm, train step, device layout.

- ``_Run``: the model (its head a pretext task's when ``cfg.objective``:
  :mod:`pso_jax.pretext`), the swarm optimizer (sharded over a mesh on several
  devices), the fused train step (:func:`pso_jax.train.make_train_step`; the
  loop runs its ``scan`` in chunks); the state's abstract shape (a restore
  target), the host batches as a chunk's input, and the gathered state that
  evaluation reads.
- ``_restore``: a checkpoint into a run's layout (saved on any device count).
- ``_layout``: the run's device layout, for reports.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pso_jax import checkpoint as ckpt
from pso_jax import flax_utils, particle_space, sharding
from pso_jax.experiment.config import Parallelism, TrainConfig
from pso_jax.experiment.input_pipeline import (
    _batch_fn,
    _clip_shape,
    _num_classes,
)
from pso_jax.experiment.pretrained import _load_pretrained
from pso_jax.models import make_model
from pso_jax.pretext import make_task, task_batch_fn
from pso_jax.pso import pso
from pso_jax.train import (
    Trainer,
    TrainState,
    cross_entropy,
    make_train_step,
    top_particles,
)


class _Run:
    """What :func:`train` and :func:`evaluate_workdir` build from a config.

    ``mesh`` is ``None`` on one device (the unsharded train step), else the
    swarm's mesh: the optimizer, the trainer (``init``, ``step``, ``scan``) and
    the state are then sharded over it.

    ``particles``: the swarm's size in this phase of the run (default
    ``cfg.particles``; fewer after a narrowing, ``cfg.narrow_at``; see
    :func:`_phase_config`).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        source,
        parallel: Parallelism | None = None,
        particles: int | None = None,
    ):
        self.cfg, self.source = cfg, source
        self.particles = particles = cfg.particles if particles is None else particles
        phase = _phase_config(cfg, particles)
        self.parallel = parallel = parallel or Parallelism()
        num_devices = parallel.num_devices()
        self.mesh = None
        if num_devices > 1:
            self.mesh = sharding.make_mesh(num_devices, data=parallel.data)
        # A pretext run's head predicts its task's targets, not classes.
        self.task = None
        if cfg.objective is not None:
            clip = _clip_shape(cfg, source)
            self.task = make_task(
                cfg.objective, clip, cfg.patch, mask_ratio=cfg.mask_ratio
            )
            self.num_classes = self.task.num_outputs
        else:
            self.num_classes = _num_classes(cfg, source)
        model = make_model(
            cfg.model,
            self.num_classes,
            width=cfg.width,
            stem=cfg.stem,
            patch=cfg.patch,
            decoder_grid=self.task.grid if cfg.decoder == "dense" else None,
        )
        dummy = jnp.zeros((1, *_clip_shape(cfg, source)), jnp.float32)
        template = model.init(jax.random.key(0), dummy)["params"]
        if cfg.pretrained is not None:
            template = _load_pretrained(cfg, template)
        self.space = particle_space.make_space(
            cfg.particle_space, rank=cfg.rank, dim=cfg.subspace_dim, seed=cfg.seed
        )
        template = self.space.template(template)
        self.optimizer = _make_optimizer(
            phase, model, dummy, template, self.mesh, parallel.pad, self.space
        )
        # With padding, the swarm's size on the device (cfg.particles + inert).
        self.swarm_size = self.optimizer.num_particles
        data = 1 if self.mesh is None else parallel.data
        # One whole model's forward pass (in cfg.dtype), on decoded params.
        self.model_fn = _model_fn(model, cfg.dtype)
        if self.task is None:
            batch_fn = _batch_fn(cfg, data)
        else:
            batch_fn = task_batch_fn(self.task, data)
        self.trainer = _make_trainer(
            phase, self.model_fn, self.optimizer, batch_fn, self.space, self.task
        )
        self.template = template
        trainer = self.trainer

        self.init = jax.jit(lambda key: trainer.init(key, template))
        self._top = None
        if self.mesh is not None:
            self._top = _gather_top(trainer.maximize, self.mesh)

    def abstract_state(self) -> TrainState:
        """The state's shapes and dtypes, with the mesh's shardings if sharded.

        The restore target: a checkpoint written on any device count is read
        straight into this run's layout.
        """
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


def _phase_config(cfg: TrainConfig, particles: int) -> TrainConfig:
    """``cfg`` for a phase of ``particles`` (after a narrowing, ``narrow_at``).

    A swarm too small for the exploit to clone anyone (``exploit_fraction *
    particles < 1``) stops exploiting (``hparam_move="both"`` keeps its PSO
    move while two particles are left), and one particle moves nothing.
    """
    if particles == cfg.particles:
        return cfg
    every, move = cfg.exploit_every, cfg.hparam_move
    if int(cfg.exploit_fraction * particles) < 1 and move != "pso":
        every, move = (every, "pso") if move == "both" else (0, move)
    if particles < 2:
        every, move = 0, "exploit"
    return dataclasses.replace(
        cfg, particles=particles, exploit_every=every, hparam_move=move, narrow_at=()
    )


def _make_optimizer(cfg: TrainConfig, model, dummy, template, mesh, pad: bool, space):
    """The run's swarm (over ``mesh`` if not ``None``) around ``template``
    (``space.template`` of the model's parameters)."""
    mask = space.mask(template)
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
    if mesh is not None:
        layout = dict(mesh=mesh, pad=pad)
    return pso(
        num_particles=cfg.particles,
        variant=cfg.variant,
        topology=cfg.topology,
        maximize=cfg.fitness == "macro_f1",
        mask=mask,
        init_fn=init_fn,
        **layout,
        **hparams,
    )


def _model_fn(model, dtype: str):
    """``fn(params, video) -> logits``: one whole model, computing in ``dtype``."""

    def model_fn(params, video):
        return model.apply({"params": params}, video)

    return flax_utils.with_compute_dtype(model_fn, dtype)


def _make_trainer(
    cfg: TrainConfig, model_fn, optimizer, batch_fn, space, task=None
) -> Trainer:
    """The fused train step; sharded when ``optimizer`` is (``pso(mesh=...)``).

    With a pretext ``task``, its loss is the fitness and the gradient loss.
    """
    apply_fn = space.wrap(model_fn)
    recenter_fn = None
    if cfg.recenter_every:
        recenter_fn = functools.partial(
            particle_space.recenter,
            space,
            redraw=True,
            maximize=cfg.fitness == "macro_f1",
        )

    ranges = {}
    if cfg.lr_range is not None:
        ranges["learning_rate"] = cfg.lr_range
    if cfg.wd_range is not None:
        ranges["weight_decay"] = cfg.wd_range
    return make_train_step(
        apply_fn,
        optimizer,
        fitness=cfg.fitness if task is None else task.loss,
        grad_loss=cross_entropy if task is None else task.loss,
        local_steps=cfg.local_steps,
        grad_optimizer=_grad_optimizer(cfg) if ranges else _adam(cfg),
        best_refresh=cfg.best_refresh,
        batch_fn=batch_fn,
        grad_hparams=ranges or None,
        exploit_every=cfg.exploit_every,
        exploit_fraction=cfg.exploit_fraction,
        hparam_move=cfg.hparam_move,
        recenter_fn=recenter_fn,
        recenter_every=cfg.recenter_every,
        split_batch=cfg.split_batch,
    )


def _adam(cfg: TrainConfig, learning_rate=None, weight_decay=None):
    """Adam at the config's schedule; AdamW with a weight decay.

    ``learning_rate`` (the schedule's peak) and ``weight_decay`` override the
    config's: a particle's own traced values under PBT.
    """
    if learning_rate is None and weight_decay is None and cfg.weight_decay == 0:
        return optax.adam(_learning_rate(cfg))
    peak = cfg.learning_rate if learning_rate is None else learning_rate
    decay = cfg.weight_decay if weight_decay is None else weight_decay
    if cfg.lr_schedule == "constant" or cfg.local_steps == 0:
        return optax.adamw(peak, weight_decay=decay)
    shape = _schedule(cfg, 1.0)
    return optax.adamw(lambda count: peak * shape(count), weight_decay=decay)


def _grad_optimizer(cfg: TrainConfig):
    """``f(learning_rate=, weight_decay=)``: a particle's own AdamW (PBT)."""

    def grad_optimizer(learning_rate=None, weight_decay=None):
        return _adam(cfg, learning_rate, weight_decay)

    return grad_optimizer


def _decay_steps(cfg: TrainConfig) -> int:
    """The gradient steps the cosine schedule spans: ``schedule_steps`` (or
    ``steps``) swarm steps of ``local_steps`` each; optax holds it at its floor
    after."""
    return max((cfg.schedule_steps or cfg.steps) * cfg.local_steps, 1)


def _schedule(cfg: TrainConfig, peak: float):
    """The cosine schedule to 5 % of ``peak``, after ``lr_warmup``'s linear rise."""
    steps = _decay_steps(cfg)
    if not cfg.lr_warmup:
        return optax.cosine_decay_schedule(peak, decay_steps=steps, alpha=0.05)
    return optax.warmup_cosine_decay_schedule(
        0.0,
        peak,
        warmup_steps=max(int(cfg.lr_warmup * steps), 1),
        decay_steps=steps,
        end_value=0.05 * peak,
    )


def _learning_rate(cfg: TrainConfig):
    if cfg.lr_schedule == "constant" or cfg.local_steps == 0:
        return cfg.learning_rate
    return _schedule(cfg, cfg.learning_rate)


def _gather_top(maximize: bool, mesh) -> Callable:
    """A jitted ``top(swarm, k)``: the ``k`` best particles, replicated on ``mesh``.

    Returns the ``k`` best personal bests (``[k, ...]``) and their fitness, with
    the swarm's best and frozen parameters.
    """

    def top(swarm, k):
        # Padding never gets a finite fitness: it ranks last.
        picked, fit = top_particles(swarm, k, maximize)
        return picked, fit, swarm.best_params, swarm.frozen_params

    replicated = NamedSharding(mesh, P())
    return jax.jit(top, static_argnums=1, out_shardings=replicated)


def _restore(run: _Run, ckdir: Path, step: int | None = None):
    """Restore a checkpoint into ``run``'s layout (any device count it was saved on).

    The step's content is verified against its stored checksums (see
    :mod:`pso_jax.checkpoint`), so ``evaluate`` and ``--resume`` never load a
    damaged swarm.

    Raises:
      pso_jax.checkpoint.CheckpointError: as ``checkpoint.restore`` (a damaged
        step names the newest intact earlier one), or for a checkpoint whose
        swarm was padded to another size than this layout's.
    """
    try:
        meta = ckpt.read_meta(ckdir, step=step)
    except ckpt.CheckpointError:
        # A missing or damaged step: the restore below raises the full error
        # (for a damaged step, with the newest intact earlier step).
        meta = {}
    stored = meta.get("swarm_size", run.swarm_size)
    if stored != run.swarm_size:
        raise ckpt.CheckpointError(
            f"checkpoint in {ckdir} holds a swarm of {stored} particles "
            f"({run.particles} + {stored - run.particles} inert padding), "
            f"this layout gives {run.swarm_size}: restore it on a device count "
            "that pads to the same size (the one it was written on, with --pad)"
        )
    return ckpt.restore(ckdir, run.abstract_state(), step=step)


def _layout(run: _Run) -> dict[str, Any]:
    """The run's device layout, for reports (not part of the config)."""
    return {
        "devices": 1 if run.mesh is None else run.mesh.size,
        "data": 1 if run.mesh is None else run.parallel.data,
        "processes": jax.process_count(),
        "swarm_size": run.swarm_size,  # particles + inert padding
    }
