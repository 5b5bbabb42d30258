"""Compile time of the fused swarm train step against one plain Adam step.

Every measurement runs in a fresh process (nothing compiled in memory), one at
a time, on the shapes of the ``hybrid`` config (``pso-jax train --config
hybrid``, the demo until 2026-12-02 and the issue's reference: c3d width 16,
tubelet stem, batch 32 of 8x32x32x3 clips, 10 classes):

- ``adam``: one plain ``optax.adam`` step of one model (the demo's cosine
  schedule), ``jax.jit(step, donate_argnums=(0, 1)).lower(...).compile()``;
- ``fused``: the demo's fused train step exactly as the experiment loop compiles
  it (``loop._chunk.lower(trainer, state, batches[1]).compile()``: P = 4
  particles, k = 4 Adam steps each, the 2P + 1 re-evaluation, the swarm move);
- parts of the fused step (``--parts``): k = 1 and pure PSO (k = 0), no
  re-evaluation (``best_refresh="none"``), P = 1, the model without its
  per-particle ``lax.map`` (``map_particles=False``), ``vmap(adam)`` over P
  particles (the gradient steps alone), Adam for k steps in a ``lax.scan``;
- each of ``adam`` and ``fused`` again in a new process with the persistent
  compilation cache warm (:mod:`pso_jax.compile_cache`; written by the first);
- ``pso-jax train --config hybrid --steps 10`` twice with one cache directory
  (two work directories): the ``compile_seconds`` of each ``summary.json`` and
  the command's wall time.

Times are lower (trace + StableHLO) and compile (XLA) separately; the op counts
are of the lowered StableHLO text and the compiled HLO text (instructions).

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/compile_time.py [--parts] \
        [--cases adam,fused,...] [--repeats N] [--no-cli] [--out benchmarks/results]
    # the table again from the JSON, without measuring:
    .venv/bin/python benchmarks/compile_time.py \
        --replot benchmarks/results/compile_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _provenance  # benchmarks/_provenance.py (this folder is on sys.path)

# name -> (kind, overrides); "fused" cases take TrainConfig fields plus "map".
CASES = {
    "adam": ("adam", {}),
    "fused": ("fused", {}),
}
PARTS = {
    "fused_k1": ("fused", {"local_steps": 1}),
    "fused_k0_pso": ("fused", {"local_steps": 0}),
    "fused_no_reeval": ("fused", {"best_refresh": "none"}),
    "fused_P1": ("fused", {"particles": 1}),
    "fused_no_map": ("fused", {"map": False}),
    "swarm_tell": ("tell", {}),
    "vmap_adam_P4": ("vmap_adam", {"particles": 4}),
    "vmap_adam_P4_k4": ("vmap_adam", {"particles": 4, "local_steps": 4}),
    "adam_scan_k4": ("adam", {"local_steps": 4}),
    "adam_no_map": ("adam", {"map": False}),
}
WARM = ("adam", "fused")  # measured again with the cache warm


def _model_and_batch(cfg, map_particles=True):
    import jax.numpy as jnp

    from pso_jax.models import make_model

    model = make_model(
        cfg.model,
        10,
        width=cfg.width,
        stem=cfg.stem,
        patch=cfg.patch,
        map_particles=map_particles,
    )
    b = cfg.batch_size
    batch = {
        "video": jnp.zeros((b, 8, 32, 32, 3), jnp.uint8),
        "label": jnp.zeros((b,), jnp.int32),
    }
    return model, batch


def _adam_step(cfg, model, steps: int):
    """``step(params, opt_state, video, label)``: ``steps`` Adam steps (a scan)."""
    import jax
    import optax

    from pso_jax.experiment.run import _learning_rate
    from pso_jax.train import cross_entropy

    tx = optax.adam(_learning_rate(cfg))

    def loss(p, video, label):
        return cross_entropy(model.apply({"params": p}, video), label)

    def one(carry, _, video, label):
        p, s = carry
        value, grads = jax.value_and_grad(loss)(p, video, label)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), value

    def step(p, s, video, label):
        video = video.astype(jax.numpy.float32) / 255.0
        if steps == 1:
            return one((p, s), None, video, label)
        return jax.lax.scan(
            lambda c, x: one(c, x, video, label), (p, s), None, length=steps
        )

    return tx, step


def _program(kind: str, over: dict):
    """``(jitted, args)`` of one case: what is lowered and compiled."""
    import jax

    from pso_jax import experiment, particle_space
    from pso_jax.experiment import loop, run

    over = dict(over)
    map_particles = over.pop("map", True)
    cfg = experiment.get_config("hybrid", **over)
    model, batch = _model_and_batch(cfg, map_particles)
    template = model.init(jax.random.key(0), batch["video"][:1].astype("float32"))
    template = template["params"]
    if kind in ("adam", "vmap_adam"):
        steps = max(cfg.local_steps, 1) if "local_steps" in over else 1
        tx, step = _adam_step(cfg, model, steps)
        if kind == "vmap_adam":
            p = jax.tree.map(lambda x: jax.numpy.stack([x] * cfg.particles), template)
            s = jax.vmap(tx.init)(p)
            step = jax.vmap(step, in_axes=(0, 0, None, None))
        else:
            p, s = template, tx.init(template)
        fn = jax.jit(step, donate_argnums=(0, 1))
        return fn, (p, s, batch["video"], batch["label"])
    space = particle_space.make_space(
        cfg.particle_space, rank=cfg.rank, dim=cfg.subspace_dim, seed=cfg.seed
    )
    template = space.template(template)
    optimizer = run._make_optimizer(cfg, model, None, template, None, False, space)
    if kind == "tell":  # the swarm's update alone (pso's tell), on the demo swarm
        hp = optimizer.default_hparams
        swarm = jax.jit(lambda k: optimizer.init(k, template, hp))(jax.random.key(0))

        def tell(key, swarm, fitness):
            return optimizer.tell(key, swarm, fitness, hp)

        fitness = jax.numpy.zeros(cfg.particles)
        return jax.jit(tell, donate_argnums=1), (jax.random.key(1), swarm, fitness)
    trainer = run._make_trainer(
        cfg, run._model_fn(model, cfg.dtype), optimizer, None, space
    )
    state = jax.jit(lambda k: trainer.init(k, template))(jax.random.key(0))
    first = jax.tree.map(lambda x: x[None], batch)
    return loop._chunk, (trainer, state, first)


def _count_ops(text: str) -> int:
    return len(re.findall(r"^\s*(?:ROOT )?%?[\w.\-]+ = ", text, re.M))


def worker(name: str, kind: str, over: dict, cache_dir: str | None) -> dict:
    """One measurement in this (fresh) process; returns its record."""
    import jax

    from pso_jax import compile_cache

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: (
            hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None
        )
    )
    if cache_dir is not None:
        compile_cache.enable(cache_dir)
    t_build = time.perf_counter()
    fn, fn_args = _program(kind, over)
    t0 = time.perf_counter()
    lowered = fn.lower(*fn_args)
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    return dict(
        name=name,
        kind=kind,
        overrides=over,
        cache=cache_dir is not None,
        cache_hits=len(hits),
        build_s=t0 - t_build,
        lower_s=t1 - t0,
        compile_s=t2 - t1,
        # CPU seconds of every thread of this process: less sensitive than the
        # wall time to the other jobs on a shared machine.
        compile_cpu_s=c2 - c1,
        fusions=compiled.as_text().count(" fusion("),
        stablehlo_ops=_count_ops(lowered.as_text()),
        hlo_instructions=_count_ops(compiled.as_text()),
        loadavg=os.getloadavg(),
    )


def _run_worker(name, kind, over, cache_dir) -> dict:
    spec = json.dumps(dict(name=name, kind=kind, over=over, cache=cache_dir))
    out = subprocess.run(
        [sys.executable, __file__, "--worker", spec],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{name}: worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cli_train(workdir: Path, cache_dir: Path) -> dict:
    """``pso-jax train --config hybrid --steps 10`` with ``cache_dir``; its timings."""
    cli = Path(sys.executable).with_name("pso-jax")
    cmd = [str(cli), "train", "--config", "hybrid", "--steps", "10", "--workdir"]
    cmd += [str(workdir), "--no-progress", "--compile-cache", str(cache_dir)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    summary = json.loads((workdir / "summary.json").read_text())
    return dict(
        command=" ".join(cmd[1:]),
        compile_s=summary["compile_seconds"],
        wall_s=wall,
        test_accuracy=summary["test_accuracy"],
        loadavg=os.getloadavg(),
    )


def _cache_size(path: Path) -> tuple[int, int]:
    files = [f for f in path.rglob("*") if f.is_file()] if path.exists() else []
    return len(files), sum(f.stat().st_size for f in files)


def measure(names: list[str], repeats: int, cli_runs: bool) -> dict:
    """Every case in ``names``, ``repeats`` interleaved rounds (a fresh cache
    directory per round), then the CLI's first and second run."""
    records = []
    cases = {**CASES, **PARTS}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(repeats):
            cache = Path(tmp) / f"cache{rnd}"
            for name in names:
                kind, over = cases[name]
                use = str(cache) if name in WARM else None
                records.append(dict(_run_worker(name, kind, over, use), round=rnd))
                print(_line(records[-1]), file=sys.stderr)
            for name in WARM:
                if name not in names:
                    continue
                kind, over = cases[name]
                rec = _run_worker(f"{name}_warm", kind, over, str(cache))
                records.append(dict(rec, round=rnd))
                print(_line(records[-1]), file=sys.stderr)
        step_cache = _cache_size(Path(tmp) / "cache0")
        cli, cli_cache = [], Path(tmp) / "cli_cache"
        if cli_runs:
            cli = [_cli_train(Path(tmp) / f"run{i}", cli_cache) for i in (1, 2)]
        for c in cli:
            print(f"cli: compile {c['compile_s']:.2f} s wall {c['wall_s']:.1f}")
        return dict(
            records=records,
            cli=cli,
            cache_files=dict(steps=step_cache, cli=_cache_size(cli_cache)),
        )


def _line(r: dict) -> str:
    return (
        f"{r['name']:<18} lower {r['lower_s']:6.2f} s  compile "
        f"{r['compile_s']:6.2f} s  hits {r['cache_hits']}  stablehlo "
        f"{r['stablehlo_ops']:6d}  hlo {r['hlo_instructions']:6d}"
    )


WHAT = {
    "adam": "one plain optax Adam step, one model",
    "fused": "demo fused step: P=4, k=4, 2P+1 re-eval, swarm move",
    "fused_k1": "fused, k=1",
    "fused_k0_pso": "fused, k=0 (pure PSO: no gradient)",
    "fused_no_reeval": "fused, best_refresh=none (P evaluations, not 2P+1)",
    "fused_P1": "fused, P=1",
    "fused_no_map": "fused, model without per-particle lax.map",
    "swarm_tell": "the swarm move alone (pso tell), P=4",
    "vmap_adam_P4": "vmap(one Adam step) over 4 particles",
    "vmap_adam_P4_k4": "vmap(4 Adam steps in a lax.scan) over 4 particles",
    "adam_scan_k4": "4 Adam steps in a lax.scan, one model",
    "adam_no_map": "one Adam step, model map_particles=False",
    "adam_warm": "adam again, cache warm (a new process)",
    "fused_warm": "fused again, cache warm (a new process)",
}


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _summary_rows(records: list[dict]) -> list[dict]:
    """Per case: medians over the rounds, the ratio to ``adam`` of each round."""
    adam = {r["round"]: r["compile_s"] for r in records if r["name"] == "adam"}
    adam_cpu = {r["round"]: r["compile_cpu_s"] for r in records if r["name"] == "adam"}
    names = list(dict.fromkeys(r["name"] for r in records))
    rows = []
    for name in names:
        rs = [r for r in records if r["name"] == name]
        compile_s = [r["compile_s"] for r in rs]
        rows.append(
            dict(
                name=name,
                rounds=len(rs),
                lower_s=_median([r["lower_s"] for r in rs]),
                compile_s=_median(compile_s),
                compile_range=(min(compile_s), max(compile_s)),
                compile_cpu_s=_median([r["compile_cpu_s"] for r in rs]),
                x_adam_cpu=_median(
                    [r["compile_cpu_s"] / adam_cpu[r["round"]] for r in rs]
                ),
                fusions=rs[0]["fusions"],
                x_adam=_median([r["compile_s"] / adam[r["round"]] for r in rs]),
                cache_hits=max(r["cache_hits"] for r in rs),
                stablehlo_ops=rs[0]["stablehlo_ops"],
                hlo_instructions=rs[0]["hlo_instructions"],
            )
        )
    return rows


def _markdown(result: dict) -> str:
    info = result["machine"]
    rounds = max(r["round"] for r in result["records"]) + 1
    cold = [r for r in result["records"] if r["compile_s"] > 0.5]
    threads = statistics.median(r["compile_cpu_s"] / r["compile_s"] for r in cold)

    def load(values):
        return "/".join(f"{v:.1f}" for v in values)

    lines = [
        "# Compile time: the fused swarm train step vs one plain Adam step",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {_provenance.machine_label(info)}; jax {info['jax']}; "
        f"{info['date']}; load average at start {load(info['loadavg_start'])}, "
        f"at end {load(result['loadavg_end'])} (the machine is shared). Each "
        f"measurement is a fresh process; {rounds} interleaved round(s) of every "
        "case, a fresh cache directory per round; medians, with the range of the "
        "compile time, and the ratio to `adam` taken within each round.",
        "",
        "Demo shapes: c3d width 16, tubelet stem, batch 32 of 8x32x32x3 clips, "
        "10 classes. `lower` is tracing to StableHLO (`jit(f).lower(...)`); "
        "`compile` is XLA's (`lowered.compile()`), in wall seconds and in CPU "
        "seconds of the process (the median CPU / wall ratio of the cold "
        f"compiles was {threads:.1f}: XLA used about that many threads; the CPU "
        "time is the compile's own work, less inflated by other jobs); a "
        "warm row reads what its round's cold row wrote "
        "(`pso_jax.compile_cache`). HLO instructions and fusions are counted "
        "in the compiled module's text. `cache hits` counts every program a "
        "process read from the cache (a cold row may read the model init's "
        "small programs that an earlier row of its round wrote; never its "
        "step).",
        "",
        "| case | what | lower s | compile s (range) | x adam | compile CPU s | "
        "x adam (CPU) | cache hits | StableHLO ops | HLO instr. | fusions |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in _summary_rows(result["records"]):
        low, high = r["compile_range"]
        lines.append(
            f"| `{r['name']}` | {WHAT.get(r['name'], '')} | {r['lower_s']:.2f} | "
            f"{r['compile_s']:.2f} ({low:.2f}-{high:.2f}) | {r['x_adam']:.2f} | "
            f"{r['compile_cpu_s']:.2f} | {r['x_adam_cpu']:.2f} | "
            f"{r['cache_hits']} | {r['stablehlo_ops']} | {r['hlo_instructions']} | "
            f"{r['fusions']} |"
        )
    if result["cli"]:
        lines += [
            "",
            "## The CLI, first and second run with one cache directory",
            "",
            "`compile_seconds` of `summary.json` (the loop's ahead-of-time "
            "`lower` + `compile` of the train step; the lowering is not cached) "
            "and the command's wall time (everything: imports, data, init, "
            "10 steps, evaluation, plots).",
            "",
            "| run | command | compile_seconds | wall s |",
            "|---|---|---:|---:|",
        ]
        for i, c in enumerate(result["cli"], 1):
            lines.append(
                f"| {i} | `pso-jax {c['command']}` | {c['compile_s']:.2f} | "
                f"{c['wall_s']:.1f} |"
            )
    if result.get("findings"):
        lines += ["", "## Findings", "", *result["findings"]]
    files = result["cache_files"]
    lines += [
        "",
        f"Cache directories after the runs: steps {files['steps'][0]} files, "
        f"{files['steps'][1] / 2**20:.1f} MiB; CLI {files['cli'][0]} files, "
        f"{files['cli'][1] / 2**20:.1f} MiB.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", action="store_true", help="also the fused step's parts")
    p.add_argument("--cases", help="comma-separated case names (default: all chosen)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds")
    p.add_argument("--no-cli", action="store_true", help="skip the two CLI runs")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--replot", type=Path, help="rewrite the .md from this JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.replot:
        result = json.loads(args.replot.read_text())
        args.replot.with_suffix(".md").write_text(_markdown(result))
        return 0
    if args.worker:
        spec = json.loads(args.worker)
        rec = worker(spec["name"], spec["kind"], spec["over"], spec["cache"])
        print(json.dumps(rec))
        return 0
    names = list(CASES) + (list(PARTS) if args.parts else [])
    if args.cases:
        names = args.cases.split(",")
        unknown = sorted(set(names) - set(CASES) - set(PARTS))
        if unknown or "adam" not in names:
            p.error(f"--cases: unknown {unknown} (and adam is needed for ratios)")
    import jax  # noqa: F401  (machine_info reads its backend)

    info = _provenance.machine_info()
    result = dict(
        command=_provenance.command_line("compile_time.py", argv),
        machine=info,
        **measure(names, args.repeats, not args.no_cli),
        loadavg_end=os.getloadavg(),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_time.json").write_text(json.dumps(result, indent=1))
    (args.out / "compile_time.md").write_text(_markdown(result))
    print(f"wrote {args.out}/compile_time.{{md,json}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
