"""The registry of reference video models and their common constructor."""

from __future__ import annotations

from pso_jax.models.base import VideoClassifier, check_decoder_grid
from pso_jax.models.c3d import C3D
from pso_jax.models.layers import IMPLS, NORMS
from pso_jax.models.r2plus1d import R2Plus1D
from pso_jax.models.vivit import ViViT
from pso_jax.models.x3d import X3D

MODELS: dict[str, type[VideoClassifier]] = {
    "c3d": C3D,
    "r2plus1d": R2Plus1D,
    "x3d": X3D,
    "vivit": ViViT,
}
DEFAULT_MODEL = "c3d"
STEMS = ("tubelet", "conv")


def make_model(
    name: str = DEFAULT_MODEL,
    num_classes: int = 10,
    *,
    width: int = 16,
    stem: str = "tubelet",
    norm: str = "group",
    impl: str = "fast",
    patch: tuple[int, int, int] = (2, 4, 4),
    map_particles: bool = True,
    decoder_grid: tuple[int, int, int] | None = None,
) -> VideoClassifier:
    """Build a video classifier from :data:`MODELS` by name.

    The model maps clips ``[B, T, H, W, C]`` (float32, channels last) to logits
    ``[B, num_classes]``; ``model.apply({'params': p}, x)`` is the whole forward
    pass (no BatchNorm, nothing mutable), so a swarm evaluates with
    ``jax.vmap(apply_fn, in_axes=(0, None))``. The last Dense layer is named
    ``"head"`` (see :func:`pso_jax.flax_utils.head_mask`).

    Args:
      name: a key of :data:`MODELS`: ``"c3d"``, ``"r2plus1d"``, ``"x3d"`` (3D
        convolutions) or ``"vivit"`` (a factorised-encoder video Transformer,
        :mod:`pso_jax.models.vivit`: ``width`` is its token width, ``patch``
        its tubelet, ``stem`` must be ``"tubelet"``, ``norm`` ``"group"`` or
        ``"layer"`` is LayerNorm, ``impl`` changes nothing).
      num_classes: number of logits.
      width: channels after the stem; later stages use 2x and 4x (x3d: 8x before
        the pool). Multiples of 8 suit GroupNorm and SIMD.
      stem: ``"tubelet"`` (patchify + Dense: a matmul, the fast default) or
        ``"conv"`` (3x3x3 conv at full resolution + max pool).
      norm: ``"group"`` (default), ``"layer"`` or ``"none"``.
      impl: ``"fast"`` (per-particle 2D-conv lowering, default) or ``"xla"``
        (``lax.conv_general_dilated`` as ``nn.Conv``; the vmap baseline). Both
        have the same parameters and outputs.
      patch: tubelet size ``(pt, ph, pw)``; T, H, W must be divisible by it and,
        after it, by the models' 2x pools (c3d, r2plus1d: T/pt, H/ph, W/pw even;
        otherwise the pool drops the remainder).
      map_particles: under vmap over parameters, run the body once per particle
        (``lax.map``; default) instead of as one vmapped graph; see
        :func:`pso_jax.models.layers.call_per_particle`. Same outputs.
      decoder_grid: ``None`` (default) or ``(T, H, W)``: a dense decoder head
        predicting ``num_classes / (T H W)`` values per cell of that grid from
        the body's feature map (:func:`pso_jax.models.base.decode_map`).

    Returns:
      An unbound ``flax.linen.Module``.

    Raises:
      ValueError: on an unknown name, stem, norm or impl, or a ``decoder_grid``
        that is not 3 positive ints sharing ``num_classes`` evenly.

    >>> import jax, jax.numpy as jnp
    >>> model = make_model("r2plus1d", num_classes=10, width=8)
    >>> x = jnp.zeros((2, 8, 32, 32, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> model.apply({"params": params}, x).shape
    (2, 10)
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    for value, allowed, what in (
        (stem, STEMS, "stem"),
        (norm, NORMS, "norm"),
        (impl, IMPLS, "impl"),
    ):
        if value not in allowed:
            raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    grid = None if decoder_grid is None else tuple(decoder_grid)
    check_decoder_grid(grid, num_classes)
    return MODELS[name](
        num_classes=num_classes,
        width=width,
        stem=stem,
        norm=norm,
        impl=impl,
        patch=tuple(patch),
        map_particles=map_particles,
        decoder_grid=grid,
    )
