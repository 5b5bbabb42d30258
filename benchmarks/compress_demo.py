"""Compression of the demo model: size against test accuracy (``pso-jax compress``).

Trains the demo (``pso-jax train --config demo``; ``--steps`` to shorten it)
unless ``--workdir`` already holds a finished run, then compresses the model
it returned with each ``BITS:SPARSITY`` of ``--grid``
(:func:`pso_jax.experiment.compress_workdir`: per-channel symmetric kernels,
global magnitude pruning) and runs the per-layer PSO search once, and writes
the table, with its provenance, to ``--out``/compression.md.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/compress_demo.py \
        --workdir /tmp/demo_out [--steps N] [--grid 8:0,4:0] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.append(str(_HERE))
import _provenance  # noqa: E402  (benchmarks/_provenance.py)

from pso_jax import cli, experiment  # noqa: E402
from pso_jax import compress as cp  # noqa: E402

GRID = "8:0,8:0.1,8:0.2,8:0.3,4:0,4:0.1,4:0.2,2:0"


def _markdown(info: dict, command: str, run: dict, rows: list, search: dict) -> str:
    lines = [
        "# Compression of the demo model: size vs test accuracy",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {_provenance.machine_label(info)}; jax {info['jax']}; "
        f"{info['date']}; load average at start {info['loadavg_start']}, at end "
        f"{list(os.getloadavg())} (the machine is shared: other jobs ran); "
        f"pso_jax sources {info['pso_jax_source']}.",
        "",
        f"Model: `pso-jax train --config demo` ({run['steps']} steps, seed "
        f"{run['config']['seed']}; c3d width {run['config']['width']}, patch "
        f"{run['config']['patch']}), the model it returned: "
        f"`{run['returned_model']}`, test accuracy {run['test_accuracy']:.3f} on "
        "the 500 test clips of moving_shapes/small (1 point = 5 clips). Kernels "
        "per output channel, symmetric, after global magnitude pruning; biases "
        "and norm scales float32; sizes in the format of `pso_jax.compress` "
        "(`compressed.npz` holds exactly these bytes): per-channel float32 "
        "scales, codes dense or bitmask + nonzero codes, whichever is smaller.",
        "",
        "| bits | sparsity | bytes | x smaller than float32 | test acc | points lost |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bits']} | {r['sparsity']:g} | {r['compressed_bytes']} | "
            f"{r['size_ratio']:.2f} | {r['test_accuracy_after']:.3f} | "
            f"{100 * r['accuracy_drop']:.1f} |"
        )
    lines += [
        "",
        f"float32: {rows[0]['float_bytes']} bytes, test accuracy "
        f"{rows[0]['test_accuracy_before']:.3f}.",
        "",
        f"## Per-layer search (lambdas {search['lambdas']}, "
        f"{search['particles']} particles x {search['steps']} steps each, "
        f"scored on the first {search['validation_clips']} validation clips)",
        "",
        "Each point of the front: per kernel `bits/sparsity`; the front is chosen "
        "on validation, test accuracy reported beside it.",
        "",
        cp.front_markdown(search["front"]),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=None, help="shorter demo")
    p.add_argument("--grid", default=GRID, help="BITS:SPARSITY,...")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    info = _provenance.machine_info()
    command = _provenance.command_line("compress_demo.py", argv)
    if not (args.workdir / "summary.json").exists():
        train = ["train", "--config", "demo", "--workdir", str(args.workdir)]
        if args.steps:
            train += ["--steps", str(args.steps)]
        assert cli.main([*train, "--no-progress"]) == 0
    rows = []
    for item in args.grid.split(","):
        bits, sparsity = item.split(":")
        start = time.perf_counter()
        rows.append(
            experiment.compress_workdir(
                args.workdir, bits=int(bits), sparsity=float(sparsity)
            )
        )
        print(
            f"{item}: {rows[-1]['size_ratio']:.2f}x, test "
            f"{rows[-1]['test_accuracy_after']:.3f} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    # Last: the default int8 entry (and the search) stay in summary.json.
    entry = experiment.compress_workdir(args.workdir, bits=8, search_front=True)
    run = json.loads((args.workdir / "summary.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    text = _markdown(info, command, run, rows, entry["search"])
    (args.out / "compression.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
