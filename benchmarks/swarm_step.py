"""Per-iteration time of one PSO step: pso_jax vs evosax vs pyswarms, on this CPU.

For every cell ``N particles x D dims x fitness`` this measures, in one process:

- pso_jax (``random_factors="per_dimension"`` and ``"per_particle"``) and evosax's
  PSO: ``k`` steps under ``lax.scan`` in one ``jax.jit`` with the state donated,
  ``k`` chosen so one call takes >= ``--min-call-s``; the median over
  ``--repeats`` calls divided by ``k`` (compile time reported separately);
- pyswarms' ``GlobalBestPSO`` (numpy float64): ``optimize(iters=k)`` calls, the
  same way, skipping cells projected to take more than ``--pyswarms-max-s``;
- the in-place bandwidth roofline: a donated elementwise update that reads and
  writes three float32 ``[N, D]`` arrays (the bytes of x, v, pbest in a step).

All swarms are unbounded with no velocity clamp (evosax's PSO has neither).

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/swarm_step.py [--quick] \
        [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import evosax.algorithms
import jax
import jax.numpy as jnp
import numpy as np
import pyswarms

import pso_jax

NS = (32, 256, 1024)
DS = (10, 1_000, 100_000)
QUICK_NS = (32, 256)
QUICK_DS = (10, 10_000)
FITNESSES = ("sphere", "rastrigin")
JAX_IMPLS = ("pso_jax_per_dim", "pso_jax_per_particle", "evosax")


# --- fitness: one particle [D] for jax, the swarm [N, D] for numpy ----------------


def sphere(x):
    return jnp.sum(x * x)


def rastrigin(x):
    return 10.0 * x.size + jnp.sum(x * x - 10.0 * jnp.cos(2.0 * jnp.pi * x))


def sphere_np(x):
    return np.sum(x * x, axis=1)


def rastrigin_np(x):
    return 10.0 * x.shape[1] + np.sum(x * x - 10.0 * np.cos(2.0 * np.pi * x), axis=1)


JAX_FITNESS = {"sphere": sphere, "rastrigin": rastrigin}
NP_FITNESS = {"sphere": sphere_np, "rastrigin": rastrigin_np}


# --- timing -------------------------------------------------------------------


def _block(tree):
    return jax.block_until_ready(tree)


def guess_k(n, d, min_call_s):
    """Steps per call from a rough cost model (10 us + 2 ns per coordinate)."""
    return max(1, int(1.5 * min_call_s / (10e-6 + 2e-9 * n * d)))


def time_scanned(build, state, args, min_call_s, repeats, k=1, max_k=1 << 20):
    """Time ``build(k)(state, *args) -> (state, aux)``, a jitted ``k``-step scan.

    Starting from the guess ``k``, ``k`` grows (recompiling) until one call takes
    ``>= min_call_s``; the state is donated and threaded through the calls.

    Returns:
      ``(result dict, final state)``.
    """
    while True:
        fn = jax.jit(build(k), donate_argnums=0)
        t0 = time.perf_counter()
        compiled = fn.lower(state, *args).compile()
        compile_s = time.perf_counter() - t0
        state, _ = _block(compiled(state, *args))  # warm-up
        t0 = time.perf_counter()
        state, _ = _block(compiled(state, *args))
        t = time.perf_counter() - t0
        if t >= min_call_s or k >= max_k:
            break
        k = min(max_k, math.ceil(k * 1.3 * min_call_s / max(t, 1e-5)))
    times = [t]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        state, _ = _block(compiled(state, *args))
        times.append(time.perf_counter() - t0)
    res = dict(
        ms=1e3 * statistics.median(times) / k,
        k=k,
        call_s=times,
        compile_s=compile_s,
    )
    return res, state


def time_eval(fitness, x, min_call_s):
    """ms of ``vmap(fitness)`` alone on the swarm ``x`` (dispatch included).

    XLA's CPU ``cos`` is value dependent (fast for small arguments), so a
    Rastrigin step's cost depends on where each library's swarm has gone.
    """
    f = jax.jit(jax.vmap(fitness))
    f(x).block_until_ready()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_call_s:
        f(x).block_until_ready()
        calls += 1
    return 1e3 * (time.perf_counter() - t0) / calls


# --- libraries ----------------------------------------------------------------


def bench_pso_jax(fitness, n, d, random_factors, min_call_s, repeats):
    opt = pso_jax.pso(
        lambda x, _batch: fitness(x),
        num_particles=n,
        random_factors=random_factors,
        bounds=None,
        velocity_clamp=None,
    )
    hp = opt.default_hparams
    key = jax.random.key(0)
    state = jax.jit(opt.init)(jax.random.key(1), jnp.zeros(d, jnp.float32), hp)

    def build(k):
        def run(state, key, hp):
            state, infos = pso_jax.scan_steps(key, opt, state, hp, k)
            return state, infos.best_fitness

        return run

    k = guess_k(n, d, min_call_s)
    res, state = time_scanned(build, state, (key, hp), min_call_s, repeats, k)
    res["best_fitness"] = float(state.best_fitness)
    res["max_abs_x"] = float(jnp.max(jnp.abs(state.positions)))
    res["eval_ms"] = time_eval(fitness, state.positions, min_call_s)
    return res


def bench_evosax(fitness, n, d, min_call_s, repeats):
    """evosax PSO, ask -> evaluate -> tell under ``lax.scan``, as in its docs."""
    es = evosax.algorithms.PSO(population_size=n, solution=jnp.zeros(d, jnp.float32))
    params = es.default_params
    key_pop, key_init = jax.random.split(jax.random.key(1))
    pop = 0.1 * jax.random.normal(key_pop, (n, d), jnp.float32)
    state = es.init(key_init, pop, jax.vmap(fitness)(pop), params)
    del pop
    key = jax.random.key(0)

    def build(k):
        def run(state, key, params):
            def body(st, key_i):
                key_ask, key_tell = jax.random.split(key_i)
                x, st = es.ask(key_ask, st, params)
                f = jax.vmap(fitness)(x)
                st, metrics = es.tell(key_tell, x, f, st, params)
                return st, metrics["best_fitness"]

            keys = jax.random.split(
                jax.random.fold_in(key, state.generation_counter), k
            )
            return jax.lax.scan(body, state, keys)

        return run

    k = guess_k(n, d, min_call_s)
    res, state = time_scanned(build, state, (key, params), min_call_s, repeats, k)
    res["best_fitness"] = float(state.best_fitness)
    res["max_abs_x"] = float(jnp.max(jnp.abs(state.population)))
    res["eval_ms"] = time_eval(fitness, state.population, min_call_s)
    return res


def bench_pyswarms(fitness_np, n, d, min_call_s, repeats):
    """pyswarms GlobalBestPSO (float64), same coefficients as pso_jax."""
    np.random.seed(0)  # pyswarms draws from numpy's global generator
    options = dict(c1=1.49618, c2=1.49618, w=0.7298)
    # pyswarms' Reporter opens ./report.log: keep it out of the repository.
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        opt = pyswarms.single.GlobalBestPSO(
            n_particles=n, dimensions=d, options=options
        )

    def call(k):
        t0 = time.perf_counter()
        opt.optimize(fitness_np, iters=k, verbose=False)
        t = time.perf_counter() - t0
        # optimize() keeps every iteration's [N, D] position and velocity.
        for name in (
            "cost_history",
            "mean_pbest_history",
            "mean_neighbor_history",
            "pos_history",
            "velocity_history",
        ):
            getattr(opt, name).clear()
        return t

    k, t = 1, call(1)  # warm-up; sets the personal bests
    while t < min_call_s:
        k = math.ceil(k * 1.3 * min_call_s / max(t, 1e-5))
        t = call(k)
    times = [t] + [call(k) for _ in range(repeats - 1)]
    return dict(ms=1e3 * statistics.median(times) / k, k=k, call_s=times)


def bench_roofline(n, d, min_call_s, repeats):
    """GB/s of ``x += a * y`` on f32 [n, d] arrays, ``x`` donated (in place).

    One output only: XLA's CPU backend does not fuse sibling outputs, so an
    update writing three donated arrays gets extra copies and would understate
    the bandwidth (see the report). Bytes moved: read x, a, y, write x.
    """
    x, a, y = (jnp.full((n, d), c, jnp.float32) for c in (0.0, 0.5, 0.25))

    def build(k):
        def run(x, a, y):
            return jax.lax.scan(lambda x, _: (x + a * y, None), x, None, length=k)

        return run

    k = guess_k(n, d, min_call_s)
    res, x = time_scanned(build, x, (a, y), min_call_s, repeats, k)
    res["bytes_per_iter"] = 4 * 4 * n * d
    res["gb_per_s"] = res["bytes_per_iter"] / (res["ms"] * 1e-3) / 1e9
    del x, a, y
    return res


# --- main ---------------------------------------------------------------------


def machine_info():
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return dict(
        cpu_model=cpu,
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        jax=jax.__version__,
        jax_backend=jax.default_backend(),
        evosax=importlib.metadata.version("evosax"),
        pyswarms=pyswarms.__version__,
        numpy=np.__version__,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        loadavg_start=os.getloadavg(),
    )


def _ms(x):
    if x is None:
        return "—"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _x(x):
    return "—" if x is None else f"{x:.2f}"


def _loads(loads):
    return "/".join(f"{x:.1f}" for x in loads)


def _ratio(a, b):
    return None if a is None or b is None else a / b


def write_markdown(path, result):
    command, info, roof, rows = (
        result[k] for k in ("command", "machine", "roofline", "rows")
    )
    lines = [
        "# PSO step time per iteration (one process, this machine)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu_model']}, {info['cpu_count']} cores; jax "
        f"{info['jax']} ({info['jax_backend']}), evosax {info['evosax']}, pyswarms "
        f"{info['pyswarms']}, numpy {info['numpy']}; {info['date']}; grid took "
        f"{result['total_s'] / 60:.1f} min. Load average (1/5/15 min) at start "
        f"{_loads(info['loadavg_start'])}, at end {_loads(result['loadavg_end'])} "
        "(the machine is shared: absolute times drift, compare ratios).",
        "",
        f"Roofline: `x += a * y` on float32 [{roof['n']}, {roof['d']}] arrays, x "
        "donated (in place; 16 bytes per element moved) = "
        f"**{roof['gb_per_s']:.1f} GB/s**. Roofline fraction "
        "= 6·4·N·D bytes (x, v, pbest read and written) / step time / that "
        "bandwidth, for pso_jax sphere rows (meaningful only at large N·D; small "
        "cells fit in cache).",
        "",
        "Times are ms per iteration (median over repeats, compile excluded). "
        "Ratios > 1 mean pso_jax is faster.",
        "",
        "| N | D | fitness | pso_jax per-dim ms | pso_jax per-particle ms | evosax ms "
        "| pyswarms ms | evosax / pso_jax per-particle | evosax / pso_jax per-dim "
        "| pyswarms / pso_jax per-dim | roofline fraction per-dim "
        "| roofline fraction per-particle |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in rows:
        pd_, pp, ev = (r[k]["ms"] for k in JAX_IMPLS)
        ps = r["pyswarms"].get("ms")
        if "skipped" in r["pyswarms"]:
            notes.append(
                f"N={r['n']}, D={r['d']}, {r['fitness']}: pyswarms "
                f"{r['pyswarms']['skipped']}"
            )
        rf = r.get("roofline_fraction", {})
        cells = [
            str(r["n"]),
            str(r["d"]),
            r["fitness"],
            _ms(pd_),
            _ms(pp),
            _ms(ev),
            _ms(ps),
            _x(_ratio(ev, pp)),
            _x(_ratio(ev, pd_)),
            _x(_ratio(ps, pd_)),
            "" if not rf else f"{100 * rf['per_dim']:.0f} %",
            "" if not rf else f"{100 * rf['per_particle']:.0f} %",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Fitness evaluation alone (`jit(vmap(fitness))` on each swarm's final "
        "positions, ms per call, dispatch included) and max |x| there. XLA's CPU "
        "`cos` is much cheaper for small arguments, so Rastrigin step times also "
        "depend on how far each library's swarm has spread or collapsed.",
        "",
        "| N | D | fitness | eval ms per-dim / per-particle / evosax "
        "| max abs x per-dim / per-particle / evosax |",
        "|---:|---:|---|---|---|",
    ]
    for r in rows:
        evals = " / ".join(_ms(r[k]["eval_ms"]) for k in JAX_IMPLS)
        xs = " / ".join(f"{r[k]['max_abs_x']:.3g}" for k in JAX_IMPLS)
        lines.append(f"| {r['n']} | {r['d']} | {r['fitness']} | {evals} | {xs} |")
    lines += ["", "Notes:", ""]
    lines += [f"- {n}" for n in notes]
    lines += [
        "- pso_jax: `pso(..., bounds=None, velocity_clamp=None)`, default `rng` "
        "and inertia hyperparameters (w=0.7298, c1=c2=1.49618), `scan_steps` "
        "returning the per-step best fitness.",
        "- evosax: `PSO` with its default params (w=0.75, c1=1.5, c2=2.0; one "
        "r1, r2 per particle), `ask -> vmap(fitness) -> tell` under `lax.scan`, "
        "keeping only `metrics['best_fitness']` per step.",
        "- pyswarms: `GlobalBestPSO` (float64, per-dimension r1, r2), "
        "`optimize(iters=k, verbose=False)`; history lists cleared between calls.",
        "- Compile times, k (steps per timed call) and every call's time are in "
        "the JSON file next to this one.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced grid, for CI")
    ap.add_argument("--out", default="benchmarks/results", type=Path)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--min-call-s", type=float, default=0.2)
    ap.add_argument(
        "--pyswarms-max-s",
        type=float,
        default=60.0,
        help="skip pyswarms cells projected to take longer",
    )
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    ns, ds = (QUICK_NS, QUICK_DS) if args.quick else (NS, DS)
    command = "PYTHONPATH=. .venv/bin/python benchmarks/swarm_step.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    info = machine_info()
    print(info, flush=True)

    n_roof, d_roof = max(ns), max(ds)
    roof = bench_roofline(n_roof, d_roof, args.min_call_s, repeats)
    roof.update(n=n_roof, d=d_roof)
    print(f"roofline {roof['gb_per_s']:.1f} GB/s", flush=True)
    gc.collect()

    rows = []
    ns_per_elem = {}  # pyswarms' cost per N*D element so far, per fitness
    t_start = time.perf_counter()
    for d in ds:
        for n in ns:
            for name in FITNESSES:
                fit = JAX_FITNESS[name]
                row = dict(n=n, d=d, fitness=name)
                row["pso_jax_per_dim"] = bench_pso_jax(
                    fit, n, d, "per_dimension", args.min_call_s, repeats
                )
                gc.collect()
                row["pso_jax_per_particle"] = bench_pso_jax(
                    fit, n, d, "per_particle", args.min_call_s, repeats
                )
                gc.collect()
                row["evosax"] = bench_evosax(fit, n, d, args.min_call_s, repeats)
                gc.collect()
                # Projected pyswarms time: warm-up + repeats iterations.
                est_s = ns_per_elem.get(name, 0.0) * 1e-9 * n * d * (repeats + 1)
                if est_s > args.pyswarms_max_s:
                    row["pyswarms"] = dict(
                        skipped=f"skipped: projected {est_s:.0f} s > "
                        f"{args.pyswarms_max_s:.0f} s"
                    )
                else:
                    row["pyswarms"] = bench_pyswarms(
                        NP_FITNESS[name], n, d, args.min_call_s, repeats
                    )
                    per = row["pyswarms"]["ms"] * 1e6 / (n * d)
                    ns_per_elem[name] = max(ns_per_elem.get(name, 0.0), per)
                gc.collect()
                if name == "sphere":
                    bytes_ = 6 * 4 * n * d
                    bw = roof["gb_per_s"] * 1e9
                    row["roofline_fraction"] = {
                        k.removeprefix("pso_jax_"): bytes_ / (row[k]["ms"] * 1e-3) / bw
                        for k in ("pso_jax_per_dim", "pso_jax_per_particle")
                    }
                rows.append(row)
                print(
                    f"[{time.perf_counter() - t_start:6.0f} s] N={n} D={d} {name}: "
                    + ", ".join(
                        f"{k}={row[k].get('ms', float('nan')):.3f} ms"
                        for k in (*JAX_IMPLS, "pyswarms")
                    ),
                    flush=True,
                )

    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(
        command=command,
        machine=info,
        settings=dict(
            repeats=repeats,
            min_call_s=args.min_call_s,
            pyswarms_max_s=args.pyswarms_max_s,
            quick=args.quick,
        ),
        roofline=roof,
        total_s=time.perf_counter() - t_start,
        loadavg_end=os.getloadavg(),
        rows=rows,
    )
    (args.out / "swarm_step.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(args.out / "swarm_step.md", result)
    print(f"wrote {args.out / 'swarm_step.md'}, {args.out / 'swarm_step.json'}")


if __name__ == "__main__":
    main()
