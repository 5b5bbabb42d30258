"""Shared structure of the reference video classifiers: stem, body, head."""

from __future__ import annotations

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
    """

    width: int = 16
    stem: str = "tubelet"
    norm: str = "group"
    impl: str = "fast"
    patch: tuple[int, int, int] = (2, 4, 4)

    def stem_features(self, x: jax.Array) -> jax.Array:
        """Apply the :class:`~pso_jax.models.layers.Stem` (inside ``compact``)."""
        stem = Stem(
            self.width, self.stem, self.patch, self.norm, self.impl, name="stem"
        )
        return stem(x)

    @staticmethod
    def pool(x: jax.Array) -> jax.Array:
        """Global average pool ``[B, T, H, W, C] -> [B, C]``."""
        return jnp.mean(x, axis=(1, 2, 3))


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
    """

    num_classes: int
    width: int = 16
    stem: str = "tubelet"
    norm: str = "group"
    impl: str = "fast"
    patch: tuple[int, int, int] = (2, 4, 4)
    map_particles: bool = True

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
            name="body",
            **self.body_fields(),
        )
        if self.map_particles and self.impl == "fast":
            features = call_per_particle(self, body, x)
        else:
            features = body(x)
        return nn.Dense(self.num_classes, name=HEAD_NAME)(features)
