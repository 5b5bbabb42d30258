"""Checkpoints of a run's full state with orbax: atomic, checksummed, resumable.

A checkpoint directory holds numbered steps (``<dir>/<step>/``), each with the
state pytree (every array of a :class:`~pso_jax.train.TrainState` or
:class:`~pso_jax.pso.PSOState`) and a JSON ``meta`` record (e.g. the run's
configuration). Orbax writes each step into a temporary directory and renames it
when complete, so an interrupted save never leaves a half-written step behind.

**Integrity.** Every save also stores a SHA-256 checksum of each leaf's bytes
inside the ``meta`` item, under the reserved key :data:`INTEGRITY_KEY` (hidden
from the ``meta`` that :func:`restore` and :func:`read_meta` return). A leaf is
hashed as its global value in C order, little-endian, so the checksum does not
depend on the devices or the sharding the state lived on: a swarm saved on 8
devices verifies after restoring onto 2. :func:`restore` first checks the stored
tree against the template (key paths, shapes, dtypes), then reads the arrays and
compares every leaf's checksum. A damaged step (a checksum mismatch, or files
orbax cannot read) raises :class:`CheckpointError` naming the step directory,
the first damaged leaf and the newest intact earlier step (found by verifying
the earlier steps in turn), if any. Nothing is ever deleted or rewritten by a
restore. Hashing costs about one more pass over the state in host memory:
sha256 at about 0.5-1 GB/s per core, leaves hashed in parallel threads. Measured
on a 51 MB state (2 busy CPU cores, medians of 5): hashing alone 0.05-0.1 s;
a save 0.58 s before checksums, 0.57-0.66 s with them; a restore 0.17-0.22 s
before, 0.21-0.26 s with them.

Not verified (their content restores as it is read; files orbax cannot read
still raise :class:`CheckpointError`): steps written before checksums were
stored (no :data:`INTEGRITY_KEY` in their meta), and saves and restores in a run
of several processes (``jax.process_count() > 1``): there the arrays are not
fully addressable on any one process, and gathering a whole swarm onto every
host just to hash it would cost each host the memory of the full state. A step
saved by several processes records why it holds no checksums; a step saved by
one process and restored by several is verified when it is next restored by one
(e.g. ``pso-jax evaluate`` on one host). With several processes a damaged step's
error does not search the earlier steps (the processes could disagree on which
one reads, and deadlock).

**Keys.** Typed PRNG keys (``jax.random.key``, dtype ``key<impl>``) are stored as
their ``uint32`` key data (and the implementation's name); a template leaf with
a key dtype restores them as typed keys again, a ``uint32`` template leaf as key
data (the form :class:`~pso_jax.train.TrainState` keeps its key in).

Templates may carry shardings (``jax.ShapeDtypeStruct(..., sharding=...)``):
orbax then reads each array straight into that layout, whatever layout it was
saved with. A ``jax.ShapeDtypeStruct`` leaf without a sharding (e.g. from
``jax.eval_shape``) restores onto this process's first device.

>>> import tempfile, jax.numpy as jnp
>>> d = tempfile.mkdtemp()
>>> _ = save(d, 5, {"x": jnp.arange(3.0)}, meta={"run": "a"})
>>> latest_step(d)
5
>>> state, meta = restore(d, {"x": jnp.zeros(3)})
>>> state["x"].tolist(), meta
([0.0, 1.0, 2.0], {'run': 'a'})
>>> latest_intact_step(d, {"x": jnp.zeros(3)})
5
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import operator
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pso_jax.tree_utils import abstract_tree, check_tree_matches, path_names
from pso_jax.types import PyTree

__all__ = [
    "INTEGRITY_KEY",
    "CheckpointError",
    "all_steps",
    "latest_intact_step",
    "latest_step",
    "read_meta",
    "restore",
    "save",
]

# The reserved ``meta`` key under which each step stores its leaves' checksums.
INTEGRITY_KEY = "__pso_jax_integrity__"
_ALGORITHM = "sha256"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, damaged, or does not match the state."""


class _DamageError(Exception):
    """Internal: a step's files are unreadable or its content fails its checksums."""


def _manager(directory: str | os.PathLike, *, max_to_keep: int | None, create: bool):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=create,
        # Synchronous saves: a checkpoint is complete when save() returns, which
        # a SIGTERM handler relies on.
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.fspath(directory)),
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )


# ---------------------------------------------------------------------------
# Argument checks


def _count(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int >= ``minimum``, or a TypeError/ValueError naming it."""
    if isinstance(value, bool) or getattr(value, "dtype", None) == np.bool_:
        raise TypeError(f"{name} must be an int >= {minimum}, got the bool {value!r}")
    try:
        number = operator.index(value)  # int, numpy and 0-d integer arrays
    except TypeError:
        raise TypeError(
            f"{name} must be an int >= {minimum}, got {value!r} "
            f"({type(value).__name__})"
        ) from None
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}")
    return number


def _unserialisable(value: Any, where: str) -> str | None:
    """The first place in ``value`` that JSON cannot hold, or ``None``."""
    if value is None or isinstance(value, str | int | float | bool):
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _unserialisable(item, f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(value, dict):
        for k, item in value.items():
            if not (k is None or isinstance(k, str | int | float | bool)):
                return f"{where} has the key {k!r} ({type(k).__name__})"
            found = _unserialisable(item, f"{where}[{k!r}]")
            if found:
                return found
        return None
    return f"{where} is {value!r} ({type(value).__name__})"


def _check_meta(meta: Any) -> dict[str, Any]:
    """``meta`` as a dict, or a TypeError/ValueError naming what is wrong."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise TypeError(
            f"meta must be a JSON-serialisable dict or None, got {type(meta).__name__}"
        )
    if INTEGRITY_KEY in meta:
        raise ValueError(
            f"meta must not hold the reserved key {INTEGRITY_KEY!r} (the "
            "checkpoint's checksums are stored there)"
        )
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        where = _unserialisable(meta, "meta") or "meta"
        raise TypeError(f"meta must be JSON-serialisable: {where} ({e})") from None
    return meta


# ---------------------------------------------------------------------------
# Storage form (typed keys as key data) and checksums


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(dtype: Any):
    # A key dtype (``key<fry>``) carries its PRNG implementation; jax has no
    # public accessor for it on a ShapeDtypeStruct (jax.random.key_impl takes
    # arrays only).
    return dtype._impl


def _leaf_paths(tree: PyTree) -> list[str]:
    return [
        "/".join(path_names(p)) or "<root>"
        for p, _ in jax.tree_util.tree_leaves_with_path(tree)
    ]


def _to_storage(state: PyTree) -> tuple[PyTree, dict[str, str]]:
    """``state`` with typed keys as ``uint32`` key data, and their impls' names."""
    paths = _leaf_paths(state)
    leaves, treedef = jax.tree.flatten(state)
    impls = {
        path: _key_impl(x.dtype).name
        for path, x in zip(paths, leaves, strict=True)
        if _is_key(x)
    }
    stored = [jax.random.key_data(x) if _is_key(x) else x for x in leaves]
    return jax.tree.unflatten(treedef, stored), impls


def _one_device() -> jax.sharding.Sharding:
    # This process's first device: where a leaf with no sharding in the template
    # goes. Orbax would otherwise use the layout the step was saved with, which
    # fails ("Topology mismatch") on another device count.
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract_leaf(x: Any) -> jax.ShapeDtypeStruct:
    """A template leaf as the abstract array orbax reads into."""
    if not isinstance(x, jax.ShapeDtypeStruct):
        return abstract_tree(x)  # arrays keep their sharding; numpy has none
    if x.sharding is not None or jax.dtypes.canonicalize_dtype(x.dtype) != x.dtype:
        return x  # e.g. float64 without jax_enable_x64: read as numpy, as saved
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_one_device())


def _key_data_leaf(x: Any) -> jax.ShapeDtypeStruct:
    """The ``uint32`` key-data leaf that a typed-key template leaf is stored as."""
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sharding = getattr(x, "sharding", None)
    # A NamedSharding's spec leaves the trailing key-data axis replicated; other
    # shardings are rank-specific.
    if not isinstance(
        sharding, jax.sharding.NamedSharding | jax.sharding.SingleDeviceSharding
    ):
        sharding = _one_device()
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _storage_template(template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """``template`` as the stored tree's abstract form, and its key leaves' impls."""
    paths = _leaf_paths(template)
    leaves, treedef = jax.tree.flatten(template)
    impls = {
        path: _key_impl(x.dtype)
        for path, x in zip(paths, leaves, strict=True)
        if _is_key(x)
    }
    abstract = [_key_data_leaf(x) if _is_key(x) else _abstract_leaf(x) for x in leaves]
    return jax.tree.unflatten(treedef, abstract), impls


def _processes() -> int:
    """The number of JAX processes (a function, so tests can pretend several)."""
    return jax.process_count()


def _digest(x: Any) -> str:
    """SHA-256 of a leaf's global value: C order, little-endian, any sharding."""
    arr = np.asarray(x)  # assembles a sharded (fully addressable) array
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr).reshape(-1)
    return hashlib.sha256(arr.view(np.uint8)).hexdigest()


def _digests(leaves: list[Any]) -> list[str]:
    """``_digest`` of each leaf, in order, several leaves at a time.

    hashlib releases the GIL on large buffers, so threads hash (and copy from
    the devices) in parallel; at most ``workers`` leaves are on the host at once.
    """
    workers = max(1, min(8, os.cpu_count() or 1, len(leaves)))
    if workers == 1:
        return [_digest(x) for x in leaves]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_digest, leaves))


def _integrity_record(stored: PyTree, impls: dict[str, str]) -> dict[str, Any]:
    """The checksums (or why there are none) stored with a step."""
    record: dict[str, Any] = {"version": 1, "keys": impls}
    processes = _processes()
    if processes > 1:
        record["algorithm"] = None
        record["unverified"] = (
            f"written by {processes} processes: the arrays are not fully "
            "addressable on one process"
        )
        return record
    record["algorithm"] = _ALGORITHM
    leaves = jax.tree.leaves(stored)
    record["leaves"] = dict(zip(_leaf_paths(stored), _digests(leaves), strict=True))
    return record


def _verify(record: Any, paths: list[str], leaves: list[Any]) -> None:
    """Raise ``_DamageError`` naming the first leaf whose checksum does not match."""
    if record is None or _processes() > 1:
        return  # written before checksums, or not checkable here (module doc)
    if not isinstance(record, dict) or "algorithm" not in record:
        raise _DamageError(f"its integrity record ({INTEGRITY_KEY!r}) is malformed")
    if record["algorithm"] is None:
        return  # written by several processes, recorded as unverified
    if record["algorithm"] != _ALGORITHM or not isinstance(record.get("leaves"), dict):
        raise _DamageError(
            f"its integrity record ({INTEGRITY_KEY!r}) is malformed: algorithm "
            f"{record['algorithm']!r}, expected {_ALGORITHM!r} with leaf checksums"
        )
    sums = record["leaves"]
    for path in paths:
        if path not in sums:
            raise _DamageError(f"leaf {path!r} has no stored checksum")
    for path, got in zip(paths, _digests(leaves), strict=True):
        if got != sums[path]:
            raise _DamageError(
                f"leaf {path!r} checksum mismatch (stored {_ALGORITHM} "
                f"{str(sums[path])[:12]}..., read {got[:12]}...)"
            )


def _check_key_impls(record: Any, impls: dict[str, Any], where: str) -> None:
    """Raise CheckpointError if a typed key was saved with another PRNG impl."""
    saved = record.get("keys", {}) if isinstance(record, dict) else {}
    for path, impl in impls.items():
        if path in saved and saved[path] != impl.name:
            raise CheckpointError(
                f"{where} stores the key at {path!r} as a {saved[path]!r} key, the "
                f"template has a {impl.name!r} key"
            )


# ---------------------------------------------------------------------------
# Save


def save(
    directory: str | os.PathLike,
    step: int,
    state: PyTree,
    *,
    meta: dict[str, Any] | None = None,
    max_to_keep: int | None = 3,
) -> Path:
    """Write ``state``, its checksums and a JSON ``meta`` record as step ``step``.

    Args:
      directory: the checkpoint directory (created if absent).
      step: the step number, an int >= 0 (numpy integers too; not a bool or a
        float); must not exist yet in ``directory``.
      state: a pytree of arrays (sharded arrays are written shard by shard;
        typed PRNG keys as their key data).
      meta: a JSON-serialisable dict stored beside the state, without the
        reserved key :data:`INTEGRITY_KEY`.
      max_to_keep: keep only this many newest steps (an int >= 1, or ``None``:
        all).

    Returns:
      The path of the written step.

    Raises:
      TypeError: ``step`` or ``max_to_keep`` not an int, or ``meta`` not a
        JSON-serialisable dict (the message names the value).
      ValueError: ``step`` < 0, ``max_to_keep`` < 1, or ``meta`` holding
        :data:`INTEGRITY_KEY`.
      CheckpointError: if ``step`` already exists (checkpoints are never
        overwritten).
    """
    import orbax.checkpoint as ocp

    step = _count("step", step, 0)
    if max_to_keep is not None:
        max_to_keep = _count("max_to_keep", max_to_keep, 1)
    meta = _check_meta(meta)
    stored, impls = _to_storage(state)
    # Hashed before writing, so the checksums go into the same atomic step.
    record = _integrity_record(stored, impls)
    with _manager(directory, max_to_keep=max_to_keep, create=True) as mngr:
        if step in mngr.all_steps():
            raise CheckpointError(
                f"checkpoint step {step} already exists in {directory}; "
                "checkpoints are never overwritten"
            )
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(stored),
                meta=ocp.args.JsonSave({**meta, INTEGRITY_KEY: record}),
            ),
        )
        mngr.wait_until_finished()
        return Path(mngr.directory) / str(step)


# ---------------------------------------------------------------------------
# Listing and reading


def all_steps(directory: str | os.PathLike) -> list[int]:
    """The complete checkpoint steps in ``directory``, ascending ([] if none)."""
    if not os.path.isdir(directory):
        return []
    with _manager(directory, max_to_keep=None, create=False) as mngr:
        return sorted(mngr.all_steps())


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete checkpoint step in ``directory``, or ``None``."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def _pick_step(directory: str | os.PathLike, step: Any) -> tuple[int, list[int]]:
    """The step to read (default: the newest) and all steps, or CheckpointError."""
    if step is not None:
        step = _count("step", step, 0)
    steps = all_steps(directory)
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(
            f"no checkpoint step {step} in {directory}; available: {steps}"
        )
    return step, steps


def _where(directory: str | os.PathLike, step: int) -> str:
    return f"checkpoint {os.path.join(os.fspath(directory), str(step))}"


def read_meta(
    directory: str | os.PathLike, *, step: int | None = None
) -> dict[str, Any]:
    """The JSON ``meta`` record of checkpoint ``step`` (default: the newest).

    Cheap (the state is not read, nor verified): e.g. to check a checkpoint's
    layout before building the template it is restored into. The reserved
    :data:`INTEGRITY_KEY` is left out.

    Raises:
      CheckpointError: if there is no such checkpoint or it is unreadable.
    """
    import orbax.checkpoint as ocp

    step, _ = _pick_step(directory, step)
    with _manager(directory, max_to_keep=None, create=False) as mngr:
        try:
            restored = mngr.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
        except Exception as e:  # orbax raises many types for a damaged step
            raise CheckpointError(
                f"{_where(directory, step)} meta is unreadable "
                f"({type(e).__name__}: {e})"
            ) from e
    meta = dict(restored["meta"] or {})
    meta.pop(INTEGRITY_KEY, None)
    return meta


def _read_step(
    mngr, where: str, step: int, storage: PyTree, impls: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """A step's verified storage leaves and its meta.

    Raises:
      _DamageError: unreadable files or a checksum mismatch.
      CheckpointError: a stored tree that does not match the template.
    """
    import orbax.checkpoint as ocp

    try:
        stored = mngr.item_metadata(step)["state"]
    except Exception as e:  # orbax raises many types for a damaged step
        raise _DamageError(
            f"its state metadata is unreadable ({type(e).__name__}: {e})"
        ) from e
    if stored is None:
        raise _DamageError("it has no readable state metadata")
    try:
        check_tree_matches(stored, storage, where)
    except ValueError as e:
        raise CheckpointError(
            f"{e}. Was it written by a run with a different configuration "
            "(model, swarm size, variant)?"
        ) from e
    try:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(storage),
                meta=ocp.args.JsonRestore(),
            ),
        )
    except Exception as e:
        raise _DamageError(
            f"its files could not be read ({type(e).__name__}: {e})"
        ) from e
    meta = dict(restored["meta"] or {})
    record = meta.pop(INTEGRITY_KEY, None)
    _check_key_impls(record, impls, where)
    leaves = jax.tree.leaves(restored["state"])
    _verify(record, _leaf_paths(storage), leaves)
    return leaves, meta


def _newest_intact(
    mngr,
    directory: str | os.PathLike,
    candidates: list[int],
    storage: PyTree,
    impls: dict[str, Any],
) -> int | None:
    """The newest of ``candidates`` that reads, matches and verifies."""
    for step in sorted(candidates, reverse=True):
        try:
            _read_step(mngr, _where(directory, step), step, storage, impls)
        except (_DamageError, CheckpointError):
            continue
        return step
    return None


def latest_intact_step(
    directory: str | os.PathLike, template: PyTree, *, before: int | None = None
) -> int | None:
    """The newest step that restores into ``template`` and passes its checksums.

    Reads (and hashes) each step from the newest down until one is intact: as
    costly as a :func:`restore` per damaged step. Nothing is deleted or changed.

    Args:
      directory: the checkpoint directory.
      template: as for :func:`restore`.
      before: only consider steps below this one (e.g. a damaged step).

    Returns:
      The step, or ``None`` if no step (below ``before``) is intact.

    >>> import tempfile, jax.numpy as jnp
    >>> d = tempfile.mkdtemp()
    >>> _ = save(d, 1, {"x": jnp.ones(2)}); _ = save(d, 2, {"x": jnp.ones(2)})
    >>> latest_intact_step(d, {"x": jnp.zeros(2)}, before=2)
    1
    """
    if before is not None:
        before = _count("before", before, 0)
    steps = [s for s in all_steps(directory) if before is None or s < before]
    if not steps:
        return None
    storage, impls = _storage_template(template)
    with _manager(directory, max_to_keep=None, create=False) as mngr:
        return _newest_intact(mngr, directory, steps, storage, impls)


def _damage_hint(mngr, directory, step: int, steps: list[int], storage, impls) -> str:
    """Where to go from a damaged step: the newest intact earlier one, if any."""
    earlier = [s for s in steps if s < step]
    if not earlier:
        return "there is no earlier step"
    if _processes() > 1:
        # Processes could disagree on which step fails to read and deadlock.
        return (
            "earlier steps were not checked (several processes): find the newest "
            "intact one with checkpoint.latest_intact_step from one process"
        )
    intact = _newest_intact(mngr, directory, earlier, storage, impls)
    if intact is None:
        return f"no earlier step ({earlier}) is intact either"
    return f"the newest intact step is {intact}: restore it with step={intact}"


def restore(
    directory: str | os.PathLike,
    template: PyTree,
    *,
    step: int | None = None,
) -> tuple[PyTree, dict[str, Any]]:
    """Read and verify checkpoint ``step`` (default: the newest) into ``template``.

    Args:
      directory: the checkpoint directory.
      template: a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. the
        ``jax.eval_shape`` of the state's init) with the expected structure,
        shapes and dtypes; shardings on its leaves place the restored arrays;
        leaves with a key dtype restore typed PRNG keys.
      step: which step (an int >= 0); ``None`` for the newest.

    Returns:
      ``(state, meta)``, ``meta`` without :data:`INTEGRITY_KEY`.

    Raises:
      CheckpointError: if there is no checkpoint, the step is missing, the
        stored state does not match ``template`` (the message names the first
        differing leaf), or the step is damaged: files orbax cannot read, or a
        leaf whose checksum does not match (the message names the step, the
        first damaged leaf and the newest intact earlier step). The damaged
        step is left as it is.
    """
    step, steps = _pick_step(directory, step)
    where = _where(directory, step)
    storage, impls = _storage_template(template)
    with _manager(directory, max_to_keep=None, create=False) as mngr:
        try:
            leaves, meta = _read_step(mngr, where, step, storage, impls)
        except _DamageError as e:
            hint = _damage_hint(mngr, directory, step, steps, storage, impls)
            raise CheckpointError(
                f"{where} is damaged: {e}; {hint}. Nothing was deleted or rewritten"
            ) from e
    paths = _leaf_paths(template)
    restored = [
        jax.random.wrap_key_data(x, impl=impls[path]) if path in impls else x
        for path, x in zip(paths, leaves, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(template), restored), meta
