"""Throughput of uniform random numbers on CPU: jax.random vs pso_jax hash.

Measures ns per sample for threefry (``jax.random.uniform`` default key),
philox through the ``rbg`` and ``unsafe_rbg`` key impls, and
``pso_jax.random.uniform(impl="hash")`` in two settings:

(a) standalone: ``jit(uniform)(key)``, once into a fresh output buffer (what a
    plain call does; page faults on newly mapped memory dominate large
    outputs) and once into a donated buffer of the same shape (aliased output);
(b) fused: ``STEPS`` iterations of the PSO-style in-place update
    ``x = x + 0.5*u1*(y - x) + 0.5*u2*(z - x)`` in one ``lax.fori_loop`` under
    ``jax.jit(..., donate_argnums=0)``, against the same update with constant
    coefficients and no random numbers (the bandwidth floor).

Reported: medians over ``--repeats`` calls after one compile-and-warm-up
call; impls are interleaved within each repeat so that load from other
processes on this shared machine hits them alike. Fused ns/sample divides by
``2 * rows * cols * steps`` (two uniforms per coordinate per step).

A second table times candidate hash mixes (fused setting) to document the
choice made in ``pso_jax/random.py``.

Usage::

    .venv/bin/python benchmarks/rng_throughput.py \\
        --out benchmarks/results/rng_throughput.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pso_jax import random as pso_random

_U32 = np.uint32


def _to_float(bits: jax.Array) -> jax.Array:
    return (
        lax.bitcast_convert_type((bits >> _U32(9)) | _U32(0x3F800000), jnp.float32) - 1
    )


def _candidate(mix: str) -> Callable:
    """A uniform sampler built from a candidate per-element mix."""

    def sample(key, shape):
        seeds = jax.random.bits(key, (4,), jnp.uint32)
        rows = lax.iota(jnp.uint32, shape[0])
        a = pso_random._triple32(rows ^ seeds[0])[:, None]
        b = pso_random._triple32(a ^ seeds[1])
        c = lax.broadcasted_iota(jnp.uint32, shape, 1)
        if mix == "lowbias32(c^a)":
            h = pso_random._lowbias32(c ^ a)
        elif mix == "lowbias32_b(lowbias32(c^a)+b)":
            h = pso_random._lowbias32_b(pso_random._lowbias32(c ^ a) + b)
        elif mix == "triple32(lowbias32(c^a)+b)":
            h = pso_random._triple32(pso_random._lowbias32(c ^ a) + b)
        elif mix == "triple32(triple32(c^a)+b)":
            h = pso_random._triple32(pso_random._triple32(c ^ a) + b)
        else:
            raise ValueError(mix)
        return _to_float(h)

    return sample


CANDIDATES = {
    "lowbias32(c^a)": "1 mix; rows are xor-shifted copies (rejected)",
    "lowbias32_b(lowbias32(c^a)+b)": "chosen",
    "triple32(lowbias32(c^a)+b)": "stronger final round",
    "triple32(triple32(c^a)+b)": "strongest",
}


def _impls() -> dict[str, tuple[Callable, Callable]]:
    """name -> (make_key(seed), sample(key, shape))."""
    jax_uniform = lambda k, s: jax.random.uniform(k, s, jnp.float32)  # noqa: E731
    return {
        "threefry (jax default)": (jax.random.key, jax_uniform),
        "philox (rbg)": (lambda s: jax.random.key(s, impl="rbg"), jax_uniform),
        "philox (unsafe_rbg)": (
            lambda s: jax.random.key(s, impl="unsafe_rbg"),
            jax_uniform,
        ),
        "pso_jax hash": (
            jax.random.key,
            lambda k, s: pso_random.uniform(k, s, jnp.float32),
        ),
    }


def _fused(sample: Callable | None, steps: int) -> Callable:
    """Jitted, donated `steps` PSO-style updates of x; None = no-RNG floor."""

    def run(x, y, z, key):
        def body(i, x):
            if sample is None:
                return x + 0.25 * (y - x) + 0.25 * (z - x)
            key_r1, key_r2 = jax.random.split(jax.random.fold_in(key, i))
            u1 = sample(key_r1, x.shape)  # [N, D], float32
            u2 = sample(key_r2, x.shape)
            return x + 0.5 * u1 * (y - x) + 0.5 * u2 * (z - x)

        return lax.fori_loop(0, steps, body, x)

    return jax.jit(run, donate_argnums=0)


def _time(fn: Callable, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, out


def _bench_shape(shape, steps, repeats, with_candidates):
    impls = _impls()
    n = math.prod(shape)
    y = jnp.ones(shape, jnp.float32)
    z = jnp.full(shape, 2.0, jnp.float32)

    # Build every case: name -> (callable taking the carried buffer, buffer).
    cases: dict[tuple[str, str], list] = {}
    for name, (make_key, sample) in impls.items():
        key = make_key(0)
        fresh = jax.jit(lambda k, sample=sample: sample(k, shape))
        # keep_unused: otherwise jit prunes the unused buffer and the output
        # is freshly allocated after all.
        donated = jax.jit(
            lambda buf, k, sample=sample: sample(k, shape),
            donate_argnums=0,
            keep_unused=True,
        )
        fused = _fused(sample, steps)
        cases[(name, "fresh")] = [lambda _, k=key, f=fresh: f(k), None]
        cases[(name, "donated")] = [
            lambda buf, k=key, f=donated: f(buf, k),
            jnp.zeros(shape, jnp.float32),
        ]
        cases[(name, "fused")] = [
            lambda buf, k=key, f=fused: f(buf, y, z, k),
            jnp.zeros(shape, jnp.float32),
        ]
    floor = _fused(None, steps)
    cases[("no RNG (floor)", "fused")] = [
        lambda buf, f=floor: f(buf, y, z, jax.random.key(0)),
        jnp.zeros(shape, jnp.float32),
    ]
    if with_candidates:
        for mix in CANDIDATES:
            fused = _fused(_candidate(mix), steps)
            cases[(mix, "candidate")] = [
                lambda buf, f=fused: f(buf, y, z, jax.random.key(0)),
                jnp.zeros(shape, jnp.float32),
            ]

    times: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    for rep in range(repeats + 1):  # rep 0 compiles and warms up
        for case, slot in cases.items():
            t, out = _time(slot[0], slot[1])
            if slot[1] is not None:
                slot[1] = out  # carry the donated buffer
            del out
            if rep > 0:
                times[case].append(t)
    med = {c: statistics.median(ts) for c, ts in times.items()}
    best = {c: min(ts) for c, ts in times.items()}

    rows = []
    floor_s = med[("no RNG (floor)", "fused")]
    per_fused = 2 * n * steps
    for name in [*impls, "no RNG (floor)"]:
        fused = med[(name, "fused")]
        rows.append(
            {
                "impl": name,
                "fresh": med.get((name, "fresh"), float("nan")) * 1e9 / n,
                "donated": med.get((name, "donated"), float("nan")) * 1e9 / n,
                "fused": fused * 1e9 / per_fused,
                "fused_min": best[(name, "fused")] * 1e9 / per_fused,
                "over_floor": (fused - floor_s) * 1e9 / per_fused,
                "fused_step_ms": fused * 1e3 / steps,
            }
        )
    cand = [
        {
            "mix": mix,
            "note": note,
            "fused": med[(mix, "candidate")] * 1e9 / per_fused,
            "over_floor": (med[(mix, "candidate")] - floor_s) * 1e9 / per_fused,
        }
        for mix, note in CANDIDATES.items()
        if (mix, "candidate") in med
    ]
    return rows, cand


def _check_fused_hash_is_real(steps: int) -> None:
    """The fused hash loop must equal the update with explicit uniforms."""
    shape = (8, 1000)
    key = jax.random.key(0)
    y, z = jnp.ones(shape), jnp.full(shape, 2.0)
    sample = _impls()["pso_jax hash"][1]
    got = _fused(sample, steps)(jnp.zeros(shape), y, z, key)
    x = np.zeros(shape, np.float32)
    for i in range(steps):
        key_r1, key_r2 = jax.random.split(jax.random.fold_in(key, i))
        u1, u2 = np.asarray(sample(key_r1, shape)), np.asarray(sample(key_r2, shape))
        x = x + 0.5 * u1 * (1 - x) + 0.5 * u2 * (2 - x)
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5, atol=1e-6)


def _markdown(results, args, command, load_before, load_after, wall) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                line.split(":", 1)[1].strip() for line in f if "model name" in line
            )
    except (OSError, StopIteration):
        pass
    lines = [
        "# RNG throughput: jax.random vs pso_jax.random hash",
        "",
        f"Command: `{command}`",
        "",
        f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"jax {jax.__version__}; {cpu}, {os.cpu_count()} cores; "
        f"devices {jax.devices()}",
        f"- Load average before/after: {load_before} / {load_after} "
        "(shared machine: other processes may run concurrently; compare ratios "
        "within one table)",
        f"- Medians over {args.repeats} repeats after a compile + warm-up call; "
        "impls interleaved within each repeat. Total wall time "
        f"{wall:.0f} s.",
        "- **fresh**: `jit(uniform)(key)` into a new buffer (includes page "
        "faults on fresh memory). **donated**: same, output aliased to a donated "
        "buffer. **fused**: ns per uniform inside "
        f"`x = x + 0.5*u1*(y-x) + 0.5*u2*(z-x)`, {args.steps} steps of "
        "`fori_loop` under `jit(donate_argnums=0)`, 2 uniforms per coordinate "
        "per step, median (min); **over floor**: fused minus the same update "
        "with no RNG (medians).",
        "",
    ]
    for shape, (rows, cand) in results.items():
        lines += [
            f"## Shape {list(shape)} (float32)",
            "",
            "| impl | standalone fresh ns/sample | standalone donated ns/sample "
            "| fused ns/sample (min) | fused over floor ns/sample | fused ms/step |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            fmt = lambda v: "—" if math.isnan(v) else f"{v:.3f}"  # noqa: E731
            lines.append(
                f"| {r['impl']} | {fmt(r['fresh'])} | {fmt(r['donated'])} | "
                f"{r['fused']:.3f} ({r['fused_min']:.3f}) | {r['over_floor']:.3f} | "
                f"{r['fused_step_ms']:.1f} |"
            )
        if cand:
            lines += [
                "",
                "Candidate per-element mixes (fused setting, same run; `a`, `b` "
                "are per-row keys):",
                "",
                "| mix | note | fused ns/sample | over floor ns/sample |",
                "|---|---|---:|---:|",
            ]
            lines += [
                f"| `{c['mix']}` | {c['note']} | {c['fused']:.3f} | "
                f"{c['over_floor']:.3f} |"
                for c in cand
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        default="1024x100000,64x8192",
        help="comma-separated ROWSxCOLS shapes (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-candidates", action="store_true", help="skip the hash-mix table"
    )
    parser.add_argument("--out", default=None, help="write a markdown table here")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    t0 = time.perf_counter()
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    _check_fused_hash_is_real(args.steps)
    results = {}
    for shape in shapes:
        results[shape] = _bench_shape(
            shape, args.steps, args.repeats, not args.no_candidates
        )
        print(f"done {shape} at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    load_after = " ".join(f"{v:.2f}" for v in os.getloadavg())
    command = " ".join(
        [".venv/bin/python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]
    )
    text = _markdown(
        results, args, command, load_before, load_after, time.perf_counter() - t0
    )
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
