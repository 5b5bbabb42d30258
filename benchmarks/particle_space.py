"""Particle spaces: state per particle and the swarm's fitness cost.

On the demo's model (c3d width 8, 2x2x2 tubelets, ``moving_shapes/small`` clips
8x32x32x3, 10 classes), for ``full``, ``lowrank`` and ``subspace`` particles
(:mod:`pso_jax.particle_space`):

- the floats one particle adds to the swarm's state (``jax.eval_shape`` of
  ``pso(...).init``: position, velocity and personal best of its coordinates;
  the base is stored once) and their share of a ``full`` particle's;
- the time of one fitness evaluation of ``P`` particles on one batch of ``B``
  clips (``swarm_fitness`` of the cross-entropy, jitted, the generic path: each
  particle's parameters decoded inside the vmap), against one model's forward
  pass over the same ``P * B`` clips. Cases run interleaved, ``--repeats``
  rounds; the table gives the median and the ratios of medians measured in
  the same run.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/particle_space.py \
        [--particles 32] [--batch 32] [--repeats 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import _provenance  # benchmarks/_provenance.py (this folder is on sys.path)
import jax
import jax.numpy as jnp
import optax

from pso_jax import particle_space as ps
from pso_jax import pso
from pso_jax.fitness import swarm_fitness
from pso_jax.models import make_model

SPACES = {
    "full": {"name": "full"},
    "lowrank r=1": {"name": "lowrank", "rank": 1},
    "lowrank r=1, layout out": {"name": "lowrank", "rank": 1, "layout": "out"},
    "lowrank r=4": {"name": "lowrank", "rank": 4},
    "subspace d=64": {"name": "subspace", "dim": 64},
    "subspace d=256": {"name": "subspace", "dim": 256},
}


def _state_floats(space, params, num_particles: int) -> int:
    template = space.template(params)
    opt = pso(num_particles=num_particles, mask=space.mask(template))
    state = jax.eval_shape(opt.init, jax.random.key(0), template)
    fields = (state.positions, state.velocities, state.pbest_params)
    total = sum(x.size for f in fields for x in jax.tree.leaves(f))
    return total // num_particles


def _load(avg) -> str:
    return "/".join(f"{x:.1f}" for x in avg)


def _timed(fn, *args, repeats: int) -> list[float]:
    jax.block_until_ready(fn(*args))  # compile
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--particles", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    info = _provenance.machine_info()
    P, B = args.particles, args.batch
    model = make_model("c3d", 10, width=8, patch=(2, 2, 2))
    x = jax.random.uniform(jax.random.key(0), (B, 8, 32, 32, 3))
    labels = jnp.arange(B) % 10
    params = model.init(jax.random.key(1), x[:1])["params"]

    def apply_fn(p, v):
        return model.apply({"params": p}, v)

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    cases, floats = {}, {}
    for label, kw in SPACES.items():
        space = ps.make_space(**kw)
        template = space.template(params)
        opt = pso(num_particles=P, mask=space.mask(template), init_scale=0.1)
        state = opt.init(jax.random.key(2), template)
        apply_tree = space.wrap(apply_fn)
        fit = jax.jit(
            lambda pos, frozen, v, a=apply_tree: swarm_fitness(
                lambda t, b: ce(a(t, b)), pos, frozen, v
            )
        )
        cases[label] = (fit, state.positions, state.frozen_params, x)
        floats[label] = _state_floats(space, params, P)
    big = jnp.tile(x, (P, 1, 1, 1, 1))
    one = jax.jit(lambda p, v: apply_fn(p, v).sum())
    cases[f"one model, {P * B} clips"] = (one, params, big)
    times = {k: [] for k in cases}
    for _ in range(args.repeats):  # interleaved rounds
        for k, (fn, *a) in cases.items():
            times[k] += _timed(fn, *a, repeats=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med[f"one model, {P * B} clips"]
    info["loadavg_end"] = os.getloadavg()
    lines = [
        "# Particle spaces: state per particle and fitness cost (CPU)",
        "",
        f"Command: `{_provenance.command_line('particle_space.py')}`",
        "",
        f"Machine: {_provenance.machine_label(info)}; load average (1/5/15 min) "
        f"at start {_load(info['loadavg_start'])}, at end "
        f"{_load(info['loadavg_end'])}.",
        "",
        f"Model: c3d width 8, 2x2x2 tubelets (the demo's), {B} clips 8x32x32x3 "
        f"per particle, P = {P}; fitness = cross-entropy through the generic "
        "path (each particle's weights decoded inside the vmap). Median of "
        f"{args.repeats} interleaved rounds.",
        "",
        "| particles | state floats / particle | share of full | fitness time (s) "
        "| / one model's forward | full / this |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k in SPACES:
        lines.append(
            f"| {k} | {floats[k]:,} | {floats[k] / floats['full']:.1%} | "
            f"{med[k]:.3f} | {med[k] / ref:.2f}x | {med['full'] / med[k]:.2f}x |"
        )
    lines.append(f"| one model, {P * B} clips (reference) | | | {ref:.3f} | 1.00x | |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "particle_space.md").write_text("\n".join(lines) + "\n")
    (args.out / "particle_space.json").write_text(
        json.dumps({"info": info, "times": times, "floats": floats}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
