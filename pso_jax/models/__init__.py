"""Small reference video classifiers for swarms (tests and benchmarks).

Four models share one constructor, :func:`make_model`: ``"c3d"`` (3x3x3 convs),
``"r2plus1d"`` (factorised residual blocks), ``"x3d"`` (depthwise inverted
bottlenecks) and ``"vivit"`` (a factorised-encoder video Transformer,
:mod:`pso_jax.models.vivit`). They take ``[B, T, H, W, C]`` float32 clips,
use GroupNorm or LayerNorm (nothing mutable), name their last Dense ``"head"``,
and lower their convolutions so that ``jax.vmap`` over a particle axis of the
params runs per-particle convolutions rather than XLA's slow grouped ones (see
:mod:`pso_jax.models.layers`).
"""

from pso_jax.models.base import HEAD_NAME, Backbone, VideoClassifier
from pso_jax.models.c3d import C3D, C3DBackbone
from pso_jax.models.flops import count_flops, flops_per_clip, param_count
from pso_jax.models.layers import (
    IMPLS,
    NORMS,
    Conv3D,
    Stem,
    call_per_particle,
    conv3d,
    depthwise_conv3d,
    max_pool,
    space_to_depth,
)
from pso_jax.models.r2plus1d import R2Plus1D, R2Plus1DBackbone, R2Plus1DBlock
from pso_jax.models.registry import DEFAULT_MODEL, MODELS, STEMS, make_model
from pso_jax.models.vivit import (
    SelfAttention,
    TransformerBlock,
    ViViT,
    ViViTBackbone,
)
from pso_jax.models.x3d import X3D, X3DBackbone, X3DBlock

__all__ = [
    "C3D",
    "Backbone",
    "C3DBackbone",
    "R2Plus1DBackbone",
    "X3DBackbone",
    "call_per_particle",
    "DEFAULT_MODEL",
    "HEAD_NAME",
    "IMPLS",
    "MODELS",
    "NORMS",
    "STEMS",
    "X3D",
    "Conv3D",
    "R2Plus1D",
    "R2Plus1DBlock",
    "Stem",
    "SelfAttention",
    "TransformerBlock",
    "VideoClassifier",
    "ViViT",
    "ViViTBackbone",
    "X3DBlock",
    "conv3d",
    "count_flops",
    "depthwise_conv3d",
    "flops_per_clip",
    "make_model",
    "max_pool",
    "param_count",
    "space_to_depth",
]
