"""A run's reports: the progress bar and the plots of the work directory.

- ``_Progress``: a ``rich`` progress bar (step, best / mean fitness, evals/s,
  ETA) on stderr when it is a terminal; plain lines (every 30 s or 10 % of the
  steps) when it is not (make, CI logs); or nothing.
- ``_plot_convergence``: ``convergence.png``, best / mean fitness and
  validation accuracy against the step (``metrics.jsonl``'s records; a
  non-finite value, stored as ``null``, is a gap).
- ``_plot_confusion``: ``confusion.png``, the best particle's test confusion
  matrix.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
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

PLAIN_EVERY_SECONDS = 30.0  # a plain progress line at least this often
PLAIN_EVERY_FRACTION = 0.1  # ... or every this share of the steps


class _Progress:
    """A rich progress bar (step, best/mean fitness, evals/s, ETA) on a terminal,
    plain lines elsewhere, or nothing (``enabled=False``)."""

    def __init__(self, enabled: bool, total: int, start: int, particles: int):
        self.enabled, self.total, self.start = enabled, total, start
        self.particles = particles
        self.plain = enabled and not Console(stderr=True).is_terminal

    def _plain_lines(self):
        """``update(step, record, per_step)`` printing a line every 30 s or 10 %
        of the steps (``per_step``: the measured seconds per step, compiling
        excluded)."""
        t0, s0 = time.perf_counter(), self.start
        last = {"t": t0, "step": s0}
        every = max(1, int(self.total * PLAIN_EVERY_FRACTION))

        def update(step, record, per_step=None, particles=None):
            now = time.perf_counter()
            due = now - last["t"] >= PLAIN_EVERY_SECONDS
            if not (due or step - last["step"] >= every or step == self.total):
                return
            last.update(t=now, step=step)
            if per_step is None:
                per_step = (now - t0) / max(step - s0, 1)
            eta = time.strftime("%H:%M:%S", time.gmtime(per_step * (self.total - step)))
            print(
                f"pso-jax: step {step}/{self.total}: best "
                f"{_number(record['best_fitness'])} mean "
                f"{_number(record['mean_fitness'])}, {per_step:.3g} s/step, "
                f"ETA {eta}",
                file=sys.stderr,
                flush=True,
            )

        return update

    def __enter__(self):
        if not self.enabled:
            return lambda step, record, per_step=None, particles=None: None
        if self.plain:
            return self._plain_lines()
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
        t0 = time.perf_counter()
        done = {"step": self.start, "evals": 0}  # particle evaluations so far

        def update(step, record, per_step=None, particles=None):
            # particles: the swarm's size for the steps since the last update
            # (smaller after a narrowing), so evals/s counts what ran.
            alive = self.particles if particles is None else particles
            done["evals"] += (step - done["step"]) * alive
            done["step"] = step
            dt = time.perf_counter() - t0
            rate = f"{done['evals'] / dt:.3g}" if done["evals"] else "-"
            self.progress.update(
                task,
                completed=step,
                best=_number(record["best_fitness"]),
                mean=_number(record["mean_fitness"]),
                rate=rate,
            )

        return update

    def __exit__(self, *exc):
        if self.enabled and not self.plain:
            self.progress.__exit__(*exc)


def _number(value) -> str:
    """A fitness for a progress line (``None``, a non-finite value: ``-``)."""
    return "-" if value is None else f"{value:.4g}"


_FITNESS_LABELS = {
    "cross_entropy": "cross-entropy loss",
    "error_rate": "error rate",
    "macro_f1": "macro-F1",
}


def _plot_convergence(records: Iterable[dict], out: Path, cfg: TrainConfig) -> None:
    """``convergence.png``: best / mean fitness and validation accuracy by step.

    ``records``: ``metrics.jsonl``'s, whose ``null`` (non-finite) values are
    gaps in the lines.
    """
    steps, best, mean, vsteps, vacc, narrowed = [], [], [], [], [], []
    lsteps, vloss = [], []

    def number(value):
        return float("nan") if value is None else value

    for r in records:
        if "val_loss" in r:  # a pretext run's validation
            lsteps.append(r["step"])
            vloss.append(number(r["val_loss"]))
        elif "val_accuracy" in r:
            vsteps.append(r["step"])
            vacc.append(number(r["val_accuracy"]))
        elif "narrowed_to" in r:
            narrowed.append((r["step"], r["narrowed_to"]))
        else:
            steps.append(r["step"])
            best.append(number(r["best_fitness"]))
            mean.append(number(r["mean_fitness"]))
    fig, ax = _figure((6.5, 4))
    ax.plot(steps, best, label="swarm best (re-scored on each batch)")
    ax.plot(steps, mean, label="swarm mean", alpha=0.6)
    if vloss:
        ax.plot(lsteps, vloss, "k.--", label="validation loss (best)")
    for at, keep in narrowed:
        ax.axvline(at, color="0.6", ls=":", lw=1)
        ax.annotate(
            f"{keep} kept",
            (at, 1),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="0.35",
            ha="left",
            va="top",
        )
    ax.set_xlabel("swarm step")
    fitness = _FITNESS_LABELS.get(cfg.fitness, cfg.fitness)
    if cfg.objective is not None:
        fitness = f"{cfg.objective} loss"
    ax.set_ylabel(f"{fitness} on the batch")
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
    ax.legend(loc="upper right", fontsize=8)
    fig.text(
        0.01,
        0.01,
        "The best is re-scored on each step's batch, so it moves with the batch.",
        fontsize=7,
        color="0.35",
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out, dpi=110)


def _plot_confusion(result: EvalResult, out: Path, names) -> None:
    """``confusion.png``: ``result``'s confusion matrix (``names``: class names)."""
    cm = np.asarray(result.confusion)
    c = cm.shape[0]
    labels = list(names) if names is not None and len(names) == c else range(c)
    fig, ax = _figure((6, 5.5))
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


def _figure(figsize: tuple[float, float]):
    """``(fig, ax)`` drawn off-screen, for files only.

    A ``matplotlib.figure.Figure`` without pyplot: nothing global changes, so
    a notebook's or script's own backend (and ``plt.show()``) keeps working
    after a run has written its plots.
    """
    # Imported on first use: matplotlib costs ~0.4 s, which `pso-jax --help`
    # (whose parser imports this package) should not pay.
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots()
