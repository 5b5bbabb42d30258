"""Compression of a trained model: low-bit kernels, magnitude pruning, sizes.

The model the swarm returns (its best particle, or the soup or elite the run
chose on validation) is a float32 Flax params pytree. This module makes it
smaller after training, with no retraining:

- **Quantisation**, symmetric and per output channel (Jacob et al., 2018,
  "Quantization and training of neural networks for efficient integer-
  arithmetic-only inference"; Krishnamoorthi, 2018, per-channel scales): for
  a kernel ``w [..., C]`` (a Dense ``[in, C]`` or a 3D conv ``[kt, kh, kw, Ci,
  C]``: Flax puts the output channel last) and ``b`` bits, ``qmax = 2**(b-1) -
  1``, ``scale[c] = max |w[..., c]| / qmax``, ``code = round(w / scale)`` in
  ``[-qmax, qmax]`` and the model computes with ``code * scale``, within
  ``scale / 2`` of ``w``. ``b = 32`` keeps the kernel float32. Biases and norm
  scales (every leaf that is not a ``kernel`` of two or more axes) stay float32:
  they are a few hundred numbers and the model is sensitive to them.
- **Magnitude pruning** (Han et al., 2015, "Learning both weights and
  connections for efficient neural networks"): the ``round(s n)`` kernel weights
  of least magnitude are set to 0, over all kernels at once (``scope=
  "global"``) or ``round(s_l n_l)`` in each kernel (``"layer"``); ties go to
  the earlier position, so the count is exact. Pruning comes first, then the
  survivors are quantised (the scale is their largest magnitude).
- **Size accounting**, in bytes, of a storage format that :func:`pack` really
  writes (``sum of the arrays' nbytes == num_bytes``): a leaf that is not a
  kernel is float32 (4 bytes a number). A kernel of ``n`` weights at ``b`` bits
  stores its per-channel scales (``4 C`` bytes; none at 32 bits) and its codes,
  either *dense*, ``ceil(n b / 8)`` bytes (two 4-bit codes a byte), or
  *sparse*, a bitmask of the nonzero codes (``ceil(n / 8)`` bytes) and only
  those codes (``ceil(nnz b / 8)`` bytes), whichever is smaller: sparse wins
  once more than ``1 / b`` of the codes are 0 (12.5 % at int8), whether pruned
  or rounded to 0. A bitmask costs 1 bit a weight, against 16-32 for a CSR
  index, and decodes with a cumulative sum.
- **Per-layer settings** (:func:`compress_params`): ``bits`` and ``sparsity`` per
  kernel, traced or not, in one pure function, and a **search** over them
  (:func:`search`) with the library's own :func:`pso_jax.minimize`: each
  particle holds, per kernel, a bit-width coordinate and a sparsity, and its
  fitness is ``-accuracy + lam * compressed / float32 size`` on held-out clips,
  vmapped over the swarm. Every ``lam`` trades size for accuracy differently;
  the personal bests of all runs and the uniform settings are pooled and the
  non-dominated ones are the Pareto front (:func:`pareto_front`).
- :func:`pso_jax.experiment.compress_workdir` (``pso-jax compress``): a run's
  returned model, compressed and measured on the test split, its results in
  ``summary.json``.

Why not a JAX quantisation library. ``qwix`` 0.1.8 (the successor of AQT)
installed cleanly here and was tried on this package's C3D (linen): its
post-training path, ``qwix.quantize_model(model, qwix.PtqProvider([rule]))``
with a weight-only rule (``weight_qtype=int8``, no ``act_qtype``), raises
``ValueError: conv_general_dilated requires same act_qtype and weight_qtype``
(``qwix/_src/providers/ptq.py``): weight-only PTQ of convolutions is not
supported, and the provider rewrites the model's calls (interception) rather
than mapping a params pytree. Its array-level ``qwix.quantize(w, jnp.int8,
channelwise_axes=(...))`` does work on a pytree leaf under ``vmap``, but takes
the bit width as a static dtype, so the search's per-particle, per-layer bit
widths (traced under ``vmap``) cannot go through it; its symmetric range is
``qmax + 0.5`` (``scale = absmax / 127.5`` at int8), not the ``absmax / 127``
asked for here; and it has no pruning or size accounting. ``aqtp`` 0.9.0 (read,
not installed) injects quantised ``dot_general``/``conv_general_dilated`` into
layers built with its ops (the model definitions would have to change), and
quantises both operands of a convolution. The quantiser below is ten lines of
``jnp``; it takes traced bit widths and is vmapped with everything else.

>>> import jax, jax.numpy as jnp
>>> params = {"dense": {"kernel": jnp.arange(-6.0, 6.0).reshape(4, 3),
...                     "bias": jnp.zeros(3)}}
>>> out = compress_params(params, bits=8)
>>> int(out.num_bytes), out.float_bytes  # 12 int8 codes + 3 scales + 3 biases
(36, 60)
>>> pruned = compress_params(params, bits=32, sparsity=0.5)
>>> int((pruned.params["dense"]["kernel"] == 0).sum())
6
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax.minimize import Bounds, minimize
from pso_jax.models.flops import param_count
from pso_jax.types import PRNGKey, PyTree, check_int, check_real, is_tracer

__all__ = [
    "BITS",
    "SCOPES",
    "Compressed",
    "Quantized",
    "SearchResult",
    "compress_params",
    "float_bytes",
    "front_markdown",
    "kernel_names",
    "pack",
    "pareto_front",
    "plot_front",
    "prune",
    "quantize",
    "save_packed",
    "search",
    "unpack",
]

# Bit widths of a kernel: integer codes of 2 to 16 bits, or float32 (32).
BITS = (2, 4, 8, 16, 32)
SCOPES = ("global", "layer")


class Quantized(NamedTuple):
    """What :func:`quantize` returns.

    Attributes:
      params: the dequantised params (``code * scale`` for kernels), float32,
        ``params``' structure: what the model evaluates.
      codes: the stored integer codes, ``int8`` (``bits <= 8``) or ``int16``,
        for kernels; other leaves as they are (float32).
      scales: ``[C]`` float32 per-output-channel scales for kernels; ``None``
        for other leaves.
      num_bytes: ``()`` int32, the stored size (see the module docstring).
    """

    params: PyTree
    codes: PyTree
    scales: PyTree
    num_bytes: jax.Array


class Compressed(NamedTuple):
    """What :func:`compress_params` returns.

    Attributes:
      params: the compressed params to evaluate (pruned, then dequantised),
        float32, the input's structure.
      num_bytes: ``()`` int32, their stored size in bytes.
      float_bytes: the input's size as float32, a Python int (static).
    """

    params: PyTree
    num_bytes: jax.Array
    float_bytes: int


class SearchResult(NamedTuple):
    """What :func:`search` returns.

    Attributes:
      front: the non-dominated candidates, smallest first: one dict each with
        ``bits`` and ``sparsity`` (``{kernel name: value}``), ``val_accuracy``,
        ``num_bytes``, ``size_ratio`` (float32 bytes / compressed bytes) and
        ``source`` (the ``lam`` run that found it, or ``"uniform int8"``...).
      candidates: every candidate scored, the same dicts.
    """

    front: list[dict[str, Any]]
    candidates: list[dict[str, Any]]


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_kernel(path, leaf) -> bool:
    """A Dense or conv kernel: a leaf named ``kernel`` with two or more axes."""
    last = path[-1] if path else None
    return getattr(last, "key", None) == "kernel" and np.ndim(leaf) >= 2


def kernel_names(params: PyTree) -> tuple[str, ...]:
    """The kernels' names (``"body/conv1/kernel"``), in ``jax.tree.leaves`` order.

    Per-layer settings (``bits``, ``sparsity`` of :func:`compress_params`) follow this
    order.

    >>> import jax.numpy as jnp
    >>> kernel_names({"head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}})
    ('head/kernel',)
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return tuple(_name(p) for p, x in flat if _is_kernel(p, x))


def float_bytes(params: PyTree) -> int:
    """The params' size stored as float32: 4 bytes a number.

    >>> import jax.numpy as jnp
    >>> float_bytes({"w": jnp.ones((3, 2)), "b": jnp.ones(2)})
    32
    """
    return 4 * param_count(params)


def _check_bits(bits: Any, num_kernels: int, *, allow_float: bool = True) -> Any:
    """``bits`` as ``()`` or ``[L]`` int32; concrete values checked."""
    shown = bits
    bits = jnp.asarray(bits)
    if bits.ndim not in (0, 1) or (bits.ndim == 1 and bits.shape[0] != num_kernels):
        raise ValueError(
            f"bits of shape {bits.shape}: expected one bit width, or one per "
            f"kernel ({num_kernels})"
        )
    if not jnp.issubdtype(bits.dtype, jnp.integer):
        raise ValueError(f"bits={shown!r}: expected integers from {BITS}")
    if not is_tracer(bits):
        choices = BITS if allow_float else BITS[:-1]
        bad = sorted({int(b) for b in np.ravel(bits)} - set(choices))
        if bad:
            raise ValueError(f"bits={bad[0]}: not supported; choose from {choices}")
    return bits.astype(jnp.int32)


def _check_sparsity(sparsity: Any, num_kernels: int) -> Any:
    """``sparsity`` as ``()`` or ``[L]`` float32; concrete values in ``[0, 1)``."""
    if not is_tracer(sparsity) and np.ndim(sparsity) == 0:
        check_real("sparsity", sparsity)
    s = jnp.asarray(sparsity, jnp.float32)
    if s.ndim not in (0, 1) or (s.ndim == 1 and s.shape[0] != num_kernels):
        raise ValueError(
            f"sparsity of shape {s.shape}: expected one sparsity, or one per "
            f"kernel ({num_kernels})"
        )
    if not is_tracer(s):
        values = np.ravel(np.asarray(s))
        bad = [v for v in values if not 0.0 <= v < 1.0]
        if bad:
            raise ValueError(
                f"sparsity={float(bad[0])}: expected a fraction in [0, 1) of the "
                "kernel weights to set to 0"
            )
    return s


def _ranks(magnitudes: jax.Array) -> jax.Array:
    """Each entry's rank, 0 for the smallest; stable, so ties are exact."""
    order = jnp.argsort(magnitudes, stable=True)
    return (
        jnp.zeros(order.shape, jnp.int32)
        .at[order]
        .set(jnp.arange(order.size, dtype=jnp.int32))
    )


def _keep_masks(kernels: list, sparsity, scope: str, ranks=None) -> list:
    """Which weights survive pruning: a bool mask per kernel.

    ``round(s n)`` weights of least magnitude are dropped, over all kernels
    (``"global"``) or in each (``"layer"``); ties go to the earlier position.
    ``ranks``: with ``"layer"``, each kernel's :func:`_ranks` computed before
    (the search prunes one model many times).
    """
    if scope == "global":
        flat = jnp.concatenate([jnp.abs(w).ravel() for w in kernels])
        drop = jnp.round(sparsity * flat.size).astype(jnp.int32)
        keep = _ranks(flat) >= drop
        sizes = np.cumsum([w.size for w in kernels])[:-1]
        parts = jnp.split(keep, sizes)
        return [k.reshape(w.shape) for k, w in zip(parts, kernels, strict=True)]
    if ranks is None:
        ranks = [_ranks(jnp.abs(w).ravel()) for w in kernels]
    s = jnp.broadcast_to(sparsity, (len(kernels),))
    return [
        (r >= jnp.round(s[i] * w.size).astype(jnp.int32)).reshape(w.shape)
        for i, (w, r) in enumerate(zip(kernels, ranks, strict=True))
    ]


def _quantize_kernel(w: jax.Array, bits: jax.Array):
    """``(codes, scale)`` of a kernel ``[..., C]`` at ``bits`` (traced or not).

    ``codes`` are float32 integers in ``[-qmax, qmax]``, ``scale`` ``[C]``; an
    all-zero channel has scale 0 and codes 0.
    """
    # 2**(b-1) - 1 exactly (127 at 8 bits); exp2 in float32 is not exact. At 32
    # bits (float32, the caller keeps w) any value will do: 2**30 - 1.
    shift = jnp.minimum(bits, 31) - 1
    qmax = (jnp.left_shift(jnp.int32(1), shift) - 1).astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)))  # [C]
    scale = absmax / qmax
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / safe), -qmax, qmax), scale


def _packed_bytes(count, bits):
    """Bytes of ``count`` codes of ``bits`` bits, packed: ``ceil(count bits / 8)``."""
    return (count * bits + 7) // 8


def _kernel_bytes(codes: jax.Array, bits: jax.Array):
    """A kernel's stored bytes and whether it is stored sparse (``()`` each)."""
    n, channels = codes.size, codes.shape[-1]
    nnz = jnp.count_nonzero(codes).astype(jnp.int32)
    dense = _packed_bytes(n, bits)
    sparse = (n + 7) // 8 + _packed_bytes(nnz, bits)
    scales = jnp.where(bits < 32, 4 * channels, 0)
    return jnp.minimum(dense, sparse) + scales, sparse < dense


def _setup(params: PyTree, bits, sparsity, scope: str):
    """``params``' leaves, the kernels' indices among them, and the settings
    checked (``bits``, ``sparsity`` as ``()`` or ``[L]`` arrays)."""
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: choose from {SCOPES}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    where = [i for i, (p, x) in enumerate(flat) if _is_kernel(p, x)]
    if not where:
        raise ValueError(
            "params have no kernel (a leaf named 'kernel' with 2+ axes) to compress"
        )
    bits = _check_bits(bits, len(where))
    sparsity = _check_sparsity(sparsity, len(where))
    if scope == "global" and sparsity.ndim == 1:
        raise ValueError(
            "sparsity per kernel needs scope='layer' (scope='global' prunes the "
            "smallest weights of all kernels together, one fraction)"
        )
    return flat, treedef, where, bits, sparsity


def _compress_parts(params: PyTree, bits, sparsity, scope: str, ranks=None):
    """The work of :func:`compress_params`, with what :func:`pack` stores.

    Returns ``(params, num_bytes, parts)``; ``parts`` per kernel name:
    ``(codes, scale, bits, sparse)`` (at 32 bits the codes are the weights).
    """
    flat, treedef, where, bits, sparsity = _setup(params, bits, sparsity, scope)
    leaves = [jnp.asarray(x, jnp.float32) for _, x in flat]
    kernels = [leaves[i] for i in where]
    keep = _keep_masks(kernels, sparsity, scope, ranks)
    bits_l = jnp.broadcast_to(bits, (len(where),))
    out, parts = list(leaves), {}
    num_bytes = jnp.int32(sum(4 * leaves[i].size for i in range(len(flat))))
    for j, (i, w, k) in enumerate(zip(where, kernels, keep, strict=True)):
        w = jnp.where(k, w, 0.0)
        codes, scale = _quantize_kernel(w, bits_l[j])
        is_float = bits_l[j] >= 32
        out[i] = jnp.where(is_float, w, codes * scale)
        stored = jnp.where(is_float, w, codes)
        size, sparse = _kernel_bytes(stored, bits_l[j])
        num_bytes = num_bytes + size - 4 * w.size
        parts[_name(flat[i][0])] = (stored, scale, bits_l[j], sparse)
    return jax.tree.unflatten(treedef, out), num_bytes, parts


def compress_params(
    params: PyTree,
    bits: Any = 8,
    sparsity: Any = 0.0,
    *,
    scope: str = "global",
) -> Compressed:
    """Prune, then quantise, every kernel of ``params``; the result and its size.

    Pure and jit-able: ``bits`` and ``sparsity`` may be traced (then they are
    not checked: the search keeps them in range); ``scope`` is static.

    Args:
      params: a float Flax params pytree of ONE model (no particle axis).
      bits: ``()`` or ``[L]`` ints from :data:`BITS`, per kernel in
        :func:`kernel_names` order (32: float32, not quantised).
      sparsity: ``()`` or ``[L]`` fractions in ``[0, 1)`` of the kernel
        weights to set to 0 (a ``[L]`` one needs ``scope="layer"``).
      scope: ``"global"`` (the smallest weights of all kernels together) or
        ``"layer"`` (each kernel its own fraction).

    Returns:
      A :class:`Compressed`: float32 params of ``params``' structure, the
      stored size (the module docstring's format) and the float32 size.

    Raises:
      ValueError: a bit width not in :data:`BITS`, a sparsity outside
        ``[0, 1)`` (naming the value), per-layer settings of the wrong length,
        a ``[L]`` sparsity with ``scope="global"``, an unknown ``scope``, or
        params without a kernel.

    >>> import jax.numpy as jnp
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 3, 4, 8))},
    ...           "head": {"kernel": jnp.ones((8, 2)), "bias": jnp.ones(2)}}
    >>> out = compress_params(params, bits=[4, 32], sparsity=[0.5, 0.0], scope="layer")
    >>> int(out.num_bytes), out.float_bytes  # conv: 4-bit, half of it pruned
    (428, 3528)
    >>> compress_params(params, sparsity=1.0)
    Traceback (most recent call last):
    ...
    ValueError: sparsity=1.0: expected a fraction in [0, 1) of the kernel weights \
to set to 0
    """
    out, num_bytes, _ = _compress_parts(params, bits, sparsity, scope)
    return Compressed(out, num_bytes, float_bytes(params))


def quantize(params: PyTree, bits: int = 8) -> Quantized:
    """Quantise every kernel to ``bits``-bit codes with per-channel scales.

    Post-training, weight-only, symmetric: ``scale[c] = max |w[..., c]| /
    (2**(bits-1) - 1)``; biases and norm scales stay float32.

    Args:
      params: a float Flax params pytree of one model.
      bits: a static int of :data:`BITS` below 32 (default int8).

    Returns:
      A :class:`Quantized`: the dequantised params, the integer codes and
      scales, and the stored size.

    Raises:
      ValueError: ``bits`` not an int of :data:`BITS` below 32.

    >>> import jax.numpy as jnp
    >>> q = quantize({"kernel": jnp.array([[1.0, -4.0], [0.5, 2.0]])})
    >>> q.codes["kernel"].tolist(), (127 * q.scales["kernel"]).round(4).tolist()
    ([[127, -127], [64, 64]], [1.0, 4.0])
    """
    bits = check_int("bits", bits)
    if bits not in BITS[:-1]:
        raise ValueError(f"bits={bits}: not supported; choose from {BITS[:-1]}")
    out, num_bytes, parts = _compress_parts(params, bits, 0.0, "global")
    dtype = jnp.int8 if bits <= 8 else jnp.int16
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    codes, scales = [], []
    for path, leaf in flat:
        part = parts.get(_name(path)) if _is_kernel(path, leaf) else None
        codes.append(leaf if part is None else part[0].astype(dtype))
        scales.append(None if part is None else part[1])
    return Quantized(
        out,
        jax.tree.unflatten(treedef, codes),
        jax.tree.unflatten(treedef, scales),
        num_bytes,
    )


def prune(
    params: PyTree, sparsity: Any, *, scope: str = "global"
) -> tuple[PyTree, PyTree]:
    """Set the ``round(s n)`` kernel weights of least magnitude to 0.

    Args:
      params: a float Flax params pytree of one model.
      sparsity: ``()`` or (with ``scope="layer"``) ``[L]`` fractions in
        ``[0, 1)``.
      scope: ``"global"`` (over all kernels) or ``"layer"`` (per kernel).

    Returns:
      ``(pruned, keep)``: the params with the pruned weights 0 (float32), and
      a bool mask per kernel of the weights kept (``None`` for other leaves).

    Raises:
      ValueError: as :func:`compress_params`.

    >>> import jax.numpy as jnp
    >>> pruned, keep = prune({"kernel": jnp.array([[3.0, -1.0], [0.5, -2.0]])}, 0.5)
    >>> pruned["kernel"].tolist(), keep["kernel"].tolist()
    ([[3.0, 0.0], [0.0, -2.0]], [[True, False], [False, True]])
    """
    flat, treedef, where, _, sparsity = _setup(params, 32, sparsity, scope)
    leaves = [jnp.asarray(x, jnp.float32) for _, x in flat]
    keep = _keep_masks([leaves[i] for i in where], sparsity, scope)
    masks: list = [None] * len(leaves)
    for i, k in zip(where, keep, strict=True):
        leaves[i], masks[i] = jnp.where(k, leaves[i], 0.0), k
    return jax.tree.unflatten(treedef, leaves), jax.tree.unflatten(treedef, masks)


def _encode_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (float ints, 1-D) as stored: int8/int16, bit-packed below 8, float32."""
    if bits == 32:
        return codes.astype(np.float32)
    codes = np.rint(codes).astype(np.int64)
    if bits == 8:
        return codes.astype(np.int8)
    if bits == 16:
        return codes.astype(np.int16)
    offset = codes + 2 ** (bits - 1)  # >= 0, < 2**bits
    shifts = np.arange(bits - 1, -1, -1)
    return np.packbits(((offset[:, None] >> shifts) & 1).astype(np.uint8).ravel())


def _decode_codes(stored: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of :func:`_encode_codes`: ``count`` codes as float32."""
    if bits in (8, 16, 32):
        return stored.astype(np.float32)
    bit_rows = np.unpackbits(stored)[: count * bits].reshape(count, bits)
    offset = bit_rows.astype(np.int64) @ (1 << np.arange(bits - 1, -1, -1))
    return (offset - 2 ** (bits - 1)).astype(np.float32)


def pack(
    params: PyTree, bits: Any = 8, sparsity: Any = 0.0, *, scope: str = "global"
) -> dict[str, np.ndarray]:
    """The compressed params in the storage format of the module docstring.

    Host-side (the sparse parts have data-dependent lengths). Entries per kernel
    ``name``: ``name:scale`` (``[C]`` float32, below 32 bits), ``name:values``
    (the codes: int8, int16, bit-packed uint8 for 2 and 4 bits, float32 at 32)
    and, stored sparse, ``name:mask`` (``np.packbits`` of the nonzero codes,
    C order); other leaves as float32 under their name; ``__meta__``: a JSON
    string of each leaf's shape, bits and layout. The arrays' ``nbytes``, but
    ``__meta__``'s, sum to :func:`compress_params`'s ``num_bytes``.

    Args:
      params, bits, sparsity, scope: as :func:`compress_params`.

    Returns:
      ``{name: numpy array}``, for ``np.savez`` (:func:`unpack` reads it).

    >>> import jax.numpy as jnp
    >>> params = {"w": {"kernel": jnp.arange(-8.0, 8.0).reshape(4, 4)}}
    >>> packed = pack(params, bits=4, sparsity=0.5)
    >>> sorted(packed), sum(v.nbytes for k, v in packed.items() if k != "__meta__")
    (['__meta__', 'w/kernel:mask', 'w/kernel:scale', 'w/kernel:values'], 22)
    """
    out, num_bytes, parts = _compress_parts(params, bits, sparsity, scope)
    packed, meta = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _name(path)
        if name not in parts:
            packed[name] = np.asarray(leaf, np.float32)
            meta[name] = {"shape": list(np.shape(leaf)), "bits": 32, "layout": "leaf"}
            continue
        codes, scale, b, sparse = (np.asarray(v) for v in parts[name])
        b, sparse, flat = int(b), bool(sparse), codes.ravel()
        if b < 32:
            packed[f"{name}:scale"] = scale.astype(np.float32)
        if sparse:
            packed[f"{name}:mask"] = np.packbits(flat != 0)
            flat = flat[flat != 0]
        packed[f"{name}:values"] = _encode_codes(flat, b)
        layout = "sparse" if sparse else "dense"
        meta[name] = {"shape": list(codes.shape), "bits": b, "layout": layout}
    packed["__meta__"] = np.asarray(json.dumps(meta))
    stored = sum(v.nbytes for k, v in packed.items() if k != "__meta__")
    assert stored == int(num_bytes), (stored, int(num_bytes))  # one format
    return packed


def unpack(packed: dict[str, np.ndarray], template: PyTree) -> PyTree:
    """The dequantised params from :func:`pack`'s arrays, ``template``'s structure.

    Args:
      packed: :func:`pack`'s dict (or ``np.load`` of the saved ``.npz``).
      template: a pytree of the params' structure (arrays or shapes).

    Returns:
      float32 params equal to :func:`compress_params`'s ``params``.

    Raises:
      ValueError: a leaf of ``template`` missing from ``packed`` or of another
        shape (naming it).
    """
    meta = json.loads(str(packed["__meta__"]))
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for path, leaf in flat:
        name = _name(path)
        if name not in meta or tuple(meta[name]["shape"]) != tuple(np.shape(leaf)):
            got = meta.get(name, {}).get("shape")
            raise ValueError(
                f"packed params: {name} has shape {got}, the template "
                f"{tuple(np.shape(leaf))}"
            )
        info = meta[name]
        if info["layout"] == "leaf":
            out.append(jnp.asarray(packed[name]))
            continue
        shape, b = tuple(info["shape"]), info["bits"]
        n = math.prod(shape)
        if info["layout"] == "sparse":
            nonzero = np.unpackbits(packed[f"{name}:mask"])[:n].astype(bool)
            codes = np.zeros(n, np.float32)
            codes[nonzero] = _decode_codes(
                packed[f"{name}:values"], b, int(nonzero.sum())
            )
        else:
            codes = _decode_codes(packed[f"{name}:values"], b, n)
        codes = codes.reshape(shape)
        if b < 32:
            codes = codes * packed[f"{name}:scale"]
        out.append(jnp.asarray(codes, jnp.float32))
    return jax.tree.unflatten(treedef, out)


def save_packed(path: str | os.PathLike, packed: dict[str, np.ndarray]) -> None:
    """Write :func:`pack`'s arrays to ``path`` (``.npz``) atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **packed)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pareto_front(sizes: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points (smaller size, higher accuracy).

    A point is dominated if another is no larger and no less accurate, and
    better in one; of equal points the first is kept. Smallest first.

    >>> pareto_front([1.0, 2.0, 3.0, 2.5], [0.5, 0.4, 0.9, 0.9])
    [0, 3]
    """
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], -accuracies[i], i))
    front, best = [], -math.inf
    for i in order:
        if accuracies[i] > best:
            front.append(i)
            best = accuracies[i]
    return front


def _decode_settings(coords, choices):
    """A particle's coordinates as ``(bits [L] int32, sparsity [L] float32)``."""
    table = jnp.asarray(choices, jnp.int32)
    index = jnp.clip(jnp.floor(coords["bits"]).astype(jnp.int32), 0, len(choices) - 1)
    return table[index], coords["sparsity"]


def _candidate(names, bits, sparsity, accuracy, size, full) -> dict[str, Any]:
    """One candidate's row: its settings per kernel, accuracy and size."""
    return {
        "bits": {n: int(b) for n, b in zip(names, bits, strict=True)},
        "sparsity": {n: float(v) for n, v in zip(names, sparsity, strict=True)},
        "val_accuracy": float(accuracy),
        "num_bytes": size,
        "size_ratio": full / size,
    }


def _score(accuracy_fn, params, ranks, bits, sparsity):
    """``(accuracy, num_bytes)`` of ``params`` compressed per layer.

    ``ranks``: the kernels' magnitude ranks, computed once on the host: inside
    the search's jitted loop ``params`` are constants, and XLA would otherwise
    constant-fold (slowly) a sort of every kernel.
    """
    out, num_bytes, _ = _compress_parts(params, bits, sparsity, "layer", ranks)
    return accuracy_fn(out), num_bytes


def search(
    accuracy_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    *,
    key: PRNGKey,
    lambdas: Sequence[float] = (0.03, 0.1, 0.3, 1.0),
    bits_choices: Sequence[int] = (2, 4, 8, 32),
    max_sparsity: float = 0.9,
    num_particles: int = 8,
    num_steps: int = 20,
) -> SearchResult:
    """Search per-kernel bits and sparsity with a swarm; the Pareto front.

    For each ``lam`` of ``lambdas``, :func:`pso_jax.minimize` minimises
    ``-accuracy_fn(compressed) + lam * num_bytes / float_bytes`` over, per
    kernel, a bit-width coordinate in ``[0, len(bits_choices))`` (its floor
    picks the width) and a sparsity in ``[0, max_sparsity]``
    (``scope="layer"``). The final personal bests of every run, and each
    uniform width of ``bits_choices`` without pruning (float32 among them),
    are scored again and pooled; :func:`pareto_front` keeps the non-dominated.

    Args:
      accuracy_fn: ``accuracy_fn(params) -> ()`` float, one model's accuracy
        on held-out data (traceable: it is vmapped over the swarm).
      params: the float model to compress (one model).
      key: a ``jax.random.key``; run ``i`` uses ``fold_in(key, i)``.
      lambdas: the size weights, each > 0.
      bits_choices: the widths searched, from :data:`BITS`.
      max_sparsity: the largest sparsity searched, in ``[0, 1)``.
      num_particles, num_steps: each run's swarm size and steps.

    Returns:
      A :class:`SearchResult`.

    Raises:
      ValueError: a ``lam`` not > 0, a width not in :data:`BITS`, an
        ``max_sparsity`` outside ``[0, 1)``, bad counts.

    >>> import jax, jax.numpy as jnp
    >>> params = {"kernel": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}
    >>> def accuracy_fn(p):  # a stand-in: how close the kernel stays
    ...     return 1.0 - jnp.mean(jnp.abs(p["kernel"] - params["kernel"]))
    >>> res = search(accuracy_fn, params, key=jax.random.key(0), lambdas=(0.1,),
    ...              num_particles=4, num_steps=3)
    >>> sizes = [r["num_bytes"] for r in res.front]
    >>> sizes == sorted(sizes) and len(res.front) <= len(res.candidates)
    True
    """
    lambdas = [check_real("lam", lam, minimum=0.0) for lam in lambdas]
    if not lambdas or min(lambdas) <= 0:
        raise ValueError(f"lambdas={lambdas}: expected one or more values > 0")
    choices = tuple(check_int("bits", b) for b in bits_choices)
    _check_bits(jnp.asarray(choices), len(choices))
    max_sparsity = check_real("max_sparsity", max_sparsity)
    _check_sparsity(max_sparsity, 1)
    num_kernels = len(kernel_names(params))
    full = float(float_bytes(params))
    ranks = [
        np.asarray(_ranks(jnp.abs(jnp.asarray(x)).ravel()))
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if _is_kernel(p, x)
    ]

    def settings_fitness(coords, lam):
        settings = _decode_settings(coords, choices)
        accuracy, size = _score(accuracy_fn, params, ranks, *settings)
        return -accuracy + lam * size / full

    low = {
        "bits": jnp.zeros(num_kernels),
        "sparsity": jnp.zeros(num_kernels),
    }
    high = {
        "bits": jnp.full(num_kernels, len(choices) - 1e-3),
        "sparsity": jnp.full(num_kernels, max_sparsity),
    }
    settings = []
    for i, lam in enumerate(lambdas):
        res = minimize(
            lambda c, lam=lam: settings_fitness(c, lam),
            Bounds(low, high),
            key=jax.random.fold_in(key, i),
            num_particles=num_particles,
            num_steps=num_steps,
        )
        pbest = jax.tree.map(np.asarray, res.state.pbest_params)
        for p in range(num_particles):
            coords = jax.tree.map(lambda a, p=p: a[p], pbest)
            bits, sparsity = jax.tree.map(np.asarray, _decode_settings(coords, choices))
            settings.append((bits, sparsity, f"lambda={lam:g}"))
    for b in choices:
        name = "float32" if b == 32 else f"int{b}"
        settings.append(
            (np.full(num_kernels, b), np.zeros(num_kernels), f"uniform {name}")
        )
    score = jax.jit(jax.vmap(lambda b, s: _score(accuracy_fn, params, ranks, b, s)))
    bits_all = jnp.asarray(np.stack([b for b, _, _ in settings]), jnp.int32)
    sparsity_all = jnp.asarray(np.stack([s for _, s, _ in settings]), jnp.float32)
    accuracy, size = jax.tree.map(np.asarray, score(bits_all, sparsity_all))
    names = kernel_names(params)
    candidates = [
        {**_candidate(names, b, s, a, int(n), full), "source": src}
        for (b, s, src), a, n in zip(settings, accuracy, size, strict=True)
    ]
    keep = pareto_front(
        [c["num_bytes"] for c in candidates], [c["val_accuracy"] for c in candidates]
    )
    return SearchResult([candidates[i] for i in keep], candidates)


def plot_front(
    candidates: Sequence[dict], front: Sequence[dict], path: str | os.PathLike
) -> None:
    """Accuracy against compressed size: every candidate, the front joined.

    Written atomically (a temporary file, renamed). The dicts are
    :class:`SearchResult`'s; a ``test_accuracy`` in the front's is drawn too.
    """
    # matplotlib (~0.4 s) is imported here, not at the top, as in pso_jax.cli;
    # no pyplot: the caller's matplotlib backend is left as it was.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.scatter(
        [c["num_bytes"] / 1024 for c in candidates],
        [c["val_accuracy"] for c in candidates],
        s=12,
        c="0.7",
        label="candidates (validation)",
    )
    xs = [r["num_bytes"] / 1024 for r in front]
    ax.plot(xs, [r["val_accuracy"] for r in front], "o-", label="front (validation)")
    if front and "test_accuracy" in front[0]:
        ax.plot(xs, [r["test_accuracy"] for r in front], "s--", label="front (test)")
    ax.set_xscale("log")
    ax.set_xlabel("compressed size (KiB)")
    ax.set_ylabel("accuracy")
    ax.set_title("per-layer bits and sparsity: size vs accuracy")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)


def front_markdown(front: Sequence[dict]) -> str:
    """The front as a markdown table (one row a point, bits/sparsity per kernel)."""
    names = list(front[0]["bits"]) if front else []
    head = ["KiB", "x smaller", "val acc", "test acc", *names, "found by"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * (len(head) - 1) + "---|"]
    for r in front:
        test = r.get("test_accuracy")
        cells = [
            f"{r['num_bytes'] / 1024:.2f}",
            f"{r['size_ratio']:.2f}",
            f"{r['val_accuracy']:.3f}",
            "-" if test is None else f"{test:.3f}",
            *(f"{r['bits'][n]}b/{r['sparsity'][n]:.2f}" for n in names),
            r["source"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
