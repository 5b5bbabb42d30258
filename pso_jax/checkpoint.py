"""Checkpoints of a run's full state with orbax: atomic, checked, resumable.

A checkpoint directory holds numbered steps (``<dir>/<step>/``), each with the
state pytree (every array of a :class:`~pso_jax.train.TrainState` or
:class:`~pso_jax.pso.PSOState`, keys included as ``uint32`` key data) and a JSON
``meta`` record (e.g. the run's configuration). Orbax writes each step into a
temporary directory and renames it when complete, so an interrupted save never
leaves a half-written step behind.

Restoring checks the stored tree against a template (key paths, shapes, dtypes)
first and raises :class:`CheckpointError` naming the first mismatch; an unreadable
step also raises :class:`CheckpointError`. Nothing is ever deleted or rewritten by
a restore. Templates may carry shardings (``jax.ShapeDtypeStruct(...,
sharding=...)``): orbax then reads each array straight into that layout, so a
swarm saved on 8 devices restores onto 2.

>>> import tempfile, jax.numpy as jnp
>>> d = tempfile.mkdtemp()
>>> _ = save(d, 5, {"x": jnp.arange(3.0)}, meta={"run": "a"})
>>> latest_step(d)
5
>>> state, meta = restore(d, {"x": jnp.zeros(3)})
>>> state["x"].tolist(), meta
([0.0, 1.0, 2.0], {'run': 'a'})
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

from pso_jax.tree_utils import abstract_tree, check_tree_matches
from pso_jax.types import PyTree

__all__ = [
    "CheckpointError",
    "all_steps",
    "latest_step",
    "read_meta",
    "restore",
    "save",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the expected state."""


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


def save(
    directory: str | os.PathLike,
    step: int,
    state: PyTree,
    *,
    meta: dict[str, Any] | None = None,
    max_to_keep: int | None = 3,
) -> Path:
    """Write ``state`` (and a JSON ``meta`` record) as checkpoint ``step``.

    Args:
      directory: the checkpoint directory (created if absent).
      step: the step number; must not exist yet in ``directory``.
      state: a pytree of arrays (sharded arrays are written shard by shard).
      meta: a JSON-serialisable dict stored beside the state.
      max_to_keep: keep only this many newest steps (``None``: all).

    Returns:
      The path of the written step.

    Raises:
      CheckpointError: if ``step`` already exists (checkpoints are never
        overwritten).
    """
    import orbax.checkpoint as ocp

    step = int(step)
    with _manager(directory, max_to_keep=max_to_keep, create=True) as mngr:
        if step in mngr.all_steps():
            raise CheckpointError(
                f"checkpoint step {step} already exists in {directory}; "
                "checkpoints are never overwritten"
            )
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta or {}),
            ),
        )
        mngr.wait_until_finished()
        return Path(mngr.directory) / str(step)


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


def read_meta(
    directory: str | os.PathLike, *, step: int | None = None
) -> dict[str, Any]:
    """The JSON ``meta`` record of checkpoint ``step`` (default: the newest).

    Cheap (the state is not read): e.g. to check a checkpoint's layout before
    building the template it is restored into.

    Raises:
      CheckpointError: if there is no such checkpoint or it is unreadable.
    """
    import orbax.checkpoint as ocp

    steps = all_steps(directory)
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(
            f"no checkpoint step {step} in {directory}; available: {steps}"
        )
    with _manager(directory, max_to_keep=None, create=False) as mngr:
        try:
            restored = mngr.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
        except Exception as e:  # orbax raises many types for a damaged step
            raise CheckpointError(
                f"checkpoint {os.path.join(os.fspath(directory), str(step))} meta "
                f"is unreadable ({type(e).__name__}: {e})"
            ) from e
    return dict(restored["meta"] or {})


def restore(
    directory: str | os.PathLike,
    template: PyTree,
    *,
    step: int | None = None,
) -> tuple[PyTree, dict[str, Any]]:
    """Read checkpoint ``step`` (default: the newest) into ``template``'s structure.

    Args:
      directory: the checkpoint directory.
      template: a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. the
        ``jax.eval_shape`` of the state's init) with the expected structure,
        shapes and dtypes; shardings on its leaves place the restored arrays.
      step: which step; ``None`` for the newest.

    Returns:
      ``(state, meta)``.

    Raises:
      CheckpointError: if there is no checkpoint, the step is missing or
        unreadable, or the stored state does not match ``template`` (the message
        names the first differing leaf).
    """
    import orbax.checkpoint as ocp

    steps = all_steps(directory)
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise CheckpointError(
            f"no checkpoint step {step} in {directory}; available: {steps}"
        )
    where = f"checkpoint {os.path.join(os.fspath(directory), str(step))}"
    with _manager(directory, max_to_keep=None, create=False) as mngr:
        try:
            stored = mngr.item_metadata(step)["state"]
        except Exception as e:  # orbax raises many types for a damaged step
            raise CheckpointError(
                f"{where} is unreadable ({type(e).__name__}: {e}); it was left "
                "as it is: delete it, or restore an earlier step"
            ) from e
        if stored is None:
            raise CheckpointError(
                f"{where} has no readable state metadata; it was left as it is: "
                "delete it, or restore an earlier step"
            )
        try:
            check_tree_matches(stored, template, where)
        except ValueError as e:
            raise CheckpointError(
                f"{e}. Was it written by a run with a different configuration "
                "(model, swarm size, variant)?"
            ) from e
        try:
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_tree(template)),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:
            raise CheckpointError(
                f"{where} could not be read ({type(e).__name__}: {e}); it was "
                "left as it is: delete it, or restore an earlier step"
            ) from e
    state = jax.tree.unflatten(
        jax.tree.structure(template), jax.tree.leaves(restored["state"])
    )
    return state, dict(restored["meta"] or {})
