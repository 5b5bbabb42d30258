"""A swarm sharded over devices and hosts: meshes, state layouts, sharded steps.

The particle axis of the swarm is split over the ``"particles"`` axis of a
``jax.sharding.Mesh``; each device stores, evaluates and moves only its own
``num_particles / devices`` particles, so the state memory per device is the
total divided by the devices (evosax and EvoX replicate the state instead).

Why ``jax.shard_map`` and not ``jit`` + ``NamedSharding``: vmapping a model over
particles turns its convolutions into grouped convolutions, which XLA's SPMD
partitioner does not split over devices, so under plain ``jit`` every device
recomputes every particle; and under ``AxisType.Explicit`` meshes the vmapped
convolution fails with ``ShardingTypeError`` (measured, see ``PERF_NOTES.md``
and ``benchmarks/sharding.py``). Inside ``shard_map`` each device runs the
unsharded code on its block of particles, and the few swarm-wide quantities
cross devices by explicit collectives:

- the global best: each shard's best (value and global index) is all-gathered,
  the first of the best wins (so ties resolve as ``argmin`` on one device), and
  its parameters are broadcast by a ``psum`` of their bit patterns (zeros on the
  other shards), which is exact;
- ring and von Neumann neighbourhoods: a halo of the neighbouring shards'
  personal bests by collective permutes (only the rows within reach);
- random informants (SPSO-2011) and CSO's random pairs: the rows a shard needs
  come round the ring of shards, block by block (``ppermute``), so the swarm
  is never gathered on one device (but it all crosses the interconnect each
  step: the fixed topologies are cheaper to shard);
- random numbers: the counter-based hash generator of :mod:`pso_jax.random`
  draws a shard's rows of the unsharded draw (``row_offset``).

So the same seed gives the same trajectory on 1, 2, 4 or 8 devices (and on two
processes as on one), bit for bit, except where the arithmetic differs:

- sums over shards, taken in another order than on one device, agree to float
  rounding: CSO's swarm mean, the ``"init_spread"`` velocity clamp, and means
  over a ``"data"`` axis (the batch split across devices);
- the fitness itself: each device runs ``fitness_fn`` on ``P / devices``
  particles, and XLA may compile a model for another batch size with other
  loop orders (seen as 1-ulp differences in a tiny 3D-conv model's train step
  on 4 and 8 devices). Given the same fitness values the swarm update is exact.

Multi-host (a TPU pod slice, several GPU hosts): call
:func:`initialize_distributed` first in every process, then build the mesh over
all processes' devices (:func:`make_mesh`); the state is a global ``jax.Array``
of which each process holds its devices' particles. Checkpoints store global
arrays, so a swarm saved on one device count restores onto another (restore
into :func:`abstract_state` of the target mesh).

>>> import jax, jax.numpy as jnp, pso_jax
>>> mesh = make_mesh(1)  # all devices by default
>>> opt = pso_jax.pso(lambda x, _: jnp.sum(x**2), num_particles=8, mesh=mesh)
>>> state = jax.jit(opt.init)(jax.random.key(0), jnp.zeros(3))
>>> state, info = jax.jit(opt.step)(jax.random.key(1), state)
>>> state.positions.shape, state_specs(state).positions == P("particles")
((8, 3), True)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pso_jax import train as train_lib
from pso_jax.base import StepInfo, SwarmOptimizer
from pso_jax.pso import PSOState, validate_hparams
from pso_jax.types import PRNGKey, PyTree

__all__ = [
    "DATA_AXIS",
    "PARTICLE_AXIS",
    "ShardedSwarmOptimizer",
    "abstract_state",
    "bytes_per_device",
    "initialize_distributed",
    "make_mesh",
    "make_train_step",
    "mesh_axes",
    "padded_num_particles",
    "shard_optimizer",
    "shard_state",
    "state_shardings",
    "state_specs",
]

PARTICLE_AXIS = "particles"
DATA_AXIS = "data"
# PSOState fields with a leading particle axis; the others are swarm-wide.
_PER_PARTICLE = frozenset(
    ("positions", "velocities", "fitness", "pbest_params", "pbest_fitness", "links")
)
# TrainState fields with a leading particle axis besides the swarm.
_TRAIN_PER_PARTICLE = frozenset(("opt_state",))


class ShardedSwarmOptimizer(NamedTuple):
    """A swarm optimizer whose state is sharded over a mesh's particle axis.

    The first seven fields are those of :class:`~pso_jax.base.SwarmOptimizer`, with
    the same signatures, on global arrays (each call is one ``jax.shard_map``;
    jit it once at the top level), so it works wherever a ``SwarmOptimizer`` does
    (``scan_steps``, ``run``, ``minimize``).

    Attributes:
      init: ``init(key, params_template, hparams=None) -> PSOState`` whose
        per-particle leaves are sharded ``P("particles")``.
      step: ``step(key, state, batch=None, hparams=None) -> (state, StepInfo)``;
        ``batch`` is replicated, or split on its leading axis over ``"data"``.
        ``step.evaluate(state, batch)`` gives the ``[P]`` fitness alone.
      tell: ``tell(key, state, fitness [P], hparams=None)``.
      ask: ``ask(state) -> params`` with ``[P, ...]`` leaves, sharded.
      default_hparams: the variant's ``PSOHyperParams``.
      num_particles: ``P``, padding included.
      config: the static ``PSOConfig`` (``num_shards``, ``num_inert``, ...).
      local: the per-shard ``SwarmOptimizer``: the same functions on one shard's
        particles, with collectives over the mesh axes, for use inside your own
        ``jax.shard_map`` (as :func:`make_train_step` does).
      mesh: the ``jax.sharding.Mesh``.
    """

    init: Callable
    step: Callable
    tell: Callable
    ask: Callable
    default_hparams: Any
    num_particles: int
    config: Any
    local: SwarmOptimizer
    mesh: Mesh


def make_mesh(
    num_devices: int | None = None,
    *,
    data: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Build a device mesh for a sharded swarm.

    Args:
      num_devices: devices to use, the first ones of ``devices`` (default: all
        of them, over every process of a multi-host run).
      data: size of a ``"data"`` axis that splits the batch (for fewer particles
        than devices); ``1`` gives a mesh with the ``"particles"`` axis only.
      devices: the devices (default ``jax.devices()``, global in multi-host runs).

    Returns:
      A ``Mesh`` of axes ``("particles",)`` of size ``num_devices``, or
      ``("particles", "data")`` of shape ``(num_devices // data, data)``; the
      ``"data"`` axis is the inner one, so a particle's data shards sit on
      neighbouring devices (same host, fastest links). Axis types are ``Auto``
      (see the module docstring: ``Explicit`` breaks vmapped convolutions).

    Raises:
      ValueError: for more devices than available, or a ``data`` size that does
        not divide ``num_devices``.

    >>> dict(make_mesh(1).shape)
    {'particles': 1}
    """
    pool = list(jax.devices() if devices is None else devices)
    if num_devices is None:
        num_devices = len(pool)
    if isinstance(num_devices, bool) or not isinstance(num_devices, int):
        raise ValueError(f"num_devices must be an int, got {num_devices!r}")
    if not 1 <= num_devices <= len(pool):
        raise ValueError(
            f"num_devices={num_devices}: must be in [1, {len(pool)}] (the devices "
            f"available: {len(pool)} x {pool[0].platform})"
        )
    if isinstance(data, bool) or not isinstance(data, int) or data < 1:
        raise ValueError(f"data={data!r}: must be an int >= 1")
    if num_devices % data:
        raise ValueError(
            f"data={data} does not divide num_devices={num_devices}; valid data "
            f"sizes: {[d for d in range(1, num_devices + 1) if num_devices % d == 0]}"
        )
    if data == 1:
        shape, names = (num_devices,), (PARTICLE_AXIS,)
    else:
        shape, names = (num_devices // data, data), (PARTICLE_AXIS, DATA_AXIS)
    return jax.make_mesh(
        shape,
        names,
        axis_types=(AxisType.Auto,) * len(shape),
        devices=pool[:num_devices],
    )


def mesh_axes(mesh: Mesh) -> tuple[int, str | None]:
    """``(particle shards, data axis name or None)`` of a swarm mesh.

    Raises:
      ValueError: if the mesh lacks a ``"particles"`` axis or has other axes
        than ``"particles"`` and ``"data"``.
    """
    names = tuple(mesh.axis_names)
    if PARTICLE_AXIS not in names or not set(names) <= {PARTICLE_AXIS, DATA_AXIS}:
        raise ValueError(
            f"a swarm mesh has the axes ('{PARTICLE_AXIS}',) or ('{PARTICLE_AXIS}', "
            f"'{DATA_AXIS}'), got {names}; build one with pso_jax.sharding.make_mesh"
        )
    data = DATA_AXIS if DATA_AXIS in names else None
    return int(mesh.shape[PARTICLE_AXIS]), data


def padded_num_particles(num_particles: int, num_devices: int, pad: bool = False):
    """The swarm size for ``num_devices`` particle shards, padded if allowed.

    Args:
      num_particles: the requested swarm size.
      num_devices: devices on the mesh's ``"particles"`` axis.
      pad: round up to the next multiple (the extra particles are inert).

    Returns:
      ``num_particles`` if it divides evenly, else the next multiple with ``pad``.

    Raises:
      ValueError: naming the valid counts, when it does not divide and ``pad`` is
        False.

    >>> padded_num_particles(10, 4, pad=True)
    12
    """
    if num_particles % num_devices == 0:
        return num_particles
    up = -(-num_particles // num_devices) * num_devices
    if pad:
        return up
    valid = ", ".join(str(num_devices * k) for k in range(1, 4))
    raise ValueError(
        f"num_particles={num_particles} is not divisible by {num_devices} devices "
        f"on the '{PARTICLE_AXIS}' axis; valid counts: {valid}, ... (multiples of "
        f"{num_devices}), or pass pad=True to add {up - num_particles} inert "
        f"particle(s) ({up} in all)"
    )


def _field_specs(state, per_particle, axis, sub=None):
    """``{field: spec}`` for a dataclass state (a prefix for ``shard_map``)."""
    out = {}
    for f in dataclasses.fields(state):
        if sub is not None and f.name in sub:
            out[f.name] = sub[f.name]
        else:
            out[f.name] = P(axis) if f.name in per_particle else P()
    return out


def _swarm_prefix(axis: str) -> PSOState:
    return PSOState(**_field_specs(PSOState, _PER_PARTICLE, axis))


def _train_prefix(axis: str):
    # Built from the dataclass fields so that TrainState can grow fields (they
    # are replicated unless listed in _TRAIN_PER_PARTICLE).
    sub = {"swarm": _swarm_prefix(axis)}
    return train_lib.TrainState(
        **_field_specs(train_lib.TrainState, _TRAIN_PER_PARTICLE, axis, sub)
    )


def state_specs(state: Any, axis: str = PARTICLE_AXIS) -> Any:
    """The ``PartitionSpec`` of every leaf of a swarm or train state.

    Per-particle leaves (positions, velocities, fitness, personal bests, random
    links, and the per-particle optax state of a ``TrainState``) get
    ``P(axis)`` on their leading axis; the rest (bests, bounds, frozen leaves,
    counters, key) ``P()``, replicated.

    Args:
      state: a ``PSOState`` or ``train.TrainState``, of arrays or abstract
        ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
      axis: the particle axis name.

    Returns:
      A tree of ``state``'s structure with ``PartitionSpec`` leaves.
    """
    if isinstance(state, PSOState):
        prefix = _swarm_prefix(axis)
    elif isinstance(state, train_lib.TrainState):
        prefix = _train_prefix(axis)
    else:
        raise ValueError(
            f"state must be a PSOState or a train.TrainState, got {type(state)}"
        )
    return jax.tree.map(
        lambda spec, sub: jax.tree.map(lambda _: spec, sub),
        prefix,
        state,
        is_leaf=lambda x: isinstance(x, P),
    )


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A ``NamedSharding`` for every leaf of ``state`` on ``mesh`` (``state_specs``).

    Use it to place a state (``jax.device_put``), as jit ``out_shardings``, or as
    the target of a checkpoint restore onto another device count:

    >>> import jax, jax.numpy as jnp, pso_jax
    >>> mesh = make_mesh(1)
    >>> opt = pso_jax.pso(num_particles=4, mesh=mesh)
    >>> abstract = jax.eval_shape(opt.init, jax.random.key(0), jnp.zeros(2))
    >>> state_shardings(abstract, mesh).positions.spec == P("particles")
    True
    """
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        state_specs(state),
        is_leaf=lambda x: isinstance(x, P),
    )


def shard_state(state: Any, mesh: Mesh) -> Any:
    """Place ``state`` on ``mesh``: per-particle leaves split, the rest replicated."""
    return jax.device_put(state, state_shardings(state, mesh))


def abstract_state(state: Any, mesh: Mesh) -> Any:
    """``state`` as ``jax.ShapeDtypeStruct`` leaves carrying shardings on ``mesh``.

    The target of a checkpoint restore onto ``mesh``, whatever device count the
    checkpoint was written from (the arrays are global; only the layout changes):
    ``pso_jax.checkpoint.restore(directory, abstract_state(abstract, mesh))``.

    Args:
      state: a ``PSOState`` or ``train.TrainState`` of arrays or abstract leaves
        (``jax.eval_shape`` of the init).
      mesh: the mesh to restore onto.
    """
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=s),
        state,
        state_shardings(state, mesh),
    )


def bytes_per_device(tree: PyTree) -> dict[jax.Device, int]:
    """Bytes of ``tree``'s arrays that each addressable device holds."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def _batch_specs(batch: Any, data_axis: str | None, mesh: Mesh) -> Any:
    """Replicated, or split on the leading axis over ``data_axis``."""
    if data_axis is None:
        return P()
    n = mesh.shape[data_axis]
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = jnp.shape(leaf)
        if not shape or shape[0] % n:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has shape {shape}: with a "
                f"'{data_axis}' axis of {n} devices its leading (batch) axis must be "
                f"divisible by {n}"
            )
    return jax.tree.map(lambda _: P(data_axis), batch)


def _step_info_specs(axis: str) -> StepInfo:
    return StepInfo(*[P(axis) if f == "fitness" else P() for f in StepInfo._fields])


def shard_optimizer(optimizer: SwarmOptimizer, mesh: Mesh) -> ShardedSwarmOptimizer:
    """Wrap a per-shard optimizer's functions in ``jax.shard_map`` over ``mesh``.

    ``pso(..., mesh=mesh)`` calls this for you; ``optimizer`` must have been
    built for the mesh (its config names the particle axis and shard count).

    Args:
      optimizer: the per-shard ``SwarmOptimizer`` (``ShardedSwarmOptimizer.local``).
      mesh: the mesh it was built for.

    Returns:
      A :class:`ShardedSwarmOptimizer`.
    """
    config = optimizer.config
    axis, data_axis = config.particle_axis, config.data_axis
    if axis is None:
        raise ValueError("optimizer is not sharded: build it with pso(..., mesh=mesh)")
    num_shards, mesh_data = mesh_axes(mesh)
    if (num_shards, mesh_data) != (config.num_shards, data_axis):
        raise ValueError(
            f"optimizer was built for {config.num_shards} particle shards (data axis "
            f"{data_axis!r}), the mesh has {num_shards} ({mesh_data!r})"
        )
    swarm = _swarm_prefix(axis)
    info = _step_info_specs(axis)

    def smap(fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)

    def hp_or_default(hparams):
        return optimizer.default_hparams if hparams is None else hparams

    def init(key: PRNGKey, params_template: PyTree, hparams: Any = None) -> PSOState:
        hparams = hp_or_default(hparams)
        validate_hparams(hparams, config.variant)
        fn = smap(optimizer.init, (P(), P(), P()), swarm)
        return fn(key, params_template, hparams)

    def step(key: PRNGKey, state: PSOState, batch: Any = None, hparams: Any = None):
        bspec = _batch_specs(batch, data_axis, mesh)
        fn = smap(optimizer.step, (P(), swarm, bspec, P()), (swarm, info))
        return fn(key, state, batch, hp_or_default(hparams))

    def evaluate(state: PSOState, batch: Any = None) -> jax.Array:
        bspec = _batch_specs(batch, data_axis, mesh)
        fn = smap(optimizer.step.evaluate, (swarm, bspec), P(axis))
        return fn(state, batch)

    def tell(key: PRNGKey, state: PSOState, fitness: jax.Array, hparams: Any = None):
        fitness = jnp.asarray(fitness)
        if fitness.shape != (config.num_particles,):
            raise ValueError(
                f"fitness must have shape ({config.num_particles},) (one scalar per "
                f"particle), got {fitness.shape}"
            )
        fn = smap(optimizer.tell, (P(), swarm, P(axis), P()), (swarm, info))
        return fn(key, state, fitness, hp_or_default(hparams))

    def ask(state: PSOState) -> PyTree:
        return smap(optimizer.ask, (swarm,), P(axis))(state)

    step.evaluate = evaluate
    return ShardedSwarmOptimizer(
        init=init,
        step=step,
        tell=tell,
        ask=ask,
        default_hparams=optimizer.default_hparams,
        num_particles=config.num_particles,
        config=config,
        local=optimizer,
        mesh=mesh,
    )


def make_train_step(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    optimizer: ShardedSwarmOptimizer,
    *,
    fitness: str | Callable[[jax.Array, jax.Array], jax.Array] = "cross_entropy",
    grad_loss: Callable[[jax.Array, jax.Array], jax.Array] = train_lib.cross_entropy,
    **kwargs: Any,
) -> train_lib.Trainer:
    """The fused swarm train step of :func:`pso_jax.train.make_train_step`, sharded.

    Each device runs the train step on its own particles (their forward passes,
    gradient steps and swarm update), inside one ``jax.shard_map``; bests and
    metrics cross devices as in :class:`ShardedSwarmOptimizer`. With a ``"data"``
    axis each device sees its slice of the batch and the fitness is combined
    over the slices: ``"cross_entropy"``, ``"error_rate"``, a callable fitness and
    ``grad_loss`` by their mean (so a callable must be a mean over the batch),
    ``"macro_f1"`` from the summed confusion matrices (exact).

    Args:
      apply_fn: as for :func:`pso_jax.train.make_train_step`.
      optimizer: from ``pso(..., mesh=mesh)``.
      fitness, grad_loss, **kwargs: as for :func:`pso_jax.train.make_train_step`.

    A ``batch_fn`` (augmentation) runs inside the ``shard_map``: with a
    ``"data"`` axis it sees only this device's slice of the batch and the same
    key on every slice, so it must draw per clip from the slice's position in
    the whole batch (``jax.lax.axis_index("data")``) to match the unsharded run
    (as :func:`pso_jax.experiment.train` does), or its slices get correlated
    draws.

    Returns:
      A :class:`pso_jax.train.Trainer` whose ``init``, ``step`` and ``scan`` take
      and return global (sharded) train states. ``step`` takes the global batch
      (replicated, or split on its leading axis over ``"data"``); ``scan`` a
      stack of them (``[k, B, ...]``) and runs ``k`` sharded steps in one
      ``lax.scan``. The metrics equal the unsharded step's; ``grad_loss`` is the
      mean over shards (equal up to float rounding; with ``pad`` it includes the
      inert particles' gradient steps). ``evaluate_logits`` is the unsharded
      one: evaluate gathered particles on one device.
    """
    if not isinstance(optimizer, ShardedSwarmOptimizer):
        raise ValueError(
            "optimizer must be a ShardedSwarmOptimizer (pso(..., mesh=mesh)), got "
            f"{type(optimizer).__name__}; use pso_jax.train.make_train_step otherwise"
        )
    config, mesh = optimizer.config, optimizer.mesh
    axis, data_axis = config.particle_axis, config.data_axis
    # Validates fitness / kwargs and gives the direction before any wrapping.
    plain = train_lib.make_train_step(
        apply_fn, optimizer.local, fitness=fitness, grad_loss=grad_loss, **kwargs
    )
    maximize = plain.maximize
    if data_axis is None:
        trainer = plain
    else:

        def apply_on_data_slice(params, video):
            # The parameters enter the model already varying over the data
            # axis, as the video slice does. For plain autodiff this changes
            # nothing (the psum of the slices' gradients is this cast's
            # transpose either way), but a model with a custom VJP (e.g.
            # pso_jax.models.layers.call_per_particle) must return cotangents
            # typed like its inputs, and its gradients vary over the slices.
            return apply_fn(_vary_over(params, data_axis), video)

        trainer = train_lib.make_train_step(
            apply_on_data_slice,
            optimizer.local,
            fitness=_data_fitness(fitness, data_axis),
            grad_loss=_data_mean(grad_loss, data_axis),
            **kwargs,
        )
    state_prefix = _train_prefix(axis)
    sign = -1.0 if maximize else 1.0

    def init(key: PRNGKey, params_template: PyTree, hparams: Any = None):
        if hparams is None:
            hparams = optimizer.default_hparams
        validate_hparams(hparams, config.variant)
        fn = jax.shard_map(
            trainer.init,
            mesh=mesh,
            in_specs=(P(), P(), P()),
            out_specs=state_prefix,
        )
        return fn(key, params_template, hparams)

    def local_step(key, state, batch, hparams):
        new, m = trainer.step(key, state, batch, hparams)
        acc = m.batch_accuracy
        if data_axis is not None:
            acc = jax.lax.pmean(acc, data_axis)
        # This batch's best particle: the first best of the shards' bests, as
        # argmin over the whole swarm would pick.
        k = jnp.where(
            jnp.isfinite(m.batch_best_fitness), sign * m.batch_best_fitness, jnp.inf
        )
        s = jnp.argmin(_all_gather(k, axis))
        m = m._replace(
            batch_best_fitness=_all_gather(m.batch_best_fitness, axis)[s],
            batch_accuracy=_all_gather(acc, axis)[s],
            grad_loss=jax.lax.pmean(m.grad_loss, axis),
        )
        # Swarm-wide values that every shard computed alike (e.g. the best's
        # re-evaluation, stacked with the shard's own particles) are typed as
        # varying: take shard 0's, exactly.
        new = jax.tree.map(
            lambda spec, sub: sub if spec != P() else jax.tree.map(_invariant, sub),
            state_prefix,
            new,
            is_leaf=lambda x: isinstance(x, P),
        )
        return new, jax.tree.map(_invariant, m)

    def step(key: Any, state: Any, batch: Any, hparams: Any = None):
        if hparams is None:
            hparams = optimizer.default_hparams
        metrics_spec = P()  # every metric is swarm-wide (a prefix for all fields)
        fn = jax.shard_map(
            local_step,
            mesh=mesh,
            in_specs=(P(), state_prefix, _batch_specs(batch, data_axis, mesh), P()),
            out_specs=(state_prefix, metrics_spec),
        )
        return fn(key, state, batch, hparams)

    def scan(state: Any, batches: Any, hparams: Any = None):
        # The plain trainer's scan closes over the per-shard step: scan the
        # sharded one instead. Still one computation under jit, and the carry
        # keeps its layout (each step's shard_map takes and gives the same specs).
        return jax.lax.scan(lambda s, b: step(None, s, b, hparams), state, batches)

    # evaluate_logits: the plain one, for gathered particles outside shard_map.
    return trainer._replace(
        init=init, step=step, scan=scan, evaluate_logits=plain.evaluate_logits
    )


def _vary_over(tree: PyTree, axis: str) -> PyTree:
    """``tree`` typed as varying over ``axis`` inside ``shard_map`` (a no-op cast)."""

    def one(x):
        if axis in _varying_axes(x):
            return x
        return jax.lax.pcast(x, axis, to="varying")

    return jax.tree.map(one, tree)


def _invariant(x: jax.Array) -> jax.Array:
    """``x`` as the value of the first device along every mesh axis it varies on.

    For values that are equal on all devices but computed from varying inputs
    (which ``shard_map``'s replication check cannot know). A ``psum`` of the bit
    patterns, zeros elsewhere: exact for any dtype. No-op when ``x`` is already
    invariant.
    """
    axes = tuple(sorted(_varying_axes(x)))
    if not axes:
        return x
    first = sum(jax.lax.axis_index(a) for a in axes) == 0
    if x.dtype == jnp.bool_:
        return jax.lax.psum(jnp.where(first, x, False).astype(jnp.int32), axes) > 0
    uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}
    bits = jax.lax.bitcast_convert_type(x, uint[x.dtype.itemsize])
    bits = jax.lax.psum(jnp.where(first, bits, jnp.zeros_like(bits)), axes)
    return jax.lax.bitcast_convert_type(bits, x.dtype)


def _varying_axes(x: jax.Array) -> frozenset:
    """The mesh axes along which ``x`` may differ, inside ``shard_map``."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax 0.10; older releases call it vma
    return mat.varying if mat is not None else getattr(aval, "vma", frozenset())


def _all_gather(x, axis):
    # "invarying": the same on every shard, as the replicated out_specs require.
    return jax.lax.all_gather(x, axis, to="invarying")


def _data_mean(fn: Callable, data_axis: str) -> Callable:
    def mean_over_data(logits, labels):
        return jax.lax.pmean(fn(logits, labels), data_axis)

    return mean_over_data


def _data_fitness(fitness: str | Callable, data_axis: str) -> Callable:
    if fitness == "macro_f1":

        def macro_f1(logits, labels):
            cm = train_lib.confusion_matrix(
                jnp.argmax(logits, -1), labels, logits.shape[-1]
            )
            return train_lib.macro_f1_from_confusion(jax.lax.psum(cm, data_axis))

        return macro_f1
    named = {
        "cross_entropy": train_lib.cross_entropy,
        "error_rate": train_lib.error_rate,
    }
    return _data_mean(named.get(fitness, fitness), data_axis)


_ENV = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    auto: bool = False,
) -> bool:
    """Join a multi-process JAX run (``jax.distributed.initialize``), if configured.

    Call it in every process before any other JAX call. Unset arguments fall back
    to the environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. On a Cloud TPU pod slice, or
    under SLURM, Open MPI or Kubernetes, pass ``auto=True``: JAX then detects
    the values left unset from the cluster environment.

    CPU processes communicate through gloo collectives (enabled here if the
    installed JAX does not default to them).

    Args:
      coordinator: ``"host:port"`` of process 0, reachable from every process.
      num_processes: number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: restrict this process to these local devices.
      auto: let JAX detect unset values from the cluster environment.

    Returns:
      True if the distributed runtime is now initialized (it already was, or
      this call did it); False for a single-process run (nothing configured, or
      ``num_processes == 1``).

    Raises:
      ValueError: for a partial or invalid configuration, naming the bad value.
    """
    vals = {"coordinator": coordinator, "num_processes": num_processes}
    vals["process_id"] = process_id
    for name, env in _ENV.items():
        if vals[name] is None and os.environ.get(env):
            vals[name] = os.environ[env]
    for name in ("num_processes", "process_id"):
        v = vals[name]
        if v is not None and not isinstance(v, int):
            try:
                vals[name] = int(v)
            except ValueError:
                raise ValueError(
                    f"{name}={v!r} (or ${_ENV[name]}) must be an int"
                ) from None
    if jax.distributed.is_initialized():
        return True
    if not auto and all(v is None for v in vals.values()):
        return False
    if vals["num_processes"] == 1:
        return False
    missing = [f"{k} (${_ENV[k]})" for k, v in vals.items() if v is None]
    if missing and not auto:
        raise ValueError(
            f"multi-process run needs {', '.join(missing)} as well, or auto=True on "
            "a cluster JAX detects (TPU pod, SLURM, Open MPI, Kubernetes)"
        )
    n, i, coord = vals["num_processes"], vals["process_id"], vals["coordinator"]
    if n is not None and n < 1:
        raise ValueError(f"num_processes={n}: must be >= 1")
    if n is not None and i is not None and not 0 <= i < n:
        raise ValueError(f"process_id={i}: must be in [0, num_processes={n})")
    if coord is not None and (":" not in coord or not coord.rsplit(":", 1)[1]):
        raise ValueError(f"coordinator={coord!r}: expected 'host:port'")
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coord,
        num_processes=n,
        process_id=i,
        local_device_ids=local_device_ids,
    )
    return True
