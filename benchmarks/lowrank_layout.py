"""Which matricisation of a 3-D conv kernel ``lowrank`` particles should factor.

``pso_jax.particle_space.lowrank`` factors a kernel ``[kt, kh, kw, Ci, Co]``
as a rank-``r`` product of an ``[m, n]`` matrix: ``layout="out"`` is ``[kt kh
kw Ci, Co]`` (the LoRA form of a dense layer applied to the flattened kernel),
``layout="time_out"`` is ``[kh kw Ci, kt Co]`` (each temporal slice its own
rank-``r`` product; fewer numbers: ``r (kh kw Ci + kt Co)``). To see which
learns better, each layout trains only its factors (the base model frozen at
its random init, one particle, no swarm move: ``--particles 1 --inertia 0
--cognitive 0 --social 0``) with the same Adam steps, on the demo's model (c3d
width 8, 2x2x2 tubelets) and ``moving_shapes/small``; the forward cost of both
is the same model's, so equal steps are equal compute.

Writes ``--out``/lowrank_layout.{md,json} (median and range over ``--seeds``
of the test accuracy and of the last 50 steps' mean training loss, and the
state floats per particle). Work directories go to ``--root``; a finished one
is reused.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/lowrank_layout.py \
        --root /tmp/lowrank_layout --data-dir /tmp/tfds [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _provenance  # noqa: E402  (benchmarks/_provenance.py)

LAYOUTS = ("out", "time_out")


def _config(args, layout: str, seed: int):
    from pso_jax import experiment

    return experiment.get_config(
        "hybrid",
        width=8,
        patch=(2, 2, 2),
        particle_space="lowrank",
        rank=args.rank,
        particles=1,
        inertia=0.0,
        cognitive=0.0,
        social=0.0,
        steps=args.steps,
        seed=seed,
        data_dir=args.data_dir,
    )


def _run(args, layout: str, seed: int) -> dict:
    """One run (reused if its work directory is finished): its figures."""
    from pso_jax import experiment, particle_space

    workdir = args.root / f"{layout}_seed{seed}"
    if not (workdir / "summary.json").exists():
        make_space = particle_space.make_space
        # The run builds its space with make_space: this layout, all else equal.
        particle_space.make_space = lambda *a, **kw: make_space(*a, **kw, layout=layout)
        try:
            experiment.train(_config(args, layout, seed), workdir, progress=False)
        finally:
            particle_space.make_space = make_space
    summary = json.loads((workdir / "summary.json").read_text())
    records = [
        json.loads(s) for s in (workdir / "metrics.jsonl").read_text().split("\n") if s
    ]
    losses = [r["grad_loss"] for r in records if "grad_loss" in r]
    return dict(
        layout=layout,
        seed=seed,
        test_accuracy=summary["test_accuracy"],
        train_loss_last50=statistics.fmean(losses[-50:]),
        wall_seconds=summary["wall_seconds"],
    )


def _floats(rank: int) -> dict:
    import jax
    import jax.numpy as jnp

    from pso_jax import particle_space
    from pso_jax.models import make_model

    model = make_model("c3d", 10, width=8, patch=(2, 2, 2))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 32, 32, 3)))["params"]
    full = particle_space.state_floats_per_particle(particle_space.make_space(), params)
    out = {"full": full}
    for layout in LAYOUTS:
        space = particle_space.make_space("lowrank", rank=rank, layout=layout)
        out[layout] = particle_space.state_floats_per_particle(space, params)
    return out


def _cell(values, fmt: str) -> str:
    med = statistics.median(values)
    return f"{med:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def _markdown(result: dict) -> str:
    info, args = result["machine"], result["settings"]
    floats = result["floats"]
    lines = [
        "# Low-rank particles: which matricisation of a 3-D conv kernel learns better",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {_provenance.machine_label(info)}; jax {info['jax']}; "
        f"{info['date']}; load average at start "
        f"{'/'.join(f'{v:.1f}' for v in info['loadavg_start'])}.",
        "",
        f"Each run trains only the rank-{args['rank']} factors of the demo's model "
        "(c3d width 8, 2x2x2 tubelets; the base frozen at its random init) with "
        f"Adam: `pso-jax train --config hybrid --width 8 --patch 2,2,2 "
        f"--particle-space lowrank --rank {args['rank']} --particles 1 --inertia 0 "
        f"--cognitive 0 --social 0 --steps {args['steps']}` (k = 4 Adam steps per "
        f"swarm step: {4 * args['steps']} Adam steps, lr 1e-2), on "
        "`moving_shapes/small` (chance 0.10; test split 500 clips). Median "
        f"(range) over seeds {', '.join(map(str, args['seeds']))}.",
        "",
        "| layout | factored as | state floats / particle | share of full "
        "| test accuracy | training loss, last 50 steps |",
        "|---|---|---:|---:|---:|---:|",
    ]
    shapes = {"out": "[kt kh kw Ci, Co]", "time_out": "[kh kw Ci, kt Co]"}
    for layout in LAYOUTS:
        runs = [r for r in result["runs"] if r["layout"] == layout]
        lines.append(
            f"| `{layout}` | {shapes[layout]} | {floats[layout]:,} | "
            f"{floats[layout] / floats['full']:.1%} | "
            f"{_cell([r['test_accuracy'] for r in runs], '.3f')} | "
            f"{_cell([r['train_loss_last50'] for r in runs], '.3f')} |"
        )
    lines += [
        "",
        "Per run:",
        "",
        "| layout | seed | test accuracy | training loss, last 50 steps | wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| `{r['layout']}` | {r['seed']} | {r['test_accuracy']:.3f} | "
            f"{r['train_loss_last50']:.3f} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/lowrank_layout"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    info = _provenance.machine_info()
    runs = []
    for seed in seeds:  # interleaved: both layouts of a seed, then the next seed
        for layout in LAYOUTS:
            runs.append(_run(args, layout, seed))
            print(json.dumps(runs[-1]), flush=True)
    result = dict(
        command=_provenance.command_line("lowrank_layout.py", argv),
        machine=info,
        settings=dict(seeds=seeds, steps=args.steps, rank=args.rank),
        floats=_floats(args.rank),
        runs=runs,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lowrank_layout.json").write_text(json.dumps(result, indent=1))
    (args.out / "lowrank_layout.md").write_text(_markdown(result))
    print(f"wrote {args.out}/lowrank_layout.{{md,json}}")


if __name__ == "__main__":
    main()
