"""Neighbourhood bests of every topology against brute-force references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pso_jax import topology


def brute_force_best(neighbours: list[list[int]], score: np.ndarray) -> np.ndarray:
    return np.array([min(n, key=lambda j: score[j]) for n in neighbours])


def ring_neighbours(p, k):
    return [[(i + d) % p for d in range(-k, k + 1)] for i in range(p)]


def von_neumann_neighbours(p):
    rows, cols = topology.grid_shape(p)
    out = []
    for i in range(p):
        r, c = divmod(i, cols)
        out.append(
            [
                i,
                ((r - 1) % rows) * cols + c,
                ((r + 1) % rows) * cols + c,
                r * cols + (c - 1) % cols,
                r * cols + (c + 1) % cols,
            ]
        )
    return out


@pytest.mark.parametrize("p", [1, 2, 5, 12, 13])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_ring_matches_brute_force(p, k):
    score = np.asarray(jax.random.permutation(jax.random.key(p * 10 + k), p), float)
    table = topology.neighbour_table("ring", p, k)
    got = topology.neighbour_best_index("ring", jnp.asarray(score), table, None)
    np.testing.assert_array_equal(got, brute_force_best(ring_neighbours(p, k), score))


@pytest.mark.parametrize("p", [1, 4, 6, 12, 16, 17, 30])
def test_von_neumann_matches_brute_force(p):
    score = np.asarray(jax.random.permutation(jax.random.key(p), p), float)
    table = topology.neighbour_table("von_neumann", p)
    got = topology.neighbour_best_index("von_neumann", jnp.asarray(score), table, None)
    np.testing.assert_array_equal(
        got, brute_force_best(von_neumann_neighbours(p), score)
    )


def test_grid_shape_is_as_square_as_possible():
    assert topology.grid_shape(12) == (3, 4)
    assert topology.grid_shape(16) == (4, 4)
    assert topology.grid_shape(17) == (1, 17)  # prime: a ring


def test_random_links_match_brute_force_and_include_self():
    p, k = 20, 3
    links = np.asarray(topology.random_links(jax.random.key(0), p, k))
    assert links.diagonal().all()
    # Each particle informs itself and at most K others.
    assert (links.sum(axis=0) <= k + 1).all()
    assert links.sum() > p  # not only self-links
    score = np.asarray(jax.random.normal(jax.random.key(1), (p,)))
    got = topology.neighbour_best_index("random", jnp.asarray(score), None, links)
    informants = [list(np.flatnonzero(links[i])) for i in range(p)]
    np.testing.assert_array_equal(got, brute_force_best(informants, score))
    other = np.asarray(topology.random_links(jax.random.key(2), p, k))
    assert not np.array_equal(links, other)


def test_infinite_scores_fall_back_to_self():
    links = jnp.eye(3, dtype=bool).at[0, 1].set(True)
    got = topology.neighbour_best_index(
        "random", jnp.array([jnp.inf, jnp.inf, 1.0]), None, links
    )
    np.testing.assert_array_equal(got, [0, 1, 2])


def test_global_needs_no_gather():
    assert topology.neighbour_best_index("global", jnp.zeros(3), None, None) is None


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("mesh", 4, 1, 3), "topology='mesh'"),
        (("ring", 4, 0, 3), "ring_neighbors=0"),
        (("random", 4, 1, 0), "num_informants=0"),
    ],
)
def test_validate(args, match):
    with pytest.raises(ValueError, match=match):
        topology.validate(*args)
