"""The particle axis of a swarm: the operations the kernel needs, on any device count.

The swarm kernel (:mod:`pso_jax.pso`, :mod:`pso_jax.velocity`,
:mod:`pso_jax.topology`) is written once against this small interface. Two
implementations:

- :class:`LocalAxis`: the whole swarm in one array (``[P, ...]`` leaves); every
  operation is plain indexing.
- :class:`ShardedAxis`: inside ``jax.shard_map`` over a mesh axis, each device
  holds a contiguous block of ``P / S`` particles; the same operations cross
  devices by collectives (``all_gather``, ``ppermute``, ``psum``) and give the
  unsharded result, bit for bit, except where noted (sums taken in another
  order: :meth:`ShardedAxis.mean`, :meth:`ShardedAxis.std`).

"Rows" are particles; a global index ``g`` is a particle's place in the whole
swarm; ``local_size`` rows are held by this instance. Both classes are frozen
(static configuration only), so they live in the factory's closure.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax.tree_utils import along_rows

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


@dataclasses.dataclass(frozen=True)
class LocalAxis:
    """The whole swarm on one device.

    Attributes:
      num_particles: ``P``, the swarm size (padding included).
      num_inert: the last ``num_inert`` particles are padding (never a best).
    """

    num_particles: int
    num_inert: int = 0

    num_shards = 1
    particle_axis = None
    data_axis = None

    @property
    def local_size(self) -> int:
        """Rows this instance holds."""
        return self.num_particles // self.num_shards

    @property
    def num_real(self) -> int:
        """Particles that are not padding."""
        return self.num_particles - self.num_inert

    def row0(self):
        """Global index of this instance's first row (a Python ``0`` unsharded)."""
        return 0

    def own_rows(self) -> jax.Array:
        """``[local_size]`` int32 global indices of this instance's rows."""
        return self.row0() + jnp.arange(self.local_size, dtype=jnp.int32)

    def inert_rows(self) -> jax.Array | None:
        """``[local_size]`` bool, True on padding rows; ``None`` without padding."""
        if not self.num_inert:
            return None
        return self.own_rows() >= self.num_real

    def own_slice(self, x: jax.Array) -> jax.Array:
        """This instance's rows of a whole-swarm ``[P, ...]`` array."""
        return x

    def gather_all(self, x: jax.Array) -> jax.Array:
        """The whole swarm's ``[P, ...]`` from every instance's rows (small ``x``)."""
        return x

    def sum(self, x: jax.Array) -> jax.Array:
        """Sum of a per-instance value over the instances (counts)."""
        return x

    def data_mean(self, x: jax.Array) -> jax.Array:
        """Mean over the slices of a batch split on a data axis."""
        return x

    def argmin(self, key: jax.Array, value: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(g, value[g])``: ``g`` the swarm-wide ``argmin`` of ``key`` (first wins).

        ``value`` is ``[local_size]`` or a tree of such leaves.
        """
        i = jnp.argmin(key)
        return i, jax.tree.map(lambda v: v[i], value)

    def take_row(self, tree, g: jax.Array):
        """Row ``g`` (a global index) of ``[local_size, ...]`` leaves, everywhere."""
        return jax.tree.map(lambda p: p[g], tree)

    def gather_rows(self, tree, gidx: jax.Array):
        """Rows ``gidx`` (``[local_size]`` global indices) of ``tree``'s leaves."""
        return jax.tree.map(lambda p: p[gidx], tree)

    def own_table(self, tables: np.ndarray) -> jax.Array:
        """This instance's ``[local_size, M]`` of ``[S, local_size, M]`` tables."""
        return jnp.asarray(tables[0])

    def halo_scores(self, score: jax.Array, halo: int) -> jax.Array:
        """``[left halo | own rows | right halo]`` of a ``[local_size]`` vector.

        The ``halo`` particles before and after this instance's block, wrapping
        round the swarm (see :func:`pso_jax.topology.shard_tables`).
        """
        n = self.local_size
        return jnp.concatenate([score[n - halo :], score, score[:halo]])

    def halo_rows(self, tree, pos: jax.Array, halo: int):
        """Rows at positions ``pos`` of the haloed block, for ``tree``'s leaves."""
        idx = (pos - halo) % self.local_size
        return jax.tree.map(lambda p: p[idx], tree)

    def mean(self, x: jax.Array) -> jax.Array:
        """``[1, ...]`` mean over the real particles of a ``[local_size, ...]`` leaf."""
        return jnp.mean(x, axis=0, keepdims=True)

    def std(self, x: jax.Array) -> jax.Array:
        """``()`` standard deviation of a ``[local_size, ...]`` leaf over the swarm."""
        return jnp.std(x)

    def vary_over_data(self, tree):
        """``tree`` typed as varying over the data axis (no-op without one)."""
        return tree

    def describe(self) -> str:
        """How many rows this instance holds, for error messages."""
        return ""


@dataclasses.dataclass(frozen=True)
class ShardedAxis(LocalAxis):
    """One device's block of a swarm split over the mesh axis ``particle_axis``.

    Its methods run inside ``jax.shard_map``.

    Attributes:
      num_particles: ``P``, the whole swarm (padding included).
      num_inert: padding particles at the end of the swarm.
      num_shards: ``S``, devices on ``particle_axis``; divides ``P``.
      particle_axis: the mesh axis name the particles are split over.
      data_axis: a mesh axis that splits the batch, or ``None``.
    """

    num_shards: int = 1
    particle_axis: str = "particles"
    data_axis: str | None = None

    def row0(self):
        return jax.lax.axis_index(self.particle_axis) * self.local_size

    def own_slice(self, x: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(x, self.row0(), self.local_size)

    def _all_gather(self, x, tiled=False):
        # "invarying": the same on every shard, which shard_map's replication
        # check must know for swarm-wide outputs.
        return jax.lax.all_gather(x, self.particle_axis, tiled=tiled, to="invarying")

    def gather_all(self, x):
        return self._all_gather(x, tiled=True)

    def sum(self, x):
        return jax.lax.psum(x, self.particle_axis)

    def data_mean(self, x):
        # Each device saw one slice of the batch: the mean of the slices' values
        # is the whole batch's for a value that is a batch mean.
        if self.data_axis is None:
            return x
        return jax.lax.pmean(x, self.data_axis)

    def argmin(self, key, value):
        # Each shard's first local minimum, then the first shard among equals:
        # ties go to the lowest global index, as jnp.argmin on the whole swarm.
        li = jnp.argmin(key)
        keys = self._all_gather(key[li])  # [S]
        idx = self._all_gather(self.row0() + li.astype(jnp.int32))
        s = jnp.argmin(keys)
        return idx[s], jax.tree.map(lambda v: self._all_gather(v[li])[s], value)

    def take_row(self, tree, g):
        n = self.local_size
        owner = g // n
        mine = jax.lax.axis_index(self.particle_axis) == owner
        return jax.tree.map(
            lambda p: _select_exact(p[g - owner * n], mine, self.particle_axis), tree
        )

    def gather_rows(self, tree, gidx):
        # The blocks travel round the ring of shards (S - 1 collective permutes of
        # one block each) and each shard keeps the rows it asked for as they
        # pass: the whole swarm crosses the interconnect once per call, but it is
        # never gathered on one device.
        n, s = self.local_size, self.num_shards
        me = jax.lax.axis_index(self.particle_axis)
        owner, lidx = gidx // n, gidx % n
        shift = [(j, (j - 1) % s) for j in range(s)]  # receive from the next shard

        def one(p):
            out = p[lidx]
            block = p
            for d in range(1, s):
                block = jax.lax.ppermute(block, self.particle_axis, shift)
                out = jnp.where(along_rows(owner == (me + d) % s, p), block[lidx], out)
            return out

        return jax.tree.map(one, tree)

    def _halos(self, x, width):
        """``(left, right)``, the ``width`` rows before and after this block.

        Gathered by collective permutes from the neighbouring shards (further
        ones when ``width > local_size``), sending only the rows needed.
        """
        n, s = self.local_size, self.num_shards
        lefts, rights = [], []
        for d in range(1, -(-width // n) + 1):
            k = min(n, width - (d - 1) * n)
            to_next = [(j, (j + d) % s) for j in range(s)]
            to_prev = [(j, (j - d) % s) for j in range(s)]
            lefts.insert(0, jax.lax.ppermute(x[n - k :], self.particle_axis, to_next))
            rights.append(jax.lax.ppermute(x[:k], self.particle_axis, to_prev))
        return jnp.concatenate(lefts), jnp.concatenate(rights)

    def own_table(self, tables):
        return jnp.asarray(tables)[jax.lax.axis_index(self.particle_axis)]

    def halo_scores(self, score, halo):
        left, right = self._halos(score, halo)
        return jnp.concatenate([left, score, right])

    def halo_rows(self, tree, pos, halo):
        n = self.local_size
        in_left, in_right = pos < halo, pos >= halo + n

        def rows(p):
            # Rows of the extended block without materialising it (a copy of the
            # whole block per step otherwise).
            lp, rp = self._halos(p, halo)
            a = lp[jnp.clip(pos, 0, halo - 1)]
            b = rp[jnp.clip(pos - halo - n, 0, halo - 1)]
            c = p[jnp.clip(pos - halo, 0, n - 1)]
            return jnp.where(
                along_rows(in_left, p), a, jnp.where(along_rows(in_right, p), b, c)
            )

        return jax.tree.map(rows, tree)

    def mean(self, x):
        # A sum of per-shard sums: the mean up to rounding (another sum order).
        inert = self.inert_rows()
        if inert is not None:
            x = jnp.where(along_rows(inert, x), 0, x)
        acc = jnp.promote_types(x.dtype, jnp.float32)
        total = jax.lax.psum(
            jnp.sum(x, axis=0, keepdims=True, dtype=acc), self.particle_axis
        )
        return (total / self.num_real).astype(x.dtype)

    def std(self, x):
        # Two-pass std over all shards: equal to jnp.std up to rounding.
        n = self.num_particles * math.prod(x.shape[1:])
        mean = jax.lax.psum(jnp.sum(x), self.particle_axis) / n
        sq = jax.lax.psum(jnp.sum(jnp.square(x - mean)), self.particle_axis)
        return jnp.sqrt(sq / n)

    def vary_over_data(self, tree):
        # A no-op cast inside shard_map. For plain autodiff it changes nothing
        # (the psum of the slices' gradients is this cast's transpose either
        # way), but a model with a custom VJP (e.g.
        # pso_jax.models.layers.call_per_particle) must return cotangents typed
        # like its inputs, and its gradients vary over the slices.
        if self.data_axis is None:
            return tree
        return jax.tree.map(lambda x: vary_over(x, self.data_axis), tree)

    def describe(self):
        return f" (this shard's {self.local_size} of {self.num_particles})"


def varying_axes(x: jax.Array) -> frozenset:
    """The mesh axes along which ``x`` may differ, inside ``shard_map``."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax 0.10; older releases call it vma
    return mat.varying if mat is not None else getattr(aval, "vma", frozenset())


def vary_over(x: jax.Array, axis: str) -> jax.Array:
    """``x`` typed as varying over ``axis`` inside ``shard_map`` (a no-op cast)."""
    if axis in varying_axes(x):
        return x
    return jax.lax.pcast(x, axis, to="varying")


def invariant(x: jax.Array) -> jax.Array:
    """``x`` as the value of the first device along every mesh axis it varies on.

    For values that are equal on all devices but computed from varying inputs
    (which ``shard_map``'s replication check cannot know). A ``psum`` of the bit
    patterns, zeros elsewhere: exact for any dtype. No-op when ``x`` is already
    invariant.
    """
    axes = tuple(sorted(varying_axes(x)))
    if not axes:
        return x
    first = sum(jax.lax.axis_index(a) for a in axes) == 0
    if x.dtype == jnp.bool_:
        return jax.lax.psum(jnp.where(first, x, False).astype(jnp.int32), axes) > 0
    return _select_exact(x, first, axes)


def _select_exact(x: jax.Array, mine: jax.Array, axes) -> jax.Array:
    """``x`` of the one device where ``mine`` is True, on every device, exactly.

    A psum of the bit patterns (zeros elsewhere) is exact for any dtype, and
    keeps -0.0 and NaN payloads that a float sum would not.
    """
    bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize])
    bits = jax.lax.psum(jnp.where(mine, bits, jnp.zeros_like(bits)), axes)
    return jax.lax.bitcast_convert_type(bits, x.dtype)
