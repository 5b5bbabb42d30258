"""What bounds and velocity clamps cost a swarm step, against the unbounded one.

One process, one ``N x D`` sphere swarm per case, ``--steps`` steps per timed
call under ``lax.scan`` in one ``jax.jit`` with the state donated (as
``swarm_step.py``); the cases are timed in interleaved rounds, so every ratio to
the unbounded step is taken under the same load. Cases:

- ``unbounded``: ``bounds=None, velocity_clamp=None`` (``swarm_step.py``'s row);
- ``clamp``: unbounded, ``velocity_clamp="absolute"`` (``vmax`` = the default
  hyperparameter, 0.5);
- ``reflect`` (the default with a box: reflecting walls and the ``"range"``
  clamp), ``reflect, no clamp``, ``clip``, ``periodic``, ``resample``: a box of
  +-5, all with the range clamp unless named otherwise.

``--before`` adds the same cases built with the previous implementations of
``velocity.clamp`` (``jnp.clip``) and of the periodic wrap (``jnp.mod``), patched
in while those programs are traced, so before and after are measured in the
same run. ``--profile`` adds, per case, the time of each XLA fusion and copy of
the step (from a ``jax.profiler`` trace, read back from its Perfetto JSON).

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/bound_cost.py [--n 256] [--d 100000] \
        [--before] [--profile] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import _provenance  # benchmarks/_provenance.py (this folder is on sys.path)
import jax
import jax.numpy as jnp

import pso_jax
from pso_jax import bounds as bounds_lib
from pso_jax import velocity as velocity_lib

BOX = (-5.0, 5.0)
CASES = {
    "unbounded": dict(bounds=None, velocity_clamp=None),
    "clamp": dict(bounds=None, velocity_clamp="absolute"),
    "reflect": dict(bounds=BOX),
    "reflect, no clamp": dict(bounds=BOX, velocity_clamp=None),
    "clip": dict(bounds=BOX, bound_handling="clip"),
    "periodic": dict(bounds=BOX, bound_handling="periodic"),
    "resample": dict(bounds=BOX, bound_handling="resample"),
}


def _old_wrap(x, low, high):
    """The periodic wrap before 2026-12-06 (``jnp.mod``)."""
    width = high - low
    wrapped = low + jnp.mod(x - low, width)
    return jnp.where(wrapped >= high, low, wrapped)


def _old_clamp(v, vmax):
    """The velocity clamp before 2026-12-06 (``jnp.clip``)."""
    return jnp.clip(v, -vmax, vmax)


@contextlib.contextmanager
def _previous_implementations():
    saved = velocity_lib.clamp, bounds_lib.wrap
    velocity_lib.clamp, bounds_lib.wrap = _old_clamp, _old_wrap
    try:
        yield
    finally:
        velocity_lib.clamp, bounds_lib.wrap = saved


def _sphere(x, _batch):
    return jnp.sum(x * x)


def build(case: dict, n: int, d: int, steps: int, before: bool):
    """The compiled ``steps``-step program and its first state."""
    opt = pso_jax.pso(_sphere, num_particles=n, **case)
    hp = opt.default_hparams
    state = jax.jit(opt.init)(jax.random.key(1), jnp.zeros(d, jnp.float32), hp)

    def run(state, key, hp):
        return pso_jax.scan_steps(key, opt, state, hp, steps)[0]

    patch = _previous_implementations() if before else contextlib.nullcontext()
    with patch:
        fn = jax.jit(run, donate_argnums=0).lower(state, jax.random.key(0), hp)
        fn = fn.compile()
    state = jax.block_until_ready(fn(state, jax.random.key(0), hp))
    return fn, state, hp


def build_all(args) -> dict:
    progs = {}
    for name, case in CASES.items():
        progs[name] = build(case, args.n, args.d, args.steps, False)
        if args.before and name != "unbounded":
            progs[f"{name} (before)"] = build(case, args.n, args.d, args.steps, True)
    return progs


def measure(progs: dict, args) -> dict:
    times = {k: [] for k in progs}
    for r in range(args.rounds):
        for k, (fn, state, hp) in progs.items():
            t0 = time.perf_counter()
            state = jax.block_until_ready(fn(state, jax.random.key(r + 1), hp))
            times[k].append(1e3 * (time.perf_counter() - t0) / args.steps)
            progs[k] = (fn, state, hp)
    return times


def profile(progs: dict, steps: int, calls: int = 2) -> dict:
    """Per case, ms per step of each XLA op (fusion, copy...) taking >= 0.5 ms."""
    result = {}
    for k, (fn, state, hp) in progs.items():
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                for c in range(calls):
                    state = jax.block_until_ready(fn(state, jax.random.key(c), hp))
            (trace,) = Path(tmp).rglob("*.trace.json.gz")
            events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
        progs[k] = (fn, state, hp)
        total = collections.Counter()
        for e in events:
            name = e.get("name", "")
            xla_op = "fusion" in name or name.startswith(("copy", "wrapped_"))
            if e.get("ph") == "X" and xla_op:
                total[name] += e.get("dur", 0.0) / 1e3 / (calls * steps)
        result[k] = {n: round(ms, 2) for n, ms in total.most_common() if ms >= 0.5}
    return result


FINDINGS = """\
How to read the ops (XLA:CPU, jax 0.10): the unbounded step is one fusion for
the new velocity (`multiply_add_fusion`: reads x, v and the bests, draws r1 and
r2, writes v in place), one for `x + v` (`wrapped_add`) and the fitness
(`ynn_fusion`). XLA:CPU has no multi-output fusion, so a value is computed once
only if it is materialised; it duplicates an effectively-unary op (one large
operand, such as `min`/`max` against a scalar) into every consumer. Hence:

- the old `jnp.clip` velocity clamp put the whole velocity rule into both
  outputs' loops (two ~19 ms fusions) and copied x and v (the copies);
  the select-based clamp (`velocity.clamp`) is materialised once, as unclamped;
- `jnp.mod` is a scalar remainder call on the CPU (the 85 ms fusion of
  periodic (before)); `bounds.wrap` uses `floor`, and periodic walls keep the
  velocity, so the step stays two passes as unbounded;
- reflect, clip and resample change the velocity where the move left the box,
  so both outputs (x and v) need the move `x + v` and the velocity: XLA fuses
  the velocity rule into both (`maximum_minimum_fusion` and `negate_select` /
  `broadcast_select`, each reading x, v and the bests) and copies x and v
  first, because each loop writes in place what the other reads. Tried
  without success (2026-12-06): `lax.optimization_barrier` (expanded before
  fusion on the CPU), an opaque `lax.cond` to materialise the velocity or the
  move (one copy fewer, 1.87-2.0x), the velocity as the move `x_new - x`,
  a one-trip `while_loop`, and updating row chunks in a `lax.map` or a
  `fori_loop` (3.8x and worse: whole-array copies per chunk). By the op
  times above, one materialised velocity would leave about 1.4x (the velocity
  loop, then two loops each reading x and v, and one copy): an estimate, not
  a measurement; 1.2x needs a loop with two outputs. A lazy rule (keep the
  velocity, zero it at the next step where x sits on a wall) would make the
  clip walls as cheap as the periodic ones, but no such rule exists for
  reflection, whose positions leave the wall.
"""


def write(out: Path, info: dict, args, times: dict, profiles: dict) -> None:
    base = statistics.median(times["unbounded"])
    rows = []
    for k, ts in times.items():
        m = statistics.median(ts)
        rows.append(
            f"| {k} | {m:.1f} | {min(ts):.1f}-{max(ts):.1f} | {m / base:.2f}x |"
        )
    lines = [
        "# What bounds and velocity clamps cost a swarm step (CPU)",
        "",
        f"Command: `{info['command']}`",
        "",
        f"Machine: {_provenance.machine_label(info)}; jax {info['jax']}; "
        f"{info['date']}; load average at start "
        f"{'/'.join(f'{x:.1f}' for x in info['loadavg_start'])}, at end "
        f"{'/'.join(f'{x:.1f}' for x in info['loadavg_end'])}.",
        "",
        f"`pso(sphere, num_particles={args.n})` over D = {args.d}, default "
        f"inertia variant, per-dimension factors, {args.steps} steps per timed "
        f"call, {args.rounds} interleaved rounds; ms per step, median (range).",
        "",
        "| case | ms / step | range | / unbounded |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ]
    if profiles:
        lines += [
            "Per XLA op (ms per step, from a `jax.profiler` trace; ops over 0.5 ms):",
            "",
            "| case | ops |",
            "|---|---|",
            *(
                f"| {k} | " + ", ".join(f"`{n}` {ms}" for n, ms in ops.items()) + " |"
                for k, ops in profiles.items()
            ),
            "",
        ]
    lines += [FINDINGS]
    out.mkdir(parents=True, exist_ok=True)
    (out / "bound_cost.md").write_text("\n".join(lines))
    (out / "bound_cost.json").write_text(
        json.dumps(
            dict(
                info=info,
                args=vars(args) | {"out": str(out)},
                times=times,
                profiles=profiles,
            )
        )
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--d", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--before", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    for name in ("n", "d", "steps", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    info = _provenance.machine_info()
    info["command"] = _provenance.command_line("bound_cost.py", argv)
    progs = build_all(args)
    times = measure(progs, args)
    profiles = profile(progs, args.steps) if args.profile else {}
    info["loadavg_end"] = os.getloadavg()
    write(args.out, info, args, times, profiles)
    print((args.out / "bound_cost.md").read_text())


if __name__ == "__main__":
    main()
