"""The one score, sanitisation, and the vmapped swarm evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pso_jax import fitness


@pytest.mark.parametrize("maximize", [False, True])
def test_score_ranks_nonfinite_last_in_either_direction(maximize):
    f = np.array([1.0, 3.0, np.nan, np.inf, -np.inf, 2.0], np.float32)
    s = np.asarray(fitness.score(f, maximize))
    assert np.all(np.isinf(s[2:5])) and np.all(s[2:5] > 0)  # all worst
    best = int(np.argmin(s))
    assert best == (1 if maximize else 0)
    np.testing.assert_array_equal(s[[0, 1, 5]], (-1 if maximize else 1) * f[[0, 1, 5]])


def test_sanitize_maps_nonfinite_to_the_worst_value():
    f = jnp.array([0.5, jnp.nan, -jnp.inf])
    assert fitness.sanitize(f, False).tolist() == [0.5, jnp.inf, jnp.inf]
    assert fitness.sanitize(f, True).tolist() == [0.5, -jnp.inf, -jnp.inf]
    # The worst value scores as the worst.
    for maximize in (False, True):
        assert float(fitness.score(fitness.worst(maximize), maximize)) == jnp.inf


def test_swarm_fitness_equals_a_loop_and_merges_frozen_leaves():
    def fn(p, batch):
        return jnp.sum(p["w"] * batch) + p["b"], p["w"] * 0 + p["b"]

    swarmed = {"w": jnp.arange(6.0).reshape(3, 2), "b": None}
    frozen = {"w": None, "b": jnp.float32(10.0)}
    batch = jnp.array([1.0, -1.0])
    fit, other = jax.jit(fitness.swarm_fitness, static_argnums=0)(
        fn, swarmed, frozen, batch
    )
    want = [fn({"w": swarmed["w"][i], "b": frozen["b"]}, batch)[0] for i in range(3)]
    np.testing.assert_array_equal(fit, want)
    assert other.shape == (3, 2)  # any pytree output gets the particle axis
