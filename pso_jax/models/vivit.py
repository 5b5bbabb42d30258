"""A ViViT-style video Transformer: tubelet tokens, a factorised encoder.

After Arnab et al., "ViViT: A Video Vision Transformer" (ICCV 2021), model 2,
the *factorised encoder*: the clip is cut into non-overlapping ``pt x ph x pw``
tubelets (the ``patch`` field, done once for a whole swarm by
:class:`~pso_jax.models.base.VideoClassifier`), each embedded by a Dense layer
with learned space and time position embeddings; a **spatial** Transformer
attends among the ``H/ph * W/pw`` tokens of each temporal index and is mean
pooled to one token per time step; a **temporal** Transformer attends among the
``T/pt`` time tokens, mean pooled (the paper's class tokens, replaced by mean
pools as in its ablations: no extra parameters); then the ``"head"`` Dense.
Pre-LayerNorm blocks: ``x + MHSA(LN(x))``, ``x + MLP(LN(x))`` with a GELU MLP
of ``mlp_ratio * width``. Nothing mutable, no dropout: a swarm evaluates it
with ``jax.vmap(apply_fn, in_axes=(0, None))``.

Sizes. The CPU default of the tests and the demo data (``8 x 32 x 32`` clips):
``width=64``, ``patch=(2, 8, 8)`` (4 x 4 x 4 = 64 tokens), ``depth=(2, 2)``,
``heads = width // 32``: about 0.1 M parameters. On an accelerator, the
configuration of the paper's smallest models, scaled to ``moving_shapes/default``
or UCF-101 at ``16 x 64 x 64``::

    make_model("vivit", 101, width=192, patch=(2, 8, 8))  # then
    ViViT(num_classes=101, width=192, patch=(2, 8, 8), depth=(4, 4), heads=3)

(``make_model`` keeps the common constructor; the depths and heads are fields of
:class:`ViViT` itself.)

Training it. Like any Transformer trained from scratch it wants a smaller
Adam step than the conv models and a warmup: at the ``hybrid`` config's peak
1e-2 without one it stays at chance on ``moving_shapes/small`` (training loss
at ln 10); ``--lr 1e-3 --lr-warmup 0.1`` trains it, after a plateau of some
1,600 Adam steps (``benchmarks/results/vivit/learning_curves.md``).

What the common fields mean here: ``stem`` must be ``"tubelet"`` (a Transformer
takes tokens; ``"conv"`` raises); ``norm`` ``"layer"`` or ``"group"`` are both
LayerNorm over each token's features (GroupNorm with one group per token is
LayerNorm), ``"none"`` drops the norms; ``impl`` changes nothing (there are no
convolutions: every contraction is a matmul, which vmaps over particles as a
batched matmul); ``map_particles`` runs the body once per particle, as for the
conv models.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pso_jax.models.base import Backbone, VideoClassifier


def _layer_norm(x: jax.Array, kind: str, name: str) -> jax.Array:
    if kind == "none":
        return x
    return nn.LayerNorm(name=name)(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the token axis ``[..., N, D] -> [..., N, D]``.

    One Dense ``qkv`` (``D -> 3D``), softmax(q kᵀ / sqrt(D/h)) v per head, a
    Dense ``out``. Written with einsums so that its FLOPs are the jaxpr's dots.

    Attributes:
      heads: number of heads; must divide the width.
    """

    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        dh = d // self.heads
        qkv = nn.Dense(3 * d, name="qkv")(x)
        qkv = qkv.reshape(*x.shape[:-1], 3, self.heads, dh)
        q, k, v = (qkv[..., i, :, :] for i in range(3))  # [..., N, h, dh]
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(dh)
        weights = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        return nn.Dense(d, name="out")(y.reshape(x.shape))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))``.

    Attributes:
      heads: attention heads.
      mlp_ratio: hidden width of the MLP over the token width.
      norm: ``"layer"``/``"group"`` (LayerNorm) or ``"none"``.
    """

    heads: int
    mlp_ratio: int = 2
    norm: str = "layer"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = x + SelfAttention(self.heads, name="attn")(
            _layer_norm(x, self.norm, "norm1")
        )
        y = nn.Dense(self.mlp_ratio * d, name="mlp1")(
            _layer_norm(x, self.norm, "norm2")
        )
        return x + nn.Dense(d, name="mlp2")(nn.gelu(y))


class ViViTBackbone(Backbone):
    """Tubelets ``[B, T', H', W', F]`` -> embedded tokens -> spatial then temporal
    Transformer -> pooled features ``[B, width]`` (``keep_map``: every spatial
    token plus its time step's temporal output, ``[B, T', H', W', width]``).

    Attributes:
      depth: ``(spatial, temporal)`` numbers of blocks.
      heads: attention heads (``0``: ``max(1, width // 32)``).
      mlp_ratio: MLP width over the token width.
    """

    depth: tuple[int, int] = (2, 2)
    heads: int = 0
    mlp_ratio: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.stem != "tubelet":
            raise ValueError(
                f"stem={self.stem!r}: the vivit model takes tubelet tokens; "
                "use stem='tubelet'"
            )
        heads = self.heads or max(1, self.width // 32)
        if self.width % heads:
            raise ValueError(f"heads={heads} must divide width={self.width}")
        b, t, h, w, _ = x.shape
        init = nn.initializers.normal(0.02)
        x = nn.Dense(self.width, name="embed")(x).reshape(b, t, h * w, self.width)
        x = x + self.param("pos_space", init, (h * w, self.width))
        for i in range(self.depth[0]):
            block = TransformerBlock(heads, self.mlp_ratio, self.norm, name=f"space{i}")
            x = block(x)
        tokens = _layer_norm(x, self.norm, "norm_space")  # [B, T', H' W', D]
        x = jnp.mean(tokens, axis=2)  # [B, T', D]
        x = x + self.param("pos_time", init, (t, self.width))
        for i in range(self.depth[1]):
            block = TransformerBlock(heads, self.mlp_ratio, self.norm, name=f"time{i}")
            x = block(x)
        x = _layer_norm(x, self.norm, "norm_time")
        if self.keep_map:  # every token, plus its time step's temporal context
            return (tokens + x[:, :, None, :]).reshape(b, t, h, w, self.width)
        return jnp.mean(x, axis=1)  # [B, D]


class ViViT(VideoClassifier):
    """ViViT-style factorised-encoder Transformer (:class:`ViViTBackbone` + head).

    See :class:`~pso_jax.models.base.VideoClassifier` for the common attributes
    and the module docstring for what ``stem``, ``norm`` and ``impl`` mean here.

    Attributes:
      depth: ``(spatial, temporal)`` Transformer blocks (default ``(2, 2)``).
      heads: attention heads (default ``0``: ``max(1, width // 32)``).
      mlp_ratio: MLP width over the token width (default 2).

    >>> import jax, jax.numpy as jnp
    >>> model = ViViT(num_classes=10, width=32, patch=(2, 8, 8))
    >>> x = jnp.zeros((2, 8, 32, 32, 3))
    >>> params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    >>> jax.jit(model.apply)({"params": params}, x).shape
    (2, 10)
    """

    norm: str = "layer"
    depth: tuple[int, int] = (2, 2)
    heads: int = 0
    mlp_ratio: int = 2

    backbone = ViViTBackbone

    def body_fields(self) -> dict:
        return {
            "depth": tuple(self.depth),
            "heads": self.heads,
            "mlp_ratio": self.mlp_ratio,
        }
