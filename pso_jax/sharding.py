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
same kernel as one device does on its block of particles: the kernel is
written once against the swarm axis of :mod:`pso_jax.swarm_axis`, whose
``ShardedAxis`` makes the few swarm-wide quantities cross devices by explicit
collectives:

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

from pso_jax.base import PARTICLE_AXIS_FIELD, SUBSTATE_FIELD, StepInfo, SwarmOptimizer
from pso_jax.swarm_axis import ShardedAxis, invariant
from pso_jax.types import PRNGKey, PyTree

__all__ = [
    "DATA_AXIS",
    "PARTICLE_AXIS",
    "ShardedSwarmOptimizer",
    "abstract_state",
    "bytes_per_device",
    "initialize_distributed",
    "batch_specs",
    "make_mesh",
    "mesh_axes",
    "padded_num_particles",
    "shard_init",
    "shard_optimizer",
    "shard_state",
    "shard_step",
    "state_prefix",
    "state_shardings",
    "state_specs",
    "swarm_axis",
]

PARTICLE_AXIS = "particles"
DATA_AXIS = "data"


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
      tell: ``tell(key, state, fitness [P], hparams=None)``.
      ask: ``ask(state) -> params`` with ``[P, ...]`` leaves, sharded.
      rescore: the unsharded one (elementwise, so it works on global arrays).
      default_hparams: the variant's ``PSOHyperParams``.
      num_particles: ``P``, padding included.
      config: the static ``PSOConfig`` (``num_shards``, ``num_inert``, ...).
      local: the per-shard ``SwarmOptimizer``: the same functions on one shard's
        particles, with collectives over the mesh axes, for use inside your own
        ``jax.shard_map`` (as :func:`pso_jax.train.make_train_step` does).
      mesh: the ``jax.sharding.Mesh``.
    """

    init: Callable
    step: Callable
    tell: Callable
    ask: Callable
    rescore: Callable
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


def swarm_axis(mesh: Mesh, num_particles: int, pad: bool = False) -> ShardedAxis:
    """The :class:`~pso_jax.swarm_axis.ShardedAxis` of a swarm on ``mesh``.

    Raises:
      ValueError: for a mesh without a ``"particles"`` axis, or a swarm size that
        does not divide over its devices without ``pad``.
    """
    num_shards, data_axis = mesh_axes(mesh)
    padded = padded_num_particles(num_particles, num_shards, pad)
    return ShardedAxis(
        num_particles=padded,
        num_inert=padded - num_particles,
        num_shards=num_shards,
        particle_axis=PARTICLE_AXIS,
        data_axis=data_axis,
    )


def state_prefix(state_type: type, axis: str = PARTICLE_AXIS) -> Any:
    """A ``state_type`` whose fields are ``PartitionSpec`` s: a prefix of its trees.

    Fields made with :func:`pso_jax.base.particle_field` get ``P(axis)``, fields
    made with :func:`pso_jax.base.substate_field` the prefix of their state type,
    the others ``P()`` (replicated). Used as ``jax.shard_map`` specs.
    """
    if not (isinstance(state_type, type) and dataclasses.is_dataclass(state_type)):
        raise ValueError(
            "state must be a PSOState or a train.TrainState (a dataclass state), "
            f"got {state_type}"
        )
    specs = {}
    for f in dataclasses.fields(state_type):
        if f.metadata.get(PARTICLE_AXIS_FIELD):
            specs[f.name] = P(axis)
        elif SUBSTATE_FIELD in f.metadata:
            specs[f.name] = state_prefix(f.metadata[SUBSTATE_FIELD], axis)
        else:
            specs[f.name] = P()
    return state_type(**specs)


def state_specs(state: Any, axis: str = PARTICLE_AXIS) -> Any:
    """The ``PartitionSpec`` of every leaf of a swarm or train state.

    Per-particle leaves (positions, velocities, fitness, personal bests, random
    links, and the per-particle optax state of a ``TrainState``: the fields a
    state type marks with :func:`pso_jax.base.particle_field`) get ``P(axis)``
    on their leading axis; the rest (bests, bounds, frozen leaves, counters,
    key) ``P()``, replicated.

    Args:
      state: a ``PSOState`` or ``train.TrainState`` (any such dataclass state),
        of arrays or abstract ``jax.ShapeDtypeStruct`` (e.g. from
        ``jax.eval_shape``).
      axis: the particle axis name.

    Returns:
      A tree of ``state``'s structure with ``PartitionSpec`` leaves.
    """
    return jax.tree.map(
        lambda spec, sub: jax.tree.map(lambda _: spec, sub),
        state_prefix(type(state), axis),
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


def batch_specs(batch: Any, data_axis: str | None, mesh: Mesh) -> Any:
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


def _make_invariant(tree: Any, prefix: Any) -> Any:
    """The replicated (``P()``) parts of ``tree`` typed invariant (shard 0's)."""
    return jax.tree.map(
        lambda spec, sub: sub if spec != P() else jax.tree.map(invariant, sub),
        prefix,
        tree,
        is_leaf=lambda x: isinstance(x, P),
    )


def shard_init(
    init_fn: Callable,
    mesh: Mesh,
    prefix: Any,
    default_hparams: Any,
    check_hparams: Callable | None = None,
) -> Callable:
    """``init(key, params_template, hparams=None)`` of a per-shard ``init_fn``.

    One ``jax.shard_map`` over ``mesh``: the key, template and hyperparameters
    replicated, the state laid out as ``prefix`` (:func:`state_prefix`).
    ``check_hparams`` sees the concrete hyperparameters before tracing.
    """

    def init(key: PRNGKey, params_template: PyTree, hparams: Any = None):
        hparams = default_hparams if hparams is None else hparams
        if check_hparams is not None:
            check_hparams(hparams)
        fn = jax.shard_map(
            init_fn, mesh=mesh, in_specs=(P(), P(), P()), out_specs=prefix
        )
        return fn(key, params_template, hparams)

    return init


def shard_step(
    step_fn: Callable,
    mesh: Mesh,
    prefix: Any,
    info_prefix: Any,
    default_hparams: Any,
    data_axis: str | None = None,
) -> Callable:
    """``step(key, state, batch=None, hparams=None)`` of a per-shard ``step_fn``.

    One ``jax.shard_map`` over ``mesh``: the state laid out as ``prefix``, the
    batch replicated or split on its leading axis over ``data_axis``, the
    second output as ``info_prefix``. Swarm-wide outputs that every shard
    computed alike from its own inputs (e.g. a best re-evaluated beside the
    shard's particles) are typed invariant by taking shard 0's, exactly.
    """

    def local(key, state, batch, hparams):
        new, info = step_fn(key, state, batch, hparams)
        return _make_invariant(new, prefix), _make_invariant(info, info_prefix)

    def step(key: PRNGKey, state: Any, batch: Any = None, hparams: Any = None):
        hparams = default_hparams if hparams is None else hparams
        fn = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), prefix, batch_specs(batch, data_axis, mesh), P()),
            out_specs=(prefix, info_prefix),
        )
        return fn(key, state, batch, hparams)

    return step


def shard_optimizer(
    optimizer: SwarmOptimizer,
    mesh: Mesh,
    state_type: type,
    check_hparams: Callable | None = None,
) -> ShardedSwarmOptimizer:
    """Wrap a per-shard swarm optimizer into one on global (sharded) arrays.

    :func:`pso_jax.pso` does this for ``mesh=``: each function is one
    ``jax.shard_map`` of the per-shard function (jit it once at the top level).

    Args:
      optimizer: the per-shard ``SwarmOptimizer``, built on a
        :class:`~pso_jax.swarm_axis.ShardedAxis` of ``mesh``
        (``optimizer.config.axis``).
      mesh: the mesh it was built for.
      state_type: its state's dataclass (its fields mark their layout).
      check_hparams: checks concrete hyperparameters before ``init`` traces.

    Returns:
      A :class:`ShardedSwarmOptimizer`.
    """
    config = optimizer.config
    axis = config.axis
    if not isinstance(axis, ShardedAxis):
        raise ValueError("optimizer is not sharded: build it with pso(..., mesh=mesh)")
    num_shards, mesh_data = mesh_axes(mesh)
    if (num_shards, mesh_data) != (axis.num_shards, axis.data_axis):
        raise ValueError(
            f"optimizer was built for {axis.num_shards} particle shards (data axis "
            f"{axis.data_axis!r}), the mesh has {num_shards} ({mesh_data!r})"
        )
    swarm = state_prefix(state_type, axis.particle_axis)
    info = _step_info_specs(axis.particle_axis)
    default = optimizer.default_hparams

    def smap(fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)

    def tell(key: PRNGKey, state: Any, fitness: jax.Array, hparams: Any = None):
        fitness = jnp.asarray(fitness)
        if fitness.shape != (axis.num_particles,):
            raise ValueError(
                f"fitness must have shape ({axis.num_particles},) (one scalar per "
                f"particle), got {fitness.shape}"
            )
        fn = smap(
            optimizer.tell, (P(), swarm, P(axis.particle_axis), P()), (swarm, info)
        )
        return fn(key, state, fitness, default if hparams is None else hparams)

    def ask(state: Any) -> PyTree:
        return smap(optimizer.ask, (swarm,), P(axis.particle_axis))(state)

    return ShardedSwarmOptimizer(
        init=shard_init(optimizer.init, mesh, swarm, default, check_hparams),
        step=shard_step(optimizer.step, mesh, swarm, info, default, axis.data_axis),
        tell=tell,
        ask=ask,
        rescore=optimizer.rescore,
        default_hparams=default,
        num_particles=axis.num_particles,
        config=config,
        local=optimizer,
        mesh=mesh,
    )


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
