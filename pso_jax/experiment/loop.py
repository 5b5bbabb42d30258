"""The host loop: :func:`train` and :func:`evaluate_workdir`.

- :func:`train`: checks the work directory (a resume must match its
  ``config.json``), builds the run (:mod:`pso_jax.experiment.run`), starts or
  restores the state, then runs ``steps_per_call`` steps per jitted call,
  logging, validating and checkpointing between calls until the last step or a
  signal, and finally writes the summary and the plots.
- :func:`evaluate_workdir`: a saved swarm re-evaluated on the test split.
- Between calls: ``_Checkpoints`` (at most one save per step, the same calls on
  every process), ``_Interrupt`` and ``_stop_signal`` (SIGTERM/SIGINT become a
  checkpoint and an early return, on every process at the same call), and
  ``_Clock`` (wall time across resumes, compile time, throughput).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from pso_jax import checkpoint as ckpt
from pso_jax.experiment.config import (
    Parallelism,
    TrainConfig,
    _check_layout,
    validate_config,
)
from pso_jax.experiment.input_pipeline import (
    _first_source,
    _source,
    _to_float,
    _train_batches,
)
from pso_jax.experiment.metrics import (
    _evaluate,
    _finish,
    _metric_records,
    _truncate_metrics,
    _write_json,
)
from pso_jax.experiment.report import _plot_convergence, _Progress
from pso_jax.experiment.run import _layout, _restore, _Run
from pso_jax.experiment.selection import _Elite
from pso_jax.train import Trainer, TrainState

__all__ = ["evaluate_workdir", "train"]


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
    workdir = Path(workdir)
    _check_workdir(workdir, cfg, resume)
    workdir.mkdir(parents=True, exist_ok=True)
    clock = _Clock(t_start=time.perf_counter())
    train_source = _first_source(cfg, "train")
    batches = _train_batches(cfg, train_source)
    data_seconds = time.perf_counter() - clock.t_start
    run = _Run(cfg, train_source, parallel)
    state, start, clock.wall_before = _start_state(run, workdir, resume)
    checkpoints = _Checkpoints(workdir / "checkpoints", run, start if resume else None)
    state, step, stop = _train_loop(
        run, state, batches, start, workdir, clock, checkpoints, progress, on_step
    )
    wall = clock.wall()
    checkpoints.save(state, step, wall)
    if stop is not None:
        return {"interrupted": True, "signal": stop, "steps": step}
    summary = _summary(run, state, workdir, step, wall, clock, data_seconds)
    if jax.process_index() == 0:  # the process that writes files and logs
        _write_json(workdir / "summary.json", summary)
        _plot_convergence(workdir / "metrics.jsonl", workdir / "convergence.png", cfg)
    return summary


def _check_workdir(workdir: Path, cfg: TrainConfig, resume: bool) -> None:
    """Raise unless ``workdir`` holds a run to resume (``resume``) or none."""
    ckdir = workdir / "checkpoints"
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


def _check_resume_config(workdir: Path, cfg: TrainConfig) -> None:
    """Raise a ValueError naming each field where ``cfg`` and config.json differ."""
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


def _start_state(run: _Run, workdir: Path, resume: bool):
    """The first state, its step and the wall seconds of the runs before it.

    Resumed: the newest checkpoint, and ``metrics.jsonl`` cut back to its step.
    New: the initial swarm, ``config.json`` and an empty ``metrics.jsonl``.
    """
    main = jax.process_index() == 0
    metrics_path = workdir / "metrics.jsonl"
    if resume:
        state, meta = _restore(run, workdir / "checkpoints")
        start = int(state.swarm.step)
        if main:
            _truncate_metrics(metrics_path, start)
        return state, start, float(meta.get("wall_seconds", 0.0))
    if main:
        _write_json(workdir / "config.json", run.cfg.to_dict())
        metrics_path.write_text("")
    return run.init(jax.random.key(run.cfg.seed)), 0, 0.0


def _train_loop(
    run: _Run,
    state: TrainState,
    batches,
    start: int,
    workdir: Path,
    clock: _Clock,
    checkpoints: _Checkpoints,
    progress: bool,
    on_step: Callable[[int, TrainState], None] | None,
):
    """Steps ``start`` to ``cfg.steps`` in chunks, or until a signal arrives.

    After each chunk: its records to ``metrics.jsonl`` (process 0), a validation
    every ``eval_every`` steps, the progress bar, a checkpoint every
    ``checkpoint_every`` steps (rounded up to whole chunks), ``on_step``.

    Returns:
      ``(state, step, stop)``: the state after ``step`` steps, and the signal
      number that stopped the run (any process's), or ``None``.
    """
    cfg = run.cfg
    main = jax.process_index() == 0  # the process that writes files and logs
    k = cfg.steps_per_call
    every = cfg.checkpoint_every
    if every:
        every = -(-every // k) * k  # checkpoints fall on call boundaries
    val_source = _source(cfg, "validation") if cfg.eval_every else None
    elite = _Elite(workdir)
    clock.t_loop, clock.loop_start = time.perf_counter(), start
    step, stop = start, None
    with (
        _Interrupt() as interrupt,
        open(workdir / "metrics.jsonl" if main else os.devnull, "a") as log,
        _Progress(progress and main, cfg.steps, start, cfg.particles) as bar,
    ):
        while step < cfg.steps and stop is None and not _out_of_time(cfg, clock):
            n = min(k - step % k, cfg.steps - step)
            state, metrics = _run_chunk(run, state, batches, step, n, clock)
            wall = clock.wall()
            records = _metric_records(metrics, step, wall)
            for r in records:
                log.write(json.dumps(r) + "\n")
            step += n
            if cfg.eval_every and (step % cfg.eval_every < n or step == cfg.steps):
                res, _ = _evaluate(run, state, val_source, top_k=1)
                elite.offer(run.eval_state(state, 1), res.accuracy, step)
                log.write(
                    json.dumps({"step": step, "val_accuracy": res.accuracy}) + "\n"
                )
            log.flush()
            bar(step, records[-1])
            if every and step % every == 0:
                checkpoints.save(state, step, wall)
            if on_step is not None:
                on_step(step, state)
            stop = _stop_signal(interrupt)
    return state, step, stop


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _chunk(trainer: Trainer, state: TrainState, batches: dict):
    """``k`` train steps in one ``lax.scan`` (one jitted call, the state donated).

    Module level with the trainer static, so a run compiles it once. Sharded,
    ``trainer.scan`` is a ``lax.scan`` over the sharded step: still one call.
    """
    return trainer.scan(state, jax.vmap(_to_float)(batches))


def _run_chunk(run: _Run, state: TrainState, batches, step: int, n: int, clock: _Clock):
    """Steps ``step + 1`` to ``step + n`` in one jitted call (state donated)."""
    stacked = jax.tree.map(
        lambda *xs: np.stack(xs),
        *(_step_batch(run, batches, step + i) for i in range(n)),
    )
    t0 = time.perf_counter()
    state, metrics = _chunk(run.trainer, state, run.device_batches(stacked))
    # One host sync per chunk (also what keeps simulated CPU devices'
    # collectives from piling up).
    jax.block_until_ready(metrics)
    if clock.compile_seconds is None:  # the first call also compiles
        clock.compile_seconds = time.perf_counter() - t0
        clock.t_loop, clock.loop_start = time.perf_counter(), step + n
    return state, metrics


def _step_batch(run: _Run, batches, step: int) -> dict:
    """Step ``step``'s batch; with ``select_on="next"`` the next one to select on."""
    batch = batches[step]
    if run.cfg.select_on == "next":
        nxt = batches[step + 1]
        batch = {**batch, "select_video": nxt["video"], "select_label": nxt["label"]}
    return batch


def _summary(
    run: _Run,
    state: TrainState,
    workdir: Path,
    step: int,
    wall: float,
    clock: _Clock,
    data_seconds: float,
) -> dict[str, Any]:
    """The run's ``summary.json``: test metrics, timings, throughput, layout."""
    timed_steps = step - clock.loop_start
    loop_seconds = time.perf_counter() - clock.t_loop
    summary = _finish(run, state, workdir, _Elite(workdir))
    summary.update(
        steps=step,
        wall_seconds=wall,
        data_seconds=data_seconds,
        compile_seconds=clock.compile_seconds,
        particle_evals_per_second=(
            timed_steps * run.cfg.particles / loop_seconds if timed_steps else None
        ),
        seconds_per_step=loop_seconds / timed_steps if timed_steps else None,
        config=run.cfg.to_dict(),
        parallel=_layout(run),
    )
    return summary


@dataclasses.dataclass
class _Clock:
    """A run's host timings (host bookkeeping, never traced).

    Attributes:
      t_start: ``time.perf_counter()`` when this process started the run.
      wall_before: wall seconds of the runs this one resumes.
      compile_seconds: of the first jitted call, which also compiles.
      t_loop, loop_start: when and at which step the timed loop (the calls
        after the first) started.
    """

    t_start: float
    wall_before: float = 0.0
    compile_seconds: float | None = None
    t_loop: float = 0.0
    loop_start: int = 0

    def wall(self) -> float:
        """Wall seconds of the run so far, across resumes."""
        return self.wall_before + time.perf_counter() - self.t_start


class _Checkpoints:
    """Saves a run's checkpoints, at most one per step.

    The newest step on disk (``saved``) is tracked here rather than listed
    again, as every process of a multi-process run must make the same save
    calls (orbax writes each one's shards).
    """

    def __init__(self, ckdir: Path, run: _Run, saved: int | None):
        self.ckdir, self.run, self.saved = ckdir, run, saved

    def save(self, state: TrainState, step: int, wall: float) -> None:
        """Save ``state`` as checkpoint ``step`` unless that is the newest."""
        if self.saved == step:
            return
        ckpt.save(
            self.ckdir,
            step,
            state,
            meta={
                "wall_seconds": wall,
                "config": self.run.cfg.to_dict(),
                "swarm_size": self.run.swarm_size,
            },
        )
        self.saved = step


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


def _out_of_time(cfg: TrainConfig, clock: _Clock) -> bool:
    """Whether the run's ``time_budget`` is spent (process 0's clock decides)."""
    if cfg.time_budget is None:
        return False
    over = clock.wall() >= cfg.time_budget
    if jax.process_count() == 1:
        return over
    # Every process stops at the same call (see _stop_signal).
    return bool(multihost_utils.broadcast_one_to_all(np.int32(over)))


def _stop_signal(interrupt: _Interrupt) -> int | None:
    """The signal that stops the run: this process's, or any process's."""
    if jax.process_count() == 1:
        return interrupt.signum
    # All processes stop at the same call, or the others would wait forever in
    # the next step's collectives.
    signums = multihost_utils.process_allgather(np.int32(interrupt.signum or 0))
    return int(np.max(signums)) or None


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
    result = _finish(run, state, workdir, _Elite(workdir))
    result["steps"] = int(state.swarm.step)
    result["parallel"] = _layout(run)
    if jax.process_index() == 0:
        _write_json(workdir / "evaluation.json", result)
    return result
