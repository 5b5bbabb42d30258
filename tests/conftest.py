"""Shared fixtures and registries for the pso_jax tests."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

import pso_jax

# No persistent compilation cache in the tests' CLI runs (in this process and in
# subprocesses): never the user's ~/.cache (tests/test_compile_cache.py sets its
# own directories).
os.environ["PSO_JAX_COMPILE_CACHE"] = "0"

# Every (variant, topology) pair the library supports: tests parametrize over it.
VARIANT_TOPOLOGIES = [
    (v, t)
    for v in pso_jax.VARIANTS
    for t in (("global",) if v in ("cso", "clpso") else pso_jax.TOPOLOGIES)
]


def sphere(params, _batch=None):
    """Sum of squares over every leaf of a pytree (one particle)."""
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))


def half_rng(key, shape, dtype):
    """A deterministic 'generator' returning 0.5 everywhere, for known answers."""
    del key
    return jnp.full(shape, 0.5, dtype)


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def tree_template():
    """A small pytree with leaves of several ranks."""
    return {
        "dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros((2,))},
        "scale": jnp.zeros(()),
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A module's TFDS data directory (``moving_shapes`` generated there).

    End-to-end runs compile the same programs again and again: the module's
    persistent compilation cache turns the repeats into cache hits.
    """
    jax.config.update(
        "jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache"))
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return str(tmp_path_factory.mktemp("tfds"))
