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
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

TOPOLOGIES = ("global", "ring", "von_neumann", "random")


def validate(topology: str, num_particles: int, ring_neighbors: int, informants: int):
    """Raise a clear ``ValueError`` for an unknown or impossible topology."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology={topology!r}: expected one of {TOPOLOGIES}")
    if topology == "ring" and not ring_neighbors >= 1:
        raise ValueError(f"ring_neighbors={ring_neighbors}: must be >= 1")
    if topology == "random" and not informants >= 1:
        raise ValueError(f"num_informants={informants}: must be >= 1")


def grid_shape(num_particles: int) -> tuple[int, int]:
    """The most square ``(rows, cols)`` with ``rows * cols == num_particles``."""
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
