"""The ``pso-jax`` command line: thin wrappers over the library.

Subcommands:

- ``pso-jax minimize``: minimise a benchmark function (``pso_jax.objectives``),
  with a progress bar, writing ``metrics.jsonl``, ``summary.json`` and
  ``convergence.png`` to ``--workdir``.
- ``pso-jax train``: train a swarm of 3D-conv video classifiers
  (:mod:`pso_jax.experiment`), e.g. ``pso-jax train --config demo``.
- ``pso-jax pretrain``: a backbone from unlabeled clips (a self-supervised
  pretext task, :mod:`pso_jax.pretext`: ``--objective masked|next_frame|order``),
  written to ``--workdir``/backbone for ``pso-jax train --pretrained DIR``.
- ``pso-jax evaluate``: re-evaluate a saved swarm (``--workdir`` of a run).
- ``pso-jax compress``: compress a run's returned model (int8 or fewer bits per
  weight, magnitude pruning; ``--search``: a swarm over per-layer settings and
  its Pareto front), its test accuracy and size before and after in
  ``summary.json`` (:mod:`pso_jax.compress`).
- ``pso-jax demo``: the built-in demo, ``train --config demo``; ``pso-jax demo
  --rastrigin`` compares every variant on shifted and rotated Rastrigin (D=10).

``train``, ``pretrain`` and ``evaluate`` run on several devices with
``--devices N`` (the swarm sharded over them, :mod:`pso_jax.sharding`) and on
several hosts with
``--coordinator``/``--num-processes``/``--process-id`` (or the
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` environment
variables, or ``--distributed-auto`` on a TPU pod slice or under SLURM/Open MPI):
start the same command on every host; ``jax.distributed.initialize`` runs before
anything else touches JAX's backend.

Errors: one line on stderr, ``pso-jax: error: ...``, naming the flag (or file
and field), the value and what is expected; ``--debug`` (before or after the
subcommand) prints the full traceback too. Every numeric flag is checked
(finite, in range) before any data is read or anything compiles; the data and
the model are checked against each other on the host before compiling. A
work directory has one writer at a time (``pso-jax.lock``). SIGTERM and SIGINT
are handled from the start of a command. Exit codes (:data:`EXIT_CODES`, also
in ``--help``):

===  ==================================================================
0    success
1    an unexpected error (a bug): one line; --debug shows the traceback
2    usage: a bad flag or config value, or a device layout that does not
     fit (argparse's own errors too)
3    the work directory is in use: another process holds its lock (the
     message names its pid, host and command)
4    the work directory does not fit the command or is damaged:
     checkpoints there without --resume, --resume without a checkpoint or
     with another configuration, an unreadable checkpoint, config.json,
     metrics.jsonl or elite
5    the data and the model disagree (class count, labels, clip shape,
     batch size against the split), or the dataset cannot be read
6    the run finished but diverged: the swarm's best fitness is not
     finite (summary.json is written, the value as null)
130  interrupted by SIGINT (Ctrl-C)
143  interrupted by SIGTERM: once a run has a state it is checkpointed
     first (continue with --resume); before that nothing is written
===  ==================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import signal
import sys
import textwrap
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from pso_jax import compile_cache, experiment, objectives, sharding
from pso_jax import compress as compress_lib
from pso_jax.checkpoint import CheckpointError
from pso_jax.experiment import loop
from pso_jax.experiment.loop import _Interrupt
from pso_jax.experiment.metrics import _json_text, _write_json
from pso_jax.flax_utils import COMPUTE_DTYPES
from pso_jax.minimize import scan_chunks
from pso_jax.models import MODELS, STEMS
from pso_jax.particle_space import PARTICLE_SPACES
from pso_jax.pretext import TASKS
from pso_jax.pso import VARIANTS, pso
from pso_jax.topology import TOPOLOGIES
from pso_jax.train import BEST_REFRESH, FITNESS_FNS

EXIT_CODES = {
    0: "success",
    1: "an unexpected error (a bug): one line; --debug shows the traceback",
    2: "usage: a bad flag or config value, or a device layout that does not fit "
    "(argparse's own errors too)",
    3: "the work directory is in use: another process holds its lock (the "
    "message names its pid, host and command)",
    4: "the work directory does not fit the command or is damaged: checkpoints "
    "there without --resume, --resume without a checkpoint or with another "
    "configuration, an unreadable checkpoint, config.json, metrics.jsonl or elite",
    5: "the data and the model disagree (class count, labels, clip shape, batch "
    "size against the split), or the dataset cannot be read",
    6: "the run finished but diverged: the swarm's best fitness is not finite "
    "(summary.json is written, the value as null)",
    130: "interrupted by SIGINT (Ctrl-C)",
    143: "interrupted by SIGTERM: once a run has a state it is checkpointed first "
    "(continue with --resume); before that nothing is written",
}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with its usage errors on one line like every error."""

    def error(self, message: str):
        self.exit(2, f"pso-jax: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seed(text: str) -> int:
    """``--seed`` of ``minimize`` and ``demo``: an int in ``[0, 2**32)``."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def _patch(text: str) -> tuple[int, int, int]:
    """``--patch``: three ints >= 1, ``T,H,W``."""
    try:
        value = tuple(int(v) for v in text.split(","))
    except ValueError:
        value = ()
    if len(value) != 3 or min(value) < 1:
        raise argparse.ArgumentTypeError(f"expected T,H,W ints >= 1, got {text!r}")
    return value


def _range(text: str) -> tuple[float, float]:
    """``"1e-4,1e-2"`` -> ``(1e-4, 1e-2)``."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LOW,HIGH (two numbers), got {text!r}"
        ) from None
    if not (0 < low <= high and math.isfinite(high)):
        raise argparse.ArgumentTypeError(
            f"expected finite 0 < LOW <= HIGH, got {text!r}"
        )
    return low, high


def _narrowings(text: str) -> tuple[tuple[int, int], ...]:
    """``"40:2,80:1"`` -> ``((40, 2), (80, 1))`` (``--narrow-at``; ``""``: none)."""
    pairs = []
    for item in filter(None, text.split(",")):
        try:
            step, keep = (int(v) for v in item.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected STEP:KEEP[,STEP:KEEP...] (ints), got {text!r}"
            ) from None
        pairs.append((step, keep))
    return tuple(pairs)


def _devices(text: str) -> int:
    """``--devices``: an int >= 1, or ``all`` (``Parallelism``'s 0).

    ``0`` is refused rather than read as every device: a count computed to 0
    should fail, not silently take the whole machine.
    """
    if text.strip().lower() == "all":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a device count >= 1 or 'all', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a device count >= 1 or 'all' (every device), got {value}"
        )
    return value


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "devices and hosts",
        "Shard the swarm over devices: each holds and trains particles/devices "
        "particles; the run's numbers are the one-device run's up to float "
        "rounding, and a run resumes on any device count. Several hosts: start "
        "the same command on each, with the coordinator flags or the "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID "
        "environment variables; the work directory must be shared (checkpoints "
        "are written by every process, other files by process 0).",
    )
    g.add_argument(
        "--devices",
        type=_devices,
        default=None,
        metavar="N|all",
        help="devices to shard the swarm over, over all processes (default: 1 in "
        "one process, the unsharded path; every device in a multi-process run). "
        "Simulated CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=N",
    )
    g.add_argument(
        "--data",
        type=_positive_int,
        default=1,
        metavar="N",
        help="split each batch over N devices (a 'data' mesh axis; the particles "
        "over devices/N): for fewer particles than devices (default: 1)",
    )
    g.add_argument(
        "--pad",
        action="store_true",
        help="if the particle count does not divide over the devices, add inert "
        "particles instead of failing (they never become bests; evaluation and "
        "reports leave them out)",
    )
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="address of process 0, reachable from every process "
        "($JAX_COORDINATOR_ADDRESS)",
    )
    g.add_argument(
        "--num-processes",
        type=_positive_int,
        metavar="N",
        help="number of processes ($JAX_NUM_PROCESSES)",
    )
    g.add_argument(
        "--process-id",
        type=_nonnegative_int,
        metavar="I",
        help="this process's index in [0, N) ($JAX_PROCESS_ID)",
    )
    g.add_argument(
        "--distributed-auto",
        action="store_true",
        help="let JAX detect the processes (Cloud TPU pod slice, SLURM, Open MPI, "
        "Kubernetes)",
    )


def _start_processes(args) -> experiment.Parallelism:
    """Join the multi-process run if configured; the run's ``Parallelism``.

    Called before anything initialises JAX's backend (``jax.distributed``
    requires it).

    Raises:
      ValueError: a bad value of the flags (named as flags).
    """
    try:
        sharding.initialize_distributed(
            args.coordinator,
            args.num_processes,
            args.process_id,
            auto=args.distributed_auto,
        )
        return experiment.Parallelism(
            devices=args.devices, data=args.data, pad=args.pad
        )
    except ValueError as e:
        message = str(e).replace("auto=True", "--distributed-auto")
        raise ValueError(message) from None


def _is_main_process() -> bool:
    return jax.process_index() == 0


def _add_swarm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objective", default="rastrigin", help="a pso_jax.objectives name")
    p.add_argument("--dims", type=_positive_int, default=10, help="problem dimension")
    p.add_argument("--shift", action="store_true", help="shift the optimum (CEC)")
    p.add_argument("--rotate", action="store_true", help="rotate the function (CEC)")
    p.add_argument("--particles", type=_positive_int, default=40, help="swarm size")
    p.add_argument("--steps", type=_positive_int, default=1000, help="step budget")
    p.add_argument("--variant", default="inertia", choices=VARIANTS)
    p.add_argument("--topology", default=None, choices=TOPOLOGIES)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--workdir", type=Path, default=Path("pso_out"))


def _run_swarm(args, variant: str, progress, task, log, interrupt) -> dict:
    """Run one swarm in chunks of jitted ``lax.scan`` steps; return its record.

    A SIGTERM/SIGINT stops it after the chunk it arrives in (``interrupt``).
    """
    key = jax.random.key(args.seed)
    key_problem, key_swarm = jax.random.split(key)
    problem = objectives.make_problem(
        args.objective,
        args.dims,
        key=key_problem if (args.shift or args.rotate) else None,
        shift=args.shift,
        rotate=args.rotate,
    )
    opt = pso(
        lambda x, _: problem.fn(x),
        num_particles=args.particles,
        variant=variant,
        topology=None if variant == "cso" else args.topology,
        bounds=problem.bounds,
    )
    hp = opt.default_hparams
    state0 = jax.jit(opt.init)(key_swarm, jnp.zeros(args.dims, jnp.float32), hp)
    history: list[float] = []
    start = time.perf_counter()
    state, done = state0, 0
    # One host sync per chunk of 50 steps: the infos arrive as numpy arrays.
    for chunk in scan_chunks(key_swarm, opt, state0, hp, args.steps):
        state, infos, done = chunk
        best, mean = infos.best_fitness, infos.mean_fitness
        for b, m in zip(best, mean, strict=True):
            history.append(float(b))
            record = {
                "variant": variant,
                "step": len(history),
                "best_fitness": float(b),
                "mean_fitness": float(m),
            }
            log.write(_json_text(record) + "\n")  # strict JSON: inf as null
        progress.update(task, advance=len(best), best=f"{best[-1]:.4g}")
        interrupt.check()
    wall = time.perf_counter() - start
    return {
        "variant": variant,
        "best_fitness": float(state.best_fitness),
        "error": float(state.best_fitness) - problem.optimum_value,
        "steps": done,
        "wall_seconds": wall,
        "particle_evals_per_second": done * args.particles / wall,
        "history": history,
    }


def _minimize_cmd(args, variants: list[str]) -> int:
    try:
        objectives.get(args.objective)
    except KeyError as e:
        raise ValueError(str(e)) from None
    with _Interrupt() as interrupt, experiment.lock_workdir(args.workdir):
        records = _minimize_runs(args, variants, interrupt)
        _minimize_report(args, records)
    return 0


def _minimize_runs(args, variants: list[str], interrupt) -> list[dict]:
    """Every variant's run, with a progress bar; ``metrics.jsonl`` written."""
    console = Console(stderr=True)
    records = []
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]}"),
        TimeRemainingColumn(),
    )
    metrics_path = args.workdir / "metrics.jsonl"
    with (
        Progress(*columns, console=console) as progress,
        open(metrics_path, "w") as log,
    ):
        for variant in variants:
            task = progress.add_task(variant, total=args.steps, best="-")
            records.append(_run_swarm(args, variant, progress, task, log, interrupt))
    return records


def _minimize_report(args, records: list[dict]) -> None:
    """``convergence.png``, ``summary.json`` (strict JSON) and the result lines."""
    # matplotlib (~0.4 s) is imported here, not at the top, to keep `--help` fast.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    console = Console(stderr=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for rec in records:
        err = [max(h - 0.0, 1e-12) for h in rec["history"]]
        ax.semilogy(range(1, len(err) + 1), err, label=rec["variant"])
    ax.set_xlabel("step")
    ax.set_ylabel("best fitness")
    name = ("shifted " if args.shift else "") + ("rotated " if args.rotate else "")
    ax.set_title(f"{name}{args.objective}, D={args.dims}, P={args.particles}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.workdir / "convergence.png", dpi=120)
    plt.close(fig)
    summary = {
        "objective": args.objective,
        "dims": args.dims,
        "particles": args.particles,
        "shift": args.shift,
        "rotate": args.rotate,
        "seed": args.seed,
        "runs": [{k: v for k, v in r.items() if k != "history"} for r in records],
    }
    _write_json(args.workdir / "summary.json", summary)  # atomic, strict JSON
    for r in records:
        console.print(
            f"{r['variant']:>13}: best {r['best_fitness']:.6g} in {r['steps']} steps, "
            f"{r['wall_seconds']:.2f} s ({r['particle_evals_per_second']:.3g} evals/s)"
        )
    metrics_path = args.workdir / "metrics.jsonl"
    console.print(f"wrote {metrics_path}, summary.json, convergence.png")


# The flags that --resume may change (experiment.RESUME_MAY_CHANGE's fields).
_RESUMABLE_FLAGS = ", ".join(
    "--" + f.replace("_", "-") for f in experiment.RESUME_MAY_CHANGE
)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument(
        "--config",
        default=None,
        choices=sorted(experiment.CONFIGS),
        help="preset (default: demo); the flags below override its fields; not "
        "with --resume, which reads the run's config.json",
    )
    g.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="default: <config>_out, or <config>_out_2, _3, ... when that holds "
        "another run (printed at the start)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --workdir from its newest checkpoint and its "
        f"config.json; only {_RESUMABLE_FLAGS} "
        "may be given to change it (--steps N extends a run; the learning-rate "
        "schedule keeps its original span and stays at its floor after)",
    )
    g.add_argument("--seed", type=int)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        help="moving_shapes, a TFDS video dataset name or a prepared TFDS folder",
    )
    d.add_argument("--dataset-config", help="moving_shapes config: small, default")
    d.add_argument("--data-dir", help="TFDS data directory")
    d.add_argument("--num-frames", type=_positive_int, help="frames per clip")
    d.add_argument("--num-classes", type=_positive_int)
    d.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=sorted(MODELS))
    m.add_argument("--width", type=_positive_int)
    m.add_argument("--stem", choices=STEMS)
    m.add_argument(
        "--patch",
        type=_patch,
        metavar="T,H,W",
        help="tubelet size, e.g. 2,2,2 (default 2,4,4; finer sees finer motion)",
    )
    m.add_argument(
        "--pretrained",
        metavar="DIR",
        help="start from a `pso-jax pretrain` work directory's backbone (a "
        "fresh head) or from params saved with flax_utils.save_params",
    )
    m.add_argument("--swarm-over", choices=("all", "head"))
    m.add_argument(
        "--particle-space",
        choices=PARTICLE_SPACES,
        help="a particle is a whole model (full), rank-R factors per kernel "
        "around one shared model (lowrank), or D coordinates of a random "
        "subspace through it (subspace)",
    )
    m.add_argument(
        "--dtype",
        choices=COMPUTE_DTYPES,
        help="the models' compute dtype (bfloat16: mixed precision, the swarm "
        "and optimizer state stay float32)",
    )
    m.add_argument("--rank", type=_positive_int, help="R of --particle-space lowrank")
    m.add_argument(
        "--subspace-dim", type=_positive_int, help="D of --particle-space subspace"
    )
    m.add_argument(
        "--recenter-every",
        type=int,
        metavar="N",
        help="subspace: every N steps the best becomes the base of a fresh "
        "random subspace (0: never)",
    )
    s = p.add_argument_group("swarm")
    s.add_argument("--particles", type=_positive_int, help="swarm size")
    s.add_argument("--steps", type=_positive_int, help="swarm steps")
    s.add_argument(
        "--local-steps", type=int, help="gradient steps per swarm step (0: pure PSO)"
    )
    _add_gradient_args(p)
    s.add_argument(
        "--narrow-at",
        type=_narrowings,
        metavar="STEP:KEEP[,...]",
        help="successive halving: after STEP steps only the KEEP particles best "
        "on validation go on (e.g. 40:1 races --lr-range, then trains the winner)",
    )
    s.add_argument(
        "--select-on",
        choices=("batch", "next"),
        help="measure the swarm's fitness on the batch just fitted, or the next",
    )
    s.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="stop training after this many seconds, then evaluate",
    )
    s.add_argument(
        "--init",
        choices=("perturb", "independent"),
        help="particles around one init, or one fresh init each",
    )
    s.add_argument("--batch-size", type=_positive_int)
    s.add_argument(
        "--split-batch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="every particle fits its own batch-size/particles clips: the swarm's "
        "step costs one model's",
    )
    s.add_argument("--inertia", type=float, help="w (default: the variant's)")
    s.add_argument("--cognitive", type=float, help="c1 (default: the variant's)")
    s.add_argument("--social", type=float, help="c2 (default: the variant's)")
    s.add_argument(
        "--init-scale", type=float, help="std of the particles' spread at init"
    )
    s.add_argument("--variant", choices=VARIANTS)
    s.add_argument("--topology", choices=TOPOLOGIES)
    s.add_argument("--fitness", choices=FITNESS_FNS)
    s.add_argument("--best-refresh", choices=BEST_REFRESH)
    s.add_argument("--steps-per-call", type=_positive_int)
    s.add_argument("--eval-every", type=int)
    s.add_argument("--checkpoint-every", type=int)
    s.add_argument("--top-k", type=_positive_int)


def _add_gradient_args(p: argparse.ArgumentParser) -> None:
    """The gradient steps' optimizer (Adam/AdamW) and its population (PBT)."""
    a = p.add_argument_group("gradient steps")
    a.add_argument("--lr", dest="learning_rate", type=float, help="Adam step size")
    a.add_argument("--lr-schedule", choices=("cosine", "constant"))
    a.add_argument(
        "--lr-warmup",
        type=float,
        metavar="FRACTION",
        help="share of the cosine schedule spent rising linearly from 0 to --lr "
        "(e.g. 0.1 for a Transformer; default 0)",
    )
    a.add_argument("--weight-decay", type=float, help="AdamW's weight decay")
    a.add_argument(
        "--lr-range",
        type=_range,
        metavar="LOW,HIGH",
        help="per-particle learning rates, log-uniform over the range (PBT)",
    )
    a.add_argument(
        "--wd-range",
        type=_range,
        metavar="LOW,HIGH",
        help="per-particle weight decays, log-uniform over the range (PBT)",
    )
    a.add_argument(
        "--exploit-every",
        type=int,
        help="every N steps the worst particles clone good ones (PBT; 0: never)",
    )
    a.add_argument("--exploit-fraction", type=float, help="share cloned (0, 0.5]")
    a.add_argument(
        "--hparam-move",
        choices=("exploit", "pso", "both"),
        help="every --exploit-every steps: PBT's clone (exploit), PSO on the "
        "log-hyperparameters (pso), or both",
    )


def _given_fields(args) -> dict:
    """The :class:`~pso_jax.experiment.TrainConfig` fields given as flags."""
    fields = [f.name for f in dataclasses.fields(experiment.TrainConfig)]
    return {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}


def _default_workdir(config: str, resume: bool) -> Path:
    """``<config>_out``; for a new run, the first of ``<config>_out_2``, ``_3``,
    ... that holds no run when ``<config>_out`` does (``make demo``'s folder,
    then ``pso-jax train --config demo``)."""
    base = Path(f"{config}_out")
    if resume:
        return base
    candidate, n = base, 1
    while (candidate / "checkpoints").exists() or (candidate / "config.json").exists():
        n += 1
        candidate = Path(f"{base}_{n}")
    if n > 1:
        print(
            f"pso-jax: note: {base} holds another run; writing to {candidate} "
            "(--workdir chooses the folder)",
            file=sys.stderr,
        )
    return candidate


def _resume_config(args, workdir: Path) -> experiment.TrainConfig:
    """The config a ``--resume`` continues: ``workdir``'s ``config.json`` with
    the flags of :data:`~pso_jax.experiment.RESUME_MAY_CHANGE` applied.

    Without a ``config.json`` (no run there) the flags' config, for
    :func:`~pso_jax.experiment.train` to report what is missing.

    Raises:
      RunFileError: a damaged ``config.json``, or a flag that differs from the
        saved value and may not change (one line: the flag, both values).
    """
    given = _given_fields(args)
    path = workdir / "config.json"
    if not path.is_file():
        return experiment.get_config(_default_config(args), **given)
    saved = experiment.read_config(path)
    if args.config is not None:
        preset = experiment.CONFIGS[args.config].to_dict()
        unlike = [
            k
            for k, v in saved.to_dict().items()
            if preset[k] != v and k not in given and k != "schedule_steps"
        ]
        if unlike:  # --config would have changed these: say it does not
            print(
                f"pso-jax: note: --resume continues {workdir} from its "
                f"config.json; --config {args.config} is not applied (the run "
                f"keeps its {', '.join(unlike)})",
                file=sys.stderr,
            )
    changes = {}
    for name, value in given.items():
        old = getattr(saved, name)
        if isinstance(value, list):
            value = tuple(value)
        if value == old:
            continue
        if name not in experiment.RESUME_MAY_CHANGE:
            flag = args._flags.get(name, name)
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise experiment.RunFileError(
                f"{flag} {shown}: the run in {workdir} has {name}={old!r} "
                f"(its config.json); resume without {flag} (--resume reads it "
                "from there), or start a new run with another --workdir"
            )
        changes[name] = value
    if "steps" in changes:  # keep the schedule's span: the steps run stay exact
        changes["schedule_steps"] = saved.schedule_steps or saved.steps
    cfg = dataclasses.replace(saved, **changes)
    experiment.validate_config(cfg)
    return cfg


def _default_config(args) -> str:
    """The preset a ``train`` / ``pretrain`` command starts from."""
    if args.config is not None:
        return args.config
    return "pretrain" if args.command == "pretrain" else "demo"


def _train_cmd(args) -> int:
    """``pso-jax train`` and ``pso-jax pretrain`` (a config with an objective)."""
    parallel = _start_processes(args)
    config = _default_config(args)
    workdir = args.workdir or _default_workdir(config, args.resume)
    if args.resume:
        cfg = _resume_config(args, workdir)
    else:
        given = _given_fields(args)
        if args.command == "pretrain" and experiment.CONFIGS[config].objective is None:
            # A preset of supervised training: pretrain it on the default task.
            given.setdefault("objective", experiment.CONFIGS["pretrain"].objective)
        cfg = experiment.get_config(config, **given)
    summary = experiment.train(
        cfg,
        workdir,
        resume=args.resume,
        progress=not args.no_progress,
        parallel=parallel,
    )
    if summary.get("interrupted"):
        name = signal.Signals(summary["signal"]).name
        print(
            f"pso-jax: interrupted by {name} at step {summary['steps']}; checkpoint "
            f"saved; continue with: pso-jax {args.command} --resume --workdir "
            f"{workdir}",
            file=sys.stderr,
        )
        return 128 + summary["signal"]
    if not _is_main_process():
        return 0
    if cfg.objective is not None:
        return _pretrain_report(cfg, summary, workdir)
    returned = summary.get("returned_model", "best_particle")
    print(
        f"test accuracy {summary['test_accuracy']:.4f} ({returned}; top-"
        f"{summary['ensemble_size']} ensemble {summary['ensemble_test_accuracy']:.4f}),"
        f" macro-F1 {summary['test_macro_f1']:.4f}; {summary['steps']} steps in "
        f"{summary['wall_seconds']:.1f} s; wrote {workdir}/summary.json"
    )
    best = summary["best_train_fitness"]
    if not math.isfinite(best):
        print(
            f"pso-jax: error: the run diverged: the swarm's best fitness is {best} "
            "(no particle kept a finite fitness), so the accuracies above are of "
            "an arbitrary model; lower --lr or --init-scale, or check the data",
            file=sys.stderr,
        )
        return 6
    return 0


def _pretrain_report(cfg, summary: dict, workdir: Path) -> int:
    """A pretext run's result line and how to fine-tune its backbone."""
    acc = summary.get("test_accuracy")
    told = "" if acc is None else f", order told right {acc:.4f}"
    patch = ",".join(map(str, cfg.patch))
    print(
        f"{cfg.objective} test loss {summary['test_loss']:.4g} (the starting "
        f"model: {summary['initial_test_loss']:.4g}, the best constant guess: "
        f"{summary['constant_test_loss']:.4g}){told}; {summary['steps']} "
        f"steps in {summary['wall_seconds']:.1f} s; wrote {workdir}/backbone\n"
        f"fine-tune: pso-jax train --pretrained {workdir} --model {cfg.model} "
        f"--width {cfg.width} --stem {cfg.stem} --patch {patch} [--swarm-over head]"
    )
    if not math.isfinite(summary["best_train_fitness"]):
        print(
            "pso-jax: error: the run diverged: no particle kept a finite loss; "
            "lower --lr or --init-scale",
            file=sys.stderr,
        )
        return 6
    return 0


def _evaluate_cmd(args) -> int:
    parallel = _start_processes(args)
    out = [loop.EVAL_JSON, loop.EVAL_CONFUSION]
    existed = [name for name in out if (args.workdir / name).exists()]
    result = experiment.evaluate_workdir(
        args.workdir, step=args.step, parallel=parallel
    )
    if not _is_main_process():
        return 0
    if "objective" in result:  # a pretext run: no confusion plot
        out = out[:1]
    wrote = ", ".join(
        f"{'rewrote' if name in existed else 'wrote'} {args.workdir / name}"
        for name in out
    )
    if "objective" in result:
        print(
            f"step {result['steps']}: {result['objective']} test loss "
            f"{result['test_loss']:.4g} (the starting model: "
            f"{result['initial_test_loss']:.4g}); {wrote}"
        )
        return 0
    print(
        f"step {result['steps']}: test accuracy {result['test_accuracy']:.4f}, "
        f"macro-F1 {result['test_macro_f1']:.4f}, top-{result['ensemble_size']} "
        f"ensemble {result['ensemble_test_accuracy']:.4f}; {wrote}"
    )
    return 0


def _lambdas(text: str) -> tuple[float, ...]:
    """``"0.03,0.1,1"`` -> ``(0.03, 0.1, 1.0)`` (``--lambdas``: each > 0, finite)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(
            f"expected LAM[,LAM...] (finite numbers > 0), got {text!r}"
        )
    return values


def _compress_cmd(args) -> int:
    entry = experiment.compress_workdir(
        args.workdir,
        bits=args.bits,
        sparsity=args.sparsity,
        scope=args.scope,
        search_front=args.search,
        lambdas=args.lambdas,
        search_clips=args.search_clips,
        search_particles=args.search_particles,
        search_steps=args.search_steps,
        seed=args.seed,
    )
    print(
        f"{entry['model']}, {entry['bits']} bits, sparsity {entry['sparsity']:g}: "
        f"test accuracy {entry['test_accuracy_before']:.4f} -> "
        f"{entry['test_accuracy_after']:.4f}; {entry['float_bytes']} -> "
        f"{entry['compressed_bytes']} bytes ({entry['size_ratio']:.2f}x smaller); "
        f"wrote {args.workdir / entry['file']}, the 'compression' entry of "
        f"{args.workdir / 'summary.json'}"
    )
    if args.search:
        for row in entry["search"]["front"]:
            print(
                f"  front: {row['size_ratio']:6.2f}x smaller, validation "
                f"{row['val_accuracy']:.4f}, test {row['test_accuracy']:.4f} "
                f"({row['source']})"
            )
        print(f"  wrote {', '.join(entry['search']['files'])} in {args.workdir}")
    return 0


def _exit_codes_epilog() -> str:
    """The ``--help`` epilog: :data:`EXIT_CODES`, one wrapped entry each."""
    lines = ["exit codes:"]
    for code, text in EXIT_CODES.items():
        lines += textwrap.wrap(
            text, 78, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    """The ``pso-jax`` parser, its subcommands and their flags."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on an error, print the full traceback as well as the one line",
    )
    # JAX's persistent compilation cache (pso_jax.compile_cache), for every command.
    common.add_argument(
        "--compile-cache",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="keep compiled programs in DIR, so that the next run loads them "
        f"instead of compiling (default: ${compile_cache.ENV_VAR}, else "
        "$XDG_CACHE_HOME/pso_jax/jax_cache or ~/.cache/pso_jax/jax_cache)",
    )
    common.add_argument(
        "--no-compile-cache",
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"compile everything afresh; also ${compile_cache.ENV_VAR}=0",
    )
    layout = dict(
        parents=[common],
        epilog=_exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser = _Parser(
        prog="pso-jax", description="Particle swarm optimization in JAX.", **layout
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_min = sub.add_parser(
        "minimize", help="minimise a benchmark function", description=__doc__, **layout
    )
    _add_swarm_args(p_min)
    p_train = sub.add_parser(
        "train",
        help="train a swarm of video classifiers",
        description="Train a swarm of 3D-conv video classifiers (each particle a "
        "whole model) with the fused PSO (+ gradient) step; writes metrics.jsonl, "
        "checkpoints/, summary.json, convergence.png and confusion.png to "
        "--workdir. SIGTERM/Ctrl-C checkpoints before exiting; --resume continues.",
        **layout,
    )
    _add_train_args(p_train)
    p_train.add_argument(
        "--label-fraction",
        type=float,
        metavar="F",
        help="train on this share (0, 1] of the train split's labeled clips (a "
        "fixed draw of --seed)",
    )
    _add_parallel_args(p_train)
    p_pre = sub.add_parser(
        "pretrain",
        help="pretrain a backbone on unlabeled clips (self-supervised)",
        description="Train the swarm on a self-supervised pretext task of the "
        "train split's clips (no label is read): masked-tubelet reconstruction "
        "(masked, VideoMAE's), next-frame prediction (next_frame) or "
        "frame-order verification (order). The flags are train's (default "
        "preset: pretrain); writes what train writes, summary.json with the "
        "task's test loss, and backbone/, which `pso-jax train --pretrained "
        "DIR` fine-tunes (--swarm-over head: only a new head).",
        **layout,
    )
    _add_train_args(p_pre)
    p_pre.add_argument(
        "--objective",
        choices=TASKS,
        help="the pretext task (default: the preset's; masked with a preset "
        "of supervised training)",
    )
    p_pre.add_argument(
        "--mask-ratio",
        type=float,
        help="masked: the share of tubelets masked, in (0, 1) (default 0.9)",
    )
    p_pre.add_argument(
        "--decoder",
        choices=experiment.config.DECODERS,
        help="masked, next_frame: the head, on the pooled features (pooled) or "
        "at every cell of the feature map (dense) (default: the preset's)",
    )
    _add_parallel_args(p_pre)
    # Error messages name a bad config field by its flag (when it was given).
    for p in (p_train, p_pre):
        p.set_defaults(
            _flags={a.dest: a.option_strings[0] for a in p._actions if a.option_strings}
        )
    p_eval = sub.add_parser(
        "evaluate",
        help="re-evaluate a saved swarm on the test split",
        description="Restore a run's checkpoint and evaluate its best particle and "
        "top-k ensemble on the test split; writes evaluation.json and "
        "evaluation_confusion.png (says 'rewrote' when they were there; the "
        "run's summary.json and confusion.png are never touched).",
        **layout,
    )
    p_eval.add_argument("--workdir", type=Path, required=True, help="a run's workdir")
    p_eval.add_argument(
        "--step", type=_nonnegative_int, default=None, help="default: newest"
    )
    _add_parallel_args(p_eval)
    _add_compress_parser(sub, layout)
    p_demo = sub.add_parser(
        "demo",
        help="the built-in demo: train --config demo (or --rastrigin)",
        **layout,
    )
    p_demo.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="default: demo_out (train --config demo), demo_rastrigin_out "
        "(--rastrigin)",
    )
    p_demo.add_argument(
        "--rastrigin",
        action="store_true",
        help="instead: every variant on shifted rotated Rastrigin (D=10)",
    )
    p_demo.add_argument("--steps", type=_positive_int, default=None)
    p_demo.add_argument("--seed", type=_seed, default=0)
    return parser


def _add_compress_parser(sub, layout: dict) -> None:
    p = sub.add_parser(
        "compress",
        help="compress a run's returned model (int8, pruning, a per-layer search)",
        description="Load the model a finished run returned (summary.json's "
        "returned_model; an ensemble's best particle), quantise its kernels "
        "(per output channel, symmetric; biases and norms stay float32) after "
        "magnitude pruning, and measure test accuracy and size before and after: "
        "the 'compression' entry of summary.json, the stored arrays in "
        "compressed.npz. --search: a swarm over per-layer bits and sparsity for "
        "each --lambdas value (fitness -validation accuracy + lambda x size "
        "fraction), its Pareto front in compression_pareto.{json,md,png}.",
        **layout,
    )
    p.add_argument("--workdir", type=Path, required=True, help="a finished run's")
    p.add_argument(
        "--bits",
        type=int,
        default=8,
        help=f"bits per kernel weight, one of {compress_lib.BITS} (32: float32, "
        "pruning only; default: 8)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=0.0,
        help="fraction in [0, 1) of the kernel weights to prune (default: 0)",
    )
    p.add_argument(
        "--scope",
        choices=compress_lib.SCOPES,
        default="global",
        help="prune the smallest weights of all kernels together, or of each",
    )
    p.add_argument("--search", action="store_true", help="also search per layer")
    p.add_argument(
        "--lambdas",
        type=_lambdas,
        default=(0.03, 0.1, 0.3, 1.0),
        metavar="LAM[,LAM...]",
        help="--search: size weights, one swarm each (default: 0.03,0.1,0.3,1)",
    )
    p.add_argument(
        "--search-clips",
        type=_positive_int,
        default=128,
        help="--search: validation clips each candidate is scored on",
    )
    p.add_argument("--search-particles", type=_positive_int, default=8)
    p.add_argument("--search-steps", type=_positive_int, default=20)
    p.add_argument("--seed", type=_seed, default=0, help="--search's key")


def _dispatch(args) -> int:
    """Run the parsed command; its exit code."""
    if args.command == "minimize":
        return _minimize_cmd(args, [args.variant])
    if args.command in ("train", "pretrain"):
        return _train_cmd(args)
    if args.command == "evaluate":
        return _evaluate_cmd(args)
    if args.command == "compress":
        return _compress_cmd(args)
    if not args.rastrigin:
        workdir = args.workdir or Path("demo_out")
        demo_args = ["train", "--config", "demo", "--workdir", str(workdir)]
        demo_args += ["--seed", str(args.seed)]
        if args.steps is not None:
            demo_args += ["--steps", str(args.steps)]
        if getattr(args, "debug", False):
            demo_args.append("--debug")
        demo_args += _compile_cache_args(args)
        return main(demo_args)
    demo = argparse.Namespace(
        objective="rastrigin",
        dims=10,
        shift=True,
        rotate=True,
        particles=40,
        steps=args.steps or 1000,
        topology=None,
        seed=args.seed,
        workdir=args.workdir or Path("demo_rastrigin_out"),
    )
    return _minimize_cmd(demo, list(VARIANTS))


def _exit_code(error: BaseException) -> int:
    """The exit code of an error's family (:data:`EXIT_CODES`)."""
    if isinstance(error, experiment.WorkdirLockedError):
        return 3
    if isinstance(error, (experiment.RunFileError, CheckpointError, FileExistsError)):
        return 4
    if isinstance(error, experiment.DataError):
        return 5
    if isinstance(error, ValueError):
        return 2
    return 1


def _error_message(error: BaseException, args) -> str:
    """The error's one line; a bad config field given as a flag named as the flag."""
    field = getattr(error, "field", None)
    flags = getattr(args, "_flags", {})
    named = isinstance(error, (experiment.ConfigError, experiment.DataError))
    if named and field in flags and getattr(args, field, None) is not None:
        value = error.value
        if isinstance(value, (tuple, list)):
            value = ",".join(map(str, value))
        text = f"{flags[field]} {value}: {error.expected}"
    else:
        text = str(error) or type(error).__name__
    if _exit_code(error) == 1:
        text = f"{type(error).__name__}: {text} (unexpected; --debug shows where)"
    return " ".join(text.split())  # one line


def _interrupted_message(command: str, signum: int) -> str:
    name = signal.Signals(signum).name
    if command in ("train", "pretrain", "demo"):
        return (
            f"pso-jax: interrupted by {name} before the run had a state to "
            "checkpoint; nothing was written"
        )
    written = "evaluation.json" if command == "evaluate" else "summary.json"
    return f"pso-jax: interrupted by {name}; {written} was not written"


def _raise_interrupted(signum, frame):
    raise experiment.Interrupted(signum)


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM and SIGINT raise :class:`~pso_jax.experiment.Interrupted` (from the
    start of the command; ``train`` turns them into a checkpoint once it has a
    state); the previous handlers come back after."""
    old = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        # Outside the main thread no handler can be set: run without.
        with contextlib.suppress(ValueError):
            old[s] = signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _compile_cache_args(args) -> list[str]:
    """The compilation cache flags given, for ``demo``'s nested ``train``."""
    if getattr(args, "no_compile_cache", False):
        return ["--no-compile-cache"]
    if getattr(args, "compile_cache", None) is not None:
        return ["--compile-cache", str(args.compile_cache)]
    return []


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pso-jax`` console script.

    Returns:
      The exit code, :data:`EXIT_CODES` (argparse's usage errors raise
      ``SystemExit(2)``). An error prints one line, ``pso-jax: error: ...``
      (``--debug``: the traceback before it).
    """
    args = _parser().parse_args(argv)
    compile_cache.enable(  # before anything compiles
        getattr(args, "compile_cache", None),
        disabled=getattr(args, "no_compile_cache", False),
    )
    with _signals_interrupt():
        try:
            return _dispatch(args)
        except experiment.Interrupted as e:
            if getattr(args, "debug", False):
                traceback.print_exc()
            print(_interrupted_message(args.command, e.signum), file=sys.stderr)
            return 128 + e.signum
        except experiment.SecondInterrupt as e:  # a second signal while stopping
            workdir = getattr(args, "workdir", None) or "DIR"
            print(
                f"pso-jax: second interrupt: {e}; continue with: pso-jax train "
                f"--resume --workdir {workdir}",
                file=sys.stderr,
            )
            return 130
        except KeyboardInterrupt:  # a second signal elsewhere
            print(
                "pso-jax: interrupted at once by a second signal; the newest "
                "checkpoint is the last one saved",
                file=sys.stderr,
            )
            return 130
        except Exception as e:
            if getattr(args, "debug", False):
                traceback.print_exc()
            print(f"pso-jax: error: {_error_message(e, args)}", file=sys.stderr)
            return _exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
