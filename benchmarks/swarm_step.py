"""Per-iteration time of one PSO step: pso_jax vs evosax, pyswarms and EvoX.

For every cell ``N particles x D dims x fitness`` this measures, in one process:

- pso_jax (``random_factors="per_dimension"`` and ``"per_particle"``) and evosax's
  PSO: ``k`` steps under ``lax.scan`` in one ``jax.jit`` with the state donated,
  ``k >= --min-steps`` chosen so one call takes >= ``--min-call-s``; the median over
  ``--repeats`` calls divided by ``k`` (compile time reported separately);
- pyswarms' ``GlobalBestPSO`` (numpy float64): ``optimize(iters=k)`` calls, the
  same way, skipping cells projected to take more than ``--pyswarms-max-s``;
- EvoX's PSO (its PyTorch release): ``torch.compile(StdWorkflow.step)`` called
  ``k`` times per timed call, as EvoX's documentation runs it; on the CPU with
  torch at 2 threads and at 1 thread, the faster reported (both are in the
  JSON); on a CUDA GPU (``--evox-device``, default: the GPU when torch sees
  one) with a ``torch.cuda.synchronize()`` closing every timed call;
- the in-place bandwidth roofline: ``x += a * y`` on float32 ``[N, D]`` arrays
  with ``x`` donated; a step's roofline time is the bytes of x, v and pbest read
  and written (6 * 4 * N * D) at that bandwidth.

All swarms but EvoX's are unbounded with no velocity clamp (evosax's PSO has
neither); EvoX's PSO always clamps positions and velocities to its bounds, here
[-5.12, 5.12].

``OMP_WAIT_POLICY=PASSIVE`` is set before torch is imported: on this shared
2-core machine, OpenMP's default spin-waiting made EvoX's compiled step up to
100x slower whenever other processes held a core (measured: 64 x 100 sphere,
13-29 ms per step spinning vs 0.3 ms passive). JAX and numpy do not use OpenMP.

On a GPU machine jax and evosax run on the GPU, pyswarms (numpy) on the host
CPU, and EvoX where ``--evox-device`` says. ``benchmarks/device_run.sh`` is the
command line used there.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/swarm_step.py [--quick] \
        [--out benchmarks/results]
    # tables and plots again from the JSON, without measuring:
    .venv/bin/python benchmarks/swarm_step.py \
        --replot benchmarks/results/swarm_step.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

# Before torch (EvoX) loads libgomp; see the module docstring.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import _provenance  # benchmarks/_provenance.py (this folder is on sys.path)
import evosax.algorithms
import jax
import jax.numpy as jnp
import numpy as np

import pso_jax

try:  # EvoX (PyTorch) is optional: its rows are skipped without it.
    import evox
    import evox.algorithms
    import evox.problems.numerical
    import evox.workflows
    import torch
    import torch._dynamo
except ImportError as e:
    evox = torch = None
    _EVOX_IMPORT_ERROR = repr(e)

# pyswarms opens ./report.log (and logs there) when imported and whenever an
# optimizer is built: do both from a temporary directory, not the repository.
with tempfile.TemporaryDirectory() as _tmp, contextlib.chdir(_tmp):
    import pyswarms

NS = (32, 256, 1024)
DS = (10, 1_000, 100_000)
QUICK_NS = (256,)
QUICK_DS = (10, 10_000)
FITNESSES = ("sphere", "rastrigin")
JAX_IMPLS = ("pso_jax_per_dim", "pso_jax_per_particle", "evosax")
HOST_IMPLS = ("pyswarms", "evox")


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


class Timing(NamedTuple):
    """How to time: calls of >= ``min_call_s`` with >= ``min_steps`` steps each."""

    min_call_s: float
    repeats: int
    min_steps: int


def guess_k(n, d, timing):
    """Steps per call from a rough cost model (10 us + 2 ns per coordinate).

    At least ``timing.min_steps``: a call's one-off costs (dispatch, and the page
    faults of temporary [N, D] buffers that XLA allocates afresh on every call)
    must not be charged to a single step.
    """
    est = int(1.5 * timing.min_call_s / (10e-6 + 2e-9 * n * d))
    return max(timing.min_steps, est)


def time_scanned(build, state, args, timing, k, max_k=1 << 20):
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
        if t >= timing.min_call_s or k >= max_k:
            break
        k = min(max_k, math.ceil(k * 1.3 * timing.min_call_s / max(t, 1e-5)))
    times = [t]
    for _ in range(timing.repeats - 1):
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
    while calls == 0 or time.perf_counter() - t0 < min_call_s:
        f(x).block_until_ready()
        calls += 1
    return 1e3 * (time.perf_counter() - t0) / calls


# --- libraries ----------------------------------------------------------------


def bench_pso_jax(fitness, n, d, random_factors, timing):
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

    res, state = time_scanned(build, state, (key, hp), timing, guess_k(n, d, timing))
    res["best_fitness"] = float(state.best_fitness)
    res["max_abs_x"] = float(jnp.max(jnp.abs(state.positions)))
    res["eval_ms"] = time_eval(fitness, state.positions, timing.min_call_s)
    return res


def bench_evosax(fitness, n, d, timing):
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

    k = guess_k(n, d, timing)
    res, state = time_scanned(build, state, (key, params), timing, k)
    res["best_fitness"] = float(state.best_fitness)
    res["max_abs_x"] = float(jnp.max(jnp.abs(state.population)))
    res["eval_ms"] = time_eval(fitness, state.population, timing.min_call_s)
    return res


def bench_pyswarms(fitness_np, n, d, timing):
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

    call(1)  # warm-up: the first iteration sets the personal bests
    k, t = 1, call(1)
    while t < timing.min_call_s:
        k = math.ceil(k * 1.3 * timing.min_call_s / max(t, 1e-5))
        t = call(k)
    times = [t] + [call(k) for _ in range(timing.repeats - 1)]
    return dict(
        ms=1e3 * statistics.median(times) / k, k=k, call_s=times, repeats=len(times)
    )


EVOX_BOUND = 5.12  # EvoX's PSO needs a box; it clamps x and v to it.


def evox_device(choice: str) -> str:
    """``auto``: ``cuda`` when torch sees a GPU, else ``cpu``."""
    if choice != "auto":
        return choice
    return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"


def bench_evox(name, n, d, timing, device="cpu"):
    """EvoX PSO (torch): ``torch.compile(workflow.step)``, k calls per timing.

    EvoX runs one compiled step per Python call (it has no multi-step fused
    loop), so per-call dispatch is part of its step time. On the CPU, timed
    with torch at 2 threads (its default here) and at 1; the faster is the
    result. On ``cuda`` every timed call ends with a device synchronisation.
    """
    if evox is None:
        return dict(skipped=f"skipped: EvoX not importable ({_EVOX_IMPORT_ERROR})")
    threads_default = torch.get_num_threads()
    torch._dynamo.reset()  # a fresh cache: no recompile limit across cells
    torch.manual_seed(0)  # EvoX draws from torch's global generator
    # EvoX builds its tensors on torch's default device, as its docs run it.
    torch.set_default_device(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    bound = torch.full((d,), EVOX_BOUND)
    algo = evox.algorithms.PSO(pop_size=n, lb=-bound, ub=bound)
    problem = {
        "sphere": evox.problems.numerical.Sphere,
        "rastrigin": evox.problems.numerical.Rastrigin,
    }[name]()
    workflow = evox.workflows.StdWorkflow(algo, problem)
    workflow.init_step()
    step = torch.compile(workflow.step)
    t0 = time.perf_counter()
    # The first call compiles; the second recompiles once (after init_step the
    # personal-best fitness aliases the fitness buffer, which guards check).
    step()
    step()
    sync()
    compile_s = time.perf_counter() - t0

    def call(k):
        t0 = time.perf_counter()
        for _ in range(k):
            step()
        sync()
        return time.perf_counter() - t0

    by_threads = {}
    # Thread counts matter on the CPU only.
    thread_counts = {threads_default} if device != "cpu" else {threads_default, 1}
    for threads in sorted(thread_counts, reverse=True):
        torch.set_num_threads(threads)
        call(1)  # warm-up at this thread count
        # From one step up, like pyswarms: jax's cost model (guess_k) would
        # have this Python loop run ~2e4 steps (10 s) per call at D = 10.
        k = 1
        t = call(k)
        while t < timing.min_call_s:
            k = math.ceil(k * 1.3 * timing.min_call_s / max(t, 1e-5))
            t = call(k)
        # The second thread count is a check, not the headline: fewer repeats.
        repeats = timing.repeats if not by_threads else min(3, timing.repeats)
        times = [t] + [call(k) for _ in range(repeats - 1)]
        by_threads[str(threads)] = dict(
            ms=1e3 * statistics.median(times) / k, k=k, call_s=times
        )
    torch.set_num_threads(threads_default)
    best = min(by_threads, key=lambda t: by_threads[t]["ms"])
    alg = workflow.algorithm
    res = dict(
        ms=by_threads[best]["ms"],
        threads=int(best),
        by_threads=by_threads,
        compile_s=compile_s,
        device=device,
        best_fitness=float(alg.global_best_fit),
        max_abs_x=float(alg.pop.abs().max()),
    )
    del workflow, algo, alg
    torch._dynamo.reset()
    torch.set_default_device("cpu")
    return res


def bench_roofline(n, d, timing):
    """GB/s of ``x += a * y`` on f32 [n, d] arrays, ``x`` donated (in place).

    One jitted call per update, not a scan: XLA hoists the loop-invariant
    ``a * y`` out of a scan into a fresh buffer. One output only: XLA's CPU
    backend does not fuse sibling outputs, so an update writing three donated
    arrays gets extra copies. Bytes moved per call: read x, a, y, write x.
    """
    x, a, y = (jnp.full((n, d), c, jnp.float32) for c in (0.0, 0.5, 0.25))
    update = jax.jit(lambda x, a, y: x + a * y, donate_argnums=0)
    x = _block(update(x, a, y))
    times = []
    while len(times) < 5 * timing.repeats or sum(times) < timing.min_call_s:
        t0 = time.perf_counter()
        x = _block(update(x, a, y))
        times.append(time.perf_counter() - t0)
    del x, a, y
    ms = 1e3 * statistics.median(times)
    nbytes = 4 * 4 * n * d
    return dict(
        ms=ms,
        calls=len(times),
        bytes_per_call=nbytes,
        gb_per_s=nbytes / (ms * 1e-3) / 1e9,
    )


# --- main ---------------------------------------------------------------------


def machine_info(evox_device_name="cpu"):
    return _provenance.machine_info(
        evox_device=evox_device_name,
        evosax=importlib.metadata.version("evosax"),
        pyswarms=pyswarms.__version__,
        evox=None if evox is None else importlib.metadata.version("evox"),
        torch=None if torch is None else torch.__version__,
        torch_threads=None if torch is None else torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        numpy=np.__version__,
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


def _get_ms(row, lib):
    return row.get(lib, {}).get("ms")


def _versions(info):
    evox_ = "EvoX not installed"
    if info.get("evox"):
        evox_ = (
            f"EvoX {info['evox']} (torch {info['torch']} on "
            f"{info.get('evox_device', 'cpu')}, "
            f"OMP_WAIT_POLICY={info['omp_wait_policy']})"
        )
    src = info.get("pso_jax_source") or {}
    return (
        f"jax {info['jax']} ({info['jax_backend']}), evosax {info['evosax']}, "
        f"pyswarms {info['pyswarms']}, {evox_}, numpy {info['numpy']}; pso_jax "
        f"sources {src.get('sources_sha256', '?')} (git HEAD {src.get('git_head')})"
    )


def write_markdown(path, result):
    command, info, roof, rows = (
        result[k] for k in ("command", "machine", "roofline", "rows")
    )
    lines = [
        "# PSO step time per iteration (one process, this machine)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {_provenance.machine_label(info)}; "
        f"{_versions(info)}; {info['date']}; grid took "
        f"{result['total_s'] / 60:.1f} min. Load average (1/5/15 min) at start "
        f"{_loads(info['loadavg_start'])}, at end {_loads(result['loadavg_end'])} "
        "(the machine is shared with other jobs: absolute times drift by 10-40 %, "
        "compare the ratios, which are taken within one run).",
        "",
        f"Steps per timed call k >= {result['settings']['min_steps']} (per-call "
        "costs such as fresh temporary buffers are amortised over k steps).",
        "",
        f"Roofline: `x += a * y` on float32 [{roof['n']}, {roof['d']}] arrays, x "
        "donated (in place; 16 bytes per element moved) = "
        f"**{roof['gb_per_s']:.1f} GB/s** (median call; the best of the readings "
        "at the start, before each largest-D cell and at the end: "
        + " / ".join(f"{g:.1f}" for g in roof["gb_per_s_readings"])
        + " GB/s). Roofline fraction "
        "= 6·4·N·D bytes (x, v, pbest read and written) / step time / that "
        "bandwidth, for pso_jax sphere rows (meaningful only at large N·D; small "
        "cells fit in cache).",
        "",
        "Times are ms per iteration (median over repeats, compile excluded). "
        "Ratios are peer time / pso_jax time: > 1 means pso_jax is faster.",
        "",
        "| N | D | fitness | pso_jax per-dim ms | pso_jax per-particle ms "
        "| evosax ms | pyswarms ms | EvoX ms "
        "| evosax / pso_jax per-particle | evosax / pso_jax per-dim "
        "| pyswarms / pso_jax per-dim | EvoX / pso_jax per-dim "
        "| roofline fraction per-dim | roofline fraction per-particle |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in rows:
        pd_, pp, ev, ps, ex = (_get_ms(r, k) for k in (*JAX_IMPLS, *HOST_IMPLS))
        for lib in HOST_IMPLS:
            if "skipped" in r.get(lib, {}):
                notes.append(
                    f"N={r['n']}, D={r['d']}, {r['fitness']}: {lib} {r[lib]['skipped']}"
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
            _ms(ex),
            _x(_ratio(ev, pp)),
            _x(_ratio(ev, pd_)),
            _x(_ratio(ps, pd_)),
            _x(_ratio(ex, pd_)),
            "" if not rf else f"{100 * rf['per_dim']:.0f} %",
            "" if not rf else f"{100 * rf['per_particle']:.0f} %",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Fitness evaluation alone (`jit(vmap(fitness))` on each swarm's final "
        "positions, ms per call, dispatch included) and max |x| there. XLA's CPU "
        "`cos` is much cheaper for small arguments, so Rastrigin step times also "
        "depend on how far each library's swarm has spread or collapsed (EvoX's "
        "positions stay in [-5.12, 5.12]; its fitness is torch code, not timed "
        "alone).",
        "",
        "| N | D | fitness | eval ms per-dim / per-particle / evosax "
        "| max abs x per-dim / per-particle / evosax / EvoX "
        "| EvoX ms at 2 / 1 torch threads | EvoX compile s |",
        "|---:|---:|---|---|---|---|---:|",
    ]
    for r in rows:
        evals = " / ".join(_ms(r[k]["eval_ms"]) for k in JAX_IMPLS)
        ex = r.get("evox", {})
        xs = " / ".join(
            f"{r[k]['max_abs_x']:.3g}" for k in JAX_IMPLS if "max_abs_x" in r[k]
        )
        if "max_abs_x" in ex:
            xs += f" / {ex['max_abs_x']:.3g}"
        by_t = ex.get("by_threads", {})
        threads = " / ".join(_ms(by_t[t]["ms"]) for t in ("2", "1") if t in by_t)
        comp = f"{ex['compile_s']:.1f}" if "compile_s" in ex else "—"
        lines.append(
            f"| {r['n']} | {r['d']} | {r['fitness']} | {evals} | {xs} "
            f"| {threads or '—'} | {comp} |"
        )
    lines += ["", "Notes:", ""]
    lines += [f"- {n}" for n in notes]
    lines += [f"- {n}" for n in result.get("run_notes", [])]
    # Measurements added to the JSON by hand after a run (see their command).
    lines += [f"- Supplement: {s['note']}" for s in result.get("supplements", [])]
    lines += [
        "- pso_jax: `pso(..., bounds=None, velocity_clamp=None)`, default `rng` "
        "and inertia hyperparameters (w=0.7298, c1=c2=1.49618), `scan_steps` "
        "returning the per-step best fitness.",
        "- evosax: `PSO` with its default params (w=0.75, c1=1.5, c2=2.0; one "
        "r1, r2 per particle), `ask -> vmap(fitness) -> tell` under `lax.scan`, "
        "keeping only `metrics['best_fitness']` per step.",
        "- pyswarms: `GlobalBestPSO` (float64, per-dimension r1, r2), "
        "`optimize(iters=k, verbose=False)`; history lists cleared between calls.",
        "- EvoX: `evox.algorithms.PSO` with its defaults (w=0.6, phi_p=2.5, "
        "phi_g=0.8; per-dimension r1, r2 from torch's generator; x and v clamped "
        f"to [-{EVOX_BOUND}, {EVOX_BOUND}]), its own `Sphere`/`Rastrigin` "
        "problems, `StdWorkflow`, `torch.compile(workflow.step)` called k times "
        "per timed call (EvoX has no fused multi-step loop, so Python dispatch "
        "is part of its step). "
        + (
            "The faster of torch at 2 threads and at 1 is reported; "
            "`OMP_WAIT_POLICY=PASSIVE` (with OpenMP's default spinning, the "
            "compiled step was up to 100x slower whenever another process held "
            "a core of this shared machine)."
            if info.get("evox_device", "cpu") == "cpu"
            else f"On `{info['evox_device']}`, each timed call ending with a "
            "device synchronisation."
        ),
        "- Compile times, k (steps per timed call) and every call's time are in "
        "the JSON file next to this one; plots: `swarm_step.png` (time per "
        "iteration vs N·D, with the roofline) and `swarm_step_ratio.png` (peer "
        "time / pso_jax time).",
    ]
    path.write_text("\n".join(lines) + "\n")


LIB_STYLE = {
    "pso_jax_per_dim": ("pso_jax (per-dim r)", "C0", "-", "o"),
    "pso_jax_per_particle": ("pso_jax (per-particle r)", "C0", "--", "s"),
    "evosax": ("evosax PSO", "C1", "-", "^"),
    "pyswarms": ("pyswarms GlobalBestPSO", "C2", "-", "v"),
    "evox": ("EvoX PSO (torch.compile)", "C3", "-", "D"),
}


def write_plots(out_dir, result, stem="swarm_step"):
    """``swarm_step.png`` (ms vs N·D) and ``swarm_step_ratio.png`` (peer / ours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, roof = result["rows"], result["roofline"]
    fitnesses = [f for f in FITNESSES if any(r["fitness"] == f for r in rows)]
    libs = (*JAX_IMPLS, *HOST_IMPLS)
    title = (
        f"{result['machine']['cpu_model']}, {result['machine']['cpu_count']} cores "
        f"(shared), {result['machine']['date'][:10]}"
    )
    for kind in ("time", "ratio"):
        fig, axes = plt.subplots(
            1, len(fitnesses), figsize=(6 * len(fitnesses), 4.5), squeeze=False
        )
        for ax, fit in zip(axes[0], fitnesses, strict=True):
            cell = sorted(
                (r for r in rows if r["fitness"] == fit),
                key=lambda r: r["n"] * r["d"],
            )
            nd = np.array([r["n"] * r["d"] for r in cell], float)
            for lib in libs:
                if kind == "ratio" and lib == "pso_jax_per_dim":
                    continue
                ys = [_get_ms(r, lib) for r in cell]
                if kind == "ratio":
                    ys = [
                        _ratio(y, _get_ms(r, "pso_jax_per_dim"))
                        for y, r in zip(ys, cell, strict=True)
                    ]
                ys = np.array([np.nan if y is None else y for y in ys], float)
                if np.all(np.isnan(ys)):
                    continue
                label, color, ls, marker = LIB_STYLE[lib]
                ax.plot(nd, ys, ls=ls, color=color, marker=marker, label=label)
            if kind == "time":
                roof_ms = 6 * 4 * nd / (roof["gb_per_s"] * 1e9) * 1e3
                ax.plot(
                    nd,
                    roof_ms,
                    color="k",
                    ls=":",
                    label=f"roofline (x, v, pbest r+w at {roof['gb_per_s']:.0f} GB/s)",
                )
                ax.set_ylabel("ms per iteration (median)")
            else:
                ax.axhline(1.0, color="k", lw=0.8)
                ax.set_ylabel("peer time / pso_jax per-dim time (> 1: pso_jax faster)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ns = ", ".join(str(n) for n in sorted({r["n"] for r in cell}))
            ax.set_xlabel(f"N particles x D dims (N in {{{ns}}})")
            ax.set_title(f"{fit}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(
            (
                "PSO step time per iteration"
                if kind == "time"
                else "Time ratio to pso_jax"
            )
            + f" - {title}",
            fontsize=10,
        )
        fig.tight_layout()
        name = f"{stem}.png" if kind == "time" else f"{stem}_ratio.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)


def bench_cell(n, d, name, args, timing, ns_per_elem):
    """Time every library on one ``(N, D, fitness)`` cell; free memory between."""
    fit = JAX_FITNESS[name]
    row = dict(n=n, d=d, fitness=name)
    for key, rf in (
        ("pso_jax_per_dim", "per_dimension"),
        ("pso_jax_per_particle", "per_particle"),
    ):
        row[key] = bench_pso_jax(fit, n, d, rf, timing)
        gc.collect()
    row["evosax"] = bench_evosax(fit, n, d, timing)
    gc.collect()
    # pyswarms is slow: as many timed iterations as fit in the budget (after a
    # warm-up one), at least 2; skip the cell if even that is projected over it.
    iter_s = ns_per_elem.get(name, 0.0) * 1e-9 * n * d
    reps = timing.repeats if iter_s == 0 else int(args.pyswarms_max_s / iter_s) - 1
    if reps < 2:
        row["pyswarms"] = dict(
            skipped=f"skipped: projected {3 * iter_s:.0f} s for 3 iterations > "
            f"{args.pyswarms_max_s:.0f} s"
        )
    else:
        ps_timing = timing._replace(repeats=min(reps, timing.repeats))
        row["pyswarms"] = bench_pyswarms(NP_FITNESS[name], n, d, ps_timing)
        per = row["pyswarms"]["ms"] * 1e6 / (n * d)
        # The cost per element of the last cell (cells come in increasing N*D
        # unless --largest-first): small cells' per-call overhead would
        # overestimate it for larger ones.
        ns_per_elem[name] = per
    gc.collect()
    if n in args.evox_ns:
        try:
            row["evox"] = bench_evox(name, n, d, timing, args.evox_device)
        except Exception as e:  # a peer's failure must not lose the other rows
            row["evox"] = dict(skipped=f"failed: {e!r}"[:300])
            if torch is not None:
                torch.set_default_device("cpu")
    else:
        row["evox"] = dict(skipped=f"skipped: N={n} not in --evox-ns")
    gc.collect()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced grid, for CI")
    ap.add_argument("--out", default="benchmarks/results", type=Path)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--min-call-s", type=float, default=0.2)
    ap.add_argument(
        "--min-steps",
        type=int,
        default=4,
        help="fewest scan steps per timed call (amortises per-call costs)",
    )
    ap.add_argument(
        "--pyswarms-max-s",
        type=float,
        default=60.0,
        help="skip pyswarms cells projected to take longer",
    )
    ap.add_argument(
        "--evox-device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="torch device for EvoX: auto (cuda if torch sees a GPU), cpu, cuda",
    )
    ap.add_argument(
        "--evox-ns",
        default=None,
        help="comma-separated N at which EvoX runs (default: every N); its "
        "torch.compile takes seconds per cell",
    )
    ap.add_argument(
        "--largest-first",
        action="store_true",
        help="cells in decreasing D and N (with --time-limit: the largest, "
        "the headline cells, are measured first)",
    )
    ap.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds after which no new cell starts; the cells done are written",
    )
    ap.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="rewrite the markdown and plots from this JSON file; measure nothing",
    )
    args = ap.parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        write_markdown(args.replot.with_suffix(".md"), result)
        write_plots(args.replot.parent, result)
        print(f"rewrote {args.replot.with_suffix('.md')} and the plots")
        return
    repeats = args.repeats or (3 if args.quick else 5)
    timing = Timing(args.min_call_s, repeats, args.min_steps)
    ns, ds = (QUICK_NS, QUICK_DS) if args.quick else (NS, DS)
    args.evox_ns = (
        set(ns) if args.evox_ns is None else {int(v) for v in args.evox_ns.split(",")}
    )
    args.evox_device = evox_device(args.evox_device)
    command = "PYTHONPATH=. .venv/bin/python benchmarks/swarm_step.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    info = machine_info(args.evox_device)
    print(info, flush=True)

    # The machine's memory bandwidth is shared and drifts: read it at the start,
    # before every largest-D cell and at the end; the best reading is the roofline.
    n_roof, d_roof = max(ns), max(ds)
    roofs = []

    def read_roofline():
        roofs.append(bench_roofline(n_roof, d_roof, timing))
        gc.collect()
        print(f"roofline {roofs[-1]['gb_per_s']:.1f} GB/s", flush=True)

    read_roofline()
    rows = []
    ns_per_elem = {}  # pyswarms' cost per N*D element, last cell, per fitness
    t_start = time.perf_counter()
    run_notes = []

    def timed_out():
        elapsed = time.perf_counter() - t_start
        return args.time_limit is not None and elapsed > args.time_limit

    for d in sorted(ds, reverse=args.largest_first):
        for n in sorted(ns, reverse=args.largest_first):
            if d == d_roof and not timed_out():
                read_roofline()
            for name in FITNESSES:
                if timed_out():
                    run_notes.append(
                        f"N={n} D={d} {name}: not measured (--time-limit "
                        f"{args.time_limit:.0f} s reached)"
                    )
                    continue
                rows.append(bench_cell(n, d, name, args, timing, ns_per_elem))
                print(
                    f"[{time.perf_counter() - t_start:6.0f} s] N={n} D={d} {name}: "
                    + ", ".join(
                        f"{k}={rows[-1][k].get('ms', float('nan')):.3f} ms"
                        for k in (*JAX_IMPLS, *HOST_IMPLS)
                    ),
                    flush=True,
                )
    read_roofline()
    roof = dict(max(roofs, key=lambda r: r["gb_per_s"]), n=n_roof, d=d_roof)
    roof["gb_per_s_readings"] = [r["gb_per_s"] for r in roofs]
    for row in rows:
        if row["fitness"] == "sphere":
            bytes_ = 6 * 4 * row["n"] * row["d"]
            row["roofline_fraction"] = {
                k.removeprefix("pso_jax_"): bytes_
                / (row[k]["ms"] * 1e-3)
                / (roof["gb_per_s"] * 1e9)
                for k in ("pso_jax_per_dim", "pso_jax_per_particle")
            }

    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(
        command=command,
        machine=info,
        settings=dict(
            **timing._asdict(),
            pyswarms_max_s=args.pyswarms_max_s,
            quick=args.quick,
            evox_ns=sorted(args.evox_ns),
            time_limit=args.time_limit,
            largest_first=args.largest_first,
        ),
        roofline=roof,
        run_notes=run_notes,
        total_s=time.perf_counter() - t_start,
        loadavg_end=os.getloadavg(),
        rows=rows,
    )
    (args.out / "swarm_step.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(args.out / "swarm_step.md", result)
    write_plots(args.out, result)
    print(f"wrote {args.out}/swarm_step.{{md,json,png}}, swarm_step_ratio.png")


if __name__ == "__main__":
    main()
