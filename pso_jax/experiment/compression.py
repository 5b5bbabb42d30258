"""``pso-jax compress``: a finished run's returned model, compressed and measured.

The pure functions (quantisation, pruning, sizes, the per-layer search) are
:mod:`pso_jax.compress`'s; this module reads a run's work directory, rebuilds the
model it returned, compresses it, measures test accuracy before and after and
writes the results into ``summary.json`` (key ``"compression"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax import checkpoint as ckpt
from pso_jax.compress import (
    SCOPES,
    _check_bits,
    _check_sparsity,
    compress_params,
    front_markdown,
    pack,
    plot_front,
    save_packed,
    search,
)
from pso_jax.experiment.config import RunFileError, particles_at, read_config
from pso_jax.experiment.input_pipeline import _check_data, _first_source
from pso_jax.experiment.loop import lock_workdir
from pso_jax.experiment.metrics import _json_text, _write_json
from pso_jax.experiment.run import _restore, _Run
from pso_jax.experiment.selection import _Elite, _elite_tree, _soups, _split_batches
from pso_jax.train import top_particles
from pso_jax.tree_utils import combine
from pso_jax.types import check_int, check_real

__all__ = ["FRONT_FILE", "PACKED_FILE", "compress_workdir"]

# pso-jax compress's files in a run's work directory.
PACKED_FILE = "compressed.npz"
FRONT_FILE = "compression_pareto"  # .json, .md, .png


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic


def _run_summary(workdir: Path) -> dict[str, Any]:
    """``summary.json`` of a finished run; a clear error if there is none."""
    if not workdir.is_dir():
        raise RunFileError(f"{workdir}: no such directory (the --workdir of a run)")
    path = workdir / "summary.json"
    if not (workdir / "config.json").is_file() or not path.is_file():
        raise RunFileError(
            f"{workdir}: no trained model (no config.json and summary.json: "
            "train there first, pso-jax train --workdir, and let it finish)"
        )
    if ckpt.latest_step(workdir / "checkpoints") is None:
        raise RunFileError(
            f"{workdir}: no trained model (no checkpoint in checkpoints/)"
        )
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunFileError(f"{path}: not JSON ({e.msg})") from None
    if not isinstance(summary, dict) or "test_accuracy" not in summary:
        raise RunFileError(
            f"{path}: no test_accuracy: not the summary of a finished run"
        )
    return summary


def _returned_params(run: _Run, state, workdir: Path, returned: str):
    """The model parameters of the model the run returned, and its name.

    An ensemble is no single model: its best particle is taken instead.
    """
    cfg = run.cfg
    k = max(1, min(cfg.top_k, run.particles))
    gathered = run.eval_state(state, k)
    swarm = gathered.swarm
    whole = bool(cfg.recenter_every)
    tree, name = None, returned
    if returned == "elite":
        tree = _Elite(workdir).params(_elite_tree(swarm, whole))
        if tree is not None and not whole:
            tree = combine(tree, swarm.frozen_params)
    elif returned in ("greedy_soup", "uniform_soup"):
        picked, _ = top_particles(swarm, k, run.trainer.maximize)
        soups = _soups(run, gathered, picked, _split_batches(run, "validation"))
        tree = combine(soups[returned], swarm.frozen_params)
    if tree is None:
        tree = combine(swarm.best_params, swarm.frozen_params)
        name = "best_particle"
    return jax.tree.map(np.asarray, run.space.decode(tree)), name


def _stacked(batches: list[dict], limit: int | None = None):
    """``(video [N, ...], label [N])`` of a split's batches (the first ``limit``)."""
    video = np.concatenate([np.asarray(b["video"]) for b in batches])[:limit]
    label = np.concatenate([np.asarray(b["label"]) for b in batches])[:limit]
    return video, label


def _accuracy_fn(apply_fn, video: np.ndarray, label: np.ndarray, chunk: int = 16):
    """``accuracy(params) -> ()``: one model's accuracy on the clips (traceable).

    The clips go through in chunks of ``chunk`` (``lax.map``), which bounds the
    activations when the search vmaps it over a swarm.
    """
    n = len(label) // chunk * chunk
    rest_v, rest_l = jnp.asarray(video[n:]), jnp.asarray(label[n:])
    v = jnp.asarray(video[:n]).reshape(-1, chunk, *video.shape[1:])
    lb = jnp.asarray(label[:n]).reshape(-1, chunk)

    def correct(params, xs):
        return jnp.sum(jnp.argmax(apply_fn(params, xs[0]), -1) == xs[1])

    def accuracy(params):
        total = jnp.sum(jax.lax.map(lambda xs: correct(params, xs), (v, lb)))
        if len(rest_l):
            total = total + correct(params, (rest_v, rest_l))
        return total / len(label)

    return accuracy


def compress_workdir(
    workdir: str | os.PathLike,
    *,
    bits: int = 8,
    sparsity: float = 0.0,
    scope: str = "global",
    search_front: bool = False,
    lambdas: Sequence[float] = (0.03, 0.1, 0.3, 1.0),
    search_clips: int = 128,
    search_particles: int = 8,
    search_steps: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Compress a run's returned model; its test accuracy and size, before/after.

    Rebuilds the run from ``config.json`` and its newest checkpoint, takes the
    model ``summary.json`` says the run returned (``returned_model``: the best
    particle, the elite or a soup; for an ensemble, its best particle),
    compresses it (:func:`compress_params`), and measures both on the test split.
    Writes ``compressed.npz`` (:func:`pack`'s arrays) and adds a
    ``"compression"`` entry to ``summary.json`` (atomically; the rest is kept).
    With ``search_front``, :func:`search` on the first ``search_clips``
    validation clips, each point of the front also scored on test:
    ``compression_pareto.json``, ``.md`` and ``.png``.

    Args:
      workdir: a finished run's work directory.
      bits, sparsity, scope: as :func:`compress_params` (one value each).
      search_front: run the search too.
      lambdas, search_particles, search_steps: :func:`search`'s.
      search_clips: validation clips the search scores on (>= 1).
      seed: the search's key.

    Returns:
      The ``"compression"`` entry written to ``summary.json``.

    Raises:
      RunFileError: ``workdir`` holds no trained model (no directory,
        ``config.json``, ``summary.json`` or checkpoint) or a damaged file.
      ValueError: bad ``bits``, ``sparsity``, ``scope`` or search settings
        (naming the value), before anything is read.
      WorkdirLockedError: another process writes into ``workdir``.
    """
    workdir = Path(workdir)
    bits = check_int("bits", bits)
    _check_bits(bits, 1)
    _check_sparsity(check_real("sparsity", sparsity), 1)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: choose from {SCOPES}")
    search_clips = check_int("search_clips", search_clips, minimum=1)
    summary = _run_summary(workdir)
    with lock_workdir(workdir):
        cfg = read_config(workdir / "config.json")
        _check_data(cfg)
        source = _first_source(cfg, "train")
        ckdir = workdir / "checkpoints"
        at = ckpt.latest_step(ckdir)
        run = _Run(cfg, source, particles=particles_at(cfg, at or 0))
        state, _ = _restore(run, ckdir)
        returned = summary.get("returned_model", "best_particle")
        params, name = _returned_params(run, state, workdir, returned)
        apply_fn = run.model_fn
        test = _accuracy_fn(apply_fn, *_stacked(_split_batches(run, "test")))
        test = jax.jit(test)
        out = compress_params(params, bits, sparsity, scope=scope)
        packed = pack(params, bits, sparsity, scope=scope)
        save_packed(workdir / PACKED_FILE, packed)
        before, after = float(test(params)), float(test(out.params))
        entry = {
            "model": name,
            "returned_model": returned,
            "bits": bits,
            "sparsity": sparsity,
            "scope": scope,
            "test_accuracy_before": before,
            "test_accuracy_after": after,
            "accuracy_drop": before - after,
            "float_bytes": out.float_bytes,
            "compressed_bytes": int(out.num_bytes),
            "size_ratio": out.float_bytes / int(out.num_bytes),
            "file": PACKED_FILE,
            "file_bytes": (workdir / PACKED_FILE).stat().st_size,
        }
        if search_front:
            entry["search"] = _search_front(
                workdir,
                run,
                apply_fn,
                test,
                params,
                lambdas,
                search_clips,
                search_particles,
                search_steps,
                seed,
            )
        summary = json.loads((workdir / "summary.json").read_text())
        summary["compression"] = entry
        _write_json(workdir / "summary.json", summary)  # atomic
    return entry


def _search_front(
    workdir: Path,
    run: _Run,
    apply_fn,
    test,
    params,
    lambdas: Sequence[float],
    search_clips: int,
    search_particles: int,
    search_steps: int,
    seed: int,
) -> dict[str, Any]:
    """:func:`~pso_jax.compress.search` on validation, its front scored on test.

    Writes ``compression_pareto.json``, ``.md`` and ``.png``; returns the
    ``"search"`` entry of the summary.
    """
    val = _stacked(_split_batches(run, "validation"), search_clips)
    res = search(
        _accuracy_fn(apply_fn, *val),
        params,
        key=jax.random.key(seed),
        lambdas=lambdas,
        num_particles=search_particles,
        num_steps=search_steps,
    )
    front = []
    for r in res.front:
        bits_l = jnp.asarray(list(r["bits"].values()))
        s_l = jnp.asarray(list(r["sparsity"].values()), jnp.float32)
        p = compress_params(params, bits_l, s_l, scope="layer").params
        front.append({**r, "test_accuracy": float(test(p))})
    base = workdir / FRONT_FILE
    _write_text(
        base.with_suffix(".json"),
        _json_text({"front": front, "candidates": res.candidates}, indent=2),
    )
    _write_text(base.with_suffix(".md"), front_markdown(front))
    plot_front(res.candidates, front, base.with_suffix(".png"))
    return {
        "lambdas": list(lambdas),
        "validation_clips": len(val[1]),
        "particles": search_particles,
        "steps": search_steps,
        "front": front,
        "files": [f"{FRONT_FILE}.{e}" for e in ("json", "md", "png")],
    }
