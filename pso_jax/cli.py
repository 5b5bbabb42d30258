"""The ``pso-jax`` command line: thin wrappers over the library.

Subcommands:

- ``pso-jax minimize``: minimise a benchmark function (``pso_jax.objectives``),
  with a progress bar, writing ``metrics.jsonl``, ``summary.json`` and
  ``convergence.png`` to ``--workdir``.
- ``pso-jax train``: train a swarm of 3D-conv video classifiers
  (:mod:`pso_jax.experiment`), e.g. ``pso-jax train --config demo``.
- ``pso-jax evaluate``: re-evaluate a saved swarm (``--workdir`` of a run).
- ``pso-jax demo``: the built-in demo, ``train --config demo``; ``pso-jax demo
  --rastrigin`` compares every variant on shifted and rotated Rastrigin (D=10).

``train`` and ``evaluate`` run on several devices with ``--devices N`` (the swarm
sharded over them, :mod:`pso_jax.sharding`) and on several hosts with
``--coordinator``/``--num-processes``/``--process-id`` (or the
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` environment
variables, or ``--distributed-auto`` on a TPU pod slice or under SLURM/Open MPI):
start the same command on every host; ``jax.distributed.initialize`` runs before
anything else touches JAX's backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
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

from pso_jax import experiment, objectives, sharding
from pso_jax.checkpoint import CheckpointError
from pso_jax.minimize import scan_chunks
from pso_jax.models import MODELS, STEMS
from pso_jax.pso import VARIANTS, pso
from pso_jax.topology import TOPOLOGIES
from pso_jax.train import BEST_REFRESH, FITNESS_FNS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
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
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return low, high


def _devices(text: str) -> int:
    """``--devices``: an int >= 1, or ``all`` (0)."""
    if text.strip().lower() == "all":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a device count or 'all', got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or all), got {value}")
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
        type=int,
        metavar="I",
        help="this process's index in [0, N) ($JAX_PROCESS_ID)",
    )
    g.add_argument(
        "--distributed-auto",
        action="store_true",
        help="let JAX detect the processes (Cloud TPU pod slice, SLURM, Open MPI, "
        "Kubernetes)",
    )


def _start_processes(args, command: str):
    """Join the multi-process run if configured; the run's ``Parallelism``.

    Called before anything initialises JAX's backend (``jax.distributed``
    requires it). Returns ``None`` after printing the error for a bad value.
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
        print(f"pso-jax {command}: {message}", file=sys.stderr)
        return None


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("pso_out"))


def _run_swarm(args, variant: str, progress, task, log) -> dict:
    """Run one swarm in chunks of jitted ``lax.scan`` steps; return its record."""
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
            log.write(json.dumps(record) + "\n")
        progress.update(task, advance=len(best), best=f"{best[-1]:.4g}")
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
    # matplotlib (~0.4 s) is imported here, not at the top, to keep `--help` fast.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        objectives.get(args.objective)
    except (KeyError, ValueError) as e:
        print(f"pso-jax: {e}", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
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
            records.append(_run_swarm(args, variant, progress, task, log))
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
    tmp = args.workdir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, args.workdir / "summary.json")  # atomic
    for r in records:
        console.print(
            f"{r['variant']:>13}: best {r['best_fitness']:.6g} in {r['steps']} steps, "
            f"{r['wall_seconds']:.2f} s ({r['particle_evals_per_second']:.3g} evals/s)"
        )
    console.print(f"wrote {metrics_path}, summary.json, convergence.png")
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument(
        "--config",
        default="demo",
        choices=sorted(experiment.CONFIGS),
        help="preset (default: %(default)s); the flags below override its fields",
    )
    g.add_argument("--workdir", type=Path, default=None, help="default: <config>_out")
    g.add_argument("--resume", action="store_true", help="continue from a checkpoint")
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
    m.add_argument("--pretrained", help="params saved with flax_utils.save_params")
    m.add_argument("--swarm-over", choices=("all", "head"))
    s = p.add_argument_group("swarm")
    s.add_argument("--particles", type=_positive_int, help="swarm size")
    s.add_argument("--steps", type=_positive_int, help="swarm steps")
    s.add_argument(
        "--local-steps", type=int, help="gradient steps per swarm step (0: pure PSO)"
    )
    s.add_argument("--lr", dest="learning_rate", type=float, help="Adam step size")
    s.add_argument("--lr-schedule", choices=("cosine", "constant"))
    s.add_argument("--weight-decay", type=float, help="AdamW's weight decay")
    s.add_argument(
        "--lr-range",
        type=_range,
        metavar="LOW,HIGH",
        help="per-particle learning rates, log-uniform over the range (PBT)",
    )
    s.add_argument(
        "--wd-range",
        type=_range,
        metavar="LOW,HIGH",
        help="per-particle weight decays, log-uniform over the range (PBT)",
    )
    s.add_argument(
        "--exploit-every",
        type=int,
        help="every N steps the worst particles clone good ones (PBT; 0: never)",
    )
    s.add_argument("--exploit-fraction", type=float, help="share cloned (0, 0.5]")
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


def _train_cmd(args) -> int:
    parallel = _start_processes(args, "train")
    if parallel is None:
        return 2
    try:
        fields = [f.name for f in dataclasses.fields(experiment.TrainConfig)]
        cfg = experiment.get_config(
            args.config, **{k: getattr(args, k) for k in fields if hasattr(args, k)}
        )
    except ValueError as e:
        print(f"pso-jax train: {e}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(f"{args.config}_out")
    try:
        summary = experiment.train(
            cfg,
            workdir,
            resume=args.resume,
            progress=not args.no_progress,
            parallel=parallel,
        )
    except (FileExistsError, CheckpointError, ValueError) as e:
        print(f"pso-jax train: {e}", file=sys.stderr)
        return 2
    if summary.get("interrupted"):
        print(
            f"pso-jax train: interrupted at step {summary['steps']}; checkpoint "
            f"saved; continue with --resume --workdir {workdir}",
            file=sys.stderr,
        )
        return 128 + summary["signal"]
    if not _is_main_process():
        return 0
    returned = summary.get("returned_model", "best_particle")
    print(
        f"test accuracy {summary['test_accuracy']:.4f} ({returned}; top-"
        f"{summary['ensemble_size']} ensemble {summary['ensemble_test_accuracy']:.4f}),"
        f" macro-F1 {summary['test_macro_f1']:.4f}; {summary['steps']} steps in "
        f"{summary['wall_seconds']:.1f} s; wrote {workdir}/summary.json"
    )
    return 0


def _evaluate_cmd(args) -> int:
    parallel = _start_processes(args, "evaluate")
    if parallel is None:
        return 2
    try:
        result = experiment.evaluate_workdir(
            args.workdir, step=args.step, parallel=parallel
        )
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"pso-jax evaluate: {e}", file=sys.stderr)
        return 2
    if not _is_main_process():
        return 0
    print(
        f"step {result['steps']}: test accuracy {result['test_accuracy']:.4f}, "
        f"macro-F1 {result['test_macro_f1']:.4f}, top-{result['ensemble_size']} "
        f"ensemble {result['ensemble_test_accuracy']:.4f}; wrote "
        f"{args.workdir}/evaluation.json"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pso-jax`` console script."""
    parser = argparse.ArgumentParser(
        prog="pso-jax", description="Particle swarm optimization in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_min = sub.add_parser(
        "minimize", help="minimise a benchmark function", description=__doc__
    )
    _add_swarm_args(p_min)
    p_train = sub.add_parser(
        "train",
        help="train a swarm of video classifiers",
        description="Train a swarm of 3D-conv video classifiers (each particle a "
        "whole model) with the fused PSO (+ gradient) step; writes metrics.jsonl, "
        "checkpoints/, summary.json, convergence.png and confusion.png to "
        "--workdir. SIGTERM/Ctrl-C checkpoints before exiting; --resume continues.",
    )
    _add_train_args(p_train)
    _add_parallel_args(p_train)
    p_eval = sub.add_parser(
        "evaluate",
        help="re-evaluate a saved swarm on the test split",
        description="Restore a run's checkpoint and evaluate its best particle and "
        "top-k ensemble on the test split; writes evaluation.json, confusion.png.",
    )
    p_eval.add_argument("--workdir", type=Path, required=True, help="a run's workdir")
    p_eval.add_argument("--step", type=int, default=None, help="default: newest")
    _add_parallel_args(p_eval)
    p_demo = sub.add_parser(
        "demo",
        help="the built-in demo: train --config demo (or --rastrigin)",
    )
    p_demo.add_argument("--workdir", type=Path, default=Path("demo_out"))
    p_demo.add_argument(
        "--rastrigin",
        action="store_true",
        help="instead: every variant on shifted rotated Rastrigin (D=10)",
    )
    p_demo.add_argument("--steps", type=_positive_int, default=None)
    p_demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "minimize":
        return _minimize_cmd(args, [args.variant])
    if args.command == "train":
        return _train_cmd(args)
    if args.command == "evaluate":
        return _evaluate_cmd(args)
    if not args.rastrigin:
        demo_args = ["train", "--config", "demo", "--workdir", str(args.workdir)]
        demo_args += ["--seed", str(args.seed)]
        if args.steps is not None:
            demo_args += ["--steps", str(args.steps)]
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
        workdir=args.workdir,
    )
    return _minimize_cmd(demo, list(VARIANTS))


if __name__ == "__main__":
    sys.exit(main())
