"""Tests for pso_jax.random: the fused counter-based hash generator.

Statistical tests use fixed keys, so they are deterministic; thresholds are a
few standard errors (or p > 1e-4) derived from the sample size, so a biased or
correlated generator fails them.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from pso_jax import random as pso_random
from pso_jax.random import bits, normal, uniform

N_SIDE = 1024  # statistical tests use [1024, 1024] ~ 1e6 samples
Z = 5.0  # tolerance in standard errors
P_MIN = 1e-4  # minimum p-value for chi-square / KS tests


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="module")
def big_uniform():
    """~1e6 float32 uniforms as a numpy float64 array, shape [1024, 1024]."""
    return np.asarray(uniform(jax.random.key(42), (N_SIDE, N_SIDE)), np.float64)


def _jit(fn):
    """jit with shape, dtype and a Python-int row_offset kept static."""
    return jax.jit(fn, static_argnums=(1, 2), static_argnames=("row_offset",))


def _corr_ok(a, b):
    a, b = np.ravel(a), np.ravel(b)
    r = np.corrcoef(a, b)[0, 1]
    assert abs(r) < Z / np.sqrt(a.size), f"correlation {r} over {a.size} samples"


# --------------------------------------------------------------------------
# Range, dtype, shape


@pytest.mark.parametrize("shape", [(7,), (1, 1), (16, 33), (4, 5, 6), (3, 2, 2, 5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_range_dtype_shape(key, shape, dtype):
    u = _jit(uniform)(key, shape, dtype)
    assert u.shape == shape
    assert u.dtype == jnp.dtype(dtype)
    u32 = np.asarray(u, np.float32)
    assert (u32 >= 0).all() and (u32 < 1).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_never_one(key, dtype):
    # Rounding float32 to 16 bits would produce 1.0; the direct bit path can't.
    u = np.asarray(_jit(uniform)(key, (256, 4096), dtype), np.float32)
    assert u.max() == 1 - 2.0 ** -jnp.finfo(dtype).nmant
    assert u.min() == 0.0


def test_float64_uses_52_bits(key):
    with jax.enable_x64(True):
        u = uniform(key, (64, 1000), jnp.float64)
        z = normal(key, (64, 1000), jnp.float64)
        assert u.dtype == jnp.float64 and z.dtype == jnp.float64
        u = np.asarray(u)
    assert (u >= 0).all() and (u < 1).all()
    # With only 32 random bits every value would sit on the 2**-32 grid.
    assert np.mean((u * 2.0**32) % 1 != 0) > 0.99
    assert abs(u.mean() - 0.5) < Z * np.sqrt(1 / 12 / u.size)


def test_float64_without_x64_warns_and_truncates(key):
    with pytest.warns(UserWarning, match="float64"):
        u = uniform(key, (4, 3), jnp.float64)
    assert u.dtype == jnp.float32


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: jax.random.key(3),
        lambda: jax.random.key(3, impl="rbg"),
        lambda: jax.random.key(3, impl="unsafe_rbg"),
        lambda: jax.random.PRNGKey(3),  # legacy uint32 key
    ],
    ids=["threefry", "rbg", "unsafe_rbg", "legacy"],
)
def test_key_kinds(make_key):
    u = np.asarray(_jit(uniform)(make_key(), (64, 256)))
    assert (u >= 0).all() and (u < 1).all()
    assert abs(u.mean() - 0.5) < Z * np.sqrt(1 / 12 / u.size)


@pytest.mark.parametrize(
    "make_keys",
    [
        lambda: jax.random.split(jax.random.key(3), (5, 4)),
        lambda: jax.random.split(jax.random.key(3, impl="rbg"), (5, 4)),
        lambda: jax.random.split(jax.random.key(3, impl="unsafe_rbg"), (5, 4)),
        lambda: jax.random.split(jax.random.PRNGKey(3), 20).reshape(5, 4, 2),
    ],
    ids=["threefry", "rbg", "unsafe_rbg", "legacy"],
)
def test_seeds_draw_what_their_keys_draw(make_keys):
    # rbg's vmapped draws differ from its single ones: seeds() must not vmap them.
    keys = make_keys()
    seeds = jax.jit(pso_random.seeds)(keys)
    assert seeds.words.shape == (5, 4, 4) and seeds.words.dtype == jnp.uint32
    for i, j in [(0, 0), (2, 3), (4, 1)]:
        for draw in (uniform, normal, bits):
            jitted = jax.jit(draw, static_argnums=1)
            np.testing.assert_array_equal(
                jitted(seeds[i, j], (6, 7)), jitted(keys[i, j], (6, 7))
            )
    np.testing.assert_array_equal(
        uniform(seeds[1][2], (3, 5), row_offset=4),
        uniform(keys[1, 2], (3, 5), row_offset=4),
    )


def test_seeds_errors(key):
    seeds = pso_random.seeds(jax.random.split(key, 3))
    with pytest.raises(ValueError, match=r"words of shape \(3, 4\)"):
        uniform(seeds, (2, 2))
    with pytest.raises(ValueError, match="impl='jax' needs a key, got Seeds"):
        uniform(seeds[0], (2, 2), impl="jax")
    with pytest.raises(ValueError, match="impl='jax' needs a key, got Seeds"):
        normal(seeds[0], (2, 2), impl="jax")


# --------------------------------------------------------------------------
# Uniformity


def test_chi_square_64_bins(big_uniform):
    counts = np.bincount((big_uniform * 64).astype(np.int64).ravel(), minlength=64)
    assert counts.size == 64
    p = stats.chisquare(counts).pvalue
    assert p > P_MIN, f"chi-square p={p}"


def test_mean_and_variance(big_uniform):
    n = big_uniform.size
    mean, var = big_uniform.mean(), big_uniform.var()
    assert abs(mean - 0.5) < Z * np.sqrt(1 / 12 / n)
    # Var(sample variance) ~ (mu4 - sigma^4) / n with mu4 = 1/80 for U(0, 1).
    assert abs(var - 1 / 12) < Z * np.sqrt((1 / 80 - 1 / 144) / n)


def test_kolmogorov_smirnov(big_uniform):
    sample = big_uniform.ravel()[::7][:100_000]
    p = stats.kstest(sample, "uniform").pvalue
    assert p > P_MIN, f"KS p={p}"


def test_row_chi_square_large_offset(key):
    # Rows near the top of the uint32 counter range are as good as row 0.
    u = np.asarray(uniform(key, (256, 4096), row_offset=2**32 - 256), np.float64)
    counts = np.bincount((u * 64).astype(np.int64).ravel(), minlength=64)
    assert stats.chisquare(counts).pvalue > P_MIN


# --------------------------------------------------------------------------
# Independence


def test_adjacent_columns_and_rows_uncorrelated(big_uniform):
    _corr_ok(big_uniform[:, :-1], big_uniform[:, 1:])
    _corr_ok(big_uniform[:-1, :], big_uniform[1:, :])


def test_adjacent_pairs_2d_chi_square(big_uniform):
    # Joint distribution of horizontally and vertically adjacent cells, 16x16.
    b = (big_uniform * 16).astype(np.int64)
    for a, c in [(b[:, :-1:2], b[:, 1::2]), (b[:-1:2, :], b[1::2, :])]:
        counts = np.bincount((a * 16 + c).ravel(), minlength=256)
        assert stats.chisquare(counts).pvalue > P_MIN


def test_r1_r2_split_keys_uncorrelated(key):
    key_r1, key_r2 = jax.random.split(key)
    r1 = np.asarray(uniform(key_r1, (N_SIDE, N_SIDE)), np.float64)
    r2 = np.asarray(uniform(key_r2, (N_SIDE, N_SIDE)), np.float64)
    _corr_ok(r1, r2)


def test_different_keys_uncorrelated():
    u1 = np.asarray(uniform(jax.random.key(1), (N_SIDE, N_SIDE)), np.float64)
    u2 = np.asarray(uniform(jax.random.key(2), (N_SIDE, N_SIDE)), np.float64)
    _corr_ok(u1, u2)


def test_distant_rows_share_no_words(key):
    # A flat counter hash(r * C + c) wraps after 2**32 cells, so rows 2**32 / C
    # apart (here 2**20) would be identical; every (row, column) cell must
    # have its own 64-bit state instead.
    cols = 1 << 12
    one_row = jax.jit(lambda off: bits(key, (1, cols), row_offset=off)[0])
    row0 = np.asarray(one_row(jnp.uint32(0)))
    for k in range(32):
        other = np.asarray(one_row(jnp.uint32(2**k)))
        shared = np.intersect1d(row0, other).size
        # Expected cols**2 / 2**32 = 0.004 shared words for independent rows.
        assert shared <= 2, f"rows 0 and 2**{k} share {shared} words"


def test_every_bit_balanced(key):
    words = np.asarray(bits(key, (N_SIDE, N_SIDE))).ravel()
    n = words.size
    for k in range(32):
        frac = np.mean((words >> np.uint32(k)) & np.uint32(1))
        assert abs(frac - 0.5) < Z * 0.5 / np.sqrt(n), f"bit {k}: {frac}"


def test_hash_matches_numpy_reference():
    # Independent numpy implementation of the formula in the module docstring.
    def xs(x, s):
        return x ^ (x >> np.uint32(s))

    def mul(x, m):
        return (x.astype(np.uint64) * m % 2**32).astype(np.uint32)

    def lowbias32(x):
        x = mul(xs(x, 16), 0x7FEB352D)
        return xs(mul(xs(x, 15), 0x846CA68B), 16)

    def lowbias32_b(x):
        x = mul(xs(x, 15), 0xD168AAAD)
        return xs(mul(xs(x, 15), 0xAF723597), 15)

    def triple32(x):
        x = mul(xs(x, 17), 0xED5AD4BB)
        x = mul(xs(x, 11), 0xAC4C1B51)
        return xs(mul(xs(x, 15), 0x31848BAB), 14)

    seeds = np.array([0x12345678, 0x9ABCDEF0, 7, 8], np.uint32)
    shape, row0 = (5, 3, 4), 2**32 - 5
    rows = (np.arange(shape[0], dtype=np.uint64) + row0).astype(np.uint32)
    a = triple32(rows ^ seeds[0])[:, None]
    b = triple32(a ^ seeds[1])
    cols = np.arange(12, dtype=np.uint32)[None, :]
    s = (lowbias32(cols ^ a).astype(np.uint64) + b) % 2**32
    expected = lowbias32_b(s.astype(np.uint32)).reshape(shape)
    got = pso_random._hash_bits(
        jnp.asarray(seeds), shape, jnp.asarray(np.uint32(row0)), 0
    )
    np.testing.assert_array_equal(np.asarray(got), expected)
    u = pso_random._bits_to_unit(
        jnp.asarray(seeds), shape, jnp.asarray(np.uint32(row0)), np.dtype("float32")
    )
    np.testing.assert_array_equal(np.asarray(u), (expected >> 9) / 2.0**23)


# --------------------------------------------------------------------------
# Determinism, row_offset, transformations


def test_deterministic(key):
    a = uniform(key, (32, 100))
    b = jax.jit(lambda k: uniform(k, (32, 100)))(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = uniform(jax.random.key(1), (32, 100))
    assert np.mean(np.asarray(a) == np.asarray(c)) < 1e-2


@pytest.mark.parametrize("fn", [uniform, normal, bits])
def test_row_offset_bitwise(key, fn):
    # Eager: the Python-int row_offset path without jit.
    full = np.asarray(fn(key, (8, 5)))
    part = np.asarray(fn(key, (3, 5), row_offset=3))
    np.testing.assert_array_equal(part, full[3:6])
    fn = jax.jit(fn, static_argnums=1, static_argnames="row_offset")
    full3 = np.asarray(fn(key, (8, 2, 3)))
    np.testing.assert_array_equal(
        np.asarray(fn(key, (1, 2, 3), row_offset=7)), full3[7:]
    )


def test_row_offset_traced_under_jit(key):
    f = jax.jit(lambda k, off: uniform(k, (3, 5), row_offset=off))
    full = np.asarray(uniform(key, (8, 5)))
    for off in (0, 3, 5):
        np.testing.assert_array_equal(
            np.asarray(f(key, jnp.int32(off))), full[off : off + 3]
        )


def test_row_offset_does_not_depend_on_num_rows(key):
    a = np.asarray(_jit(uniform)(key, (1, 7), row_offset=10))
    b = np.asarray(_jit(uniform)(key, (20, 7)))[10:11]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fn", [uniform, normal])
def test_jit_equals_no_jit(key, fn):
    eager = fn(key, (16, 40))
    jitted = jax.jit(lambda k: fn(k, (16, 40)))(key)
    if fn is uniform:
        np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
    else:
        chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("legacy", [False, True])
def test_vmap_over_keys_equals_loop(legacy):
    if legacy:
        keys = jax.random.split(jax.random.PRNGKey(5), 4)
    else:
        keys = jax.random.split(jax.random.key(5), 4)
    one_u = jax.jit(lambda k: uniform(k, (6, 7)))
    one_n = jax.jit(lambda k: normal(k, (6, 7)))
    vmapped = jax.vmap(lambda k: uniform(k, (6, 7)))(keys)  # eager vmap
    looped = jnp.stack([one_u(k) for k in keys])
    assert vmapped.shape == (4, 6, 7)
    np.testing.assert_array_equal(np.asarray(vmapped), np.asarray(looped))
    vmapped_n = jax.jit(jax.vmap(lambda k: normal(k, (6, 7))))(keys)
    looped_n = jnp.stack([one_n(k) for k in keys])
    chex.assert_trees_all_close(vmapped_n, looped_n, rtol=1e-6, atol=1e-6)


def test_shard_map_rows_match_unsharded():
    # A fresh process, so the fake-device flag is read before JAX starts.
    code = textwrap.dedent(
        """
        import jax, numpy as np
        from jax.sharding import PartitionSpec as P
        from pso_jax.random import normal, uniform
        assert jax.device_count() == 4
        mesh = jax.make_mesh((4,), ("particles",))
        key, n = jax.random.key(0), 3
        for fn in (uniform, normal):
            def local(k, fn=fn):
                off = jax.lax.axis_index("particles") * n
                return fn(k, (n, 5, 2), row_offset=off)
            f = jax.jit(jax.shard_map(
                local, mesh=mesh, in_specs=P(), out_specs=P("particles")))
            np.testing.assert_array_equal(
                np.asarray(f(key)), np.asarray(fn(key, (4 * n, 5, 2))))
        print("OK")
        """
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(root), env.get("PYTHONPATH", "")) if p
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_impl_jax_delegates(key):
    for dtype in (jnp.float32, jnp.bfloat16):
        np.testing.assert_array_equal(
            np.asarray(uniform(key, (4, 5), dtype, impl="jax"), np.float32),
            np.asarray(jax.random.uniform(key, (4, 5), dtype), np.float32),
        )
    np.testing.assert_array_equal(
        np.asarray(normal(key, (4, 5), impl="jax")),
        np.asarray(jax.random.normal(key, (4, 5))),
    )


# --------------------------------------------------------------------------
# normal()


def test_normal_moments():
    z = np.asarray(normal(jax.random.key(7), (N_SIDE, N_SIDE)), np.float64)
    n = z.size
    assert np.isfinite(z).all()
    assert abs(z.mean()) < Z / np.sqrt(n)
    # Var(sample variance) = 2 / n for a standard normal.
    assert abs(z.var() - 1) < Z * np.sqrt(2 / n)
    p = stats.kstest(z.ravel()[::7][:100_000], "norm").pvalue
    assert p > P_MIN, f"KS p={p}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_normal_finite_dtype(key, dtype):
    z = _jit(normal)(key, (64, 512), dtype)
    assert z.dtype == jnp.dtype(dtype)
    assert np.isfinite(np.asarray(z, np.float32)).all()


def test_normal_extreme_uniforms_are_finite():
    # The grid end points 0 and 1 - 2**-23 are where log(0) / erfinv(+-1) lurk.
    u = jnp.array([0.0, 2.0**-23, 0.5, 1 - 2.0**-23], jnp.float32)
    z = np.asarray(pso_random._unit_to_normal(u))
    assert np.isfinite(z).all()
    assert z[0] == -z[-1] and 5 < z[-1] < 6  # symmetric, ~5.3 sigma tails


# --------------------------------------------------------------------------
# Errors


def test_unknown_impl(key):
    with pytest.raises(ValueError, match="threefry"):
        uniform(key, (2, 3), impl="threefry")
    with pytest.raises(ValueError, match="bogus"):
        normal(key, (2, 3), impl="bogus")


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, None, "float8_e4m3fn"])
def test_bad_dtype(key, dtype):
    with pytest.raises(ValueError, match="dtype"):
        uniform(key, (2, 3), dtype)
    with pytest.raises(ValueError, match="dtype"):
        normal(key, (2, 3), dtype)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (-1, 2), (2, 2.5), "ab"])
def test_bad_shape(key, shape):
    with pytest.raises(ValueError, match="shape"):
        uniform(key, shape)


def test_too_many_columns(key):
    with pytest.raises(ValueError, match="2\\*\\*32"):
        jax.eval_shape(lambda k: uniform(k, (2, 2**16, 2**16 + 1)), key)
    # The largest supported square is fine (abstract only, nothing allocated).
    out = jax.eval_shape(lambda k: uniform(k, (2**31, 2**31)), key)
    assert out.shape == (2**31, 2**31)


@pytest.mark.parametrize("row_offset", [-1, 2**32 - 2, True])
def test_bad_row_offset(key, row_offset):
    with pytest.raises(ValueError, match="row_offset"):
        uniform(key, (3, 2), row_offset=row_offset)


def test_bad_row_offset_array(key):
    with pytest.raises(ValueError, match="row_offset"):
        uniform(key, (3, 2), row_offset=jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="row_offset"):
        uniform(key, (3, 2), row_offset=jnp.float32(1.0))


def test_impl_jax_rejects_row_offset(key):
    with pytest.raises(ValueError, match="row_offset"):
        uniform(key, (3, 2), impl="jax", row_offset=2)
    with pytest.raises(ValueError, match="row_offset"):
        jax.jit(lambda k, o: uniform(k, (3, 2), impl="jax", row_offset=o))(key, 0)
    # A concrete zero is accepted.
    uniform(key, (3, 2), impl="jax", row_offset=jnp.int32(0))
