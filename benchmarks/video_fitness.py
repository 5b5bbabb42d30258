"""Swarm fitness throughput of the reference 3D-conv video models, on this machine.

For every cell ``config x P`` this measures, in one process, the forward pass of
``jax.vmap(lambda p, x: model.apply({'params': p}, x), in_axes=(0, None))`` on a
batch of ``B`` clips (every particle sees the same batch), jitted, for:

- ``fast``: the models' defaults (tubelet stem, 2D-conv lowering, body run once
  per particle: ``pso_jax.models.layers.call_per_particle``);
- ``plain-vmap``: the same lowering, ``map_particles=False`` (vmap turns the
  convolutions into grouped ones);
- ``xla``: ``impl="xla"``, plain ``lax.conv_general_dilated`` as ``nn.Conv``
  does, plain vmap (the naive baseline of PERF_NOTES.md);
- ``conv-stem``: ``fast`` with a 3x3x3 convolution stem instead of the tubelet;
- ``fast+shard_map``: ``fast`` under ``jax.shard_map`` over a ``"particles"``
  mesh axis of ``--host-devices`` CPU devices
  (``--xla_force_host_platform_device_count``, measured in a child process):
  XLA runs each device's program on its own thread, and its CPU convolutions
  are single-threaded, so this is how the swarm uses every core.

Slow baselines are skipped where one call would take many seconds (see
``_rows``). Each row reports the median over ``--repeats`` timed calls after a
compile and a warm-up call, particle evaluations per second (``P / t``), achieved
GFLOP/s from the analytic count (``pso_jax.models.flops``: a multiply-add is 2
FLOPs; only dots and convolutions count: ``2 |out| K`` and ``2 |out| kt kh kw
C_in / groups``), and its ratio to the matmul peak: a jitted float32 2048x2048
matmul timed just before every timed call, the ratio taken per call and then the
median (other processes share this machine; per-call ratios cancel slow drifts).
Compile time is ``lower + compile`` of the jitted function.

On a GPU (jax's default backend) the matmul is ``--matmul-n`` (default 8192)
square at jax's default float32 precision, which is what the models' dots and
convolutions use too; every model gets the ``fast``, ``plain-vmap`` and ``xla``
rows at every P (the CPU's time limits do not apply), and no ``fast+shard_map``
rows (one device). ``benchmarks/device_run.sh`` is the command line used there.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/video_fitness.py \
        [--quick] [--out benchmarks/results/video_fitness.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _provenance  # benchmarks/_provenance.py (this folder is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pso_jax import flax_utils
from pso_jax.models import (
    DEFAULT_MODEL,
    MODELS,
    STEMS,
    flops_per_clip,
    make_model,
    param_count,
)

CONFIGS = {"small": (8, 32, 32, 3), "default": (16, 64, 64, 3)}
NUM_CLASSES = 10
WIDTH = 16
MATMUL_N = 2048
SHARDED = "fast+shard_map"  # fast, particles split over host devices
VARIANTS = {
    "fast": {},
    SHARDED: {},
    "plain-vmap": {"map_particles": False},
    "xla": {"impl": "xla"},
    "conv-stem": {"stem": "conv"},
}


@dataclass
class Row:
    config: str
    model: str
    variant: str
    num_particles: int
    flops: int  # per swarm evaluation (P particles x B clips)
    compile_s: float = 0.0
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)  # FLOP/s
    matmul_cores: list[float] = field(default_factory=list)  # CPU time / wall


def _rows(
    config: str, num_particles: int, quick: bool, every: bool = False
) -> list[tuple[str, str]]:
    """(model, variant) pairs measured in one cell.

    Every model's ``fast`` row everywhere; baselines where one call stays under
    ~1-3 s (XLA's depthwise convolution makes x3d ``xla`` take ~1 s already at
    P=8 on the small config; c3d ``xla`` at P=32 on the default config ~3 s).
    ``every``: every model's ``fast``, ``plain-vmap`` and ``xla`` (and the default
    model's ``conv-stem`` at P=8), for an accelerator.
    """
    if every:
        rows = [(m, v) for m in MODELS for v in ("fast", "plain-vmap", "xla")]
        if num_particles == 8:
            rows.append((DEFAULT_MODEL, "conv-stem"))
        return rows
    rows = [(m, "fast") for m in MODELS]
    if config == "small":
        rows += [(m, "plain-vmap") for m in MODELS]
        rows += [(m, "xla") for m in MODELS if m != "x3d" or num_particles == 8]
    else:
        rows.append((DEFAULT_MODEL, "plain-vmap"))
        if num_particles <= 32:
            rows.append((DEFAULT_MODEL, "xla"))
        if num_particles == 8:
            rows += [
                (m, v)
                for m in MODELS
                if m != DEFAULT_MODEL
                for v in ("plain-vmap", "xla")
                if (m, v) != ("x3d", "xla")
            ]
            rows.append((DEFAULT_MODEL, "conv-stem"))
    if quick:
        rows = [r for r in rows if r[1] in ("fast", "xla") and r[0] != "x3d"]
    return rows


def _cpu_seconds() -> float:
    usage = os.times()
    return usage.user + usage.system


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def _model_table(lines: list[str]) -> None:
    lines += [
        "## Models (width 16, 10 classes)",
        "",
        "Analytic forward FLOPs per clip (multiply-add = 2; dots and convolutions "
        "only, norms/activations/pooling not counted).",
        "",
        "| model | stem | params | MFLOP/clip small 8x32x32 | MFLOP/clip default "
        "16x64x64 |",
        "|---|---|---:|---:|---:|",
    ]
    for name in MODELS:
        for stem in STEMS:
            model = make_model(name, NUM_CLASSES, width=WIDTH, stem=stem)
            x = jnp.zeros((1, *CONFIGS["small"]))
            params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
            mflops = [flops_per_clip(model, CONFIGS[c]) / 1e6 for c in CONFIGS]
            lines.append(
                f"| {name} | {stem} | {param_count(params):,} | {mflops[0]:.2f} | "
                f"{mflops[1]:.2f} |"
            )
    lines.append("")


def _evaluator(model, sharded: bool):
    """(jitted swarm evaluation, function placing the swarm for it)."""
    evaluate = jax.vmap(flax_utils.apply_fn(model), in_axes=(0, None))
    if not sharded:
        return jax.jit(evaluate), lambda swarm: swarm
    # Each host device evaluates its own particles (STYLE: shard_map over
    # "particles"); XLA runs one device's program per thread.
    mesh = Mesh(np.array(jax.devices()), ("particles",))
    evaluate = jax.shard_map(
        evaluate,
        mesh=mesh,
        in_specs=(PartitionSpec("particles"), PartitionSpec()),
        out_specs=PartitionSpec("particles"),
    )
    sharding = NamedSharding(mesh, PartitionSpec("particles"))
    return jax.jit(evaluate), lambda swarm: jax.device_put(swarm, sharding)


def run_cell(
    config,
    num_particles,
    batch,
    repeats,
    quick,
    matmul,
    rows_override=None,
    matmul_n=MATMUL_N,
) -> list[Row]:
    clip_shape = CONFIGS[config]
    key_params, key_x = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (batch, *clip_shape), jnp.float32)
    fns, rows, swarms = [], [], {}
    every = jax.default_backend() != "cpu"
    pairs = rows_override or _rows(config, num_particles, quick, every)
    for name, variant in pairs:
        model = make_model(name, NUM_CLASSES, width=WIDTH, **VARIANTS[variant])
        # Variants with the same parameters (all but conv-stem) share one swarm.
        if (name, model.stem) not in swarms:
            init = jax.jit(
                lambda k, m=model: flax_utils.init_swarm_params(
                    m, k, num_particles, x[:1]
                )
            )
            swarms[name, model.stem] = init(key_params)
        evaluate, place = _evaluator(model, variant == SHARDED)
        swarm = place(swarms[name, model.stem])
        row = Row(
            config,
            name,
            variant,
            num_particles,
            flops_per_clip(model, clip_shape) * batch * num_particles,
        )
        t0 = time.perf_counter()
        compiled = evaluate.lower(swarm, x).compile()
        row.compile_s = time.perf_counter() - t0
        _timed(compiled, swarm, x)  # warm-up
        fns.append((compiled, swarm))
        rows.append(row)
        print(f"  compiled {config} P={num_particles} {name} {variant}", flush=True)
    a = jnp.ones((matmul_n, matmul_n), jnp.float32)
    for _ in range(repeats):
        for row, (compiled, swarm) in zip(rows, fns, strict=True):
            cpu0, wall0 = _cpu_seconds(), time.perf_counter()
            peak = 2 * matmul_n**3 / min(_timed(matmul, a) for _ in range(3))
            row.matmul_cores.append(
                (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
            )
            t = _timed(compiled, swarm, x)
            row.times.append(t)
            row.peaks.append(peak)
            row.ratios.append(row.flops / t / peak)
    return rows


def _cell_table(rows: list[Row], lines: list[str], best_peak: float) -> None:
    lines += [
        "| model | variant | P | ms / swarm eval | particle evals/s | GFLOP/s | "
        "% of peak (median) | % of peak (best) | speed-up vs xla | compile s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r.model, r.variant, r.num_particles): r for r in rows}
    for r in rows:
        t = statistics.median(r.times)
        base = by_key.get((r.model, "xla", r.num_particles))
        speedup = f"{statistics.median(base.times) / t:.1f}x" if base else "—"
        bold = "**" if r.model == DEFAULT_MODEL and r.variant == "fast" else ""
        lines.append(
            f"| {r.model} | {r.variant} | {r.num_particles} | {t * 1e3:.1f} | "
            f"{r.num_particles / t:,.0f} | {r.flops / t / 1e9:.1f} | "
            f"{bold}{100 * statistics.median(r.ratios):.1f}{bold} | "
            f"{100 * r.flops / min(r.times) / best_peak:.1f} | {speedup} | "
            f"{r.compile_s:.2f} |"
        )
    peaks = [p / 1e9 for r in rows for p in r.peaks]
    cores = [c for r in rows for c in r.matmul_cores]
    lines += [
        "",
        f"Matmul peak during these rows: median {statistics.median(peaks):.0f} "
        f"GFLOP/s (min {min(peaks):.0f}, max {max(peaks):.0f})"
        + (
            f"; the matmul kept {statistics.median(cores):.2f} cores busy (median; "
            "~1 means another process held a core, which halves the peak but not "
            "the single-threaded convolutions, so per-call ratios read high)."
            if jax.default_backend() == "cpu"
            else "."
        ),
        "",
    ]


NOTES_ACCELERATOR = """## Reading these rows on an accelerator

- The variants were designed on the CPU (see the CPU table,
  `benchmarks/results/video_fitness.md`). Off the CPU the per-particle loops
  of `fast` fall back to plain vmap (`pso_jax.models.layers`), so `fast` and
  `plain-vmap` run the same program: each 3D convolution lowered to 2D
  convolutions over frames (`impl="fast"`), batched over particles. `xla` is
  `lax.conv_general_dilated`'s 3D convolution under plain vmap. Which
  lowering wins here is what these rows measure.
- The clips are small (B=16 clips of 16x64x64 at most, width 16): one swarm
  evaluation is a few GFLOP, far too little work to fill the chip at P=8, so
  the fraction of the matmul peak rises with P.
"""

NOTES = """## What the variants change, and why it matters on this CPU

Development measurements on this machine (AMD Zen 5, AVX-512, 2 cores; XLA
routes dots and convolutions to YNNPACK), default config unless noted:

- **Tubelet stem** (default): a 2x4x4 space-to-depth reshape plus a Dense layer,
  so the first layer is a matmul (K = 96) instead of a 3-input-channel 3x3x3
  convolution at full resolution (`conv-stem`: 2.8x the FLOPs of the whole
  tubelet c3d, ~8x its time). The patchify has no parameters and runs once for
  the swarm, outside the per-particle loop.
- **2D-conv lowering** (`impl="fast"`): XLA's 3D convolution reaches ~55-100
  GFLOP/s here, its 2D convolution ~190-230 (~45-50 % of the matmul peak) for
  these channel counts, so a kt x kh x kw convolution is one 2D convolution
  over frames: on kt time-shifted frames stacked along channels (C_in <= C_out)
  or with kt * C_out outputs and a shifted sum. An explicit im2col + matmul
  was slower (materialising 27 shifted copies costs more than the matmul
  gains). Depthwise convolutions (x3d) are a fused sum of 27 shifted copies:
  XLA's own depthwise convolution runs at ~0.2-1 GFLOP/s.
- **Per-particle body** (`map_particles=True`, default): under
  `vmap(in_axes=(0, None))` the backbone runs in a `lax.map` over particles
  (a `custom_vmap` rule) instead of one vmapped graph. Plain vmap turns each
  convolution into a grouped one (`feature_group_count=P`), which XLA runs
  slower than P separate ones, and materialises every activation for all P
  particles at once (GBs at P=128: page faults on fresh memory and cache
  misses in every norm/ReLU). Per particle, activations are a few MB. Same
  outputs (tested); when only the head carries a particle axis (a frozen
  backbone) nothing loops and the backbone runs once.
- **GroupNorm** computed as per-channel sums combined per group and one fused
  `x * a + b` (`pso_jax.models.layers.GroupNorm`, `nn.GroupNorm`'s maths and
  parameters): ~4x faster than `nn.GroupNorm` on 16-32 channels, which had
  cost ~25 % of c3d's time.
- **One core per device.** XLA's CPU convolutions (YNNPACK) run on a single
  thread, however large (a 2D convolution 8x larger still shows CPU time ==
  wall time), while its matmul uses both cores; independent convolutions in
  one program are not run concurrently either (two halves of the swarm, pairs
  of particles per loop step, XLA scheduler flags: no gain). So on one device
  c3d's convolutions run at ~90 % of *one* core's matmul speed, i.e. ~45-50 %
  of the two-core peak, and the whole model at ~30-40 %. `fast+shard_map`
  gives each core its own device and half the particles: ~1.9x the one-device
  speed on a quiet machine (c3d, P=32, default config: 312 -> 166 ms). (This
  departs from PERF_NOTES' "fake devices give no speed-up", which holds for
  matmul-bound work.)
- What is left: in c3d the two 3x3x3 convolutions are ~75 % of the time;
  norms, ReLU, pooling, the shifted sums and loop overhead the rest.
  Widening the network (stem 32, conv1 32) did not raise the ratio.
- **x3d** stays far from the matmul peak: most of its time is the depthwise
  3x3x3 convolution, memory/emitter-bound at ~10-20 GFLOP/s though it is only
  ~30 % of its FLOPs.
- The small config gives each particle little work per loop step (16 clips of
  4x8x8 tubelets), so fixed costs weigh more there.
- Compile time is ~0.4-1.3 s and flat in P (the loop body is compiled once).
"""


def _summary(cells, best_peak: float, lines: list[str]) -> None:
    """The target line: the default model, last config, % of peak (best) by P."""
    config = cells[-1][0]
    lines += [
        f"## Summary: `{DEFAULT_MODEL}`, config `{config}`, % of matmul peak "
        "(best call / best peak)",
        "",
        "| variant | "
        + " | ".join(f"P={p}" for c, p, _ in cells if c == config)
        + " |",
        "|---|" + "---:|" * sum(c == config for c, _, _ in cells),
    ]
    for variant in ("xla", "plain-vmap", "fast", SHARDED):
        cols = []
        for c, _, rows in cells:
            if c != config:
                continue
            row = next(
                (r for r in rows if (r.model, r.variant) == (DEFAULT_MODEL, variant)),
                None,
            )
            cols.append(
                f"{100 * row.flops / min(row.times) / best_peak:.1f}" if row else "—"
            )
        lines.append(f"| {variant} | " + " | ".join(cols) + " |")
    lines.append("")


def _sharded_worker(args) -> None:
    """Child process (host devices set by XLA_FLAGS): print the sharded rows."""
    matmul = jax.jit(lambda a: a @ a)
    jax.block_until_ready(matmul(jnp.ones((MATMUL_N, MATMUL_N))))
    configs = ["small"] if args.quick else list(CONFIGS)
    for config in configs:
        for num_particles in [int(p) for p in args.particles.split(",")]:
            pairs = [(m, SHARDED) for m in MODELS]
            if args.quick:
                pairs = [(m, v) for m, v in pairs if m != "x3d"]
            rows = run_cell(
                config,
                num_particles,
                args.batch,
                args.repeats,
                args.quick,
                matmul,
                rows_override=pairs,
            )
            for row in rows:
                print("ROW " + json.dumps(dataclasses.asdict(row)), flush=True)


def _run_sharded(args, num_devices: int) -> list[Row]:
    """Measure the sharded rows in a child process with ``num_devices`` devices."""
    cmd = [
        sys.executable,
        __file__,
        "--sharded-worker",
        "--particles",
        args.particles,
        "--batch",
        str(args.batch),
        "--repeats",
        str(2 if args.quick else args.repeats),
    ]
    if args.quick:
        cmd.append("--quick")
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return [
        Row(**json.loads(line[4:]))
        for line in proc.stdout.splitlines()
        if line.startswith("ROW ")
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small config, few rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--particles", default="8,32,128")
    parser.add_argument("--out", type=Path, default=None, help="markdown file")
    parser.add_argument(
        "--host-devices",
        type=int,
        default=None,
        help="host devices for the fast+shard_map rows (0: skip them; default: "
        "one per core on the CPU, 0 on an accelerator)",
    )
    parser.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated clip configs of {sorted(CONFIGS)} (default: all; "
        "--quick: small)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds after which no new cell starts; the cells done are written",
    )
    parser.add_argument(
        "--matmul-n",
        type=int,
        default=None,
        help=f"side of the float32 peak matmul (default {MATMUL_N} on the CPU, "
        "8192 on an accelerator)",
    )
    parser.add_argument("--sharded-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sharded_worker:
        _sharded_worker(args)
        return
    particles = [int(p) for p in args.particles.split(",")]
    on_cpu = jax.default_backend() == "cpu"
    if args.host_devices is None:
        args.host_devices = len(os.sched_getaffinity(0)) if on_cpu else 0
    matmul_n = args.matmul_n or (MATMUL_N if on_cpu else 8192)
    if args.configs:
        configs = args.configs.split(",")
        unknown = sorted(set(configs) - set(CONFIGS))
        if unknown:
            parser.error(f"--configs: unknown {unknown}; choose from {sorted(CONFIGS)}")
    else:
        configs = ["small"] if args.quick else list(CONFIGS)
    repeats = 2 if args.quick else args.repeats

    start = time.perf_counter()
    load_before = os.getloadavg()
    matmul = jax.jit(lambda a: a @ a)
    jax.block_until_ready(matmul(jnp.ones((matmul_n, matmul_n))))

    cmd = _provenance.command_line("video_fitness.py", argv)
    info = _provenance.machine_info()

    def write_report(cells, not_run, partial=False):
        """The markdown of the cells so far (rewritten after every cell)."""
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
        lines = [
            "# Video fitness: vmapped 3D-conv models vs the matmul peak",
            "",
            f"Command: `{cmd}`",
            "",
            f"- Date: {info['date']}; jax {info['jax']}; "
            f"{_provenance.machine_label(info)}; devices {jax.devices()}",
            f"- Load average before/after: {' '.join(f'{v:.2f}' for v in load_before)}"
            f" / {' '.join(f'{v:.2f}' for v in load_after)} (shared machine: compare "
            "ratios within one table, not across runs)",
            f"- Batch B={args.batch} clips (float32, channels last), width 16, 10 "
            f"classes; medians over {repeats} timed calls after a compile and a "
            f"warm-up; total wall time {wall:.0f} s.",
            "- **% of peak (median)**: achieved GFLOP/s over a jitted f32 "
            f"{matmul_n}x{matmul_n} matmul (best of 3, jax's default precision) "
            "timed just before each call, "
            "median of the per-call ratios. **% of peak (best)**: the fastest call "
            "over the best matmul of the whole run (robust to other processes "
            "stealing a core during a matmul, which inflates the per-call ratio). "
            "**particle evals/s**: P / (time of one swarm evaluation on the B clips). "
            "**speed-up vs xla**: time of the `xla` row "
            "(plain vmap, `lax.conv_general_dilated`) over this row's, same P.",
            f"- Default model: `{DEFAULT_MODEL}` (**bold**: its `fast` row).",
            "",
        ]
        if not_run:
            lines += [
                f"Not measured (--time-limit {args.time_limit:.0f} s reached): "
                + ", ".join(not_run),
                "",
            ]
        best_peak = max(p for _, _, rows in cells for r in rows for p in r.peaks)
        _summary(cells, best_peak, lines)
        _model_table(lines)
        lines += [
            f"Best matmul peak of the run: {best_peak / 1e9:.0f} GFLOP/s.",
            "",
        ]
        for config in configs:
            t, h, w, c = CONFIGS[config]
            lines += [f"## Config `{config}`: clips {t}x{h}x{w}x{c}", ""]
            for cfg, num_particles, rows in cells:
                if cfg == config:
                    lines += [f"### P = {num_particles}", ""]
                    _cell_table(rows, lines, best_peak)
        lines.append(NOTES if on_cpu else NOTES_ACCELERATOR)
        if partial:
            lines.insert(2, "**Partial: the run was still going.**\n")
        text = "\n".join(lines)
        if not partial:
            print(text)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)

    cells, not_run = [], []
    for config in configs:
        for num_particles in particles:
            if args.time_limit and time.perf_counter() - start > args.time_limit:
                not_run.append(f"{config} P={num_particles}")
                continue
            print(f"cell {config} P={num_particles}", flush=True)
            rows = run_cell(
                config,
                num_particles,
                args.batch,
                repeats,
                args.quick,
                matmul,
                matmul_n=matmul_n,
            )
            cells.append((config, num_particles, rows))
            write_report(cells, not_run, partial=True)
    if args.host_devices > 1:
        print(f"sharded rows on {args.host_devices} host devices", flush=True)
        for row in _run_sharded(args, args.host_devices):
            for config, num_particles, rows in cells:
                if (config, num_particles) == (row.config, row.num_particles):
                    at = sum(r.variant in ("fast", SHARDED) for r in rows)
                    rows.insert(at, row)

    write_report(cells, not_run)


if __name__ == "__main__":
    main()
