"""Neighbourhood topologies: who informs whom, and each particle's neighbourhood best.

Topologies are by particle *index*, not by distance (Kennedy & Mendes, 2002,
"Population structure and particle swarm performance"):

- ``"global"`` (star, gbest): every particle sees the whole swarm.
- ``"ring"``: particle ``i`` sees ``i-k .. i+k`` (wrapping), ``k = ring_neighbors``.
- ``"von_neumann"``: a wrapped 2-D grid of ``rows x cols = P`` (as square as P
  allows), each particle seeing itself and its four grid neighbours.
- ``"random"``: SPSO-2011 adaptive random informants (Clerc, 2011, "Standard
  Particle Swarm Optimisation"; Zambrano-Bigiarini et al., CEC 2013): each particle
  informs itself and ``K`` random particles; the links are re-drawn after every
  step in which the swarm's best did not improve.

Fixed neighbourhoods are static ``[P, M]`` index tables (numpy constants built in
the factory); the random topology keeps a ``[P, P]`` boolean link matrix in the
swarm state, ``links[i, j] = True`` when ``j`` informs ``i``.

:func:`neighbour_bests` reads every particle's neighbourhood best through a swarm
axis (:mod:`pso_jax.swarm_axis`), so one function serves one device and a swarm
split over devices: a fixed neighbourhood is looked up in this block of
particles extended by a halo of its neighbours (:func:`shard_tables`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax.types import check_int

TOPOLOGIES = ("global", "ring", "von_neumann", "random")


def validate(topology: str, num_particles: int, ring_neighbors: int, informants: int):
    """Raise a clear ``ValueError`` for an unknown or impossible topology.

    ``ring_neighbors`` and ``informants`` must be integers >= 1 whatever the
    topology (a ``1.5`` is a mistake even where it is unused).

    >>> validate("ring", 8, 1.5, 3)
    Traceback (most recent call last):
    ...
    ValueError: ring_neighbors=1.5: expected an integer >= 1, got float
    """
    if not isinstance(topology, str) or topology not in TOPOLOGIES:
        raise ValueError(f"topology={topology!r}: expected one of {TOPOLOGIES}")
    check_int("num_particles", num_particles, minimum=1)
    check_int("ring_neighbors", ring_neighbors, minimum=1)
    check_int("num_informants", informants, minimum=1)


def grid_shape(num_particles: int) -> tuple[int, int]:
    """The most square ``(rows, cols)`` with ``rows * cols == num_particles``.

    >>> grid_shape(12)
    (3, 4)
    """
    num_particles = check_int("num_particles", num_particles, minimum=1)
    rows = int(math.isqrt(num_particles))
    while num_particles % rows:
        rows -= 1
    return rows, num_particles // rows


def neighbour_table(topology: str, num_particles: int, ring_neighbors: int = 1):
    """Static ``[P, M]`` int32 table of each particle's neighbourhood (self first).

    Returns ``None`` for ``"global"`` and ``"random"``, which need no table.

    >>> neighbour_table("ring", 5, 1)[0].tolist()
    [0, 4, 1]
    """
    p = num_particles
    idx = np.arange(p)
    if topology == "ring":
        cols = [idx]
        for d in range(1, ring_neighbors + 1):
            cols += [(idx - d) % p, (idx + d) % p]
        return np.stack(cols, axis=1).astype(np.int32)
    if topology == "von_neumann":
        rows, ncols = grid_shape(p)
        r, c = idx // ncols, idx % ncols
        cols = [
            idx,
            ((r - 1) % rows) * ncols + c,
            ((r + 1) % rows) * ncols + c,
            r * ncols + (c - 1) % ncols,
            r * ncols + (c + 1) % ncols,
        ]
        return np.stack(cols, axis=1).astype(np.int32)
    return None


def random_links(
    key: jax.Array,
    num_particles: int,
    informants: int,
    *,
    row_offset: int | jax.Array = 0,
    num_rows: int | None = None,
) -> jax.Array:
    """Draw SPSO-2011 informant links: ``[P, P]`` bool, ``links[i, j]``: j informs i.

    Every particle informs itself and ``informants`` particles drawn uniformly with
    replacement, so a particle has on average ``K + 1`` informants.

    Args:
      key: a ``jax.random.key``.
      num_particles: ``P``, the whole swarm's size.
      informants: ``K``.
      row_offset: global index of the first row to return (may be traced).
      num_rows: rows to return (default all ``P``). A particle shard passes its
        first global index and its size and gets exactly those rows of the
        unsharded matrix: the ``[P, K]`` draw is the same on every shard (it is
        tiny), and each shard scatters only the links into its own rows.

    Returns:
      ``[num_rows, P]`` bool.
    """
    p = num_particles
    rows = p if num_rows is None else num_rows
    targets = jax.random.randint(key, (p, informants), 0, p)  # [P(j), K] -> i
    if num_rows is None:
        links = jnp.zeros((p, p), bool).at[targets, jnp.arange(p)[:, None]].set(True)
        return links | jnp.eye(p, dtype=bool)
    local = targets - row_offset  # rows of other shards fall outside [0, rows)
    local = jnp.where((local >= 0) & (local < rows), local, rows)
    links = (
        jnp.zeros((rows, p), bool)
        .at[local, jnp.arange(p)[:, None]]
        .set(True, mode="drop")
    )
    self_ = (row_offset + jnp.arange(rows))[:, None] == jnp.arange(p)[None, :]
    return links | self_


def shard_tables(table: np.ndarray, num_shards: int) -> tuple[int, np.ndarray]:
    """Neighbour tables of each particle shard, indexing a haloed local block.

    A fixed topology's neighbours lie within ``halo`` particles of each other
    (ring: ``k``; von Neumann: one grid row). A shard holding the contiguous
    particles ``[s * n, (s + 1) * n)`` receives the ``halo`` particles before and
    after its block (wrapping) from its neighbour shards, and looks neighbours up
    in the extended block ``[left halo | own n | right halo]``.

    Args:
      table: ``[P, M]`` global table of :func:`neighbour_table`.
      num_shards: ``S``, which must divide ``P``.

    Returns:
      ``(halo, tables)``: the halo width and an ``[S, n, M]`` int32 array of
      positions in the extended block, in the global table's column order (so
      ties resolve exactly as in the unsharded swarm).

    >>> halo, t = shard_tables(neighbour_table("ring", 8, 1), 4)
    >>> halo, t[1].tolist()  # shard 1 holds particles 2, 3; block = [1, 2, 3, 4]
    (1, [[1, 0, 2], [2, 1, 3]])
    """
    p, _ = table.shape
    n = p // num_shards
    idx = np.arange(p)[:, None]
    delta = (table - idx) % p  # the shortest signed offset j - i, wrapping
    delta = np.where(delta > p // 2, delta - p, delta)
    halo = int(np.abs(delta).max())
    pos = halo + (idx % n) + delta  # [P, M], rows grouped by shard
    return halo, pos.reshape(num_shards, n, -1).astype(np.int32)


def neighbour_best_index(
    topology: str,
    score: jax.Array,
    table: np.ndarray | None,
    links: jax.Array | None,
    self_index: jax.Array | None = None,
) -> jax.Array | None:
    """Index of each particle's best neighbour by ``score`` (lower is better).

    Args:
      topology: one of :data:`TOPOLOGIES`.
      score: ``[P]`` float, personal-best fitness as a minimisation key
        (non-finite values already mapped to ``+inf``).
      table: the static neighbourhood table of :func:`neighbour_table`.
      links: the ``[P, P]`` link matrix of the random topology (or a shard's
        ``[n, P]`` rows of it).
      self_index: ``[n]`` global indices of the rows of ``links`` (default
        ``arange(P)``): where a particle falls back to itself.

    Returns:
      ``[P]`` int32 neighbour-best indices, or ``None`` for ``"global"`` (the caller
      uses the single best particle instead, which avoids a ``[P, D]`` gather).
      Ties go to the first neighbour in table order (self first), or the lowest
      index for the random topology.
    """
    if topology == "global":
        return None
    if topology == "random":
        masked = jnp.where(links, score[None, :], jnp.inf)  # [P(i), P(j)]
        best = jnp.argmin(masked, axis=1)
        # A particle all of whose informants are +inf keeps itself.
        all_inf = jnp.isinf(jnp.min(masked, axis=1))
        if self_index is None:
            self_index = jnp.arange(score.shape[0])
        return jnp.where(all_inf, self_index, best).astype(jnp.int32)
    table = jnp.asarray(table)
    local = jnp.argmin(score[table], axis=1)  # [P]
    return jnp.take_along_axis(table, local[:, None], axis=1)[:, 0]


def neighbour_bests(axis, topology, halo_tables, links, pbest, score, g, g_row):
    """Each particle's neighbourhood best, read from the (new) personal bests.

    Args:
      axis: the swarm axis (:class:`pso_jax.swarm_axis.LocalAxis` or
        ``ShardedAxis``) that ``pbest`` and ``score`` are laid out on.
      topology: one of :data:`TOPOLOGIES`.
      halo_tables: ``(halo, tables)`` of :func:`shard_tables` for ``"ring"`` and
        ``"von_neumann"``; unused otherwise.
      links: this instance's rows of the random topology's links, or ``None``.
      pbest: personal bests, ``[n, ...]`` leaves (``n`` rows held here).
      score: ``[n]`` their minimisation keys (:func:`pso_jax.fitness.score`).
      g: ``()`` global index of the swarm's best personal best.
      g_row: its parameters (no particle axis).

    Returns:
      ``(nbest, is_self)``: a tree of ``[n, ...]`` leaves (``[1, ...]`` for the
      global topology: ``g_row``, broadcast) and ``[n]`` bool, True where a
      particle is its own neighbourhood best.
    """
    own = axis.own_rows()
    if topology == "global":
        return jax.tree.map(lambda r: r[None], g_row), own == g
    if topology == "random":
        # Any particle may inform any other: all [P] scores (cheap), then the
        # chosen rows from wherever they are held.
        nidx = neighbour_best_index("random", axis.gather_all(score), None, links, own)
        return axis.gather_rows(pbest, nidx), nidx == own
    halo, tables = halo_tables
    if halo == 0:  # one particle per neighbourhood
        return pbest, jnp.ones(own.shape, bool)
    # The tables index [left halo | own block | right halo] in the global
    # table's column order, which keeps ties (and so the trajectory) the same
    # on any number of devices.
    tab = axis.own_table(tables)  # [n, M]
    best = jnp.argmin(axis.halo_scores(score, halo)[tab], axis=1)
    pos = jnp.take_along_axis(tab, best[:, None], axis=1)[:, 0]  # [n]
    self_pos = halo + jnp.arange(own.shape[0], dtype=jnp.int32)
    return axis.halo_rows(pbest, pos, halo), pos == self_pos
