"""The host loop: :func:`train` and :func:`evaluate_workdir`.

- :func:`train`: checks the config, the device layout and the data against the
  model (before anything is written or compiled), takes the work directory's
  lock, checks the work directory (a resume must match its ``config.json``),
  builds the run (:mod:`pso_jax.experiment.run`), starts or restores the
  state, then runs blocks of steps (``_block_length``: the first one step,
  which measures; then as many as take about 2 s, at most ``steps_per_call``;
  the one compiled step, compiled ahead of time), logging, validating and
  checkpointing between blocks until the last step or a signal, and finally
  writes the summary and the plots. The phases are printed as they start.
- :func:`evaluate_workdir`: a saved swarm re-evaluated on the test split.
- :func:`lock_workdir`: one writer per work directory (``pso-jax.lock``, an
  ``flock`` with the holder's pid, host and command inside).
- Between calls: ``_Checkpoints`` (at most one save per step, the same calls on
  every process), ``_Interrupt`` and ``_stop_signal`` (SIGTERM/SIGINT: before
  the run has a state, :class:`Interrupted` at once, nothing written; after,
  a checkpoint and an early return, on every process at the same call), and
  ``_Clock`` (wall time across resumes, compile time, throughput).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import gc
import json
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from pso_jax import checkpoint as ckpt
from pso_jax.experiment.config import (
    RESUME_MAY_CHANGE,
    Parallelism,
    RunFileError,
    TrainConfig,
    _check_layout,
    particle_steps,
    particles_at,
    read_config,
    validate_config,
)
from pso_jax.experiment.input_pipeline import (
    _check_data,
    _check_labels,
    _first_source,
    _source,
    _to_float,
    _train_batches,
)
from pso_jax.experiment.metrics import (
    _evaluate,
    _finish,
    _json_text,
    _metric_records,
    _read_metrics,
    _truncate_metrics,
    _write_json,
)
from pso_jax.experiment.pretraining import _finish_pretext, _validation_record
from pso_jax.experiment.report import _plot_convergence, _Progress
from pso_jax.experiment.run import _layout, _restore, _Run
from pso_jax.experiment.selection import _Elite, _narrowed, _split_batches
from pso_jax.train import Trainer, TrainState

__all__ = [
    "LOCK_FILE",
    "Interrupted",
    "SecondInterrupt",
    "WorkdirLockedError",
    "evaluate_workdir",
    "lock_workdir",
    "train",
]

LOCK_FILE = "pso-jax.lock"  # in the work directory, while a command writes there
# pso-jax evaluate's files, beside (never over) the run's summary.json and
# confusion.png.
EVAL_JSON, EVAL_CONFUSION = "evaluation.json", "evaluation_confusion.png"


class WorkdirLockedError(RuntimeError):
    """Another process holds the work directory's lock (the message names it)."""


class Interrupted(KeyboardInterrupt):  # noqa: N818 (a KeyboardInterrupt, not an error)
    """A SIGTERM or SIGINT that arrived before the run had a state to checkpoint.

    A ``KeyboardInterrupt``, as Ctrl-C is, so that ``except Exception`` clauses
    on its way up let it pass.

    Attributes:
      signum: the signal's number.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


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
        ``config.json`` must equal ``cfg`` but for the fields of
        :data:`RESUME_MAY_CHANGE` (``steps`` with the same ``schedule_steps``
        span), and is written back with them (the device layout may differ).
      progress: show a ``rich`` progress bar (on stderr; process 0 only).
      on_step: ``on_step(step, state)`` called on the host after every jitted
        call (for tests and notebooks).
      parallel: the device layout (default: one device, or every device of a
        multi-process run); see :class:`Parallelism`.

    Returns:
      The summary dict (also written to ``summary.json``). If a SIGTERM/SIGINT
      arrived once the run had a state (the initial or the restored one), the
      run checkpoints, returns early with ``"interrupted": True`` and writes no
      summary.

    Raises:
      ConfigError: a bad config (before anything is read or written).
      ValueError: a layout that does not fit (too many devices, a particle
        count that does not divide without ``pad``: raised before any data or
        compilation).
      DataError: the config and the data disagree (the class count, the clip
        shape against the model, the batch size against the split, a label out
        of range): raised on the host before compiling (``moving_shapes``:
        before generating it).
      WorkdirLockedError: another process writes into ``workdir``
        (:func:`lock_workdir`).
      FileExistsError: ``workdir`` already holds checkpoints and not ``resume``.
      pso_jax.checkpoint.CheckpointError: ``resume`` without a usable checkpoint.
      RunFileError: ``resume`` with a config other than ``config.json``'s, or
        a damaged ``config.json`` or ``metrics.jsonl`` (naming file and line or
        field; a torn last line of ``metrics.jsonl`` is only a note).
      Interrupted: a SIGTERM/SIGINT before the run had a state: nothing was
        checkpointed (a created ``workdir`` is removed again).
    """
    with _Interrupt() as interrupt:
        validate_config(cfg)
        parallel = parallel or Parallelism()
        _check_layout(cfg, parallel)
        _check_data(cfg)  # moving_shapes: from its config, before generating it
        interrupt.check()
        workdir = Path(workdir)
        if resume and not workdir.is_dir():
            raise ckpt.CheckpointError(f"--resume: {workdir} does not exist")
        with lock_workdir(workdir):
            _check_workdir(workdir, cfg, resume)
            interrupt.check()
            return _train(cfg, workdir, resume, progress, on_step, parallel, interrupt)


def _train(
    cfg: TrainConfig,
    workdir: Path,
    resume: bool,
    progress: bool,
    on_step: Callable[[int, TrainState], None] | None,
    parallel: Parallelism,
    interrupt: _Interrupt,
) -> dict[str, Any]:
    """:func:`train` once the work directory is locked and checked."""
    clock = _Clock(t_start=time.perf_counter())
    main = jax.process_index() == 0
    if main:
        what = "resuming" if resume else "writing"
        _phase(f"{what} {workdir} ({cfg.steps} steps of {cfg.particles} particles)")
        late = [f"{at}:{keep}" for at, keep in cfg.narrow_at if at >= cfg.steps]
        if late:
            _note(
                f"narrow_at {','.join(late)}: at or after the run's end "
                f"(steps={cfg.steps}), so the swarm does not narrow there"
            )
        _phase(f"preparing the dataset {_data_name(cfg)} ...")
    with interrupt.at_once():  # preparing the data (minutes) stops at once
        train_source = _first_source(cfg, "train")
    _check_data(cfg, train_source)  # any dataset: its info and first clip
    batches = _train_batches(cfg, train_source)
    data_seconds = time.perf_counter() - clock.t_start
    if main:
        _phase(f"building {cfg.model} and the swarm ...")
    # A resumed run continues with the particles its newest checkpoint holds.
    saved = ckpt.latest_step(workdir / "checkpoints") if resume else None
    run = _Run(cfg, train_source, parallel, particles=particles_at(cfg, saved or 0))
    interrupt.check()
    state, start, clock.wall_before = _start_state(run, workdir, resume, interrupt)
    checkpoints = _Checkpoints(workdir / "checkpoints", run, start if resume else None)
    interrupt.saved = checkpoints.saved
    run, state, step, stop = _train_loop(
        run,
        state,
        batches,
        start,
        workdir,
        clock,
        checkpoints,
        progress,
        on_step,
        interrupt,
    )
    wall = clock.wall()
    checkpoints.save(state, step, wall, interrupt)
    if stop is not None:
        return {"interrupted": True, "signal": stop, "steps": step}
    summary = _summary(run, state, workdir, step, wall, clock, data_seconds)
    if jax.process_index() == 0:  # the process that writes files and logs
        _write_json(workdir / "summary.json", summary)
        records, _ = _read_metrics(workdir / "metrics.jsonl")
        _plot_convergence([r for _, r in records], workdir / "convergence.png", cfg)
    return summary


def _data_name(cfg: TrainConfig) -> str:
    """The dataset as the phase line names it."""
    if cfg.dataset == "moving_shapes":
        return (
            f"moving_shapes/{cfg.dataset_config} (generated on first use, then "
            "read from the TFDS data directory)"
        )
    return cfg.dataset


def _check_workdir(workdir: Path, cfg: TrainConfig, resume: bool) -> None:
    """Raise unless ``workdir`` holds a run to resume (``resume``) or none."""
    ckdir = workdir / "checkpoints"
    existing = ckpt.latest_step(ckdir)
    if resume:
        if existing is None:
            raise ckpt.CheckpointError(f"--resume: no checkpoint in {ckdir}")
        _check_resume_config(workdir, cfg)
        if cfg.steps < existing:
            raise RunFileError(
                f"--steps {cfg.steps}: {workdir} holds a checkpoint of step "
                f"{existing} already; pass --steps >= {existing} (more steps "
                "extend the run)"
            )
    elif existing is not None:
        raise FileExistsError(
            f"{workdir} already holds checkpoints (newest: step {existing}); pass "
            "--resume to continue that run, or choose another --workdir"
        )


def _check_resume_config(workdir: Path, cfg: TrainConfig) -> bool:
    """Raise a RunFileError naming each field where ``cfg`` and config.json differ
    (other than :data:`RESUME_MAY_CHANGE`'s); whether any of those differ.

    A changed ``steps`` must keep the learning-rate schedule's span
    (``schedule_steps``), so that the steps already run stay what they were.
    A damaged ``config.json`` raises :func:`read_config`'s RunFileError.
    """
    saved = read_config(workdir / "config.json")
    stored = saved.to_dict()
    new = cfg.to_dict()
    span = (saved.schedule_steps or saved.steps, cfg.schedule_steps or cfg.steps)
    # The schedule's span compared as what it is (None means steps).
    stored["schedule_steps"], new["schedule_steps"] = span
    differ = {
        k: (stored[k], v)
        for k, v in new.items()
        if stored[k] != v and k not in RESUME_MAY_CHANGE
    }
    new["schedule_steps"] = cfg.schedule_steps
    if differ:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items())
        hint = ""
        if "schedule_steps" in differ:
            hint = (
                f"; to extend the run keep its schedule: schedule_steps="
                f"{saved.schedule_steps or saved.steps}"
            )
        raise RunFileError(
            f"--resume with a configuration different from {workdir}/config.json "
            f"({detail}){hint}; resume with the same flags (only "
            f"{', '.join(RESUME_MAY_CHANGE)} may change) or use another --workdir"
        )
    return new != saved.to_dict()


def _start_state(run: _Run, workdir: Path, resume: bool, interrupt: _Interrupt):
    """The first state, its step and the wall seconds of the runs before it.

    Resumed: the newest checkpoint, and ``metrics.jsonl`` cut back to its step
    (a torn last line dropped, with a note). New: the initial swarm, then
    ``config.json`` and an empty ``metrics.jsonl``. Once the state exists (and
    before any file is written) a signal no longer stops at once but
    checkpoints it (``interrupt.defer()``).
    """
    main = jax.process_index() == 0
    metrics_path = workdir / "metrics.jsonl"
    if resume:
        state, meta = _restore(run, workdir / "checkpoints")
        interrupt.defer()
        start = int(state.swarm.step)
        if main:
            note = _truncate_metrics(metrics_path, start)
            if note is not None:
                _note(note)
            if read_config(workdir / "config.json") != run.cfg:  # --steps etc.
                _write_json(workdir / "config.json", run.cfg.to_dict())
        return state, start, float(meta.get("wall_seconds", 0.0))
    state = run.init(jax.random.key(run.cfg.seed))
    interrupt.defer()
    if main:
        _write_json(workdir / "config.json", run.cfg.to_dict())
        metrics_path.write_text("")
    return state, 0, 0.0


def _note(message: str) -> None:
    """One line on stderr: something the run did that its user should know."""
    print(f"pso-jax: note: {message}", file=sys.stderr, flush=True)


def _phase(message: str) -> None:
    """One line on stdout: the phase the run is in (data, compiling, training).

    On stdout, with the result line: stderr keeps the progress, notes and
    errors (one line, for an error).
    """
    print(f"pso-jax: {message}", flush=True)


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
    interrupt: _Interrupt,
):
    """Steps ``start`` to ``cfg.steps`` in chunks, or until a signal arrives.

    After each chunk: its records to ``metrics.jsonl`` (process 0), a validation
    every ``eval_every`` steps, the progress bar, a checkpoint every
    ``checkpoint_every`` steps (rounded up to whole chunks), ``on_step``.

    A signal that arrived before the first chunk stops the run before it.

    At a step of ``cfg.narrow_at`` (a block ends there) the swarm narrows to
    the particles that win on validation (:func:`_narrowed`); the loop goes on
    with their smaller run, and its own compiled step.

    Returns:
      ``(run, state, step, stop)``: the run of the last phase, the state after
      ``step`` steps, and the signal number that stopped the run (any
      process's), or ``None``.
    """
    cfg = run.cfg
    main = jax.process_index() == 0  # the process that writes files and logs
    k = cfg.steps_per_call
    every = cfg.checkpoint_every
    if every:
        every = -(-every // k) * k  # checkpoints fall on multiples of k
    # Every run reads validation (evaluations, narrowings, the final choice of
    # the returned model): a dataset without that split fails here, not after
    # training.
    val_source = _source(cfg, "validation")
    elite = _Elite(workdir)
    clock.t_loop, clock.loop_start = time.perf_counter(), start
    step, stop = start, _stop_signal(interrupt)
    compiled: dict[int, Any] = {}  # block length -> its executable
    with (
        open(workdir / "metrics.jsonl" if main else os.devnull, "a") as log,
        _Progress(progress and main, cfg.steps, start, cfg.particles) as bar,
    ):
        while step < cfg.steps and stop is None and not _out_of_time(cfg, clock):
            n = _block_length(step, k, _next_stop(cfg, step), clock)
            interrupt.step = step + n  # what a signal now waits for
            state, metrics = _run_chunk(run, state, batches, step, n, clock, compiled)
            if step == start and main:
                _phase(_eta_line(run, clock, step + n))
            wall = clock.wall()
            records = _metric_records(metrics, step, wall)
            for r in records:
                log.write(_json_text(r) + "\n")  # strict JSON: inf as null
            step += n
            if cfg.eval_every and (step % cfg.eval_every < n or step == cfg.steps):
                if run.task is not None:  # a pretext run: its loss
                    record = _validation_record(run, state, val_source, step)
                else:
                    res, _ = _evaluate(run, state, val_source, top_k=1)
                    elite.offer(
                        run.eval_state(state, 1),
                        res.accuracy,
                        step,
                        whole=bool(run.cfg.recenter_every),
                    )
                    record = {"step": step, "val_accuracy": res.accuracy}
                log.write(_json_text(record) + "\n")
            ran = run.particles  # the swarm these steps ran with
            if run.particles != particles_at(cfg, step):
                run, state = _narrow(run, state, step, log, clock, compiled)
                checkpoints.run = run
            log.flush()
            bar(step, records[-1], clock.step_seconds, ran)
            if every and step % every == 0:
                checkpoints.save(state, step, wall, interrupt)
            if on_step is not None:
                on_step(step, state)
            stop = _stop_signal(interrupt)
    return run, state, step, stop


def _next_stop(cfg: TrainConfig, step: int) -> int:
    """Where the block starting after ``step`` must end at the latest: the
    run's end or its next narrowing."""
    later = [at for at, _ in cfg.narrow_at if at > step]
    return min([cfg.steps, *later])


def _narrow(run: _Run, state: TrainState, step: int, log, clock: _Clock, compiled):
    """Narrow the swarm after ``step`` steps (``cfg.narrow_at``): the run and
    state of the particles that go on; their record in ``metrics.jsonl``."""
    keep = particles_at(run.cfg, step)
    main = jax.process_index() == 0
    if main:
        _phase(f"narrowing {run.particles} particles to {keep} on validation ...")
    val = _split_batches(run, "validation")
    run, state, record = _narrowed(run, state, keep, val)
    log.write(_json_text({"step": step, **record}) + "\n")
    compiled.clear()  # the smaller swarm's step compiles anew
    clock.restart_timing()
    if main:
        accs = ", ".join(f"{a:.3f}" for a in record["particle_val_accuracy"])
        _phase(f"kept particles {record['kept']} (validation accuracy {accs})")
    return run, state


BLOCK_SECONDS = 2.0  # a block of steps takes about this long at most


def _block_length(step: int, k: int, steps: int, clock: _Clock) -> int:
    """How many steps the next block runs before the host syncs.

    The first block of a run (or of a resume) is one step: it compiles and
    measures the step time. After it, ``min(k, max(1, floor(2 s / step
    time)))`` steps (``k``: ``steps_per_call``), ending on a multiple of ``k``
    and at ``steps``. A signal is answered at the end of the block it arrives
    in: within about :data:`BLOCK_SECONDS` (one step, if a step is slower).
    Every block runs the same compiled single step (:func:`_run_chunk`), so
    the block lengths never change what a step computes.
    """
    n = min(k - step % k, steps - step)
    if clock.step_seconds is None:
        return 1
    fit = max(1, int(BLOCK_SECONDS / max(clock.step_seconds, 1e-9)))
    return min(n, fit)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _chunk(trainer: Trainer, state: TrainState, batches: dict):
    """Train steps in one ``lax.scan`` (one jitted call, the state donated).

    Module level with the trainer static. The loop calls it on one step at a
    time (``batches`` of length 1: one compile per run), dispatched
    asynchronously within a block. Sharded, ``trainer.scan`` is a
    ``lax.scan`` over the sharded step: still one call.
    """
    return trainer.scan(state, jax.vmap(_to_float)(batches))


def _run_chunk(
    run: _Run,
    state: TrainState,
    batches,
    step: int,
    n: int,
    clock: _Clock,
    compiled: dict[str, Any] | None = None,
):
    """Steps ``step + 1`` to ``step + n``: the compiled single step ``n`` times,
    dispatched without waiting (the state donated), then one host sync.

    The labels are checked on the host first (a label the model has no output
    for would score every particle ``inf``): before the first call compiles.
    The step is compiled ahead of time, once per run (kept in ``compiled``),
    so that ``clock.compile_seconds`` is compiling only and
    ``clock.step_seconds`` the steps only. One compiled step for every block
    length: the trajectory is the same bits whatever the blocks were (a
    resume included).
    """
    compiled = {} if compiled is None else compiled
    host = [_step_batch(run, batches, step + i) for i in range(n)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *host)
    for name in ("label", "select_label"):
        if name in stacked:
            where = f"the train batches of steps {step + 1}..{step + n}"
            _check_labels(stacked[name], run.num_classes, where)
    main = jax.process_index() == 0
    if "step" not in compiled:
        if main:
            _phase("compiling the train step ...")
        first = run.device_batches(jax.tree.map(lambda x: x[None], host[0]))
        t0 = time.perf_counter()
        compiled["step"] = _chunk.lower(run.trainer, state, first).compile()
        seconds = time.perf_counter() - t0
        # Summed over the run's phases (a narrowed swarm compiles its own step).
        clock.compile_seconds = (clock.compile_seconds or 0.0) + seconds
        if main:
            _phase(f"compiled in {seconds:.1f} s; training")
    t0 = time.perf_counter()
    outs = []
    for batch in host:
        inputs = run.device_batches(jax.tree.map(lambda x: x[None], batch))
        state, metrics = compiled["step"](state, inputs)
        outs.append(metrics)
    # One host sync per block (also what keeps simulated CPU devices'
    # collectives from piling up).
    outs = jax.device_get(outs)
    clock.timed(n, time.perf_counter() - t0)
    metrics = jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
    return state, metrics


def _eta_line(run: _Run, clock: _Clock, done: int) -> str:
    """After the first call: the measured step time and the time still to go.

    The time left counts particle steps (:func:`particle_steps`), so the
    cheaper steps after a narrowing (``narrow_at``) are estimated as such.
    """
    cfg, left = run.cfg, run.cfg.steps - done
    per_particle = clock.step_seconds / run.particles
    seconds = per_particle * (particle_steps(cfg) - particle_steps(cfg, done))
    eta = time.strftime("%H:%M:%S", time.gmtime(seconds))
    return f"{clock.step_seconds:.3g} s per step; about {eta} for the {left} steps left"


def _step_batch(run: _Run, batches, step: int) -> dict:
    """Step ``step``'s batch; with ``select_on="next"`` the next one to select on."""
    batch = batches[step]
    if run.cfg.select_on == "next":
        nxt = batches[step + 1]
        batch = {**batch, "select_video": nxt["video"]}
        if "label" in nxt:  # a pretext run's batch_fn makes its own
            batch["select_label"] = nxt["label"]
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
    if run.task is None:
        summary = _finish(run, state, workdir, _Elite(workdir))
    else:
        summary = _finish_pretext(run, state, workdir)
    per_step = clock.step_seconds  # None only if this process ran no step
    summary.update(
        steps=step,
        wall_seconds=wall,
        data_seconds=data_seconds,
        compile_seconds=clock.compile_seconds,
        particle_evals_per_second=(run.particles / per_step if per_step else None),
        seconds_per_step=per_step,
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
      compile_seconds: compiling the train step (ahead of time, once per block
        length), nothing else.
      t_loop, loop_start: when and at which step the loop started.
      steps_timed, train_seconds: steps run by this process and the seconds
        their calls took (compiling excluded).
    """

    t_start: float
    wall_before: float = 0.0
    compile_seconds: float | None = None
    t_loop: float = 0.0
    loop_start: int = 0
    steps_timed: int = 0
    train_seconds: float = 0.0

    def wall(self) -> float:
        """Wall seconds of the run so far, across resumes."""
        return self.wall_before + time.perf_counter() - self.t_start

    def restart_timing(self) -> None:
        """Time the steps from here on alone (a narrowed swarm's are faster)."""
        self.steps_timed, self.train_seconds = 0, 0.0

    def timed(self, steps: int, seconds: float) -> None:
        """Count a call of ``steps`` steps that took ``seconds``."""
        self.steps_timed += steps
        self.train_seconds += seconds

    @property
    def step_seconds(self) -> float | None:
        """Seconds per step so far (``None`` before the first step)."""
        if not self.steps_timed:
            return None
        return self.train_seconds / self.steps_timed


class _Checkpoints:
    """Saves a run's checkpoints, at most one per step.

    The newest step on disk (``saved``) is tracked here rather than listed
    again, as every process of a multi-process run must make the same save
    calls (orbax writes each one's shards).
    """

    def __init__(self, ckdir: Path, run: _Run, saved: int | None):
        self.ckdir, self.run, self.saved = ckdir, run, saved

    def save(
        self,
        state: TrainState,
        step: int,
        wall: float,
        interrupt: _Interrupt | None = None,
    ) -> None:
        """Save ``state`` as checkpoint ``step`` unless that is the newest.

        ``interrupt`` learns which step is being saved and which is intact (for
        a second signal's message).
        """
        if self.saved == step:
            return
        if interrupt is not None:
            interrupt.saving, interrupt.saved = step, self.saved
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
        if interrupt is not None:
            interrupt.saving, interrupt.saved = None, step


class _Interrupt:
    """SIGTERM/SIGINT while a command runs: recorded, and acted on at safe points.

    Before the run has a state, :meth:`check` (called between phases) raises
    :class:`Interrupted` for a signal that arrived; inside :meth:`at_once`
    (preparing data: Python and NumPy) it is raised at once. It is never raised
    at once elsewhere: the handler runs whenever XLA's compiler calls back into
    Python, and an exception there leaves it broken (the interpreter then
    crashes, SIGSEGV, on exit). After :meth:`defer` (the run has a state) the
    loop checks the flag between calls and checkpoints; a second signal stops at
    once (``KeyboardInterrupt``).

    Host bookkeeping (the signal seen, the mode), never traced.
    """

    def __init__(self):
        self.signum: int | None = None
        self.mode = "hold"  # "hold", "at_once" or "deferred"
        self._old: dict[int, Any] = {}
        self.step: int | None = None  # the step the running call ends at
        self.saving: int | None = None  # the checkpoint being written
        self.saved: int | None = None  # the newest checkpoint written

    @property
    def deferred(self) -> bool:
        return self.mode == "deferred"

    def defer(self) -> None:
        """From now on a signal only sets the flag: the run has a state to save."""
        self.mode = "deferred"

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal arrived (before :meth:`defer`)."""
        if self.signum is not None and not self.deferred:
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def at_once(self) -> Iterator[None]:
        """A block (pure Python and NumPy) that a signal interrupts at once."""
        self.check()
        self.mode = "at_once"
        try:
            yield
        finally:
            self.mode = "hold"

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread no handler can be set: run without.
            with contextlib.suppress(ValueError):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.deferred and self.signum is not None:  # a second signal: at once
            raise SecondInterrupt(self._second_message())
        self.signum = self.signum or signum
        if self.deferred and jax.process_index() == 0:
            # Printing is safe here (raising inside JAX is not): the user
            # hears at once that the signal was seen.
            where = "" if self.step is None else f" (step {self.step})"
            print(
                f"pso-jax: {signal.Signals(signum).name}: stopping after this "
                f"step{where}; saving a checkpoint... (a second signal quits "
                "without it)",
                file=sys.stderr,
                flush=True,
            )
        # Inside a __del__ or a gc callback (JAX has one) an exception would be
        # lost ("Exception ignored"): the flag stops the run at the next check.
        if self.mode == "at_once" and not _in_finaliser(frame):
            raise Interrupted(signum)

    def _second_message(self) -> str:
        """What a second signal loses, and which checkpoint is intact."""
        intact = (
            "no checkpoint was written yet"
            if self.saved is None
            else f"the previous one (step {self.saved}) is intact"
        )
        if self.saving is not None:
            return f"checkpoint of step {self.saving} abandoned; {intact}"
        where = "" if self.step is None else f" of step {self.step}"
        return f"quit without a checkpoint{where}; {intact}"

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


class SecondInterrupt(KeyboardInterrupt):  # noqa: N818 (a KeyboardInterrupt)
    """A second SIGTERM/SIGINT while a run stops: it quits at once, without the
    checkpoint being saved; the message says which checkpoint is intact."""


def _in_finaliser(frame) -> bool:
    """Whether ``frame`` runs inside a ``__del__`` or a ``gc`` callback."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code.co_name == "__del__" or frame.f_code in callbacks:
            return True
        frame = frame.f_back
    return False


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
    ``evaluation.json`` and ``evaluation_confusion.png`` (never the run's own
    ``summary.json`` or ``confusion.png``), and returns the metrics.

    Args:
      workdir: a run's work directory.
      step: the checkpoint step (default: the newest).
      parallel: the device layout to restore onto (any device count: the
        checkpoint holds global arrays); the swarm must keep the padded size it
        was saved with. Default as for :func:`train`.

    Raises:
      RunFileError: ``workdir`` is not a directory, or its ``config.json`` is
        missing or damaged (naming the file and the field).
      WorkdirLockedError: another process writes into ``workdir``.
      pso_jax.checkpoint.CheckpointError: no usable checkpoint.
      ValueError: a layout that does not fit (see :func:`train`).
      DataError: the config and the data disagree (see :func:`train`).
      Interrupted: a SIGTERM/SIGINT arrived (``evaluation.json`` unwritten).
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise RunFileError(f"{workdir}: no such directory (the --workdir of a run)")
    # A signal stops it at the next phase, evaluation.json unwritten.
    with _Interrupt() as interrupt, lock_workdir(workdir):
        cfg = read_config(workdir / "config.json")
        parallel = parallel or Parallelism()
        _check_layout(cfg, parallel)
        _check_data(cfg)
        with interrupt.at_once():
            source = _first_source(cfg, "train")
        _check_data(cfg, source)
        ckdir = workdir / "checkpoints"
        at = ckpt.latest_step(ckdir) if step is None else step
        run = _Run(cfg, source, parallel, particles=particles_at(cfg, at or 0))
        interrupt.check()
        state, _ = _restore(run, ckdir, step=step)
        interrupt.check()
        if run.task is None:
            elite = _Elite(workdir)
            result = _finish(run, state, workdir, elite, confusion=EVAL_CONFUSION)
        else:  # a pretext run: its task's loss (backbone/ left as it is)
            result = _finish_pretext(run, state, workdir, save=False)
        result["steps"] = int(state.swarm.step)
        result["parallel"] = _layout(run)
        interrupt.check()
        if jax.process_index() == 0:
            _write_json(workdir / EVAL_JSON, result)
    return result


@contextlib.contextmanager
def lock_workdir(workdir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``workdir``'s lock while the block runs: one writer per work directory.

    :func:`train`, :func:`evaluate_workdir` and ``pso-jax minimize`` hold it.
    The lock is an ``fcntl.flock`` on ``workdir/pso-jax.lock`` (:data:`LOCK_FILE`),
    which the operating system releases when its holder dies, however it dies;
    the file holds the holder's pid, host, command line and start time, which
    a second process names when it fails (at once: it never waits). A lock
    file left by a process that died (SIGKILL, a crash) is taken over with a
    one-line note naming that process. The file is removed on release, and
    ``workdir`` too if this call created it and nothing else was written there.

    Where the file system has no ``flock`` (some network file systems), the pid
    inside decides: a holder on this host that no longer runs is taken over; one
    on another host is trusted (delete the file if that process is gone).

    In a multi-process run process 0 holds the lock for all (on the shared work
    directory) and tells the others whether it got it, so that all fail alike.
    Not re-entrant: a second ``lock_workdir`` of the same directory in the same
    process fails as another process's would.

    Yields:
      The lock file's path.

    Raises:
      WorkdirLockedError: another process holds the lock; the message names
        its pid, host, command line and start time.

    >>> import tempfile
    >>> with lock_workdir(tempfile.mkdtemp()) as path:
    ...     print(path.name, json.loads(path.read_text())["pid"] == os.getpid())
    pso-jax.lock True
    >>> path.exists()
    False
    """
    workdir = Path(workdir)
    created = not workdir.exists()
    path = workdir / LOCK_FILE
    main = jax.process_index() == 0
    fd = None
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        error = None
        if main:
            try:
                # A signal while the lock is taken waits until ``fd`` is known,
                # so that the cleanup below always finds what it must undo.
                with _signals_held():
                    fd = _acquire(path)
            except WorkdirLockedError as e:
                error = e
        if jax.process_count() > 1:  # every process fails alike, or none
            held = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not held and error is None:
                error = WorkdirLockedError(
                    f"{workdir} is in use: process 0 could not take its lock "
                    "(see process 0's message)"
                )
        if error is not None:
            raise error
        yield path
    finally:
        with _signals_held():
            if fd is not None:
                _release(fd, path)
            if created and main:
                with contextlib.suppress(OSError):
                    workdir.rmdir()  # only if empty: nothing was written


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT held back while the block runs, raised again after it
    (to the handlers there were before), so that it is never cut in half."""
    pending: list[int] = []
    old = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        # Outside the main thread no handler can be set: run without.
        with contextlib.suppress(ValueError):
            old[s] = signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def _acquire(path: Path) -> int:
    """Lock ``path`` (created if absent); the open descriptor that holds it.

    Whatever interrupts it (a signal's :class:`Interrupted`) leaves no lock
    held and no lock file of ours behind.
    """
    fd = _open_locked(path)
    try:
        previous = _read_holder(fd)
        if previous:
            gone = "no longer runs" if not _may_run(previous) else "no longer holds it"
            _note(
                f"took over the stale lock {path} of {_holder(previous)}, which {gone}"
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    except BaseException:
        _release(fd, path)
        raise
    return fd


def _open_locked(path: Path) -> int:
    """``path`` opened (created if absent) and ``flock``-ed, or an error."""
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a releasing holder just removed the directory
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            _flock(fd, path)
            # A releasing holder may have removed the file between our open
            # and flock: then we hold a lock on a file no one else sees. Retry.
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise WorkdirLockedError(f"{path}: the lock file kept changing; try again")


def _flock(fd: int, path: Path) -> None:
    """Take the ``flock`` of ``fd``, or raise naming its holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WorkdirLockedError(_locked_message(path, _read_holder(fd))) from None
    except OSError:  # no flock on this file system: the pid inside decides
        holder = _read_holder(fd)
        if holder and _may_run(holder):
            raise WorkdirLockedError(
                _locked_message(path, holder) + f" (or delete {path} if that "
                "process is gone: this file system has no flock)"
            ) from None


def _release(fd: int, path: Path) -> None:
    """Remove the lock file (while still holding it), then unlock."""
    try:
        if _same_file(fd, path):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)  # releases the flock


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder written in a lock file (``{}`` if empty, ``{"raw": ...}`` if not
    JSON)."""
    text = os.pread(fd, 65536, 0).decode(errors="replace").strip()
    if not text:
        return {}
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {"raw": text[:200]}
    return holder if isinstance(holder, dict) else {"raw": text[:200]}


def _may_run(holder: dict[str, Any]) -> bool:
    """Whether the holder may still run (``False`` only if it surely does not)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True  # another host: cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host h (pso-jax train ...) since ...`` for messages."""
    if "pid" not in holder:
        return f"an unknown process (lock file {holder.get('raw', '')!r})"
    return (
        f"pid {holder['pid']} on {holder.get('host', '?')} "
        f"({holder.get('command', '?')}) since {holder.get('since', '?')}"
    )


def _locked_message(path: Path, holder: dict[str, Any]) -> str:
    who = _holder(holder) if holder else "another process (starting up)"
    return (
        f"{path.parent} is in use: {who} holds its lock {path.name}; wait for it "
        "to finish, or choose another --workdir"
    )
