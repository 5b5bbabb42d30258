"""Counter-based random numbers that fuse into XLA elementwise loops.

A PSO step draws two uniforms per coordinate (``r1``, ``r2`` for every particle
and dimension, e.g. ``[1024, 100000]`` each step). With ``jax.random`` on our
2-core CPU that is the dominant cost of the step: threefry2x32 and philox
(``rbg``/``unsafe_rbg`` keys) each cost 5-14 ns per sample even when fused into
the update, 40-80x the update's own memory traffic.

This module provides ``impl="hash"``: a keyed, counter-based integer hash of
``(seed words, global row, column)`` written in plain ``uint32`` ``lax`` ops
(iota, xor, shift, multiply, add). XLA fuses it into the consumer's elementwise
loop, so no random array is ever written to memory. Measured on this machine
(``benchmarks/rng_throughput.py``; ``[1024, 100000]``, two uniforms fused into
``x = x + 0.5*u1*(y - x) + 0.5*u2*(z - x)`` on a donated buffer) the update
costs 0.15-0.35 ns per sample against a 0.13-0.17 ns no-RNG bandwidth floor,
versus 6.5-14 ns for threefry and 5-14 ns for philox (ranges over runs on a
shared, loaded machine; see ``benchmarks/results/rng_throughput.md``).

The generator. With seed words ``s0..s3`` from one tiny draw of ``key``, ``r``
the global row index (``row_offset`` + position along axis 0) and ``c`` the
flattened index over the remaining axes, all ``uint32``::

    a = triple32(r ^ s0)            # per-row keys (bijective in r)
    b = triple32(a ^ s1)
    bits = lowbias32_b(lowbias32(c ^ a) + b)

(``float64`` adds a second word, the same hash keyed by ``s2, s3``.)

``triple32`` and ``lowbias32`` are xorshift-multiply permutations of the 32-bit
integers found by C. Wellons' hash prospector
(https://github.com/skeeto/hash-prospector, "Prospecting for Hash Functions",
https://nullprogram.com/blog/2018/07/31/); ``lowbias32_b`` is the lower-bias
variant ``[15 d168aaad 15 af723597 15]`` from the same list. ``(r, c) -> (a,
lowbias32(c ^ a))`` is a bijection of 64-bit pairs, so no two ``(row, column)``
cells share an internal state for any shape up to ``[2**32, 2**32]``; the
second key ``b`` enters after a nonlinear step, so no row is a shifted or
xor-permuted copy of another (which a single ``hash(c ^ a_r)`` would give).
Every seed, row and column bit avalanches onto every output bit (flip
probability within 0.004 of 1/2 over 2**18 random cells with rows < 2**10
and columns < 2**20, i.e. at the noise level of the check). Bits become floats by the
mantissa trick: ``(bits >> 9) | 0x3F800000`` bitcast to ``float32``, minus 1.

Caveats:
    * Not cryptographic, and not a replacement for ``jax.random`` where
      streams must be split and recombined arbitrarily. Seeds come from one
      tiny ``jax.random.bits`` draw of the key, so key handling (split,
      fold_in) keeps JAX's semantics.
    * Within one row the 32-bit outputs are a permutation of the column
      counter, so a row of more than ~2**16 raw 32-bit words has fewer
      repeats than truly random words would (a birthday test sees it). The
      float outputs keep only the top 23 (or fewer) bits and are unaffected
      in practice.
    * Outputs are on a grid of ``2**-nmant`` (``2**-23`` for float32), as with
      ``jax.random.uniform``. ``float64`` uses two independent 32-bit hash
      words for 52 random mantissa bits (twice the cost) and needs
      ``jax_enable_x64``; without it JAX's convention applies (a warning, then
      float32).
    * Quality is checked by ``tests/test_random.py`` (chi-square, KS, moment,
      correlation and per-bit balance tests), not by a full battery such as
      TestU01 or PractRand.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["Seeds", "bits", "normal", "seeds", "uniform"]

_IMPLS = ("hash", "jax")
_DTYPES = tuple(np.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32))
_DTYPES += (np.dtype(np.float64),)
_MAX_INDEX = 2**32  # rows and columns are uint32 counters

_U32 = np.uint32


def _xorshift(x: jax.Array, shift: int) -> jax.Array:
    return x ^ (x >> _U32(shift))


def _lowbias32(x: jax.Array) -> jax.Array:
    # hash-prospector lowbias32, [16 7feb352d 15 846ca68b 16], bias 0.1735.
    x = _xorshift(x, 16) * _U32(0x7FEB352D)
    x = _xorshift(x, 15) * _U32(0x846CA68B)
    return _xorshift(x, 16)


def _lowbias32_b(x: jax.Array) -> jax.Array:
    # hash-prospector [15 d168aaad 15 af723597 15], bias 0.1598. Different
    # constants from the first stage so the two rounds do not share structure.
    x = _xorshift(x, 15) * _U32(0xD168AAAD)
    x = _xorshift(x, 15) * _U32(0xAF723597)
    return _xorshift(x, 15)


def _triple32(x: jax.Array) -> jax.Array:
    # hash-prospector triple32, bias 0.0209 (indistinguishable from a random
    # permutation). Applied to per-row values only: forcing them out of the
    # fused column loop (optimization_barrier) measured no faster.
    x = _xorshift(x, 17) * _U32(0xED5AD4BB)
    x = _xorshift(x, 11) * _U32(0xAC4C1B51)
    x = _xorshift(x, 15) * _U32(0x31848BAB)
    return _xorshift(x, 14)


def _check_impl(impl: str) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got impl={impl!r}.")


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(
            f"shape must be a tuple of ints, got shape={shape!r}."
        ) from None
    if not dims:
        raise ValueError(
            "shape must have at least one axis (axis 0 is the particle axis), "
            f"got shape={shape!r}."
        )
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)):
            raise ValueError(f"shape entries must be ints, got shape={shape!r}.")
        if d < 1:
            raise ValueError(
                f"shape entries must be >= 1 (no empty arrays), got shape={shape!r}."
            )
    return tuple(int(d) for d in dims)


def _check_dtype(dtype, fn_name: str) -> np.dtype:
    try:
        if dtype is None:
            raise TypeError
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(
            f"{fn_name}: dtype must be a floating dtype, got dtype={dtype!r}."
        ) from None
    if dt not in _DTYPES:
        names = ", ".join(d.name for d in _DTYPES)
        raise ValueError(
            f"{fn_name}: dtype must be one of {names}, got dtype={dtype!r}."
        )
    canonical = np.dtype(jax.dtypes.canonicalize_dtype(dt))
    if canonical != dt:
        # Same convention (and message) as jax.random without jax_enable_x64.
        warnings.warn(
            f"Explicitly requested dtype {dt.name} requested in {fn_name} is not "
            f"available, and will be truncated to dtype {canonical.name}. To enable "
            "more dtypes, set the jax_enable_x64 configuration option.",
            UserWarning,
            stacklevel=3,
        )
    return canonical


def _is_zero(row_offset) -> bool:
    """True if row_offset is a concrete zero; False if nonzero or traced."""
    try:
        return int(row_offset) == 0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False


def _row_offset_u32(row_offset, num_rows: int) -> jax.Array:
    if isinstance(row_offset, (bool, np.bool_)):
        raise ValueError(f"row_offset must be an int, got row_offset={row_offset!r}.")
    if isinstance(row_offset, (int, np.integer)):
        if not 0 <= row_offset <= _MAX_INDEX - num_rows:
            raise ValueError(
                f"row_offset must satisfy 0 <= row_offset <= 2**32 - shape[0] = "
                f"{_MAX_INDEX - num_rows}, got row_offset={row_offset!r}."
            )
        return jnp.asarray(_U32(row_offset))
    row_offset = jnp.asarray(row_offset)
    if row_offset.shape != () or not jnp.issubdtype(row_offset.dtype, jnp.integer):
        raise ValueError(
            "row_offset must be an int or an integer scalar array, got "
            f"shape={row_offset.shape} dtype={row_offset.dtype}."
        )
    # Traced offsets are taken modulo 2**32 (int32 wraps like uint32).
    return row_offset.astype(jnp.uint32)


def _check_args(impl, key, shape, dtype, fn_name: str, row_offset):
    """Checked ``(shape, dtype)`` of a draw; ``impl="jax"`` takes no offset or seeds."""
    _check_impl(impl)
    if impl == "jax" and isinstance(key, Seeds):
        raise ValueError(
            f"{fn_name}: impl='jax' needs a key, got Seeds (hash seed words); "
            "pass the key itself, or use impl='hash'."
        )
    shape = _check_shape(shape)
    dtype = _check_dtype(dtype, fn_name)
    if impl == "jax" and not _is_zero(row_offset):
        raise ValueError(
            "impl='jax' does not support row_offset (jax.random streams "
            f"cannot be offset by rows); got row_offset={row_offset!r}. "
            "Use impl='hash'."
        )
    return shape, dtype


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["words"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class Seeds:
    """Keys' hash seed words, drawn ahead by :func:`seeds` (a pytree).

    :func:`uniform`, :func:`normal` and :func:`bits` take one key's (``words``
    of shape ``[4]``) in place of that key and give exactly what it gives.
    Indexing selects keys, as it would on the batch of keys.
    """

    words: jax.Array  # uint32 [*batch, 4]

    def __getitem__(self, index) -> Seeds:
        return Seeds(self.words[index])  # leading (batch) axes; words stay last


def _key_words(key: jax.Array) -> jax.Array:
    return jax.random.bits(key, (4,), jnp.uint32)


def seeds(keys: jax.Array) -> Seeds:
    """The hash seed words of every key of ``keys`` (any batch shape), at once.

    Drawing from a key costs one tiny threefry evaluation, which XLA:CPU
    compiles as a rolled loop of its own; a swarm step that draws from 4 keys
    per leaf compiles dozens of them. One vmapped draw over all the keys is one
    such loop, and gives bitwise the same words (``rbg`` and ``unsafe_rbg``
    keys, whose vmapped draws differ from their single ones, are drawn one at
    a time).

    >>> import jax
    >>> from pso_jax.random import seeds, uniform
    >>> keys = jax.random.split(jax.random.key(0), (3, 2))
    >>> s = seeds(keys)
    >>> s.words.shape
    (3, 2, 4)
    >>> bool((uniform(s[1, 0], (4, 5)) == uniform(keys[1, 0], (4, 5))).all())
    True

    Args:
      keys: typed keys of any shape, or legacy ``uint32`` keys (trailing key
        data axis).

    Returns:
      ``Seeds`` whose ``words`` are ``uint32`` of shape ``batch + (4,)``;
      index it like the batch of keys.
    """
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if not typed:
        keys = jax.random.wrap_key_data(keys)
    batch = keys.shape
    flat = keys.reshape(-1)
    if str(jax.random.key_impl(flat)) == "threefry2x32":
        words = jax.vmap(_key_words)(flat)
    else:
        words = jnp.stack([_key_words(k) for k in flat])
    return Seeds(words.reshape(batch + (4,)))


def _key_or_seed_words(key) -> jax.Array:
    if isinstance(key, Seeds):
        if key.words.shape != (4,):
            raise ValueError(
                "a draw takes one key's Seeds (words of shape (4,)), got words of "
                f"shape {key.words.shape}; index the Seeds first."
            )
        return key.words
    return _key_words(key)


def _seeds_and_row(key, shape, row_offset):
    """The hash generator's 4 seed words (the only key work) and first row."""
    return _key_or_seed_words(key), _row_offset_u32(row_offset, shape[0])


def _hash_bits(
    seeds: jax.Array, shape: tuple[int, ...], row: jax.Array, word: int
) -> jax.Array:
    """Hash word ``word`` of every cell of ``shape``; uint32, same shape."""
    num_rows = shape[0]
    num_cols = math.prod(shape[1:])
    if num_cols > _MAX_INDEX:
        raise ValueError(
            f"prod(shape[1:]) must be <= 2**32 (columns are uint32), got shape={shape}."
        )
    rows = lax.iota(jnp.uint32, num_rows) + row  # [P], global row index
    key_a = _triple32(rows ^ seeds[2 * word])[:, None]  # [P, 1]
    key_b = _triple32(key_a ^ seeds[2 * word + 1])  # [P, 1]
    cols = lax.broadcasted_iota(jnp.uint32, (num_rows, num_cols), 1)
    bits = _lowbias32_b(_lowbias32(cols ^ key_a) + key_b)  # [P, C], uint32
    return bits.reshape(shape)


def _bits_to_unit(seeds, shape, row, dtype: np.dtype) -> jax.Array:
    """Uniform [0, 1) in ``dtype`` from the hash, via the mantissa trick."""
    finfo = jnp.finfo(dtype)
    if finfo.bits == 64:
        # Two words: 52 random mantissa bits (32 from word 0, 20 from word 1).
        hi = _hash_bits(seeds, shape, row, 0).astype(jnp.uint64)
        lo = _hash_bits(seeds, shape, row, 1).astype(jnp.uint64)
        mant = ((hi << np.uint64(32)) | lo) >> np.uint64(64 - finfo.nmant)
        one = np.uint64(0x3FF0000000000000)
        return lax.bitcast_convert_type(mant | one, dtype) - np.asarray(1, dtype)
    bits = _hash_bits(seeds, shape, row, 0)
    uint = jnp.uint32 if finfo.bits == 32 else jnp.uint16
    one = np.asarray(1, dtype).view(np.dtype(uint))
    mant = (bits >> _U32(32 - finfo.nmant)).astype(uint)
    return lax.bitcast_convert_type(mant | one, dtype) - np.asarray(1, dtype)


def bits(
    key: jax.Array, shape: tuple[int, ...], *, row_offset: int | jax.Array = 0
) -> jax.Array:
    """Draw raw 32-bit hash words, the source of :func:`uniform`.

    Cell ``(i, j)`` (row ``row_offset + i``, flattened column ``j``) gets the
    hash word described in the module docstring; ``uniform`` keeps its top
    bits. Shapes and ``row_offset`` behave as in :func:`uniform`.

    >>> import jax
    >>> from pso_jax.random import bits
    >>> bits(jax.random.key(0), (2, 3)).dtype.name
    'uint32'

    Args:
      key: a typed key or a legacy ``uint32`` key (one scalar key), or one
        key's :class:`Seeds`.
      shape: output shape, at least 1-D, every entry >= 1.
      row_offset: as in :func:`uniform`.

    Returns:
      ``uint32`` array of ``shape``.

    Raises:
      ValueError: bad ``shape`` or ``row_offset``.
    """
    shape = _check_shape(shape)
    words, row = _seeds_and_row(key, shape, row_offset)
    return _hash_bits(words, shape, row, 0)


def uniform(
    key: jax.Array,
    shape: tuple[int, ...],
    dtype=jnp.float32,
    *,
    impl: str = "hash",
    row_offset: int | jax.Array = 0,
) -> jax.Array:
    """Draw uniform samples in [0, 1).

    ``shape[0]`` is the particle (row) axis and may be any size >= 1; the
    remaining axes are flattened (row-major) into one column index. With
    ``impl="hash"`` the value of a cell depends only on ``key``, its global row
    ``row_offset + i`` and its column, never on ``shape[0]``: a shard holding
    rows ``[k, k + n)`` of a bigger array gets exactly those rows by passing
    ``row_offset=k`` (e.g. ``lax.axis_index("particles") * n`` in
    ``shard_map``). It is a pure ``uint32`` computation that XLA fuses into the
    consumer, so it is cheapest when consumed inside the same ``jit``.

    >>> import jax
    >>> from pso_jax.random import uniform
    >>> key = jax.random.key(0)
    >>> u = uniform(key, (8, 5))
    >>> u.shape, u.dtype.name
    ((8, 5), 'float32')
    >>> bool((uniform(key, (3, 5), row_offset=3) == u[3:6]).all())
    True

    Args:
      key: a typed key (``jax.random.key(seed)``, any impl) or a legacy
        ``uint32`` key, or one key's :class:`Seeds` (``impl="hash"`` only).
        One scalar key; vmap over keys for a batch.
      shape: output shape, at least 1-D, every entry >= 1.
        ``prod(shape[1:])`` must be <= 2**32.
      dtype: bfloat16, float16, float32 or float64 (float64 needs
        ``jax_enable_x64``; it hashes two words per sample for 52 random bits).
        16-bit types take the top bits of the hash directly, so 1.0 never
        appears.
      impl: ``"hash"`` (default, this module's generator) or ``"jax"``
        (``jax.random.uniform(key, shape, dtype)``, for reference).
      row_offset: global index of row 0; a Python int in
        ``[0, 2**32 - shape[0]]`` or an integer scalar array (may be traced;
        taken modulo 2**32). ``impl="jax"`` supports only 0 and raises
        otherwise (its streams cannot be offset without drawing every row).

    Returns:
      Array of ``shape`` and ``dtype`` with values in [0, 1). Not particle-
      specific in layout: axis 0 is whatever ``shape[0]`` means to the caller.

    Raises:
      ValueError: unknown ``impl``, unsupported ``dtype``, bad ``shape`` or
        ``row_offset``, or a nonzero ``row_offset`` with ``impl="jax"``.
    """
    shape, dtype = _check_args(impl, key, shape, dtype, "uniform", row_offset)
    if impl == "jax":
        return jax.random.uniform(key, shape, dtype)
    seeds, row = _seeds_and_row(key, shape, row_offset)
    return _bits_to_unit(seeds, shape, row, dtype)


def normal(
    key: jax.Array,
    shape: tuple[int, ...],
    dtype=jnp.float32,
    *,
    impl: str = "hash",
    row_offset: int | jax.Array = 0,
) -> jax.Array:
    """Draw standard normal samples.

    With ``impl="hash"`` each sample is ``sqrt(2) * erfinv(2 v - 1)`` of one
    hash uniform ``v``, taken at the midpoints of the ``2**-nmant`` grid so
    that ``2 v - 1`` is exactly symmetric and never +-1: the output is always
    finite, with tails truncated at ~5.3 (float32; ~8.2 for float64). This
    inverse-CDF form needs one hash word per sample and no ``cos``, which XLA
    evaluates slowly on CPU (Box-Muller measured ~4x slower here). 16-bit
    dtypes are computed in float32 and rounded. Row semantics and
    ``row_offset`` are as in :func:`uniform`.

    >>> import jax
    >>> from pso_jax.random import normal
    >>> z = normal(jax.random.key(0), (4, 3))
    >>> z.shape, bool(jax.numpy.isfinite(z).all())
    ((4, 3), True)

    Args:
      key: a typed key or a legacy ``uint32`` key (one scalar key), or one
        key's :class:`Seeds`.
      shape: output shape, at least 1-D, every entry >= 1.
      dtype: bfloat16, float16, float32 or float64.
      impl: ``"hash"`` (default) or ``"jax"`` (``jax.random.normal``).
      row_offset: as in :func:`uniform`.

    Returns:
      Array of ``shape`` and ``dtype``.

    Raises:
      ValueError: as in :func:`uniform`.
    """
    shape, dtype = _check_args(impl, key, shape, dtype, "normal", row_offset)
    if impl == "jax":
        return jax.random.normal(key, shape, dtype)
    seeds, row = _seeds_and_row(key, shape, row_offset)
    work = dtype if dtype == np.float64 else np.dtype(np.float32)
    u = _bits_to_unit(seeds, shape, row, work)
    return _unit_to_normal(u).astype(dtype)


def _unit_to_normal(u: jax.Array) -> jax.Array:
    """Map grid uniforms ``k * 2**-nmant`` in [0, 1) to finite normals."""
    # Midpoint of the u grid: 2u - (1 - eps) is exact, symmetric and |.| < 1,
    # so erf_inv never sees +-1 (which would give +-inf).
    eps = np.asarray(2.0 ** -jnp.finfo(u.dtype).nmant, u.dtype)
    x = 2 * u - (1 - eps)
    return np.sqrt(2).astype(u.dtype) * lax.erf_inv(x)
