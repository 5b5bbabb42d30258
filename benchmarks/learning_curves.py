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

Each training run validates its best particle every ``--eval-every`` steps
(``metrics.jsonl``); the final test accuracy comes from its ``summary.json``.
Writes ``learning_curves.{json,md,png}`` to ``--out``.

    PYTHONPATH=. python benchmarks/learning_curves.py --out benchmarks/results
    PYTHONPATH=. python benchmarks/learning_curves.py --quick --out /tmp/lc
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pso_jax import experiment
from pso_jax.data import REVERSED, load_moving_shapes


def _run(name, cfg, out: Path, budget_s: float) -> dict:
    workdir = out / "runs" / name  # checkpoints etc.; git-ignored
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    # Steps that fit the wall-clock budget: measure the speed on a short run.
    probe = experiment.train(
        experiment.get_config(
            "demo", **{**cfg, "steps": 2 * cfg["steps_per_call"], "eval_every": 0}
        ),
        out / "runs" / f"{name}_probe",
        progress=False,
    )
    steps = max(
        cfg["steps_per_call"],
        int(budget_s / probe["seconds_per_step"])
        // cfg["steps_per_call"]
        * cfg["steps_per_call"],
    )
    full = experiment.get_config(
        "demo", **{**cfg, "steps": steps, "eval_every": max(steps // 8, 1)}
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
        "compile_seconds": summary["compile_seconds"],
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
        "within_pair_accuracy": float(pair_correct.mean()),
        "chance": 1 / num_classes,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--budget", type=float, default=240.0, help="train seconds")
    parser.add_argument("--quick", action="store_true", help="a 30 s budget")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    budget = 30.0 if args.quick else args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    command = "PYTHONPATH=. python benchmarks/" + " ".join(
        [os.path.basename(__file__), *sys.argv[1:]]
    )
    base = {"data_dir": args.data_dir, "steps_per_call": 5, "checkpoint_every": 0}
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
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "budget_seconds": budget,
        "runs": results,
        "time_averaged_frame": baseline,
        "total_seconds": time.time() - t0,
    }
    (args.out / "learning_curves.json").write_text(json.dumps(record, indent=2))
    lines = [
        "# Learning curves on moving_shapes/small",
        "",
        f"Command: `{command}`",
        "",
        f"- {record['date']}; jax {record['jax']}; {record['machine']}; load "
        f"average at the end {record['load_average']} (a shared machine: compare "
        "runs within this table)",
        f"- Same model (demo config: {experiment.CONFIGS['demo'].model}, width "
        f"{experiment.CONFIGS['demo'].width}), same data, a {budget:.0f} s training "
        "budget each (steps = budget / measured seconds per step; compile excluded).",
        "",
        "| run | steps | s/step | test acc (best particle) | top-k ensemble | "
        "macro-F1 | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['seconds_per_step']:.3f} | "
            f"{r['test_accuracy']:.3f} | {r['ensemble_test_accuracy']:.3f} | "
            f"{r['test_macro_f1']:.3f} | {r['compile_seconds']:.1f} |"
        )
    lines += [
        "",
        f"Time-averaged-frame baseline (softmax regression on mean frames): test "
        f"accuracy {baseline['test_accuracy']:.3f} (chance {baseline['chance']:.2f}),"
        " accuracy within each time-reversed pair "
        f"{baseline['within_pair_accuracy']:.3f} (chance 0.5): the mean frame "
        "tells the pair, not the direction.",
        "",
        "![learning curves](learning_curves.png)",
    ]
    (args.out / "learning_curves.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in results:
        xs = [c["train_seconds"] for c in r["curve"]]
        ax.plot(xs, [c["val_accuracy"] for c in r["curve"]], "o-", label=r["name"])
    ax.axhline(baseline["test_accuracy"], color="gray", ls="--", label="mean frame")
    ax.set_xlabel("training seconds (compile excluded)")
    ax.set_ylabel("validation accuracy (best particle)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "learning_curves.png", dpi=110)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
