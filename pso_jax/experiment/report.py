"""A run's reports: the progress bar and the plots of the work directory.

- ``_Progress``: a ``rich`` progress bar (step, best / mean fitness, evals/s,
  ETA) on stderr, or nothing.
- ``_plot_convergence``: ``convergence.png``, best / mean fitness and
  validation accuracy against the step (read from ``metrics.jsonl``).
- ``_plot_confusion``: ``confusion.png``, the best particle's test confusion
  matrix.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from pso_jax.experiment.config import TrainConfig
from pso_jax.train import EvalResult


class _Progress:
    """A rich progress bar (step, best/mean fitness, evals/s, ETA), or nothing."""

    def __init__(self, enabled: bool, total: int, start: int, particles: int):
        self.enabled, self.total, self.start = enabled, total, start
        self.particles = particles

    def __enter__(self):
        if not self.enabled:
            return lambda step, record: None
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("best {task.fields[best]} mean {task.fields[mean]}"),
            TextColumn("{task.fields[rate]} evals/s"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.progress.__enter__()
        task = self.progress.add_task(
            "train",
            total=self.total,
            completed=self.start,
            best="-",
            mean="-",
            rate="-",
        )
        t0, s0 = time.perf_counter(), self.start

        def update(step, record):
            dt = time.perf_counter() - t0
            rate = f"{(step - s0) * self.particles / dt:.3g}" if step > s0 else "-"
            self.progress.update(
                task,
                completed=step,
                best=f"{record['best_fitness']:.4g}",
                mean=f"{record['mean_fitness']:.4g}",
                rate=rate,
            )

        return update

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)


def _plot_convergence(metrics_path: Path, out: Path, cfg: TrainConfig) -> None:
    """``convergence.png``: best / mean fitness and validation accuracy by step."""
    plt = _pyplot()
    steps, best, mean, vsteps, vacc = [], [], [], [], []
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        if "val_accuracy" in r:
            vsteps.append(r["step"])
            vacc.append(r["val_accuracy"])
        else:
            steps.append(r["step"])
            best.append(r["best_fitness"])
            mean.append(r["mean_fitness"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(steps, best, label="swarm best")
    ax.plot(steps, mean, label="swarm mean", alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel(cfg.fitness)
    ax.set_title(
        f"{cfg.model} x {cfg.particles} particles, k={cfg.local_steps}, "
        f"{cfg.dataset}/{cfg.dataset_config}"
    )
    if vacc:
        ax2 = ax.twinx()
        ax2.plot(vsteps, vacc, "k.--", label="val accuracy (best)")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("validation accuracy")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_confusion(result: EvalResult, out: Path, names) -> None:
    """``confusion.png``: ``result``'s confusion matrix (``names``: class names)."""
    plt = _pyplot()
    cm = np.asarray(result.confusion)
    c = cm.shape[0]
    labels = list(names) if names is not None and len(names) == c else range(c)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(c), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(c), labels, fontsize=8)
    for i in range(c):
        for j in range(c):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test accuracy {result.accuracy:.3f}, macro-F1 {result.macro_f1:.3f}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    # Imported on first use: matplotlib costs ~0.4 s, which `pso-jax --help`
    # (whose parser imports this package) should not pay.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
