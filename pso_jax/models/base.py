"""Shared structure of the reference video classifiers: stem, body, head."""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from pso_jax.models.layers import Stem, call_per_particle, space_to_depth

HEAD_NAME = "head"


class Backbone(nn.Module):
    """Base of the models' bodies: clips (tubelets) -> pooled features ``[B, F]``.

    Subclasses implement :meth:`__call__` with :meth:`stem_features` first and
    :meth:`pool` last.

    Attributes:
      width, stem, norm, impl, patch: as in :class:`VideoClassifier`.
      keep_map: return the feature map ``[B, t, h, w, F]`` before the pool
        (for :class:`VideoClassifier`'s ``decoder_grid``); no parameter changes.
    """

    width: int = 16
    stem: str = "tubelet"
    norm: str = "group"
    impl: str = "fast"
    patch: tuple[int, int, int] = (2, 4, 4)
    keep_map: bool = False

    def stem_features(self, x: jax.Array) -> jax.Array:
        """Apply the :class:`~pso_jax.models.layers.Stem` (inside ``compact``)."""
        stem = Stem(
            self.width, self.stem, self.patch, self.norm, self.impl, name="stem"
        )
        return stem(x)

    def pool(self, x: jax.Array) -> jax.Array:
        """Global average pool ``[B, T, H, W, C] -> [B, C]`` (``keep_map``: ``x``)."""
        return x if self.keep_map else jnp.mean(x, axis=(1, 2, 3))


def check_decoder_grid(grid, num_outputs: int) -> None:
    """Raise a ``ValueError`` naming the value unless ``grid`` serves ``num_outputs``.

    ``grid`` is ``None`` (the pooled head) or ``(t, h, w)`` positive ints whose
    cells share ``num_outputs`` evenly.
    """
    if grid is None:
        return
    ok = isinstance(grid, tuple) and len(grid) == 3
    if not ok or not all(isinstance(g, int) and g >= 1 for g in grid):
        raise ValueError(f"decoder_grid={grid!r}: expected None or 3 positive ints")
    if num_outputs % math.prod(grid):
        raise ValueError(
            f"decoder_grid={grid}: its {math.prod(grid)} cells do not share "
            f"num_classes={num_outputs} outputs evenly"
        )


def decode_map(features: jax.Array, grid, num_outputs: int) -> jax.Array:
    """The ``"head"`` of a dense decoder: feature map -> ``[B, num_outputs]``.

    ``features [B, t, h, w, F]`` (a body's map before the pool) predicts
    ``num_outputs / (T H W)`` values for every cell of ``grid = (T, H, W)``,
    flattened in ``[T, H, W, values]`` order. An axis of ``grid`` of size 1 is
    the mean over that axis of the map; otherwise the axis must be a multiple
    ``r`` of the map's, and one Dense layer (``"head"``, applied at every map
    cell) predicts the ``r_t r_h r_w`` grid cells under it (a linear decoder
    with a depth-to-space, as VideoMAE's per-token linear decoder).
    """
    b, *dims, _ = features.shape
    values = num_outputs // math.prod(grid)
    factors = []
    for axis, (m, g) in enumerate(zip(dims, grid, strict=True)):
        if g == 1 and m > 1:
            features = jnp.mean(features, axis=1 + axis, keepdims=True)
            m = 1
        if g % m:
            raise ValueError(
                f"decoder_grid={tuple(grid)}: the body's feature map "
                f"{tuple(dims)} does not divide it"
            )
        factors.append(g // m)
    x = nn.Dense(math.prod(factors) * values, name=HEAD_NAME)(features)
    t, h, w = x.shape[1:4]
    x = x.reshape(b, t, h, w, *factors, values)
    return x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, -1)


class VideoClassifier(nn.Module):
    """Configuration and forward pass shared by :data:`pso_jax.models.MODELS`.

    Input clips are ``[B, T, H, W, C]`` float32 (channels last), one particle; the
    output is ``[B, num_classes]`` logits. The forward pass is: cut tubelets (no
    parameters, done once for a whole swarm when the clips are shared), the
    model's :class:`Backbone` (submodule ``"body"``) and a Dense layer ``"head"``
    on the pooled features. With ``map_particles``, the body runs once per
    particle under vmap (:func:`~pso_jax.models.layers.call_per_particle`).

    All fields are static Python values: they change the compiled graph, so they
    live on the module, never in a swarm state.

    Attributes:
      num_classes: number of logits.
      width: channels after the stem; later stages use multiples of it (keep it a
        multiple of 8: GroupNorm groups and SIMD lanes divide it evenly).
      stem: ``"tubelet"`` (patchify + Dense, a matmul) or ``"conv"`` (3x3x3
        convolution + max pool); see :class:`pso_jax.models.layers.Stem`.
      norm: ``"group"``, ``"layer"`` or ``"none"``.
      impl: ``"fast"`` (2D-conv lowering, shifted-sum depthwise) or ``"xla"``
        (plain ``lax.conv_general_dilated``, as ``nn.Conv``); same parameters.
      patch: tubelet / stem pool size ``(pt, ph, pw)``.
      map_particles: run the body once per particle (``lax.map``) when vmapped
        over parameters; only with ``impl="fast"``. Same outputs either way.
      decoder_grid: ``None`` (default): the head is one Dense on the pooled
        features. ``(T, H, W)``: a dense decoder, the head sees the body's
        feature map and predicts ``num_classes / (T H W)`` values per cell of
        that grid (:func:`decode_map`; for the pretext reconstruction tasks,
        :mod:`pso_jax.pretext`). The body's parameters are the same either way.
    """

    num_classes: int
    width: int = 16
    stem: str = "tubelet"
    norm: str = "group"
    impl: str = "fast"
    patch: tuple[int, int, int] = (2, 4, 4)
    map_particles: bool = True
    decoder_grid: tuple[int, int, int] | None = None

    backbone: ClassVar[type[Backbone]] = Backbone

    def body_fields(self) -> dict:
        """Fields of :attr:`backbone` beyond the common ones (a subclass's own)."""
        return {}

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 5:
            raise ValueError(f"expected clips [B, T, H, W, C], got shape {x.shape}")
        if self.stem == "tubelet":
            x = space_to_depth(x, self.patch)
        body = self.backbone(
            width=self.width,
            stem=self.stem,
            norm=self.norm,
            impl=self.impl,
            patch=self.patch,
            keep_map=self.decoder_grid is not None,
            name="body",
            **self.body_fields(),
        )
        if self.map_particles and self.impl == "fast":
            features = call_per_particle(self, body, x)
        else:
            features = body(x)
        if self.decoder_grid is not None:
            check_decoder_grid(self.decoder_grid, self.num_classes)
            return decode_map(features, self.decoder_grid, self.num_classes)
        return nn.Dense(self.num_classes, name=HEAD_NAME)(features)
