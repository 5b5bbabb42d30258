"""Learning curves on moving_shapes: test accuracy vs wall-clock.

Runs, one after another on the same machine, with the same model, data and
wall-clock budget:

- pure PSO (``local_steps=0``),
- the hybrid with k = 1 and k = 4 Adam steps per swarm step,
- a single model trained with Adam (one particle, PSO coefficients 0: the swarm
  update is the identity), the baseline every user asks about,
- the time-averaged-frame baseline: a softmax regression on each clip's mean
  frame, which cannot see the order of frames; its accuracy *within* each
  time-reversed pair of classes should be near 1/2.

Each training run validates its best particle every ``steps // 8`` steps
(``metrics.jsonl``); the final test accuracy comes from its ``summary.json``.
Writes ``learning_curves.{json,md,png}`` to ``--out``.

A short probe run of each configuration (no validation, so that its seconds
per step are the train step's alone) sets the step count for the budget. It
also fills jax's persistent compilation cache (``--out``/runs/jax_cache,
emptied first), so the full run does not compile pure PSO's train step again
(the hybrids' cosine learning-rate schedule spans the run's step count, a
constant of their train step, which therefore compiles again). The compile
time reported is the probe's. ``train s`` in the table is steps x the full
run's seconds per step (validation included): the training time the budget
bought.

    # tables and plot again from the JSON, without training:
    python benchmarks/learning_curves.py \
        --replot benchmarks/results/learning_curves.json

    PYTHONPATH=. python benchmarks/learning_curves.py --out benchmarks/results
    PYTHONPATH=. python benchmarks/learning_curves.py --quick --out /tmp/lc
    # the video Transformer beside the c3d table (Adam's peak 1e-3 after a
    # warmup: at the hybrid's 1e-2 without one, every ViViT run stays at chance,
    # benchmarks/results/vivit/lr1e-2/):
    PYTHONPATH=. python benchmarks/learning_curves.py --model vivit --width 64 \
        --patch 2,8,8 --lr 1e-3 --lr-warmup 0.1 --budget 120 \
        --out benchmarks/results/vivit
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import _provenance  # benchmarks/_provenance.py (this folder is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pso_jax import experiment
from pso_jax.data import REVERSED, load_moving_shapes

# The configuration every run overrides: the 4-particle hybrid (the demo until
# 2026-12-02, when the demo became a learning-rate race with inertia 0 and a
# narrowing to one particle, which neither pure PSO nor one Adam model can use).
BASE = "hybrid"


def _run(name, cfg, out: Path, budget_s: float) -> dict:
    workdir = out / "runs" / name  # checkpoints etc.; git-ignored
    probe_dir = out / "runs" / f"{name}_probe"
    for d in (workdir, probe_dir):
        if d.exists():
            shutil.rmtree(d)
    # Steps that fit the wall-clock budget: measure the speed on a short run
    # that does not validate (a validation, and its compile, inside the timed
    # loop would make the steps look slower than they are).
    probe = experiment.train(
        experiment.get_config(
            BASE, **{**cfg, "steps": 3 * cfg["steps_per_call"], "eval_every": 0}
        ),
        probe_dir,
        progress=False,
    )
    steps = max(
        cfg["steps_per_call"],
        int(budget_s / probe["seconds_per_step"])
        // cfg["steps_per_call"]
        * cfg["steps_per_call"],
    )
    full = experiment.get_config(
        BASE, **{**cfg, "steps": steps, "eval_every": max(steps // 8, 1)}
    )
    summary = experiment.train(full, workdir, progress=False)
    curve = [
        (r["step"], r["val_accuracy"])
        for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
        if "val_accuracy" in r
    ]
    sec = summary["seconds_per_step"]
    return {
        "name": name,
        "steps": steps,
        "seconds_per_step": sec,
        "test_accuracy": summary["test_accuracy"],
        "ensemble_test_accuracy": summary["ensemble_test_accuracy"],
        "test_macro_f1": summary["test_macro_f1"],
        # The probe compiled; the full run loaded the compiled program.
        "compile_seconds": probe["compile_seconds"],
        "compile_seconds_full_run": summary["compile_seconds"],  # compile only
        "curve": [
            {"step": s, "train_seconds": s * sec, "val_accuracy": a} for s, a in curve
        ],
    }


def _mean_frames(source) -> tuple[np.ndarray, np.ndarray]:
    videos = np.stack([np.asarray(source[i]["video"]) for i in range(len(source))])
    labels = np.array([int(source[i]["label"]) for i in range(len(source))])
    return videos.astype(np.float32).mean(1).reshape(len(videos), -1) / 255, labels


def time_averaged_baseline(data_dir, steps: int = 2000) -> dict:
    """Softmax regression on mean frames (full-batch Adam); test accuracy overall
    and within each reversed pair."""
    xtr, ytr = _mean_frames(
        load_moving_shapes("small", split="train", data_dir=data_dir)
    )
    xte, yte = _mean_frames(
        load_moving_shapes("small", split="test", data_dir=data_dir)
    )
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    num_classes = len(REVERSED)
    params = {"w": jnp.zeros((xtr.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
    opt = optax.adamw(1e-2, weight_decay=1e-3)

    def loss(p, x, y):
        logits = x @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def fit(params):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss)(p, xtr, ytr)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
        return p

    p = fit(params)
    logits = np.asarray(xte @ p["w"] + p["b"])
    pred = logits.argmax(1)
    # Within a pair: of the two classes {y, REVERSED[y]}, which scores higher.
    rev = np.asarray(REVERSED)[yte]
    idx = np.arange(len(yte))
    pair_correct = logits[idx, yte] > logits[idx, rev]
    return {
        "test_accuracy": float((pred == yte).mean()),
        # The predicted class is the true one or its time reversal.
        "pair_accuracy": float(((pred == yte) | (pred == rev)).mean()),
        "within_pair_accuracy": float(pair_correct.mean()),
        "chance": 1 / num_classes,
    }


def write_outputs(record: dict, out: Path) -> str:
    """``learning_curves.{md,png}`` in ``out`` from a run's record; the markdown."""
    lines = [
        "# Learning curves on moving_shapes/small",
        "",
        f"Command: `{record['command']}`",
        "",
        f"- {record['date']}; jax {record['jax']}; {record['machine']}; load "
        "average at the end "
        + "/".join(f"{v:.1f}" for v in record["load_average"])
        + " (a shared machine: compare "
        "runs within this table)",
        f"- Same model ({record.get('base', 'demo')} config: "
        f"{record.get('model', '?')}), same data, a "
        f"{record['budget_seconds']:.0f} s training budget each (steps = budget / "
        "the probe's seconds per step; compile excluded).",
        "",
        "| run | steps | s/step | train s | test acc (best particle) | "
        "top-k ensemble | macro-F1 | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["runs"]:
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['seconds_per_step']:.3f} | "
            f"{r['steps'] * r['seconds_per_step']:.1f} | "
            f"{r['test_accuracy']:.3f} | {r['ensemble_test_accuracy']:.3f} | "
            f"{r['test_macro_f1']:.3f} | {r['compile_seconds']:.1f} |"
        )
    baseline = record["time_averaged_frame"]
    pair = baseline.get("pair_accuracy")  # absent from records before 2026-11-30
    pair = (
        ""
        if pair is None
        else (
            f"the predicted class is the true one or its time reversal in {pair:.3f} "
            f"of test clips (chance {2 * baseline['chance']:.2f}); "
        )
    )
    lines += [
        "",
        "Time-averaged-frame baseline (softmax regression on each clip's mean frame, "
        f"which has no frame order): test accuracy {baseline['test_accuracy']:.3f} "
        f"(chance {baseline['chance']:.2f}); {pair}between a class and its reversal "
        "it scores the true one higher in "
        f"{baseline['within_pair_accuracy']:.3f} (chance 0.5: the mean frame cannot "
        "tell the direction).",
        "",
    ]
    # Remarks written into a record after its run (a flaw found later, say).
    notes = record.get("notes_added_after_the_run", [])
    lines += [f"- Note added after the run: {n}" for n in notes]
    lines += (
        ["", "![learning curves](learning_curves.png)"]
        if notes
        else ["![learning curves](learning_curves.png)"]
    )
    (out / "learning_curves.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in record["runs"]:
        xs = [c["train_seconds"] for c in r["curve"]]
        ax.plot(xs, [c["val_accuracy"] for c in r["curve"]], "o-", label=r["name"])
    ax.axhline(baseline["test_accuracy"], color="gray", ls="--", label="mean frame")
    ax.set_xlabel("training seconds (compile excluded)")
    ax.set_ylabel("validation accuracy (best particle)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--budget", type=float, default=240.0, help="train seconds")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a 10 s budget (a smoke run: expect chance accuracy)",
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--model",
        default=None,
        help="a pso_jax.models name (default: the hybrid config's c3d); e.g. vivit, "
        "with --out benchmarks/results/vivit to keep it beside the c3d table",
    )
    parser.add_argument("--width", type=int, default=None, help="model width")
    parser.add_argument(
        "--patch",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        default=None,
        help="tubelet T,H,W (vivit: e.g. 2,8,8)",
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="Adam's peak (default: the config's)"
    )
    parser.add_argument(
        "--lr-warmup",
        type=float,
        default=None,
        help="share of the schedule rising from 0 (a Transformer: e.g. 0.1)",
    )
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="rewrite the markdown and plot from this JSON file; train nothing",
    )
    args = parser.parse_args(argv)
    if args.replot is not None:
        record = json.loads(args.replot.read_text())
        print(write_outputs(record, args.replot.parent))
        return 0
    budget = 10.0 if args.quick else args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    # Each configuration compiles once, in its probe; the full run reads the
    # cache (no minimum compile time or entry size: every program is kept).
    cache = args.out / "runs" / "jax_cache"
    if cache.exists():
        shutil.rmtree(cache)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    info = _provenance.machine_info()
    command = _provenance.command_line("learning_curves.py", argv)
    base = {"data_dir": args.data_dir, "steps_per_call": 5, "checkpoint_every": 0}
    given = {"model": args.model, "width": args.width, "patch": args.patch}
    given |= {"learning_rate": args.lr, "lr_warmup": args.lr_warmup}
    given = {k: v for k, v in given.items() if v is not None}
    base |= given
    demo = experiment.get_config(BASE, **given)
    runs = {
        "pure PSO (k=0)": {**base, "local_steps": 0},
        "hybrid k=1": {**base, "local_steps": 1},
        "hybrid k=4": {**base, "local_steps": 4},
        "Adam, 1 model": {
            **base,
            "particles": 1,
            "local_steps": 4,
            "inertia": 0.0,
            "cognitive": 0.0,
            "social": 0.0,
            "top_k": 1,
        },
    }
    t0 = time.time()
    results = [
        _run(n.split()[0] + str(i), c, args.out, budget) | {"name": n}
        for i, (n, c) in enumerate(runs.items())
    ]
    baseline = time_averaged_baseline(args.data_dir)
    record = {
        "command": command,
        "date": info["date"],
        "jax": jax.__version__,
        "machine": _provenance.machine_label(info),
        "machine_info": info,
        "load_average": os.getloadavg(),
        "budget_seconds": budget,
        "base": BASE,
        "model": f"{demo.model}, width {demo.width}, patch {list(demo.patch)}; "
        f"Adam peak lr {demo.learning_rate:g}, warmup {demo.lr_warmup:g}",
        "runs": results,
        "time_averaged_frame": baseline,
        "total_seconds": time.time() - t0,
    }
    (args.out / "learning_curves.json").write_text(json.dumps(record, indent=2))
    print(write_outputs(record, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
