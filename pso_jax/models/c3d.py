"""A small C3D-style classifier: 3x3x3 convolutions and pooling.

After Tran et al., "Learning Spatiotemporal Features with 3D Convolutional
Networks" (ICCV 2015), shrunk for swarms: stem, two 3x3x3 conv blocks (the second
after a 2x2x2 max pool), global average pool and a Dense head.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from pso_jax.models.base import Backbone, VideoClassifier
from pso_jax.models.layers import Conv3D, max_pool, norm


class C3DBackbone(Backbone):
    """stem(w) -> conv(2w) -> pool(2x2x2) -> conv(4w) -> GAP; 3x3x3 convs, each
    followed by the norm and a ReLU."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem_features(x)
        for i, (mult, pool) in enumerate(((2, True), (4, False)), start=1):
            x = Conv3D(mult * self.width, impl=self.impl, name=f"conv{i}")(x)
            x = nn.relu(norm(x, self.norm, f"norm{i}"))
            if pool:
                x = max_pool(x, (2, 2, 2))
        return self.pool(x)


class C3D(VideoClassifier):
    """C3D-style model (:class:`C3DBackbone`, then the ``"head"`` Dense).

    See :class:`~pso_jax.models.base.VideoClassifier` for the attributes.

    >>> import jax, jax.numpy as jnp
    >>> model = C3D(num_classes=10, width=8)
    >>> x = jnp.zeros((2, 8, 32, 32, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> model.apply({"params": params}, x).shape
    (2, 10)
    """

    backbone = C3DBackbone
