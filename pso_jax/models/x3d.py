"""An X3D-style classifier: inverted bottlenecks with depthwise 3x3x3 convolutions.

After Feichtenhofer, "X3D: Expanding Architectures for Efficient Video
Recognition" (CVPR 2020): pointwise expansion, depthwise 3x3x3 convolution,
pointwise projection, residual; spatial-only downsampling; a wide pointwise layer
before the pool. Few FLOPs, but the depthwise part is memory-bound on CPU.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from pso_jax.models.base import Backbone, VideoClassifier
from pso_jax.models.layers import Conv3D, max_pool, norm


class X3DBlock(nn.Module):
    """Inverted bottleneck with a residual connection.

    Dense(e*C), norm, ReLU, depthwise 3x3x3, norm, ReLU, Dense(C), norm, plus the
    input (projected by a Dense if the channel count changes), ReLU.

    Attributes:
      features: output channels ``C``.
      expansion: inner width factor ``e``.
      norm: ``"group"``, ``"layer"`` or ``"none"``.
      impl: depthwise lowering (see :class:`~pso_jax.models.layers.Conv3D`).
    """

    features: int
    expansion: int = 4
    norm: str = "group"
    impl: str = "fast"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = nn.Dense(self.features, name="proj")(x)
        inner = self.expansion * self.features
        y = nn.relu(norm(nn.Dense(inner, name="expand")(x), self.norm, "norm1"))
        y = Conv3D(inner, depthwise=True, impl=self.impl, name="depthwise")(y)
        y = nn.relu(norm(y, self.norm, "norm2"))
        y = norm(nn.Dense(self.features, name="project")(y), self.norm, "norm3")
        return nn.relu(y + shortcut)


class X3DBackbone(Backbone):
    """stem(w) -> block(w) -> pool(1x2x2) -> block(2w) -> Dense(8w) -> GAP."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem_features(x)
        x = X3DBlock(self.width, norm=self.norm, impl=self.impl, name="block1")(x)
        x = max_pool(x, (1, 2, 2))
        x = X3DBlock(2 * self.width, norm=self.norm, impl=self.impl, name="block2")(x)
        x = nn.Dense(8 * self.width, name="conv5")(x)
        return self.pool(nn.relu(norm(x, self.norm, "norm5")))


class X3D(VideoClassifier):
    """X3D-style model (:class:`X3DBackbone`, then the ``"head"`` Dense).

    See :class:`~pso_jax.models.base.VideoClassifier` for the attributes.

    >>> import jax, jax.numpy as jnp
    >>> model = X3D(num_classes=10, width=8)
    >>> x = jnp.zeros((2, 8, 32, 32, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> model.apply({"params": params}, x).shape
    (2, 10)
    """

    backbone = X3DBackbone
