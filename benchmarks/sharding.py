"""Sharded swarm: per-device state memory and time per step versus device count.

For 1, 2, 4, ... devices (up to ``--devices``) this measures, in one process:

1. The PSO step (sphere fitness, ``N x D``, ``pso(..., mesh=make_mesh(n))``):
   the state's bytes on each device (its addressable shards), XLA's temporary
   buffer size per device, and the time per step of ``k`` steps under
   ``lax.scan`` in one jit with the state donated; the unsharded optimizer as
   the reference row.
2. The work split of a 3D-conv video fitness (C3D vmapped over particles with
   ``impl="xla"``, so its later convolutions are grouped convolutions over the
   particles): ``jax.shard_map`` (what ``pso_jax.sharding`` does) against plain
   ``jit`` with the particles sharded by ``NamedSharding``. For each, the
   per-device program's convolution feature groups (particles per device whose
   convolutions that device computes), XLA's cost-analysis FLOPs per device,
   the all-gathers it inserts, and the time per evaluation; and whether an
   ``AxisType.Explicit`` mesh compiles at all.

**Fake CPU devices measure layout and overhead, not speed-up**: by default the
devices are ``--xla_force_host_platform_device_count`` fakes sharing this
machine's cores (one device already uses them all), so time per step cannot
drop as devices are added. What the rows show is the layout (memory per device
= total / devices), the per-device work (FLOPs, convolution groups), and the
cost of the collectives and per-device dispatch. On a machine with several GPUs
(or a TPU host) run with ``--real`` to measure the speed-up on the devices
present; with ``jax.distributed`` variables set (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) in every process, ``--real`` spans
all hosts' devices and process 0 writes the results.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/sharding.py [--quick] \\
        [--out benchmarks/results]
    PYTHONPATH=. python benchmarks/sharding.py --real   # on a multi-GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices")
    ap.add_argument(
        "--real", action="store_true", help="use the devices present (GPU/TPU)"
    )
    ap.add_argument("--num-particles", type=int, default=1024)
    ap.add_argument("--num-dims", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=8, help="steps per timed call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--video-particles", type=int, default=16)
    ap.add_argument("--video-batch", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes, for CI")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.num_particles, args.num_dims, args.repeats = 256, 2_000, 3
    return args


def _median_time(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device_counts(total: int) -> list[int]:
    out, n = [], 1
    while n <= total:
        out.append(n)
        n *= 2
    return out


def swarm_rows(args, counts) -> list[dict]:
    """State bytes per device and time per step, unsharded and on n devices."""
    import jax
    import jax.numpy as jnp

    import pso_jax
    from pso_jax import sharding

    def sphere(x, _batch):
        return jnp.sum(jnp.square(x))

    key = jax.random.key(0)
    template = jnp.zeros(args.num_dims, jnp.float32)
    rows = []
    for n in [None, *counts]:
        mesh = None if n is None else sharding.make_mesh(n)
        opt = pso_jax.pso(
            sphere, num_particles=args.num_particles, velocity_clamp=None, mesh=mesh
        )
        hp = opt.default_hparams
        state = jax.jit(opt.init)(key, template, hp)
        per_device = sharding.bytes_per_device(state)
        total = sum(x.nbytes for x in jax.tree.leaves(state))

        def run(state, hp, opt=opt):
            return pso_jax.scan_steps(key, opt, state, hp, args.steps)[0]

        t0 = time.perf_counter()
        compiled = jax.jit(run, donate_argnums=0).lower(state, hp).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        state = compiled(state, hp)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state = jax.block_until_ready(compiled(state, hp))
            times.append((time.perf_counter() - t0) / args.steps)
        rows.append(
            dict(
                devices=n,
                particles_per_device=args.num_particles // (n or 1),
                state_bytes_per_device=max(per_device.values()),
                state_bytes_total=total,
                temp_bytes_per_device=getattr(mem, "temp_size_in_bytes", None),
                ms_per_step=1e3 * statistics.median(times),
                compile_s=compile_s,
            )
        )
        print(f"  swarm devices={n}: {rows[-1]}", flush=True)
    return rows


def _conv_groups(hlo: str) -> list[int]:
    """``feature_group_count`` of every convolution in an HLO module (1 if none)."""
    out = []
    for line in hlo.splitlines():
        if " convolution(" in line:
            m = re.search(r"feature_group_count=(\d+)", line)
            out.append(int(m.group(1)) if m else 1)
    return out


def _flops(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, list):
        ca = ca[0] if ca else {}
    return (ca or {}).get("flops")


def video_rows(args, counts) -> tuple[list[dict], dict]:
    """shard_map vs jit + NamedSharding for a vmapped 3D-conv fitness."""
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from pso_jax import flax_utils, sharding
    from pso_jax.models import make_model

    model = make_model("c3d", 10, width=8, stem="conv", impl="xla", map_particles=False)
    clip = (8, 16, 16, 3)
    x = jax.random.normal(jax.random.key(1), (args.video_batch, *clip))
    num = args.video_particles
    swarm = jax.jit(lambda k: flax_utils.init_swarm_params(model, k, num, x[:1]))(
        jax.random.key(0)
    )
    evaluate = jax.vmap(flax_utils.apply_fn(model), in_axes=(0, None))
    rows, explicit = [], {}
    for n in counts:
        if num % n:
            continue
        mesh = sharding.make_mesh(n)
        on = NamedSharding(mesh, P("particles"))
        sw = jax.device_put(swarm, on)
        xr = jax.device_put(x, NamedSharding(mesh, P()))
        methods = {
            "shard_map": jax.jit(
                jax.shard_map(
                    evaluate,
                    mesh=mesh,
                    in_specs=(P("particles"), P()),
                    out_specs=P("particles"),
                )
            ),
            "jit + NamedSharding": jax.jit(evaluate, out_shardings=on),
        }
        for name, fn in methods.items():
            compiled = fn.lower(sw, xr).compile()
            hlo = compiled.as_text()
            groups = _conv_groups(hlo)
            seconds = _median_time(compiled, sw, xr, repeats=args.repeats)
            rows.append(
                dict(
                    devices=n,
                    method=name,
                    ms_per_eval=1e3 * seconds,
                    gflop_per_device=(_flops(compiled) or float("nan")) / 1e9,
                    max_conv_groups=max(groups),
                    conv_groups=groups,
                    all_gathers=hlo.count("all-gather("),
                )
            )
            print(f"  video devices={n} {name}: {rows[-1]}", flush=True)
        em = jax.make_mesh(
            (n,),
            ("particles",),
            axis_types=(AxisType.Explicit,),
            devices=jax.devices()[:n],
        )
        try:
            swe = jax.device_put(swarm, NamedSharding(em, P("particles")))
            xe = jax.device_put(x, NamedSharding(em, P()))
            with jax.set_mesh(em):
                jax.jit(evaluate).lower(swe, xe).compile()
            explicit[n] = "compiles"
        except Exception as e:  # the failure is what is recorded
            explicit[n] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return rows, explicit


def _provenance(args, argv) -> dict:
    import _provenance as provenance
    import jax
    import numpy as np

    return provenance.machine_info(
        command=provenance.command_line("sharding.py", argv),
        numpy=np.__version__,
        backend=jax.default_backend(),
        devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        fake_cpu_devices=not args.real,
        processes=jax.process_count(),
    )


def _mb(b) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def write(args, meta, swarm, video, explicit) -> None:
    fake = meta["fake_cpu_devices"]
    src = meta["pso_jax_source"]
    ref = swarm[0]["ms_per_step"]
    lines = [
        "# Sharded swarm: state memory and time per step versus device count",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['platform']}, {meta['cpu_count']} cores; jax {meta['jax']} "
        f"({meta['backend']}), {meta['devices']}, {meta['processes']} process(es); "
        f"pso_jax git {src['git_head']}, sources sha256 {src['sources_sha256']}; "
        f"{meta['date']}. Load average "
        f"(1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in meta['loadavg_start'])}"
        f", at end {'/'.join(f'{x:.1f}' for x in meta['loadavg_end'])} (shared "
        "machine: compare ratios within this run).",
        "",
    ]
    if fake:
        lines += [
            "**These devices are fake CPU devices** "
            "(`--xla_force_host_platform_device_count`) sharing the same cores, "
            "and one device already uses all of them: **they measure layout and "
            "overhead, not speed-up.** Time per step cannot fall as devices are "
            "added; what it shows is the cost of the collectives and of running "
            "one program per device. Run `benchmarks/sharding.py --real` on a "
            "machine with several GPUs (or a TPU host) for speed-up.",
            "",
        ]
    lines += [
        f"## Swarm state and step (sphere, N = {args.num_particles}, "
        f"D = {args.num_dims}, float32)",
        "",
        "State = positions, velocities, personal bests (`[N, D]` each, split over "
        "the devices) plus the replicated swarm best and bookkeeping. A "
        "replicated layout (evosax, EvoX) keeps the whole state on every device. "
        f"Time: median over {args.repeats} calls of {args.steps} steps under "
        "`lax.scan`, state donated.",
        "",
        "| devices | particles / device | state MB / device | state MB total | "
        "replicated layout MB / device | XLA temp MB / device | ms / step | "
        "time vs unsharded | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in swarm:
        lines.append(
            f"| {r['devices'] or 'unsharded'} | {r['particles_per_device']} | "
            f"{_mb(r['state_bytes_per_device'])} | {_mb(r['state_bytes_total'])} | "
            f"{_mb(r['state_bytes_total'])} | {_mb(r['temp_bytes_per_device'])} | "
            f"{r['ms_per_step']:.2f} | {r['ms_per_step'] / ref:.2f} | "
            f"{r['compile_s']:.1f} |"
        )
    lines += [
        "",
        f"## Video fitness: who computes which particles ({args.video_particles} "
        f"particles, C3D width 8 with a conv stem, clips {args.video_batch} x "
        "8 x 16 x 16 x 3)",
        "",
        "`vmap` over particles turns the later convolutions into grouped "
        "convolutions with one group per particle. *conv groups / device* is the "
        "largest `feature_group_count` in the per-device program: the number of "
        "particles whose convolutions each device computes (the stem conv, with a "
        "shared input, is one ungrouped conv). GFLOP / device is XLA's cost "
        "analysis of the per-device program.",
        "",
        "| devices | method | particles / device | conv groups / device | "
        "GFLOP / device | all-gathers | ms / eval |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in video:
        lines.append(
            f"| {r['devices']} | {r['method']} | "
            f"{args.video_particles // r['devices']} | {r['max_conv_groups']} | "
            f"{r['gflop_per_device']:.4f} | {r['all_gathers']} | "
            f"{r['ms_per_eval']:.1f} |"
        )
    lines += [
        "",
        "`AxisType.Explicit` mesh (`jax.make_mesh`'s default in jax 0.10), plain "
        "`jit` of the same vmapped model: "
        + "; ".join(
            f"{', '.join(str(n) for n, w in explicit.items() if w == v)} device(s): {v}"
            for v in dict.fromkeys(explicit.values())
        ),
        "",
        "Reading: with `shard_map` every device runs the convolutions of its own "
        "particles only (groups = particles / device, FLOPs = total / devices, "
        "no all-gathers). Under `jit` + `NamedSharding`, XLA's partitioner "
        "splits the stem convolution but all-gathers the weights of the grouped "
        "ones and computes them for all particles on every device (groups = all "
        "particles at every device count), so its FLOPs per device fall more "
        "slowly than 1 / devices. Times: fake devices, compare within a row "
        "pair only.",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharding.md").write_text("\n".join(lines))
    (args.out / "sharding.json").write_text(
        json.dumps(
            dict(meta=meta, swarm=swarm, video=video, explicit_mesh=explicit),
            indent=1,
        )
    )
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if not args.real:
        # Before JAX starts: the device count is fixed then.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from pso_jax import sharding

    if args.real:
        sharding.initialize_distributed()  # no-op unless configured
    meta = _provenance(args, argv)
    counts = _device_counts(jax.device_count())
    print(f"devices: {counts}", flush=True)
    swarm = swarm_rows(args, counts)
    video, explicit = video_rows(args, counts)
    meta["loadavg_end"] = os.getloadavg()
    if jax.process_index() == 0:
        write(args, meta, swarm, video, explicit)


if __name__ == "__main__":
    main()
