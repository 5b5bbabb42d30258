"""The swarm as a population: per-particle hyperparameters, exploit/explore, diversity.

Population Based Training (Jaderberg et al., 2017, "Population based training of
neural networks"): every particle trains with its own hyperparameters of the
gradient steps (a learning rate, a weight decay, ...), drawn over a range at the
start; every few steps the worst particles take the weights, optimizer state and
hyperparameters of a good one (*exploit*, truncation selection) and perturb the
hyperparameters (*explore*). Or the swarm moves the hyperparameters themselves:
PSO on their logarithms (:func:`move_hparams`), each particle keeping its own
weights. Or the population narrows (:func:`narrow`, successive halving): after
a short race the best few particles go on alone, with all the compute. The
swarm's particle axis is the population's, so
all of it runs in the one jitted, vmapped train step
(:func:`pso_jax.train.make_train_step`), on one device or sharded (every
function here goes through a swarm axis, :mod:`pso_jax.swarm_axis`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax.base import PARTICLE_AXIS_FIELD, SUBSTATE_FIELD
from pso_jax.tree_utils import tree_where

# Per-particle fields that hold particle indices (random links, CLPSO's
# exemplars): meaningless once the rows are renumbered; a narrowed state keeps
# the fresh state's.
_INDEX_FIELDS = frozenset({"links", "exemplars"})


def check_ranges(ranges: Mapping[str, tuple[float, float]]) -> None:
    """Raise a ``ValueError`` naming a range that is not ``0 < low <= high``.

    >>> check_ranges({"learning_rate": (1e-2, 1e-4)})
    Traceback (most recent call last):
    ...
    ValueError: grad_hparams['learning_rate']=(0.01, 0.0001): expected 0 < low <= high
    """
    for name, rng in ranges.items():
        ok = isinstance(rng, tuple | list) and len(rng) == 2
        if ok:
            lo, hi = (float(v) for v in rng)
            ok = 0 < lo <= hi and math.isfinite(hi)
        if not ok:
            raise ValueError(
                f"grad_hparams[{name!r}]={rng!r}: expected 0 < low <= high"
            )


def init_hparams(key, ranges: Mapping[str, tuple[float, float]], axis) -> dict:
    """Per-particle hyperparameters, log-uniform over each range, stratified.

    Particle ``i`` of ``P`` draws from the ``perm(i)``-th of ``P`` equal slices
    of the log range (a Latin hypercube: every slice is used once per
    hyperparameter), so even 4 particles cover the range.

    Args:
      key: a ``jax.random.key``.
      ranges: ``{name: (low, high)}``.
      axis: the swarm axis (its rows of the whole swarm's draw are returned).

    Returns:
      ``{name: [n] float32}``.
    """
    p = axis.num_particles
    out = {}
    for i, (name, (lo, hi)) in enumerate(sorted(ranges.items())):
        key_perm, key_u = jax.random.split(jax.random.fold_in(key, i))
        u = (jax.random.permutation(key_perm, p) + jax.random.uniform(key_u, (p,))) / p
        log_v = math.log(lo) + u * (math.log(hi) - math.log(lo))
        out[name] = axis.own_slice(jnp.exp(log_v).astype(jnp.float32))
    return out


def exploit(key, axis, score, fraction, factors, tree, hparams):
    """PBT's truncation selection: the worst particles clone good ones.

    The ``floor(fraction * P)`` particles with the worst ``score`` each take the
    rows of a particle drawn from the same number of best ones; their
    hyperparameters are then multiplied by a factor drawn from ``factors``
    (explore). Padding particles are never a source.

    Args:
      key: a ``jax.random.key``.
      axis: the swarm axis.
      score: ``[n]`` minimisation keys (:func:`pso_jax.fitness.score`).
      fraction: the share of the swarm replaced (static, in ``(0, 0.5]``).
      factors: the explore factors (static tuple), e.g. ``(0.8, 1.25)``.
      tree: per-particle leaves ``[n, ...]`` to copy (weights, optimizer state).
      hparams: ``{name: [n]}`` per-particle hyperparameters (or ``{}``).

    Returns:
      ``(tree, hparams, replaced)``: the new rows and ``[n]`` bool, True where a
      particle cloned another.
    """
    p, num_real = axis.num_particles, axis.num_real
    n_sel = int(fraction * num_real)
    key_src, key_f = jax.random.split(key)
    s_all = axis.gather_all(score)
    if axis.num_inert:  # padding ranks last, is never a source
        s_all = jnp.where(jnp.arange(p) >= num_real, jnp.inf, s_all)
    order = jnp.argsort(s_all, stable=True)  # best first
    top, bottom = order[:n_sel], order[num_real - n_sel : num_real]
    source = (
        jnp.arange(p)
        .at[bottom]
        .set(top[jax.random.randint(key_src, (n_sel,), 0, n_sel)])
    )
    source = axis.own_slice(source)
    replaced = source != axis.own_rows()
    # One gather for the rows and the hyperparameters (sharded: one pass of the
    # blocks round the ring of shards).
    src_tree, src_hparams = axis.gather_rows((tree, hparams), source)
    tree = tree_where(replaced, src_tree, tree)
    table = jnp.asarray(factors, jnp.float32)
    new_hparams = {}
    for i, (name, v) in enumerate(sorted(hparams.items())):
        pick = jax.random.randint(jax.random.fold_in(key_f, i), (p,), 0, len(factors))
        f = axis.own_slice(table[pick])
        new_hparams[name] = jnp.where(replaced, src_hparams[name] * f, v)
    return tree, new_hparams, replaced


# PSO on the log-hyperparameters: inertia, cognitive, social (Clerc's constriction
# values, as the swarm's own defaults).
HPARAM_PSO_COEFFS = (0.7298, 1.49618, 1.49618)
# The hyperparameters move within this factor of their initial range on each
# side: far enough to leave a range that was set 10x off, not to overflow.
HPARAM_REACH = 100.0


def init_hparam_swarm(hparams: Mapping[str, jax.Array]) -> dict:
    """The PSO state of the log-hyperparameters: velocities 0, no personal best.

    ``{"velocity": {name: [n]}, "pbest": {name: [n]}, "pbest_score": [n]}``;
    every leaf is per particle.
    """
    first = next(iter(hparams.values()))
    return {
        "velocity": {k: jnp.zeros_like(v) for k, v in hparams.items()},
        "pbest": dict(hparams),
        "pbest_score": jnp.full(first.shape, jnp.inf, jnp.float32),
    }


def reset_hparam_swarm(hswarm: dict, hparams: Mapping, rows: jax.Array) -> dict:
    """``hswarm`` with ``rows`` ([n] bool) restarted at ``hparams`` (clones)."""
    fresh = init_hparam_swarm(hparams)
    return jax.tree.map(lambda a, b: jnp.where(rows, a, b), fresh, hswarm)


def move_hparams(key, axis, score, hparams, hswarm, ranges, coeffs=HPARAM_PSO_COEFFS):
    """One PSO move of the hyperparameters, in log space.

    ``u = log h``; ``v = w v + c1 r1 (u_pbest - u) + c2 r2 (u_gbest - u)``,
    ``u = u + v``, with ``gbest`` the hyperparameters of the particle with the
    best ``score`` now and ``pbest`` those at which this particle scored best.
    Velocities are clamped to half the log-width of the initial range and
    ``u`` to that range widened by :data:`HPARAM_REACH` on each side.

    Args:
      key: a ``jax.random.key``.
      axis: the swarm axis.
      score: ``[n]`` minimisation keys (:func:`pso_jax.fitness.score`).
      hparams: ``{name: [n]}`` positive hyperparameters.
      hswarm: :func:`init_hparam_swarm`'s state.
      ranges: ``{name: (low, high)}``, the initial ranges (static).
      coeffs: ``(w, c1, c2)``.

    Returns:
      ``(hparams, hswarm)``.
    """
    w, c1, c2 = coeffs
    p = axis.num_particles
    improved = score < hswarm["pbest_score"]
    pbest = {k: jnp.where(improved, hparams[k], hswarm["pbest"][k]) for k in hparams}
    pbest_score = jnp.where(improved, score, hswarm["pbest_score"])
    _, gbest = axis.argmin(score, dict(hparams))
    new_hp, new_v = {}, {}
    for i, name in enumerate(sorted(hparams)):
        lo, hi = (math.log(float(b)) for b in ranges[name])
        vmax = max(0.5 * (hi - lo), 0.1)
        r1, r2 = (
            axis.own_slice(jax.random.uniform(jax.random.fold_in(key, 2 * i + j), (p,)))
            for j in (0, 1)
        )
        u = jnp.log(hparams[name])
        v = (
            w * hswarm["velocity"][name]
            + c1 * r1 * (jnp.log(pbest[name]) - u)
            + c2 * r2 * (jnp.log(gbest[name]) - u)
        )
        new_v[name] = jnp.clip(v, -vmax, vmax)
        reach = math.log(HPARAM_REACH)
        u = jnp.clip(u + new_v[name], lo - reach, hi + reach)
        new_hp[name] = jnp.exp(u).astype(hparams[name].dtype)
    return new_hp, {"velocity": new_v, "pbest": pbest, "pbest_score": pbest_score}


def diversity(axis, positions, center) -> jax.Array:
    """``()`` RMS distance of the particles from ``center``, over its norm.

    ``sqrt(mean_i |x_i - c|^2) / |c|`` over all swarmed leaves, with ``c`` the
    swarm's best: 0 for a collapsed swarm (every particle the best model). From
    per-particle sums gathered in particle order, so a sharded swarm reports
    the unsharded value bit for bit.
    """
    n = axis.local_size
    # In units of the best's largest weight, so huge weights do not overflow
    # the squares (the ratio is the same).
    scale = jnp.max(
        jnp.stack(
            [jnp.max(jnp.abs(c.astype(jnp.float32))) for c in jax.tree.leaves(center)]
            or [jnp.float32(1.0)]
        )
    )
    scale = jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1.0)
    center = jax.tree.map(lambda c: c.astype(jnp.float32) / scale, center)
    d2 = sum(
        jnp.sum(jnp.square(x.astype(jnp.float32) / scale - c[None]).reshape(n, -1), 1)
        for x, c in zip(
            jax.tree.leaves(positions), jax.tree.leaves(center), strict=True
        )
    )
    inert = axis.inert_rows()
    if inert is not None:
        d2 = jnp.where(inert, 0.0, d2)
    mean_d2 = jnp.sum(axis.gather_all(d2)) / axis.num_real
    c2 = sum(jnp.sum(jnp.square(c)) for c in jax.tree.leaves(center))
    return jnp.sqrt(mean_d2 / jnp.maximum(c2, 1e-30))


def narrow(state: Any, rows, like: Any) -> Any:
    """The particles ``rows`` of ``state``, alone: a state of ``len(rows)`` particles.

    Successive halving's step (Jamieson & Talwalkar, 2016): the chosen particles
    go on exactly as they were (positions, velocities, personal bests, their
    optax state and hyperparameters: every per-particle field's rows), the
    swarm-wide fields (the best, its fitness, the counters, the run's key) are
    kept, and the rest is dropped. ``like``, a state of the smaller swarm (its
    ``init``'s), gives the layout: a field the smaller swarm does not have
    (``None`` there, e.g. the hyperparameter swarm of a run of one particle)
    stays ``None``, and the fields that hold particle indices (random links,
    exemplars) are ``like``'s.

    Works on a :class:`pso_jax.pso.PSOState` or a
    :class:`pso_jax.train.TrainState` (any state whose fields say their layout
    with :func:`pso_jax.base.particle_field`), on one device. Host-side (not
    jitted: it runs once per narrowing).

    Args:
      state: the state of ``P`` particles.
      rows: the particles to keep, ``k`` distinct indices in ``[0, P)`` (their
        order is the new particle order).
      like: a state of ``k`` particles.

    Returns:
      ``like`` with ``state``'s values.

    Raises:
      ValueError: ``rows`` that are not distinct indices of ``state``'s
        particles, or as many as ``like`` has.
    """
    rows = np.asarray(rows)
    num, want = _num_particles(state), _num_particles(like)
    if (
        rows.ndim != 1
        or rows.dtype.kind not in "iu"
        or len(rows) != want
        or len(set(rows.tolist())) != len(rows)
        or (len(rows) and (rows.min() < 0 or rows.max() >= num))
    ):
        raise ValueError(
            f"rows={rows.tolist()}: expected {want} distinct particle indices in "
            f"[0, {num})"
        )
    return _narrow_fields(state, jnp.asarray(rows), like)


def _num_particles(state: Any) -> int:
    swarm = getattr(state, "swarm", state)  # a TrainState's PSOState
    return int(np.shape(swarm.fitness)[0])


def _narrow_fields(old: Any, rows: jax.Array, like: Any) -> Any:
    updates = {}
    for f in dataclasses.fields(type(like)):
        old_v, new_v = getattr(old, f.name), getattr(like, f.name)
        if SUBSTATE_FIELD in f.metadata:
            updates[f.name] = _narrow_fields(old_v, rows, new_v)
        elif old_v is None or new_v is None or f.name in _INDEX_FIELDS:
            updates[f.name] = new_v
        elif f.metadata.get(PARTICLE_AXIS_FIELD):
            updates[f.name] = jax.tree.map(lambda a: jnp.take(a, rows, axis=0), old_v)
        else:
            updates[f.name] = old_v
    return like.replace(**updates)
