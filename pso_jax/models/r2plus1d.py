"""An R(2+1)D-style classifier: factorised spatial/temporal residual blocks.

After Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action
Recognition" (CVPR 2018): each 3x3x3 convolution becomes a 1x3x3 spatial one and a
3x1x1 temporal one, inside residual blocks.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from pso_jax.models.base import Backbone, VideoClassifier
from pso_jax.models.layers import Conv3D, max_pool, norm


class R2Plus1DBlock(nn.Module):
    """Residual block: (1x3x3 conv, norm, ReLU, 3x1x1 conv, norm) + shortcut, ReLU.

    The shortcut is a Dense projection when the channel count changes.

    Attributes:
      features: output channels (the middle width too).
      norm: ``"group"``, ``"layer"`` or ``"none"``.
      impl: convolution lowering (see :class:`~pso_jax.models.layers.Conv3D`).
    """

    features: int
    norm: str = "group"
    impl: str = "fast"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = nn.Dense(self.features, name="proj")(x)
        y = Conv3D(self.features, (1, 3, 3), impl=self.impl, name="spatial")(x)
        y = nn.relu(norm(y, self.norm, "norm1"))
        y = Conv3D(self.features, (3, 1, 1), impl=self.impl, name="temporal")(y)
        y = norm(y, self.norm, "norm2")
        return nn.relu(y + shortcut)


class R2Plus1DBackbone(Backbone):
    """stem(w) -> block(2w) -> pool(2x2x2) -> block(4w) -> GAP."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem_features(x)
        x = R2Plus1DBlock(2 * self.width, self.norm, self.impl, name="block1")(x)
        x = max_pool(x, (2, 2, 2))
        x = R2Plus1DBlock(4 * self.width, self.norm, self.impl, name="block2")(x)
        return self.pool(x)


class R2Plus1D(VideoClassifier):
    """R(2+1)D-style model (:class:`R2Plus1DBackbone`, then the ``"head"`` Dense).

    See :class:`~pso_jax.models.base.VideoClassifier` for the attributes.

    >>> import jax, jax.numpy as jnp
    >>> model = R2Plus1D(num_classes=10, width=8)
    >>> x = jnp.zeros((2, 8, 32, 32, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> model.apply({"params": params}, x).shape
    (2, 10)
    """

    backbone = R2Plus1DBackbone
