"""Building blocks for 3D-conv video models that vmap well over particles.

A swarm evaluates ``jax.vmap(apply, in_axes=(0, None))(swarm_params, clips)``. Left
to itself, vmap turns every convolution whose input *and* kernel carry the particle
axis into one grouped convolution (``feature_group_count=P``), and XLA's CPU
backend runs grouped and depthwise 3D convolutions far below its matmul speed
(``benchmarks/results/video_fitness.md``). The layers here keep the maths of
``flax.linen.Conv`` (same parameter names and shapes) but choose the lowering:

- :func:`conv3d` computes a ``kt x kh x kw`` convolution as *one* 2D convolution
  over the frames (batch and time merged): either on the ``kt`` time-shifted
  frames stacked along channels (``kt * C_in`` inputs), or with ``kt * C_out``
  outputs (every temporal tap) followed by a sum of time-shifted slices,
  whichever copies the smaller tensor. XLA's 2D convolution is several times
  faster than its 3D one on CPU. Its vmap rule (``custom_vmap``)
  runs one ordinary convolution per particle (``lax.map``) instead of a grouped
  one, folds the particle axis into the output channels when the input is shared
  (the stem) and into the batch when only the input is batched.
- :func:`depthwise_conv3d` is a sum of shifted, scaled copies (one fused
  elementwise loop) rather than XLA's depthwise convolution.
- :func:`space_to_depth` is the tubelet patchify of ViViT (Arnab et al., 2021):
  followed by a Dense layer it makes the first layer a matmul.
- :func:`call_per_particle` runs a whole submodule once per particle
  (``lax.map``) when vmap batches its parameters, so every intermediate of one
  particle stays small and cache-resident instead of ``P`` times larger.

XLA runs its CPU convolutions on one thread: to use every core, shard the
particles over host devices (``--xla_force_host_platform_device_count`` and
``jax.shard_map`` over a ``"particles"`` axis), one device per core.

Norms are GroupNorm or LayerNorm, never BatchNorm, so ``model.apply({'params':
p}, x)`` is the whole forward pass and nothing mutable needs threading through a
swarm state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("fast", "xla")
NORMS = ("group", "layer", "none")

_DN2 = ("NHWC", "HWIO", "NHWC")
_DN3 = ("NDHWC", "DHWIO", "NDHWC")


def _conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'SAME', stride-1 2D convolution: x [N, H, W, Ci], kernel [kh, kw, Ci, Co]."""
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DN2)


def _conv3d_impl(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """One particle's 3D convolution through 2D convolutions (see module doc)."""
    kt, kh, kw, cin, cout = kernel.shape
    n, t, h, w, _ = x.shape
    if kt == 1:  # spatial only: frames are independent images
        y = _conv2d(x.reshape(n * t, h, w, cin), kernel[0])
        return y.reshape(n, t, h, w, cout)
    if kh == kw == 1:  # temporal only: a (kt, 1) kernel over [N, T, H*W, C]
        y = _conv2d(x.reshape(n, t, h * w, cin), kernel[:, 0])
        return y.reshape(n, t, h, w, cout)
    pad = ((kt - 1) // 2, kt // 2)  # XLA's 'SAME'
    if cin <= cout:
        # Stack the kt time-shifted frames along channels (the smaller tensor is
        # the one copied kt times): one 2D convolution with kt * cin inputs.
        xp = jnp.pad(x, ((0, 0), pad, (0, 0), (0, 0), (0, 0)))
        xt = jnp.concatenate([xp[:, i : i + t] for i in range(kt)], axis=-1)
        k2 = jnp.moveaxis(kernel, 0, 2).reshape(kh, kw, kt * cin, cout)
        y = _conv2d(xt.reshape(n * t, h, w, kt * cin), k2)
        return y.reshape(n, t, h, w, cout)
    # Frame t' gives kt partial outputs y[t', i] = conv2d(x[t'], K[i]) in one
    # convolution with kt * cout outputs; out[t] = sum_i y[t + i - pad, i].
    k2 = jnp.moveaxis(kernel, 0, -2).reshape(kh, kw, cin, kt * cout)
    y = _conv2d(x.reshape(n * t, h, w, cin), k2).reshape(n, t, h, w, kt, cout)
    y = jnp.pad(y, ((0, 0), pad, (0, 0), (0, 0), (0, 0), (0, 0)))
    return sum(y[:, i : i + t, :, :, i] for i in range(kt))


@jax.custom_batching.custom_vmap
def _conv3d_vmappable(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _conv3d_impl(x, kernel)


def _on_cpu() -> bool:
    # The loops below are a CPU schedule; GPUs/TPUs run XLA's batched (grouped)
    # convolutions well, so there the rules fall back to an ordinary vmap.
    return jax.default_backend() == "cpu"


@_conv3d_vmappable.def_vmap
def _conv3d_vmap_rule(axis_size, in_batched, x, kernel):
    x_batched, kernel_batched = in_batched
    if not _on_cpu():
        in_axes = (0 if x_batched else None, 0 if kernel_batched else None)
        return jax.vmap(_conv3d_impl, in_axes=in_axes)(x, kernel), True
    if x_batched and kernel_batched:
        # P ordinary convolutions in a loop beat one grouped convolution on CPU.
        out = lax.map(lambda xk: _conv3d_vmappable(*xk), (x, kernel))
    elif kernel_batched:
        # Shared input (the stem): one convolution with P * cout output channels.
        kernel = jnp.moveaxis(kernel, 0, -2)  # [kt, kh, kw, Ci, P, Co]
        cout = kernel.shape[-1]
        y = _conv3d_vmappable(x, kernel.reshape(*kernel.shape[:-2], -1))
        out = jnp.moveaxis(y.reshape(*y.shape[:-1], axis_size, cout), -2, 0)
    else:
        # Batched input, shared kernel: fold the mapped axis into the batch.
        y = _conv3d_vmappable(x.reshape(-1, *x.shape[2:]), kernel)
        out = y.reshape(axis_size, -1, *y.shape[1:])
    return out, True


@jax.custom_vjp
def conv3d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'SAME', stride-1 3D convolution that vmaps to per-particle convolutions.

    Numerically the convolution of ``flax.linen.Conv`` (no bias) computed through
    2D convolutions; see the module docstring for the lowering
    and the vmap rule. Reverse-mode differentiable, with a backward pass that
    vmaps as well as the forward one: the input gradient is this same fast
    convolution (flipped kernel), the kernel gradient one matmul over shifted
    copies of the input. (Autodiff through XLA's convolution instead turns into
    grouped convolutions under vmap over particles, ~100x slower on CPU: a
    hybrid train step of 8 particles took 5 s instead of 0.05 s.)

    Args:
      x: clips, ``[B, T, H, W, C_in]`` float, one particle (no particle axis).
      kernel: ``[kt, kh, kw, C_in, C_out]`` with odd ``kt, kh, kw``, one particle.

    Returns:
      ``[B, T, H, W, C_out]``.

    >>> x = jnp.ones((1, 4, 8, 8, 3))
    >>> conv3d(x, jnp.ones((3, 3, 3, 3, 5))).shape
    (1, 4, 8, 8, 5)
    """
    return _conv3d_vmappable(x, kernel)


def _conv3d_fwd(x, kernel):
    return _conv3d_vmappable(x, kernel), (x, kernel)


def _conv3d_bwd(res, g):
    x, kernel = res
    # 'SAME' with odd kernels pads symmetrically, so the input gradient is the
    # same convolution of g with the flipped, in/out-transposed kernel.
    dx = _conv3d_vmappable(g, jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4))
    return dx, _kernel_grad(x, g, kernel.shape)


def _kernel_grad_impl(x, g, shape):
    """One particle's kernel gradient: ``sum x[shifted] (x) g`` over positions.

    The ``kt`` time shifts of ``x`` are stacked on channels once; each of the
    ``kh * kw`` spatial shifts is then one ``[kt*C_in, N] @ [N, C_out]`` matmul
    (measured 6x faster than one im2col matmul over all 27 shifts, and 50x
    faster than XLA's own weight-gradient convolution on CPU).
    """
    kt, kh, kw, cin, cout = shape
    _, t, h, w, _ = x.shape
    pads = [((k - 1) // 2, k // 2) for k in (kt, kh, kw)]
    xp = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    xt = jnp.concatenate([xp[:, i : i + t] for i in range(kt)], axis=-1)
    g2 = g.reshape(-1, cout)
    dk = jnp.stack(
        [
            jnp.einsum(
                "nc,no->co", xt[:, :, j : j + h, m : m + w].reshape(-1, kt * cin), g2
            )
            for j in range(kh)
            for m in range(kw)
        ]
    )  # [kh*kw, kt*C_in, C_out]
    dk = dk.reshape(kh, kw, kt, cin, cout)
    return jnp.moveaxis(dk, 2, 0)


def _kernel_grad(x, g, shape):
    @jax.custom_batching.custom_vmap
    def grad(x, g):
        return _kernel_grad_impl(x, g, shape)

    @grad.def_vmap
    def rule(axis_size, in_batched, x, g):
        # Per-particle matmuls in a loop beat one batched dot of odd layout on
        # CPU (as for the forward convolution).
        if not _on_cpu():
            # vmap of the plain function: vmapping ``grad`` would call this rule
            # again, without end.
            in_axes = tuple(0 if b else None for b in in_batched)
            plain = functools.partial(_kernel_grad_impl, shape=shape)
            return jax.vmap(plain, in_axes=in_axes)(x, g), True
        x, g = (
            a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, b in zip((x, g), in_batched, strict=True)
        )
        return lax.map(lambda a: grad(*a), (x, g)), True

    return grad(x, g)


conv3d.defvjp(_conv3d_fwd, _conv3d_bwd)


def depthwise_conv3d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'SAME', stride-1 depthwise 3D convolution as a sum of shifted copies.

    XLA's CPU depthwise convolution (``feature_group_count=C``) is slow, and
    slower still once vmap folds particles into its groups; the shifted sum fuses
    into one elementwise loop that vmap simply widens.

    Args:
      x: ``[B, T, H, W, C]``, one particle.
      kernel: ``[kt, kh, kw, 1, C]`` (the layout of ``flax.linen.Conv`` with
        ``feature_group_count=C``), one particle.

    Returns:
      ``[B, T, H, W, C]``.

    >>> depthwise_conv3d(jnp.ones((1, 2, 4, 4, 8)), jnp.ones((3, 3, 3, 1, 8))).shape
    (1, 2, 4, 4, 8)
    """
    kt, kh, kw = kernel.shape[:3]
    _, t, h, w, _ = x.shape
    pads = [((k - 1) // 2, k // 2) for k in (kt, kh, kw)]  # XLA's 'SAME'
    xp = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    out = jnp.zeros_like(x)
    for i in range(kt):
        for j in range(kh):
            for m in range(kw):
                out = out + xp[:, i : i + t, j : j + h, m : m + w] * kernel[i, j, m, 0]
    return out


def space_to_depth(x: jax.Array, patch: Sequence[int]) -> jax.Array:
    """Cut clips into non-overlapping tubelets and flatten each into channels.

    Args:
      x: ``[B, T, H, W, C]``; T, H, W divisible by ``patch``.
      patch: tubelet size ``(pt, ph, pw)``.

    Returns:
      ``[B, T/pt, H/ph, W/pw, pt*ph*pw*C]``.

    Raises:
      ValueError: if a dimension is not divisible by its patch size.

    >>> space_to_depth(jnp.ones((2, 8, 32, 32, 3)), (2, 4, 4)).shape
    (2, 4, 8, 8, 96)
    """
    b, t, h, w, c = x.shape
    pt, ph, pw = patch
    if t % pt or h % ph or w % pw:
        raise ValueError(f"clip dims {(t, h, w)} not divisible by tubelet {patch}")
    x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, t // pt, h // ph, w // pw, pt * ph * pw * c)


def max_pool(x: jax.Array, window: Sequence[int]) -> jax.Array:
    """Non-overlapping max pool over (T, H, W); x is ``[B, T, H, W, C]``.

    A reshape and a max (one fused reduction) when the window divides the clip,
    else ``flax.linen.max_pool`` with 'VALID' padding.

    >>> import jax.numpy as jnp
    >>> x = jnp.arange(16.0).reshape(1, 2, 2, 4, 1)  # [B, T, H, W, C]
    >>> max_pool(x, (2, 2, 2))[0, ..., 0].tolist()
    [[[13.0, 15.0]]]
    """
    b, t, h, w, c = x.shape
    pt, ph, pw = window
    if t % pt or h % ph or w % pw:
        return nn.max_pool(x, tuple(window), strides=tuple(window), padding="VALID")
    x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
    return x.max(axis=(2, 4, 6))


class GroupNorm(nn.Module):
    """GroupNorm (Wu & He, 2018) over ``[B, ..., C]``: ``flax.linen.GroupNorm``'s
    maths and parameters (``scale``, ``bias`` of shape ``[C]``; fast variance
    ``E[x^2] - E[x]^2``), computed for speed on CPU.

    Statistics are per-channel sums over all positions (a reduction along rows,
    vectorised across channels) combined per group on a ``[B, C]`` array, and the
    output is one fused ``x * a + b`` with per-(sample, channel) ``a``, ``b``:
    about 4x faster than ``nn.GroupNorm``'s grouped reshape for small groups.

    Attributes:
      num_groups: number of channel groups; must divide ``C``.
      epsilon: added to the variance.
    """

    num_groups: int = 8
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        g = self.num_groups
        if c % g:
            raise ValueError(f"{g} groups do not divide {c} channels")
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        xf = x.reshape(b, -1, c)
        # Statistics in float32 (a no-op for float32 inputs): a bfloat16 sum
        # over every position of a clip loses the variance.
        x32 = xf.astype(jnp.promote_types(xf.dtype, jnp.float32))
        count = xf.shape[1] * (c // g)
        mean = jnp.sum(x32, axis=1).reshape(b, g, -1).sum(-1) / count  # [b, g]
        mean2 = jnp.sum(x32 * x32, axis=1).reshape(b, g, -1).sum(-1) / count
        inv = lax.rsqrt(jnp.maximum(mean2 - mean * mean, 0.0) + self.epsilon)
        a = jnp.repeat(inv, c // g, axis=1) * scale  # [b, c]
        shift = bias - jnp.repeat(mean, c // g, axis=1) * a
        a, shift = a.astype(xf.dtype), shift.astype(xf.dtype)
        return (xf * a[:, None] + shift[:, None]).reshape(x.shape)


def norm(x: jax.Array, kind: str, name: str) -> jax.Array:
    """Apply a GroupNorm, LayerNorm or nothing, over channels (inside compact).

    GroupNorm (:class:`GroupNorm`) uses ``gcd(C, 8)`` groups, so any channel
    count works.
    """
    if kind == "group":
        return GroupNorm(num_groups=math.gcd(x.shape[-1], 8), name=name)(x)
    if kind == "layer":
        return nn.LayerNorm(name=name)(x)
    if kind == "none":
        return x
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def _apply_params(module: nn.Module, params: Any, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x)


def _per_particle_fn(module: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
    """``fn(params, x) = module.apply({'params': params}, x)`` whose vmap rule
    loops over the batched axis with ``lax.map`` when any parameter is batched."""

    @jax.custom_batching.custom_vmap
    def fn(params, x):
        return _apply_params(module, params, x)

    @fn.def_vmap
    def rule(axis_size, in_batched, params, x):
        leaves, treedef = jax.tree.flatten((params, x))
        flags = jax.tree.leaves(in_batched)
        if not any(jax.tree.leaves(in_batched[0])) or not _on_cpu():
            # Only the input is batched (shared parameters), or not a CPU: an
            # ordinary vmap.
            plain = functools.partial(_apply_params, module)
            in_axes = jax.tree.map(lambda b: 0 if b else None, in_batched)
            return jax.vmap(plain, in_axes=in_axes)(params, x), True

        def one(mapped):
            it = iter(mapped)
            full = [
                next(it) if flag else leaf
                for leaf, flag in zip(leaves, flags, strict=True)
            ]
            return differentiable(*jax.tree.unflatten(treedef, full))

        mapped = [leaf for leaf, flag in zip(leaves, flags, strict=True) if flag]
        return lax.map(one, mapped), True

    @jax.custom_vjp
    def differentiable(params, x):
        return fn(params, x)

    def _fwd(params, x):
        return fn(params, x), (params, x)

    def _bwd(res, g):
        # Derivatives go through the plain vmap-able function (the batching rule
        # above only changes how the primal is scheduled); its forward pass is
        # recomputed here rather than stored, as jax.checkpoint would.
        _, vjp = jax.vjp(functools.partial(_apply_params, module), *res)
        return vjp(g)

    differentiable.defvjp(_fwd, _bwd)

    return differentiable


def call_per_particle(parent: nn.Module, child: nn.Module, x: jax.Array) -> Any:
    """Call ``child(x)`` (inside ``parent``'s compact method), scheduled per particle.

    Numerically ``child(x)``. Under ``jax.vmap`` over a particle axis of the
    parameters, the child runs once per particle in a ``lax.map`` loop rather
    than as one vmapped (grouped-convolution) graph over all particles: each
    particle's activations are small enough to stay in cache, and XLA's ordinary
    convolutions replace grouped ones. Leaves that are not batched (a frozen,
    shared backbone) are closed over, not copied; if no parameter of the child is
    batched, no loop is made at all. Only the ``"params"`` collection is
    supported (the models here have no other).

    Args:
      parent: the calling module (its ``variables`` hold the child's params).
      child: a submodule constructed in ``parent``'s compact method, with a name.
      x: the child's input (with or without a batch axis of its own).

    Returns:
      ``child(x)``.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> class Model(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return call_per_particle(self, nn.Dense(4, name="body"), x)
    >>> model, x = Model(), jnp.ones((3, 2))
    >>> keys = jax.random.split(jax.random.key(0), 5)
    >>> swarm = jax.vmap(lambda k: model.init(k, x)["params"])(keys)  # 5 particles
    >>> out = jax.vmap(lambda p: model.apply({"params": p}, x))(swarm)
    >>> want = jax.vmap(lambda p: nn.Dense(4).apply({"params": p["body"]}, x))(swarm)
    >>> out.shape, bool(jnp.allclose(out, want, atol=1e-6))
    ((5, 3, 4), True)
    """
    if parent.is_initializing():
        return child(x)
    params = parent.variables["params"][child.name]
    unbound = child.clone(parent=None, name=None)
    return _per_particle_fn(unbound)(params, x)


class Conv3D(nn.Module):
    """A 'SAME', stride-1 3D convolution with a bias: ``flax.linen.Conv``'s maths.

    Parameters are ``kernel [kt, kh, kw, C_in, features]`` and ``bias
    [features]``, as in ``nn.Conv``, for any ``impl``.

    Attributes:
      features: output channels.
      kernel_size: ``(kt, kh, kw)``, odd sizes.
      depthwise: one filter per channel (``features`` must equal ``C_in``).
      impl: ``"fast"`` (:func:`conv3d` / :func:`depthwise_conv3d`) or ``"xla"``
        (``lax.conv_general_dilated``, what ``nn.Conv`` does; the baseline).
      use_bias: add a bias.
    """

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    depthwise: bool = False
    impl: str = "fast"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        if self.depthwise and self.features != cin:
            raise ValueError(f"depthwise needs features == C_in, got {cin}")
        in_per_group = 1 if self.depthwise else cin
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*self.kernel_size, in_per_group, self.features),
        )
        if self.impl == "fast":
            fn = depthwise_conv3d if self.depthwise else conv3d
            y = fn(x, kernel)
        elif self.impl == "xla":
            y = lax.conv_general_dilated(
                x,
                kernel,
                (1, 1, 1),
                "SAME",
                dimension_numbers=_DN3,
                feature_group_count=cin if self.depthwise else 1,
            )
        else:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class Stem(nn.Module):
    """Turn clips into ``[B, T/pt, H/ph, W/pw, features]`` features.

    ``kind="tubelet"``: a Dense layer on clips already cut into tubelets by
    :func:`space_to_depth` (``[B, T/pt, H/ph, W/pw, pt*ph*pw*C]``; the models do
    the cut once for the whole swarm, outside the per-particle part), which makes
    the first layer a matmul. ``kind="conv"``: a 3x3x3 convolution of the raw
    ``[B, T, H, W, C]`` clips at full resolution, then a max pool by the tubelet
    size (the classic C3D stem; its 3 input channels make it slow). Both are
    followed by the norm and a ReLU.

    Attributes:
      features: output channels.
      kind: ``"tubelet"`` or ``"conv"``.
      patch: tubelet / pool size ``(pt, ph, pw)``.
      norm: ``"group"``, ``"layer"`` or ``"none"``.
      impl: convolution lowering for ``kind="conv"`` (see :class:`Conv3D`).
    """

    features: int
    kind: str = "tubelet"
    patch: tuple[int, int, int] = (2, 4, 4)
    norm: str = "group"
    impl: str = "fast"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "tubelet":
            x = nn.Dense(self.features, name="proj")(x)
        elif self.kind == "conv":
            x = Conv3D(self.features, (3, 3, 3), impl=self.impl, name="conv")(x)
            x = max_pool(x, self.patch)
        else:
            raise ValueError(f"stem must be 'tubelet' or 'conv', got {self.kind!r}")
        return nn.relu(norm(x, self.norm, "norm"))
