"""The swarm against one Adam model and a tuned learning-rate grid, at equal compute.

Equal compute is the same total number of particle gradient steps in every run
(on this CPU, where P particles cost P models, that is also about equal
wall-clock; the wall seconds are reported beside it). Same model, data,
augmentation and schedule shape (the ``hybrid`` config: C3D width 16, k = 4 Adam
steps per swarm step, batch 32, cosine decay). With ``P`` particles and ``S``
swarm steps, a unit of compute is ``P * S * k`` gradient steps:

1. ``adam``: one model at the default learning rate, all ``P * S`` steps;
2. ``grid``: ``P`` single models, one per learning rate of the grid, ``S``
   steps each (together one unit): the best of the grid picked on validation
   ("I tuned it myself") and the grid's median;
3. ``independent``: ``P`` particles, swarm coefficients 0 (what the swarm adds);
4. ``hybrid``: the hybrid (the ``hybrid`` config's gentle PSO coefficients);
5. ``pbt``: the swarm with per-particle learning rates drawn over a range,
   PBT's exploit every ``--exploit-every`` steps, selection on the next batch,
   elitism, and the returned model chosen on validation among the best
   particle, the elite, the soups and the ensemble; ``pbt_nopso``: the same
   without the swarm move (coefficients 0), PBT alone; ``pbt_hpso``: no
   exploit and no swarm move of the weights, PSO on the log learning rates
   instead (``hparam_move="pso"``); ``pbt_both``: the exploit and that move.
6. successive halving (``narrow_at``; per-particle learning rates over the
   range, no swarm move, no exploit): ``race_short`` keeps the validation
   winner after S/15 steps, ``race`` after 4S/15, ``halving`` keeps 2 after
   2S/15 and 1 after 6S/15; each runs longer, so that its particle steps are
   ``P * S`` like every other run's.
7. split batch (``split_batch=True``; no swarm move): every particle fits its
   own ``B / P`` clips of each batch, so one swarm step costs one model's step
   at batch ``B`` and the run takes all ``P * S`` steps; ``split`` at the
   default learning rate, ``split_pbt`` with the range and the exploit. Its
   gradient steps are counted at the full batch (``P`` particle steps as one).

Every run validates ``--evals`` times and returns the validation winner among
its candidates (for one model: the final model or its best checkpoint), so the
baselines get the same back-off as the swarm. Robustness rows (``--robust``):
runs 1 and 5 with the initial learning rate (range) 10x too high and too low.

    PYTHONPATH=. .venv/bin/python benchmarks/swarm_vs_adam.py --out benchmarks/results
    PYTHONPATH=. .venv/bin/python benchmarks/swarm_vs_adam.py --steps 150 \\
        --seeds 0 --out benchmarks/results      # one seed, half the hybrid's steps
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import _provenance  # benchmarks/_provenance.py (this folder is on sys.path)

from pso_jax import experiment
from pso_jax.experiment.config import particle_steps

GRID = (3e-4, 1e-3, 3e-3, 1e-2)
# The model, data and swarm every run starts from: the "hybrid" config (the
# demo when these results were first measured, 2026-12-01).
_BENCH_CONFIG = experiment.get_config("hybrid")
# Successive-halving plans: (fraction of S, particles kept) pairs.
_RACES = {
    "race_short": ((1 / 15, 1),),
    "race": ((4 / 15, 1),),
    "halving": ((2 / 15, 2), (6 / 15, 1)),
}


def _configs(args, seed: int, lr_scale: float = 1.0) -> dict[str, list]:
    """``{run: [TrainConfig, ...]}`` of one seed (the grid has several)."""
    p, s = args.particles, args.steps
    lr = args.lr * lr_scale

    def cfg(steps, **kw):
        evals = max(1, steps // args.evals)
        every = -(-evals // 10) * 10  # a multiple of steps_per_call (10)
        base = dict(
            steps=steps,
            seed=seed,
            eval_every=every,
            checkpoint_every=0,
            data_dir=args.data_dir,
            learning_rate=lr,
        )
        return dataclasses.replace(_BENCH_CONFIG, **{**base, **kw})

    single = dict(particles=1, inertia=0.0, cognitive=0.0, social=0.0, top_k=1)
    lo, hi = args.lr_range
    population = dict(
        lr_range=(lo * lr_scale, hi * lr_scale),
        exploit_every=args.exploit_every,
        select_on="next",
    )
    no_move = dict(inertia=0.0, cognitive=0.0, social=0.0)
    runs = {
        "adam": [cfg(p * s, **single)],
        "pbt": [cfg(s, **population)],
        # PBT alone: the same population and exploit, no swarm move.
        "pbt_nopso": [cfg(s, **population, **no_move)],
        # The hyperparameters moved by PSO (with or without the exploit), the
        # weights by their gradient steps only.
        "pbt_hpso": [cfg(s, **population, **no_move, hparam_move="pso")],
        "pbt_both": [cfg(s, **population, **no_move, hparam_move="both")],
        # Split batch: every particle fits its own B / P clips of the batch, so
        # a swarm step costs one model's step and the run takes all P * S steps.
        "split": [cfg(p * s, **no_move, split_batch=True)],
        "split_pbt": [cfg(p * s, **population, **no_move, split_batch=True)],
    }
    # Successive halving: P particles race their learning rates for the first
    # R steps, then the validation winner trains alone; its run is longer so
    # that P * R + (T - R) = P * S particle steps, the unit of compute.
    race = dict(lr_range=population["lr_range"], **no_move, top_k=1)
    for name, plan in _RACES.items():
        pairs = tuple((round(f * s), keep) for f, keep in plan)
        last, keep = pairs[-1]
        head = particle_steps(cfg(last + 1, **race, narrow_at=pairs), last)
        runs[name] = [cfg(last + -(-(p * s - head) // keep), **race, narrow_at=pairs)]
    if lr_scale == 1.0:
        runs["grid"] = [cfg(s, **{**single, "learning_rate": g}) for g in GRID]
        runs["independent"] = [cfg(s, **no_move)]
        runs["hybrid"] = [cfg(s)]
    return runs


def _train(cfg, workdir: Path) -> dict:
    if workdir.exists():
        shutil.rmtree(workdir)
    t0 = time.perf_counter()
    summary = experiment.train(cfg, workdir, progress=False)
    returned = summary.get("returned_model", "best_particle")
    return {
        "test_accuracy": summary["test_accuracy"],
        "val_accuracy": summary["candidates_val_accuracy"][returned],
        "returned": returned,
        "candidates_test": summary.get("candidates_test_accuracy"),
        "grad_steps": _grad_steps(cfg),
        "wall_s": time.perf_counter() - t0,
        "learning_rate": cfg.learning_rate,
        "hparams": summary.get("grad_hparams_best_first"),
        "curve": _curve(workdir, cfg),
    }


def _grad_steps(cfg, step: int | None = None) -> int:
    """Gradient steps at the full batch: a split run's count ``P`` as one."""
    done = particle_steps(cfg, step) * cfg.local_steps
    return done // cfg.particles if cfg.split_batch else done


def _curve(workdir: Path, cfg) -> list[tuple[int, float]]:
    """``(gradient steps, validation accuracy)`` of the run's best particle."""
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "val_accuracy" in r:
            out.append((_grad_steps(cfg, r["step"]), r["val_accuracy"]))
    return out


def _row(name: str, accs: list[float], walls: list[float], steps: int) -> str:
    med = statistics.median(accs)
    rng = f"{min(accs):.3f}-{max(accs):.3f}" if len(accs) > 1 else "-"
    wall = statistics.median(walls)
    return f"| {name} | {med:.3f} | {rng} | {len(accs)} | {steps} | {wall:.0f} |"


def _tables(results: dict) -> list[str]:
    lines = [
        "| run | test accuracy (median) | range | seeds | gradient steps | wall s |",
        "|---|---:|---|---:|---:|---:|",
    ]
    per = results["per_seed"]

    def col(run, key="test_accuracy"):
        return [seed[run][0][key] for seed in per.values() if run in seed]

    for run in (
        "adam",
        "independent",
        "hybrid",
        "pbt",
        "pbt_nopso",
        "pbt_hpso",
        "pbt_both",
        *_RACES,
        "split",
        "split_pbt",
    ):
        if col(run):
            steps = next(iter(per.values()))[run][0]["grad_steps"]
            lines.append(_row(run, col(run), col(run, "wall_s"), steps))
    grid_best, grid_median, grid_wall = [], [], []
    for seed in per.values():
        runs = seed.get("grid", [])
        if runs:
            pick = max(runs, key=lambda r: r["val_accuracy"])
            grid_best.append(pick["test_accuracy"])
            grid_median.append(statistics.median(r["test_accuracy"] for r in runs))
            grid_wall.append(sum(r["wall_s"] for r in runs))
    if grid_best:
        steps = sum(r["grad_steps"] for r in next(iter(per.values()))["grid"])
        lines.append(_row("grid, best on validation", grid_best, grid_wall, steps))
        lines.append(_row("grid, median", grid_median, grid_wall, steps))
    for name, seeds in results.get("robust", {}).items():
        accs = [r["test_accuracy"] for r in seeds]
        lines.append(
            _row(name, accs, [r["wall_s"] for r in seeds], seeds[0]["grad_steps"])
        )
    return lines


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    seed0 = next(iter(results["per_seed"].values()))
    for run, rows in seed0.items():
        for i, r in enumerate(rows):
            xs, ys = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
            label = run if run != "grid" else f"grid lr={GRID[i]:g}"
            ax.plot(
                xs, ys, marker="o", ms=3, label=label, alpha=0.5 if run == "grid" else 1
            )
    ax.set_xlabel("particle gradient steps")
    ax.set_ylabel("validation accuracy (best particle)")
    ax.set_title("moving_shapes/small, first seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--steps", type=int, default=300, help="swarm steps S")
    ap.add_argument("--particles", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, default=1e-2, help="the default learning rate")
    ap.add_argument("--lr-range", type=float, nargs=2, default=(1e-3, 3e-2))
    ap.add_argument("--exploit-every", type=int, default=25)
    ap.add_argument("--evals", type=int, default=6, help="validations per run")
    ap.add_argument("--robust", action="store_true", help="also lr 10x off")
    ap.add_argument(
        "--robust-runs", default="adam,pbt,pbt_nopso", help="runs of the robust rows"
    )
    ap.add_argument(
        "--runs",
        default="adam,grid,independent,hybrid,pbt,pbt_nopso",
        help="comma-separated runs at the default lr ('' for none: --robust alone)",
    )
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--name", default="swarm_vs_adam", help="output file stem")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {
        "command": _provenance.command_line("swarm_vs_adam.py", argv),
        "machine_info": (info := _provenance.machine_info()),
        "machine": _provenance.machine_label(info),
        "load_average": os.getloadavg(),
        "args": {k: v for k, v in vars(args).items() if k != "out"}
        | {"out": str(args.out)},
        "per_seed": {},
        "robust": {},
    }
    runs_dir = args.out / "runs" / "swarm_vs_adam"
    for seed in seeds:
        per = results["per_seed"][seed] = {}
        wanted = set(filter(None, args.runs.split(",")))
        for run, cfgs in _configs(args, seed).items():
            if run not in wanted:
                continue
            per[run] = [
                _train(c, runs_dir / f"{run}{i}_s{seed}") for i, c in enumerate(cfgs)
            ]
            print(
                seed, run, [round(r["test_accuracy"], 3) for r in per[run]], flush=True
            )
            _write(results, args.out)
        wanted_robust = set(filter(None, args.robust_runs.split(",")))
        if args.robust:
            for scale, tag in ((10.0, "lr x10"), (0.1, "lr /10")):
                for run, cfgs in _configs(args, seed, scale).items():
                    if run not in wanted_robust:
                        continue
                    r = _train(cfgs[0], runs_dir / f"{run}_{scale}_s{seed}")
                    results["robust"].setdefault(f"{run}, {tag}", []).append(r)
                    print(seed, run, tag, round(r["test_accuracy"], 3), flush=True)
                    _write(results, args.out)
    results["load_average_end"] = os.getloadavg()
    _write(results, args.out)
    if any(results["per_seed"].values()):
        _plot(results, args.out / f"{args.name}.png")


def _write(results: dict, out: Path) -> None:
    name = results["args"].get("name", "swarm_vs_adam")
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    md = [
        "# The swarm against one Adam model and an lr grid, at equal compute",
        "",
        f"Command: `{results['command']}`",
        f"Machine: {results['machine']}; load average at the start "
        f"{results['load_average'][0]:.2f}.",
        "",
        *_tables(results),
        "",
        "Test accuracy of the model each run returns (the validation winner among "
        "its candidates). Gradient steps: particle steps x k (particles x swarm "
        "steps, summed over a narrowing run's phases; a split-batch run's P "
        "particle steps at B / P clips count as one).",
    ]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
