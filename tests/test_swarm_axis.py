"""The swarm-axis operations: known answers on one device, and the sharded
implementation (a one-device mesh here; tests/test_sharding.py runs the kernel on
2, 4 and 8 devices) equal to the local one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pso_jax import sharding, topology
from pso_jax.swarm_axis import LocalAxis, ShardedAxis


def test_local_axis_known_answers():
    axis = LocalAxis(5)
    key = jnp.array([3.0, 1.0, 2.0, 1.0, 5.0])
    g, (v, w) = axis.argmin(key, (jnp.arange(5) * 10, -jnp.arange(5)))
    assert (int(g), int(v), int(w)) == (1, 10, -1)  # ties: the first
    tree = {"x": jnp.arange(10.0).reshape(5, 2)}
    assert axis.take_row(tree, 3)["x"].tolist() == [6.0, 7.0]
    assert axis.gather_rows(tree, jnp.array([4, 0, 0, 1, 2]))["x"][:, 0].tolist() == [
        8.0,
        0.0,
        0.0,
        2.0,
        4.0,
    ]
    # [left halo | own | right halo], wrapping round the swarm.
    assert axis.halo_scores(key, 2).tolist() == [1.0, 5.0, 3, 1, 2, 1, 5, 3.0, 1.0]
    np.testing.assert_allclose(axis.mean(tree["x"]), [[4.0, 5.0]])
    assert axis.inert_rows() is None and axis.row0() == 0
    assert LocalAxis(6, num_inert=2).inert_rows().tolist() == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize(("topo", "p"), [("ring", 7), ("ring", 2), ("von_neumann", 12)])
def test_neighbour_bests_equal_a_direct_table_lookup(topo, p):
    table = topology.neighbour_table(topo, p, 1)
    score = jax.random.uniform(jax.random.key(p), (p,))
    pbest = {"x": jnp.arange(p * 3.0).reshape(p, 3)}
    axis = LocalAxis(p)
    nbest, is_self = topology.neighbour_bests(
        axis, topo, topology.shard_tables(table, 1), None, pbest, score, 0, None
    )
    idx = topology.neighbour_best_index(topo, score, table, None)
    np.testing.assert_array_equal(nbest["x"], pbest["x"][idx])
    np.testing.assert_array_equal(is_self, idx == jnp.arange(p))


def test_sharded_axis_on_one_device_equals_local():
    mesh = sharding.make_mesh(1)
    p = 6
    local, sharded = LocalAxis(p), sharding.swarm_axis(mesh, p)
    assert isinstance(sharded, ShardedAxis) and sharded.local_size == p
    x = jax.random.normal(jax.random.key(0), (p, 3))
    key = jnp.array([2.0, 0.5, 0.5, 3.0, 1.0, 0.7])
    pos = jnp.array([0, 1, 7, 3, 2, 6])  # positions in the haloed block (halo 1)

    def ops(axis):
        def fn(x, key):
            g, v = axis.argmin(key, key)
            return (
                g,
                v,
                axis.take_row(x, g),
                axis.gather_rows(x, jnp.arange(p)[::-1]),
                axis.halo_scores(key, 1),
                axis.halo_rows(x, pos, 1),
                axis.mean(x),
                axis.std(x),
                axis.gather_all(key),
                axis.own_slice(key),
            )

        return fn

    want = ops(local)(x, key)
    n_out = len(want)
    got = jax.jit(
        jax.shard_map(
            ops(sharded),
            mesh=mesh,
            in_specs=(P("particles"), P("particles")),
            out_specs=(P(),) * n_out,
            check_vma=False,
        )
    )(x, key)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
