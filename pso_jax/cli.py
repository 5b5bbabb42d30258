"""The ``pso-jax`` command line: thin wrappers over the library.

Subcommands:

- ``pso-jax minimize``: minimise a benchmark function (``pso_jax.objectives``),
  with a progress bar, writing ``metrics.jsonl``, ``summary.json`` and
  ``convergence.png`` to ``--workdir``.
- ``pso-jax demo``: the built-in demo: shifted and rotated Rastrigin (D=10),
  every variant compared on one convergence plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pso_jax.topology import TOPOLOGIES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_swarm_args(p: argparse.ArgumentParser) -> None:
    from pso_jax.pso import VARIANTS

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
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pso_jax import objectives
    from pso_jax.minimize import scan_steps
    from pso_jax.pso import pso

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
    state = jax.jit(opt.init)(key_swarm, jnp.zeros(args.dims, jnp.float32), hp)
    chunk = min(50, args.steps)

    def advance(st, n):
        return scan_steps(key_swarm, opt, st, hp, n)

    run_chunk = jax.jit(advance, static_argnums=1, donate_argnums=0)
    history: list[float] = []
    start = time.perf_counter()
    done = 0
    while done < args.steps:
        n = min(chunk, args.steps - done)
        state, infos = run_chunk(state, n)
        best = np.asarray(infos.best_fitness)  # one host sync per chunk
        mean = np.asarray(infos.mean_fitness)
        for i in range(n):
            log.write(
                json.dumps(
                    {
                        "variant": variant,
                        "step": done + i + 1,
                        "best_fitness": float(best[i]),
                        "mean_fitness": float(mean[i]),
                    }
                )
                + "\n"
            )
            history.append(float(best[i]))
        done += n
        progress.update(task, advance=n, best=f"{best[-1]:.4g}")
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from pso_jax import objectives

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
    p_demo = sub.add_parser(
        "demo",
        help="the built-in demo (every variant on shifted rotated Rastrigin)",
    )
    p_demo.add_argument("--workdir", type=Path, default=Path("demo_out"))
    p_demo.add_argument("--steps", type=_positive_int, default=1000)
    p_demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "minimize":
        return _minimize_cmd(args, [args.variant])
    demo = argparse.Namespace(
        objective="rastrigin",
        dims=10,
        shift=True,
        rotate=True,
        particles=40,
        steps=args.steps,
        topology=None,
        seed=args.seed,
        workdir=args.workdir,
    )
    from pso_jax.pso import VARIANTS

    return _minimize_cmd(demo, list(VARIANTS))


if __name__ == "__main__":
    sys.exit(main())
