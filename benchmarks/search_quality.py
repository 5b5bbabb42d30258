"""Search quality at equal evaluation budgets: pso_jax vs evosax, pyswarms and EvoX.

Every optimizer gets the same number of fitness evaluations, ``--evals-per-dim``
(default 10 000) times D, on the same shifted and rotated problems, over
``--seeds`` seeds, and the final error ``best fitness - optimum`` is reported as
median and interquartile range; errors below 1e-8 count as 0 (the CEC rule).

Problems: ``pso_jax.objectives.make_problem(name, D, shift=True, rotate=True)``,
i.e. ``F(x) = f(R (x - o) + x*)`` with a Haar-random rotation ``R``, a shift ``o``
uniform in the central 80 % of the box and ``x*`` the base function's argmin, so
the optimum is 0 at ``o`` for every function. One fixed instance per (function,
D), the same for every optimizer and seed (``--problem-seed``). The base
functions are checked against opfunu's CEC definitions in
``tests/test_objectives_opfunu.py``.

Every library evaluates the same float32 JAX function (numpy/torch libraries
through a jitted ``vmap`` of it), and every optimizer starts uniformly in the
function's box. Evaluations are counted the same way for all: a library's
fitness calls are counted by the evaluator, pso_jax's and evosax's from their
step counts (``N`` per step; evosax's PSO also evaluates its initial swarm).

Optimizers (swarm size ``--swarm-size``, default 40, for every PSO; library
defaults otherwise):

- pso_jax: ``default``, what ``pso_jax.minimize(fn, (low, high))`` runs with
  no options (``minimize_defaults``: the von Neumann topology with TVAC, w
  0.9 -> 0.4, c1 2.5 -> 0.5, c2 0.5 -> 2.5 over the first 40 % of the run's
  steps, held after); ``inertia``
  with the ``global``, ``ring`` and ``von_neumann``
  topologies, ``spso2011`` (random informants), ``cso`` and ``clpso`` (at its
  constant default w=0.7, and with the paper's w falling linearly from 0.9 to
  0.2 over the run's steps); bounds as
  ``pso_jax.minimize(fn, (low, high))`` sets them (reflecting walls, velocity
  clamp 0.5 x range), no restarts. Seeds run under one ``jax.vmap``; the
  trajectory of seed ``s`` is that of ``minimize(..., key=jax.random.key(s))``
  (checked at start-up).
- evosax: ``PSO`` (defaults w=0.75, c1=1.5, c2=2; unbounded) and ``CMA_ES`` as a
  reference line (population 4 + 3 ln D, sigma0 = 0.3 x box width, mean uniform
  in the box; no restarts), both vmapped over seeds.
- pyswarms: ``GlobalBestPSO`` and ``LocalBestPSO`` (k=3 nearest neighbours,
  p=2), w=0.7298, c1=c2=1.49618, reflecting walls (its default, periodic,
  stalls when the optimum is near a wall).
- EvoX (PyTorch release, CPU, eager): ``PSO`` (defaults w=0.6, phi_p=2.5,
  phi_g=0.8; clamps x and v to the box) and ``CSO`` (phi=0; evaluates only the
  N/2 losers each step, so it takes twice as many steps).

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/search_quality.py \\
        [--quick] [--out benchmarks/results] [--stem search_quality]
    # tables and plots again from the JSON, without running:
    .venv/bin/python benchmarks/search_quality.py \\
        --replot benchmarks/results/search_quality.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

# Before torch (EvoX) loads libgomp: OpenMP's default spin-waiting slows torch
# badly on this shared 2-core machine (see swarm_step.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import _provenance  # benchmarks/_provenance.py (this folder is on sys.path)
import evosax.algorithms
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

import pso_jax
from pso_jax import objectives
from pso_jax.minimize import minimize_defaults

try:  # EvoX (PyTorch) is optional: its entries are skipped without it.
    import evox
    import evox.algorithms
    import evox.core
    import evox.workflows
    import torch
except ImportError as e:
    evox = torch = None
    _EVOX_IMPORT_ERROR = repr(e)

# pyswarms opens ./report.log when imported and whenever an optimizer is built:
# do both from a temporary directory, not the repository.
with tempfile.TemporaryDirectory() as _tmp, contextlib.chdir(_tmp):
    import pyswarms

FUNCTIONS = ("sphere", "rastrigin", "rosenbrock", "ackley", "griewank", "schwefel")
DIMS = (10, 30, 100)
SEEDS = 10
QUICK_FUNCTIONS = ("sphere", "rastrigin", "rosenbrock")
QUICK_DIMS = (10,)
QUICK_SEEDS = 3
ERROR_FLOOR = 1e-8  # CEC: errors below this count as 0
NUM_CHECKPOINTS = 60  # evaluation counts at which the convergence curve is kept


class Entry(NamedTuple):
    """One optimizer configuration.

    Attributes:
      name: the label in tables and plots.
      library: "pso_jax", "evosax", "pyswarms" or "evox".
      kind: which runner (see ``RUNNERS``).
      options: keyword arguments of the runner.
      reference: a reference line (CMA-ES), not one of the PSO peers.
    """

    name: str
    library: str
    kind: str
    options: dict
    reference: bool = False


ENTRIES = (
    # What pso_jax.minimize(fn, (low, high)) runs with no options (its
    # minimize_defaults: von Neumann topology, TVAC schedules over the run).
    Entry("pso_jax default", "pso_jax", "pso_jax", dict(minimize_default=True)),
    Entry("pso_jax inertia/global", "pso_jax", "pso_jax", dict(variant="inertia")),
    Entry(
        "pso_jax inertia/ring",
        "pso_jax",
        "pso_jax",
        dict(variant="inertia", topology="ring"),
    ),
    Entry(
        "pso_jax inertia/von_neumann",
        "pso_jax",
        "pso_jax",
        dict(variant="inertia", topology="von_neumann"),
    ),
    Entry("pso_jax spso2011", "pso_jax", "pso_jax", dict(variant="spso2011")),
    Entry("pso_jax cso", "pso_jax", "pso_jax", dict(variant="cso")),
    Entry("pso_jax clpso", "pso_jax", "pso_jax", dict(variant="clpso")),
    Entry(
        "pso_jax clpso w 0.9→0.2",
        "pso_jax",
        "pso_jax",
        dict(variant="clpso", inertia_schedule=(0.9, 0.2)),
    ),
    Entry("evosax PSO", "evosax", "evosax_pso", {}),
    Entry("pyswarms global", "pyswarms", "pyswarms", dict(local=False)),
    Entry("pyswarms local", "pyswarms", "pyswarms", dict(local=True)),
    Entry("EvoX PSO", "evox", "evox", dict(algorithm="PSO")),
    Entry("EvoX CSO", "evox", "evox", dict(algorithm="CSO")),
    Entry("evosax CMA-ES", "evosax", "evosax_cma", {}, reference=True),
)
ENTRY_BY_NAME = {e.name: e for e in ENTRIES}


# --- problems and bookkeeping ------------------------------------------------------


def make_problem(name, num_dims, problem_seed):
    """The fixed shifted+rotated instance of ``name`` in ``num_dims`` dims."""
    key = jax.random.fold_in(
        jax.random.fold_in(jax.random.key(problem_seed), FUNCTIONS.index(name)),
        num_dims,
    )
    return objectives.make_problem(name, num_dims, key=key, shift=True, rotate=True)


def checkpoints(first, budget):
    """Evaluation counts (ints, increasing, last = budget) for the curves."""
    c = np.geomspace(first, budget, NUM_CHECKPOINTS)
    return np.unique(np.round(c).astype(np.int64))


def at_checkpoints(evals, best, marks):
    """Best-so-far after the last batch with ``evals <= mark``, per mark.

    Args:
      evals: ``[T]`` increasing evaluation counts after each batch.
      best: ``[S, T]`` best fitness found by then (or per batch).
      marks: ``[C]`` evaluation counts.

    Returns:
      ``[S, C]`` float64; ``inf`` before the first batch.
    """
    best = np.asarray(best, np.float64)
    best = np.fmin.accumulate(np.where(np.isnan(best), np.inf, best), axis=1)
    idx = np.searchsorted(np.asarray(evals), marks, side="right") - 1
    out = best[:, np.maximum(idx, 0)]
    out[:, idx < 0] = np.inf
    return out


class Evaluator:
    """The problem's float32 JAX function for numpy/torch libraries, counted.

    Called with a swarm ``[N, D]`` (any float array), returns ``[N]`` float64
    fitness (NaN as ``inf``) and logs the evaluation count and best-so-far
    after every call.
    """

    def __init__(self, fn):
        self._fn = jax.jit(jax.vmap(fn))
        self.reset()

    def reset(self):
        self.evals = 0
        self.best = math.inf
        self.log_evals, self.log_best = [], []

    def __call__(self, x):
        f = np.asarray(self._fn(np.asarray(x, np.float32)), np.float64)
        f = np.where(np.isnan(f), np.inf, f)
        self.evals += f.shape[0]
        self.best = min(self.best, float(f.min()))
        self.log_evals.append(self.evals)
        self.log_best.append(self.best)
        return f


# --- runners: each returns (evals [T], best [S, T], info dict) ---------------------


def _vmapped(one, seeds):
    """jit(vmap(one)) over ``jax.random.key(s)`` for s in seeds; times compile."""
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    fn = jax.jit(jax.vmap(one))
    t0 = time.perf_counter()
    compiled = fn.lower(keys).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    best = np.asarray(jax.block_until_ready(compiled(keys)))
    return best, dict(compile_s=compile_s, run_s=time.perf_counter() - t0)


def _box(problem):
    low, high = problem.bounds
    d = problem.num_dims
    return jnp.full((d,), low, jnp.float32), jnp.full((d,), high, jnp.float32)


def build_pso_jax(problem, num_particles, variant="inertia", topology=None, **hp):
    """The optimizer ``minimize(fn, (low, high), num_dims=D, ...)`` builds."""
    return pso_jax.pso(
        lambda x, _batch: problem.fn(x),
        num_particles=num_particles,
        variant=variant,
        topology=topology,
        bounds=_box(problem),
        **hp,
    )


def run_pso_jax(
    problem, n, budget, seeds, inertia_schedule=None, minimize_default=False, **options
):
    steps = budget // n
    if inertia_schedule is not None:  # (start, end) over the run's steps
        start, end = inertia_schedule
        options["inertia"] = optax.linear_schedule(start, end, steps)
    if minimize_default:  # what minimize() adds to pso()'s defaults
        options = {"variant": "inertia", **options}
        options |= minimize_defaults(steps, **options)
    with warnings.catch_warnings():
        # TVAC (the default's schedules) starts outside the stability region
        # on purpose; minimize() does not warn about it either.
        warnings.simplefilter("ignore", pso_jax.PSOConvergenceWarning)
        opt = build_pso_jax(problem, n, **options)
        hp = opt.default_hparams
        low, high = _box(problem)
        template = (low + high) / 2

        def one(key):
            key_run = jax.random.fold_in(key, 0)  # minimize()'s first attempt
            state = opt.init(key_run, template, hp)
            _, infos = pso_jax.scan_steps(key_run, opt, state, hp, steps)
            return infos.best_fitness

        best, info = _vmapped(one, seeds)
    return n * np.arange(1, steps + 1), best, info


def run_evosax_pso(problem, n, budget, seeds):
    d = problem.num_dims
    low, high = problem.bounds
    es = evosax.algorithms.PSO(population_size=n, solution=jnp.zeros(d, jnp.float32))
    params = es.default_params
    f = jax.vmap(problem.fn)
    steps = budget // n - 1  # the initial swarm is evaluated too

    def one(key):
        key_pop, key_init, key_run = jax.random.split(key, 3)
        pop = jax.random.uniform(key_pop, (n, d), jnp.float32, low, high)
        fit = f(pop)
        state = es.init(key_init, pop, fit, params)

        def body(st, key_i):
            key_ask, key_tell = jax.random.split(key_i)
            x, st = es.ask(key_ask, st, params)
            st, _ = es.tell(key_tell, x, f(x), st, params)
            return st, st.best_fitness

        _, hist = jax.lax.scan(body, state, jax.random.split(key_run, steps))
        return jnp.concatenate([jnp.min(fit)[None], hist])

    best, info = _vmapped(one, seeds)
    return n * np.arange(1, steps + 2), best, info


def cma_population(num_dims):
    return 4 + int(3 * math.log(num_dims))


def run_evosax_cma(problem, n, budget, seeds):
    del n  # CMA-ES uses its own default population size
    d = problem.num_dims
    low, high = problem.bounds
    lam = cma_population(d)
    es = evosax.algorithms.CMA_ES(
        population_size=lam, solution=jnp.zeros(d, jnp.float32)
    )
    params = es.default_params.replace(std_init=0.3 * (high - low))
    f = jax.vmap(problem.fn)
    steps = budget // lam

    def one(key):
        key_mean, key_init, key_run = jax.random.split(key, 3)
        mean = jax.random.uniform(key_mean, (d,), jnp.float32, low, high)
        state = es.init(key_init, mean, params)

        def body(st, key_i):
            key_ask, key_tell = jax.random.split(key_i)
            x, st = es.ask(key_ask, st, params)
            fx = f(x)
            st, _ = es.tell(key_tell, x, fx, st, params)
            # Once its covariance degenerates (after converging), evosax's CMA-ES
            # samples NaN; those count as failed evaluations.
            return st, jnp.min(jnp.where(jnp.isnan(fx), jnp.inf, fx))

        _, hist = jax.lax.scan(body, state, jax.random.split(key_run, steps))
        return hist

    best, info = _vmapped(one, seeds)
    info["population"] = lam
    return lam * np.arange(1, steps + 1), best, info


def _host_runs(problem, seeds, run_one):
    """Run ``run_one(evaluator, seed)`` per seed; gather its evaluation logs."""
    evaluator = Evaluator(problem.fn)
    logs, t0 = [], time.perf_counter()
    for seed in seeds:
        evaluator.reset()
        run_one(evaluator, int(seed))
        logs.append((np.asarray(evaluator.log_evals), np.asarray(evaluator.log_best)))
    evals = logs[0][0]
    for e, _ in logs:
        if not np.array_equal(e, evals):
            raise RuntimeError("runs of one optimizer made different evaluation calls")
    best = np.stack([b for _, b in logs])
    return evals, best, dict(run_s=time.perf_counter() - t0)


def run_pyswarms(problem, n, budget, seeds, local=False):
    d = problem.num_dims
    low, high = problem.bounds
    options = dict(c1=1.49618, c2=1.49618, w=0.7298)
    if local:
        options.update(k=3, p=2)
    cls = pyswarms.single.LocalBestPSO if local else pyswarms.single.GlobalBestPSO

    def run_one(evaluator, seed):
        np.random.seed(seed)  # pyswarms draws from numpy's global generator
        with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
            opt = cls(
                n_particles=n,
                dimensions=d,
                options=options,
                bounds=(np.full(d, low), np.full(d, high)),
                # Reflecting walls, as pso_jax's default. pyswarms' own default,
                # "periodic", stalls when the optimum is near a wall: on a
                # shifted 10-D sphere with 1e5 evaluations it ended at 0.3-1.1
                # (3 of 3 seeds) where "reflective" reached 0.
                bh_strategy="reflective",
            )
        # optimize() keeps every iteration's [N, D] positions and velocities:
        # 1.6 GB at D=100. Keep none.
        opt._populate_history = lambda _hist: None
        opt.optimize(evaluator, iters=budget // n, verbose=False)

    return _host_runs(problem, seeds, run_one)


def run_evox(problem, n, budget, seeds, algorithm="PSO"):
    if evox is None:
        raise ImportError(_EVOX_IMPORT_ERROR)
    d = problem.num_dims
    low, high = problem.bounds
    cls = getattr(evox.algorithms, algorithm)
    per_step = n // 2 if algorithm == "CSO" else n

    class TrackedProblem(evox.core.Problem):
        def __init__(self, evaluator):
            super().__init__()
            self.evaluator = evaluator

        def evaluate(self, pop):
            f = self.evaluator(pop.detach().cpu().numpy())
            return torch.from_numpy(f.astype(np.float32))

    def run_one(evaluator, seed):
        torch.manual_seed(seed)  # EvoX draws from torch's global generator
        algo = cls(
            pop_size=n,
            lb=torch.full((d,), float(low)),
            ub=torch.full((d,), float(high)),
        )
        workflow = evox.workflows.StdWorkflow(algo, TrackedProblem(evaluator))
        workflow.init_step()
        while evaluator.evals + per_step <= budget:
            workflow.step()

    return _host_runs(problem, seeds, run_one)


RUNNERS = {
    "pso_jax": run_pso_jax,
    "evosax_pso": run_evosax_pso,
    "evosax_cma": run_evosax_cma,
    "pyswarms": run_pyswarms,
    "evox": run_evox,
}


def check_matches_minimize():
    """The vmapped pso_jax runs follow ``minimize``'s trajectory (seed 3)."""
    problem = objectives.make_problem("sphere", 5)
    n, steps, seed = 8, 30, 3
    _, best, _ = run_pso_jax(problem, n, n * steps, [seed], minimize_default=True)
    res = pso_jax.minimize(
        problem.fn,
        problem.bounds,
        num_dims=5,
        key=jax.random.key(seed),
        num_particles=n,
        num_steps=steps,
    )
    np.testing.assert_allclose(best[0], res.history, rtol=1e-4, atol=1e-12)


# --- statistics and output ---------------------------------------------------------


def errors_of(best, optimum):
    """Errors ``best - optimum`` with the CEC floor (below 1e-8 -> 0)."""
    err = np.maximum(np.asarray(best, np.float64) - optimum, 0.0)
    return np.where(err < ERROR_FLOOR, 0.0, err)


def _curve_quantiles(curve):
    """Quartiles per checkpoint; None where not every seed has evaluated yet."""
    out = {}
    for k, q in (("q25", 25), ("median", 50), ("q75", 75)):
        with np.errstate(invalid="ignore"):
            v = np.percentile(curve, q, axis=0)
        out[k] = [float(x) if np.isfinite(x) else None for x in v]
    return out


def summarize(final_errors):
    q25, med, q75 = np.percentile(final_errors, [25, 50, 75])
    return dict(median=med, q25=q25, q75=q75, mean=float(np.mean(final_errors)))


def _e(x):
    if x is None:
        return "—"
    return "0" if x == 0 else f"{x:.2e}"


def _cell(s):
    if s is None:
        return "—"
    return f"{_e(s['median'])} [{_e(s['q25'])}, {_e(s['q75'])}]"


def compare(cell):
    """Best pso_jax entry vs best PSO peer (and CMA-ES) in one (function, D) cell."""
    stats = cell["entries"]

    def best_of(pred):
        names = [
            n for n, s in stats.items() if "summary" in s and pred(ENTRY_BY_NAME[n])
        ]
        if not names:
            return None
        return min(
            names,
            key=lambda n: (stats[n]["summary"]["median"], stats[n]["summary"]["mean"]),
        )

    ours = best_of(lambda e: e.library == "pso_jax")
    peer = best_of(lambda e: e.library != "pso_jax" and not e.reference)
    if ours is None or peer is None:
        return None
    a = np.asarray(stats[ours]["final_errors"])
    b = np.asarray(stats[peer]["final_errors"])
    ma, mb = np.median(a), np.median(b)
    p, a_lower = 1.0, bool(ma < mb)
    if not (np.all(a == a[0]) and np.all(b == b[0]) and a[0] == b[0]):
        test = scipy.stats.mannwhitneyu(a, b, alternative="two-sided")
        p = float(test.pvalue)
        # The direction of the rank sums, not of the medians (which can be equal).
        a_lower = bool(test.statistic < a.size * b.size / 2)
    verdict = ("win" if a_lower else "loss") if p < 0.05 else "tie"
    return dict(
        ours=ours,
        peer=peer,
        p_value=p,
        verdict=verdict,
        at_least_as_good=bool(ma <= mb),
    )


DEFAULT_ENTRY = "pso_jax default"


def _default_vs_peer(cells):
    """The headline line for ``minimize()``'s default against the best peer."""
    n_ok = n_all = 0
    verdicts = dict(win=0, tie=0, loss=0)
    losses = []
    for c in cells:
        cmp_ = c.get("comparison")
        st = c["entries"].get(DEFAULT_ENTRY, {})
        if cmp_ is None or "summary" not in st:
            continue
        cell = dict(
            c, entries={k: c["entries"][k] for k in (DEFAULT_ENTRY, cmp_["peer"])}
        )
        v = compare(cell)
        n_all += 1
        n_ok += v["at_least_as_good"]
        verdicts[v["verdict"]] += 1
        if v["verdict"] == "loss":
            losses.append(f"{c['function']} D={c['d']} (p = {v['p_value']:.3f})")
    if not n_all:
        return []
    lost = f"; significant losses: {', '.join(losses)}" if losses else ""
    return [
        f"`minimize()`'s default ({DEFAULT_ENTRY}) alone is at least as good as "
        f"the best peer's median on **{n_ok} of {n_all}** cells (significant: "
        f"{verdicts['win']} wins, {verdicts['loss']} losses, {verdicts['tie']} "
        f"ties{lost}).",
        "",
    ]


def write_markdown(path, result):
    info, cells, settings = result["machine"], result["cells"], result["settings"]
    dims = sorted({c["d"] for c in cells})
    names = [e.name for e in ENTRIES if any(e.name in c["entries"] for c in cells)]
    lines = [
        "# Search quality at equal evaluation budgets (one process, this machine)",
        "",
        f"Command: `{result['command']}`",
        "",
        *[
            f"Then re-run and merged (`--update`) on {u['machine']['date']}, load "
            f"{_loads(u['machine']['loadavg_start'])}: `{u['command']}` "
            f"({', '.join(u['entries'])})."
            for u in result.get("updates", [])
        ],
        "",
        f"Machine: {info['cpu_model']}, {info['cpu_count']} cores (shared with other "
        f"jobs); {_versions(info)}; {info['date']}; took "
        f"{result['total_s'] / 60:.1f} min. Load average (1/5/15 min) at start "
        f"{_loads(info['loadavg_start'])}, at end {_loads(result['loadavg_end'])}.",
        "",
        f"Grid: functions {', '.join(settings['functions'])} (all shifted and "
        f"rotated), D ∈ {{{', '.join(map(str, settings['dims']))}}}, "
        f"{settings['seeds']} seeds, {settings['evals_per_dim']:,}·D evaluations "
        f"per run, swarm size {settings['swarm_size']} for every PSO. Problem "
        f"instances from `--problem-seed {settings['problem_seed']}`.",
        "",
        "Error = best fitness found - optimum (0); errors < 1e-8 count as 0 (CEC "
        "rule). Cells: median [25th, 75th percentile] over seeds. All libraries "
        "evaluate the same float32 JAX function, so errors near the float32 "
        "resolution of a function's value at its optimum are noise: about 1e-4 "
        "for Rastrigin at D=100 (10·D - Σ10 cos ≈ 0 cancels), up to ~1e-2 for "
        "Schwefel (418.98·D - Σ...), ~2e-6 for Ackley.",
        "",
        "## Headline: best pso_jax configuration vs best PSO peer",
        "",
        "Per cell, the pso_jax configuration and the PSO peer with the lowest "
        "median (all at their default settings; no tuning per function). "
        "Verdict: two-sided Mann-Whitney U on the final errors, p < 0.05 "
        "(win/loss), else tie. Choosing the best of several configurations on "
        "each side favours neither side systematically, but the p-values are "
        "not corrected for that choice.",
        "",
        "| function | D | best pso_jax | median [IQR] | best peer | median [IQR] "
        "| p | verdict | pso_jax median ≤ peer's | `minimize()` default "
        "(pso_jax default) | evosax CMA-ES (reference) |",
        "|---|---:|---|---|---|---|---:|---|---|---|---|",
    ]
    count = dict(total=0, as_good=0, win=0, tie=0, loss=0)
    losses = []
    for c in cells:
        cmp_ = c.get("comparison")
        if cmp_ is None:
            continue
        st = c["entries"]
        cma = st.get("evosax CMA-ES", {}).get("summary")
        default = st.get("pso_jax default", {}).get("summary")
        lines.append(
            f"| {c['function']} | {c['d']} | {cmp_['ours']} "
            f"| {_cell(st[cmp_['ours']]['summary'])} | {cmp_['peer']} "
            f"| {_cell(st[cmp_['peer']]['summary'])} "
            f"| {cmp_['p_value']:.3f} | {cmp_['verdict']} "
            f"| {'yes' if cmp_['at_least_as_good'] else '**no**'} "
            f"| {_cell(default)} | {_cell(cma)} |"
        )
        count["total"] += 1
        count["as_good"] += cmp_["at_least_as_good"]
        count[cmp_["verdict"]] += 1
        if not cmp_["at_least_as_good"]:
            losses.append(c)
    lines += [
        "",
        f"pso_jax's best default is at least as good as the best peer's median on "
        f"**{count['as_good']} of {count['total']}** cells (significant: "
        f"{count['win']} wins, {count['loss']} losses, {count['tie']} ties).",
        "",
    ]
    lines += _default_vs_peer(cells)
    per_config = []
    for name in names:
        if ENTRY_BY_NAME[name].library != "pso_jax":
            continue
        n_ok = n_all = 0
        for c in cells:
            cmp_ = c.get("comparison")
            if cmp_ is None or "summary" not in c["entries"].get(name, {}):
                continue
            n_all += 1
            mine = c["entries"][name]["summary"]["median"]
            n_ok += mine <= c["entries"][cmp_["peer"]]["summary"]["median"]
        per_config.append(f"{name} {n_ok}/{n_all}")
    lines += [
        "Each pso_jax configuration on its own, cells where its median is at least "
        "as good as the best peer's: " + ", ".join(per_config) + ".",
        "",
    ]
    if losses:
        lines.append("Where pso_jax is behind (median worse than the best peer's):")
        lines.append("")
        for c in losses:
            cmp_ = c["comparison"]
            st = c["entries"]
            lines.append(
                f"- {c['function']}, D={c['d']}: {cmp_['ours']} "
                f"{_e(st[cmp_['ours']]['summary']['median'])} vs {cmp_['peer']} "
                f"{_e(st[cmp_['peer']]['summary']['median'])} "
                f"(p = {cmp_['p_value']:.3f}, {cmp_['verdict']})."
            )
        lines.append("")
    for d in dims:
        fns = [c["function"] for c in cells if c["d"] == d]
        by_fn = {c["function"]: c for c in cells if c["d"] == d}
        lines += [
            f"## D = {d}: final error, median [IQR]",
            "",
            "| optimizer | " + " | ".join(fns) + " |",
            "|---|" + "---|" * len(fns),
        ]
        for name in names:
            row = []
            for fn in fns:
                st = by_fn[fn]["entries"].get(name, {})
                cell = _cell(st.get("summary")) if "summary" in st else "—"
                if by_fn[fn].get("comparison") and name in (
                    by_fn[fn]["comparison"]["ours"],
                    by_fn[fn]["comparison"]["peer"],
                ):
                    cell = f"**{cell}**"
                row.append(cell)
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines += [
            "",
            f"Convergence (median error vs evaluations, IQR shaded): "
            f"`{path.stem}_D{d}.png`.",
            "",
        ]
    lines += ["## Wall time per optimizer (all seeds of a cell, seconds)", ""]
    lines += [
        "| function | D | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for c in cells:
        row = []
        for name in names:
            st = c["entries"].get(name, {})
            if "info" not in st:
                row.append("—")
                continue
            i = st["info"]
            comp = f" (+{i['compile_s']:.0f} compile)" if "compile_s" in i else ""
            row.append(f"{i['run_s']:.0f}{comp}")
        lines.append(f"| {c['function']} | {c['d']} | " + " | ".join(row) + " |")
    lines += [
        "",
        "pso_jax and evosax run all seeds of a cell in one vmapped, jitted call; "
        "pyswarms and EvoX run seed after seed in Python (speed is not what this "
        "benchmark compares: see `swarm_step.md`).",
        "",
        "## Settings",
        "",
    ]
    lines += [f"- {line}" for line in SETTINGS_NOTES]
    skipped = [
        f"{c['function']}, D={c['d']}: {name}: {st['skipped']}"
        for c in cells
        for name, st in c["entries"].items()
        if "skipped" in st
    ]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {s}" for s in skipped]
    path.write_text("\n".join(lines) + "\n")


SETTINGS_NOTES = (
    "pso_jax default: what `pso_jax.minimize(fn, (low, high), num_dims=D, "
    "num_particles=N, num_steps=budget // N)` runs with no other option: "
    "`pso(fn, num_particles=N, bounds=(low, high), "
    "**minimize_defaults(num_steps))`, i.e. topology von_neumann and the TVAC "
    "schedules (w 0.9 -> 0.4, c1 2.5 -> 0.5, c2 0.5 -> 2.5, linear over the "
    "first 40 % of the run, then held), reflecting walls, velocity clamp "
    "0.5 x range.",
    "pso_jax (the other rows): `pso(fn, num_particles=N, variant=..., "
    "topology=..., bounds=(low, high))` with every other argument at pso()'s "
    "default (reflecting walls, velocity clamp 0.5 x range, hash RNG, "
    "per-dimension r1, r2), without restarts (minimize() runs these when "
    "given the coefficients too, e.g. `inertia=0.7298`; else it schedules "
    "them). inertia: w=0.7298, "
    "c1=c2=1.49618; ring: 1 neighbour each side; spso2011: its default random "
    "topology (3 informants); cso: phi=0.1; clpso: c=1.49445, refresh gap 7, "
    "velocity clamp 0.2 x range (the paper's), w=0.7 constant (its default) or "
    "`inertia=optax.linear_schedule(0.9, 0.2, steps)` (the paper's), reflecting "
    "walls (the paper instead leaves particles outside the box unevaluated). "
    "`constriction` is omitted: with its defaults it is the same update as "
    "`inertia`'s.",
    "pso_jax cso re-evaluates every particle each step (N evaluations per "
    "step, winners included), whereas EvoX's CSO evaluates only the N/2 losers; "
    "both are charged what they evaluate.",
    "evosax PSO: defaults (w=0.75, c1=1.5, c2=2.0, one r1, r2 per particle), "
    "no bounds (the initial swarm is uniform in the box); the initial swarm's "
    "evaluation is charged.",
    "evosax CMA-ES (reference, not a PSO peer): population 4 + 3 ln D, "
    "sigma0 = 0.3 x box width, initial mean uniform in the box, no restarts, "
    "no bounds.",
    "pyswarms: w=0.7298, c1=c2=1.49618 (pyswarms has no defaults), reflecting "
    "walls (`bh_strategy='reflective'`, as pso_jax's default; pyswarms' default "
    "'periodic' stalls when the optimum is near a wall: shifted 10-D sphere, "
    "1e5 evaluations, 3 seeds: 0.31-1.08 periodic vs 0 reflective), no velocity "
    "clamp; LocalBestPSO with k=3 nearest "
    "neighbours in position space (self included), p=2. float64 positions, "
    "evaluated in float32.",
    "EvoX: `PSO` and `CSO` at their defaults with the box as `lb`/`ub`, "
    "`StdWorkflow`, eager (the fitness is the JAX function, so no "
    "`torch.compile`).",
)


def write_plots(out_dir, result, stem="search_quality"):
    """One PNG per D: median error vs evaluations per function, IQR shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    ours = [e.name for e in ENTRIES if e.library == "pso_jax"]
    peers = [e.name for e in ENTRIES if e.library != "pso_jax"]
    # pso_jax: solid, cool colours; peers: dashed, warm ones; CMA-ES dotted.
    our_colors = ("C0", "C9", "C4", "navy", "teal", "C2", "olive")
    peer_colors = ("C1", "C8", "C7", "C3", "C6", "k")
    colors = {n: our_colors[i % len(our_colors)] for i, n in enumerate(ours)}
    colors.update({n: peer_colors[i % len(peer_colors)] for i, n in enumerate(peers)})
    styles = {n: "-" for n in ours} | {n: "--" for n in peers}
    styles["evosax CMA-ES"] = ":"
    for d in sorted({c["d"] for c in cells}):
        row = [c for c in cells if c["d"] == d]
        cols = min(3, len(row))
        nrows = math.ceil(len(row) / cols)
        fig, axes = plt.subplots(
            nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False
        )
        for ax, c in zip(axes.flat, row, strict=False):
            for name, st in c["entries"].items():
                if "curve" not in st:
                    continue
                x = np.asarray(c["checkpoints"], float)
                q = {
                    k: np.maximum(np.asarray(v, float), ERROR_FLOOR)
                    for k, v in st["curve"].items()
                }
                ax.plot(
                    x,
                    q["median"],
                    styles[name],
                    color=colors[name],
                    label=name,
                    lw=1.6 if name in ours else 1.2,
                )
                ax.fill_between(x, q["q25"], q["q75"], color=colors[name], alpha=0.08)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"shifted rotated {c['function']}, D={d}", fontsize=10)
            ax.set_xlabel("fitness evaluations")
            ax.set_ylabel("error (median over seeds)")
            ax.grid(True, which="major", alpha=0.3)
        for ax in list(axes.flat)[len(row) :]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8)
        settings = result["settings"]
        fig.suptitle(
            f"Error vs evaluations, {settings['seeds']} seeds, swarm size "
            f"{settings['swarm_size']} (errors < 1e-8 drawn at 1e-8); "
            f"{result['machine']['date'][:10]}",
            fontsize=10,
        )
        fig.tight_layout(rect=(0, 0.08, 1, 0.96))
        fig.savefig(out_dir / f"{stem}_D{d}.png", dpi=100)
        plt.close(fig)


def merge_results(base, cells):
    """``base`` with the entries of ``cells`` replacing (or adding to) its own."""
    merged = json.loads(json.dumps(base))  # a deep copy
    by_key = {(c["function"], c["d"]): c for c in merged["cells"]}
    for cell in cells:
        old = by_key.get((cell["function"], cell["d"]))
        if old is None:
            merged["cells"].append(cell)
            continue
        old["entries"].update(cell["entries"])
        old["comparison"] = compare(old)
    # Keep the table order of ENTRIES in every cell.
    order = {e.name: i for i, e in enumerate(ENTRIES)}
    for c in merged["cells"]:
        c["entries"] = dict(sorted(c["entries"].items(), key=lambda kv: order[kv[0]]))
    return merged


# --- main --------------------------------------------------------------------------


def machine_info():
    return _provenance.machine_info(
        evosax=importlib.metadata.version("evosax"),
        pyswarms=pyswarms.__version__,
        evox=None if evox is None else importlib.metadata.version("evox"),
        torch=None if torch is None else torch.__version__,
        numpy=np.__version__,
    )


def _versions(info):
    src = info.get("pso_jax_source") or {}
    evox_ = (
        f"EvoX {info['evox']} (torch {info['torch']})"
        if info.get("evox")
        else ("EvoX not installed")
    )
    return (
        f"jax {info['jax']} ({info['jax_backend']}), evosax {info['evosax']}, "
        f"pyswarms {info['pyswarms']}, {evox_}, numpy {info['numpy']}; pso_jax "
        f"sources {src.get('sources_sha256', '?')} (git HEAD {src.get('git_head')})"
    )


def _loads(loads):
    return "/".join(f"{x:.1f}" for x in loads)


def run_cell(function, d, args, entries, seeds):
    problem = make_problem(function, d, args.problem_seed)
    budget = args.evals_per_dim * d
    marks = checkpoints(min(args.swarm_size, cma_population(d)), budget)
    cell = dict(function=function, d=d, budget=budget, checkpoints=marks.tolist())
    cell["entries"] = {}
    for entry in entries:
        t0 = time.perf_counter()
        if entry.reference and d > args.cma_max_dim:
            cell["entries"][entry.name] = dict(
                skipped=f"D > --cma-max-dim {args.cma_max_dim} (cost)"
            )
            continue
        try:
            evals, best, info = RUNNERS[entry.kind](
                problem, args.swarm_size, budget, seeds, **entry.options
            )
        except ImportError as e:
            cell["entries"][entry.name] = dict(skipped=f"not importable: {e}")
            continue
        if evals[-1] > budget:
            raise RuntimeError(f"{entry.name} used {evals[-1]} > {budget} evaluations")
        curve = errors_of(at_checkpoints(evals, best, marks), problem.optimum_value)
        final = curve[:, -1]
        cell["entries"][entry.name] = dict(
            final_errors=final.tolist(),
            evaluations_used=int(evals[-1]),
            summary=summarize(final),
            curve=_curve_quantiles(curve),
            info=info,
        )
        s = cell["entries"][entry.name]["summary"]
        print(
            f"  {function} D={d} {entry.name:28s} median {_e(s['median'])} "
            f"[{_e(s['q25'])}, {_e(s['q75'])}] ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    cell["comparison"] = compare(cell)
    return cell


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced grid, for CI")
    ap.add_argument("--out", default="benchmarks/results", type=Path)
    ap.add_argument(
        "--stem",
        default="search_quality",
        help="file names in --out: STEM.md, STEM.json, STEM_D*.png",
    )
    ap.add_argument("--functions", default=None, help="comma-separated subset")
    ap.add_argument("--dims", default=None, help="comma-separated, e.g. 10,30")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--evals-per-dim", type=int, default=10_000)
    ap.add_argument("--swarm-size", type=int, default=40)
    ap.add_argument("--problem-seed", type=int, default=2026)
    ap.add_argument(
        "--cma-max-dim",
        type=int,
        default=30,
        help="skip the CMA-ES reference above this D (evosax's CMA-ES costs "
        "O(D^3) per generation: at D=100 it alone would take ~25 min here)",
    )
    ap.add_argument(
        "--entries", default=None, help="comma-separated subset of optimizer names"
    )
    ap.add_argument(
        "--update",
        action="store_true",
        help="re-run only these cells/entries and merge them into the JSON in "
        "--out (same seeds and budget); the file lists every command",
    )
    ap.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="rewrite the markdown and plots from this JSON file; run nothing",
    )
    args = ap.parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        for c in result["cells"]:
            c["comparison"] = compare(c)
        write_markdown(args.replot.with_suffix(".md"), result)
        write_plots(args.replot.parent, result, stem=args.replot.stem)
        print(f"rewrote {args.replot.with_suffix('.md')} and the plots")
        return
    functions = (
        args.functions.split(",")
        if args.functions
        else (QUICK_FUNCTIONS if args.quick else FUNCTIONS)
    )
    dims = (
        [int(x) for x in args.dims.split(",")]
        if args.dims
        else (QUICK_DIMS if args.quick else DIMS)
    )
    num_seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    entries = ENTRIES
    if args.entries:
        wanted = args.entries.split(",")
        unknown = set(wanted) - set(ENTRY_BY_NAME)
        if unknown:
            ap.error(f"unknown entries {sorted(unknown)}; valid: {list(ENTRY_BY_NAME)}")
        entries = tuple(e for e in ENTRIES if e.name in wanted)
    command = "PYTHONPATH=. .venv/bin/python benchmarks/search_quality.py " + (
        shlex.join(sys.argv[1:] if argv is None else argv)
    )
    info = machine_info()
    print(info, flush=True)
    check_matches_minimize()
    seeds = list(range(num_seeds))
    settings = dict(
        functions=list(functions),
        dims=list(dims),
        seeds=num_seeds,
        evals_per_dim=args.evals_per_dim,
        swarm_size=args.swarm_size,
        problem_seed=args.problem_seed,
        cma_max_dim=args.cma_max_dim,
        quick=args.quick,
        entries=[e.name for e in entries],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.stem}.json"
    base = None
    if args.update:
        base = json.loads(json_path.read_text())
        if base["settings"]["seeds"] != num_seeds or any(
            base["settings"][k] != settings[k]
            for k in ("evals_per_dim", "swarm_size", "problem_seed")
        ):
            ap.error("--update: seeds/budget/swarm size/problem seed differ")
        base.setdefault("updates", []).append(
            dict(command=command, machine=info, entries=settings["entries"])
        )
    cells, t_start = [], time.perf_counter()
    for d in dims:
        for function in functions:
            print(f"[{time.perf_counter() - t_start:6.0f} s] {function} D={d}")
            cells.append(run_cell(function, d, args, entries, seeds))
            result = dict(
                command=command,
                machine=info,
                settings=settings,
                total_s=time.perf_counter() - t_start,
                loadavg_end=os.getloadavg(),
                cells=cells,
            )
            if base is not None:
                result = merge_results(base, cells)
            # Written after every cell, so an interrupted run leaves its results.
            json_path.write_text(json.dumps(result) + "\n")
    write_markdown(args.out / f"{args.stem}.md", result)
    write_plots(args.out, result, stem=args.stem)
    print(f"wrote {args.out}/{args.stem}.{{md,json}} and {args.stem}_D*.png")


if __name__ == "__main__":
    main()
