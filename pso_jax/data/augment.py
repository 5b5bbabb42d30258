"""On-device video augmentation: pure, key-first functions that ``jit`` and ``vmap``.

Every function takes one clip ``[T, H, W, C]`` (float, in [0, 1]) and keeps its
shape unless it says otherwise; :func:`augment_batch` maps over a batch with one
key per clip. None is jitted here: jit the training step that calls them.

Geometric and temporal transformations that change what the label means come
only as ``(video, label) -> (video, label)`` pairs, so a flipped clip can not keep
a stale label: a horizontal flip swaps left/right and cw/ccw (:data:`HFLIP`), a
vertical flip swaps up/down and cw/ccw (:data:`VFLIP`), and playing a clip
backwards swaps every class with its pair (:data:`REVERSED`). The moving-shapes
data is exactly invariant under each of these with its label map (see
:mod:`pso_jax.data.moving_shapes`), so they add no label noise there. Crops,
colour changes and temporal crops or frame drops keep the label: the same map
applies to every frame and frame order is kept (a tight crop can push part of the
actor out of view, though).

>>> import jax, jax.numpy as jnp
>>> video, label = jnp.zeros((8, 32, 32, 3)), jnp.int32(0)  # 0: moves left
>>> hflip(video, label)[1]  # mirrored, it moves right
Array(1, dtype=int32)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pso_jax.data.moving_shapes import HFLIP, REVERSED, VFLIP

__all__ = [
    "augment",
    "augment_batch",
    "brightness_contrast",
    "hflip",
    "map_label",
    "random_brightness_contrast",
    "random_frame_drop",
    "random_hflip",
    "random_resized_crop",
    "random_time_reverse",
    "random_vflip",
    "resized_crop",
    "temporal_crop",
    "time_reverse",
    "vflip",
]


def map_label(label: jax.Array, table: Sequence[int]) -> jax.Array:
    """``table[label]`` for a traced int label (any shape); keeps int32.

    >>> import jax.numpy as jnp
    >>> from pso_jax.data.moving_shapes import REVERSED
    >>> map_label(jnp.array([0, 2, 9]), REVERSED)  # left, up, fade_out reversed
    Array([1, 3, 8], dtype=int32)
    """
    return jnp.asarray(table, jnp.int32)[label]


def hflip(video: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mirror left-right (``x -> W - 1 - x``); the label goes through ``HFLIP``.

    >>> import jax.numpy as jnp
    >>> video = jnp.zeros((8, 4, 4, 3)).at[:, :, 0].set(1.0)  # left column lit
    >>> flipped, label = hflip(video, jnp.int32(4))  # 4: rotate_cw
    >>> float(flipped[0, 0, -1, 0]), int(label)  # right column lit; 5: rotate_ccw
    (1.0, 5)
    """
    return jnp.flip(video, axis=-2), map_label(label, HFLIP)


def vflip(video: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mirror up-down (``y -> H - 1 - y``); the label goes through ``VFLIP``.

    >>> import jax.numpy as jnp
    >>> video = jnp.zeros((8, 4, 4, 3)).at[:, 0].set(1.0)  # top row lit
    >>> flipped, label = vflip(video, jnp.int32(2))  # 2: up
    >>> float(flipped[0, -1, 0, 0]), int(label)  # bottom row lit; 3: down
    (1.0, 3)
    """
    return jnp.flip(video, axis=-3), map_label(label, VFLIP)


def time_reverse(video: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Play the clip backwards (axis ``-4``); the label goes through ``REVERSED``.

    >>> import jax.numpy as jnp
    >>> video = jnp.arange(4.0).reshape(4, 1, 1, 1)  # frame t has the value t
    >>> backwards, label = time_reverse(video, jnp.int32(6))  # 6: grow
    >>> backwards[:, 0, 0, 0].tolist(), int(label)  # 7: shrink
    ([3.0, 2.0, 1.0, 0.0], 7)
    """
    return jnp.flip(video, axis=-4), map_label(label, REVERSED)


def _random_apply(key, fn, video, label, prob):
    apply = jax.random.bernoulli(key, prob)
    new_video, new_label = fn(video, label)
    return (
        jnp.where(apply, new_video, video),
        jnp.where(apply, new_label, jnp.asarray(label, jnp.int32)),
    )


def random_hflip(key, video, label, prob: float = 0.5):
    """:func:`hflip` with probability ``prob``; returns ``(video, label)``.

    >>> import jax, jax.numpy as jnp
    >>> video, label = jnp.zeros((8, 16, 16, 3)), jnp.int32(0)  # 0: left
    >>> _, always = random_hflip(jax.random.key(0), video, label, prob=1.0)
    >>> _, never = random_hflip(jax.random.key(0), video, label, prob=0.0)
    >>> int(always), int(never)
    (1, 0)
    """
    return _random_apply(key, hflip, video, label, prob)


def random_vflip(key, video, label, prob: float = 0.5):
    """:func:`vflip` with probability ``prob``; returns ``(video, label)``.

    >>> import jax, jax.numpy as jnp
    >>> video, label = jnp.zeros((8, 16, 16, 3)), jnp.int32(2)  # 2: up
    >>> _, flipped = random_vflip(jax.random.key(0), video, label, prob=1.0)
    >>> int(flipped)  # 3: down
    3
    """
    return _random_apply(key, vflip, video, label, prob)


def random_time_reverse(key, video, label, prob: float = 0.5):
    """:func:`time_reverse` with probability ``prob``; returns ``(video, label)``.

    >>> import jax, jax.numpy as jnp
    >>> video, label = jnp.zeros((8, 16, 16, 3)), jnp.int32(8)  # 8: fade_in
    >>> _, new = random_time_reverse(jax.random.key(0), video, label, prob=1.0)
    >>> int(new)  # 9: fade_out
    9
    """
    return _random_apply(key, time_reverse, video, label, prob)


def resized_crop(
    video: jax.Array, top, left, height, width, method: str = "linear"
) -> jax.Array:
    """Crop the box ``[top, top + height) x [left, left + width)`` (pixels, may
    be fractional and traced) from every frame and resize it back to ``H x W``.

    Args:
        video: ``[T, H, W, C]`` float.
        top, left, height, width: the box, in input pixels.
        method: interpolation of ``jax.image.scale_and_translate``.

    Returns:
        ``[T, H, W, C]``, same dtype.

    >>> import jax.numpy as jnp
    >>> video = jnp.ones((2, 8, 8, 3))
    >>> zoomed = resized_crop(video, top=2, left=2, height=4, width=4)  # centre, 2x
    >>> zoomed.shape, bool(jnp.allclose(zoomed, 1.0))
    ((2, 8, 8, 3), True)
    """
    H, W = video.shape[-3:-1]
    scale = jnp.stack([H / height, W / width]).astype(jnp.float32)
    translation = -jnp.stack([top, left]).astype(jnp.float32) * scale
    out = jax.image.scale_and_translate(
        video, video.shape, (1, 2), scale, translation, method=method
    )
    return out.astype(video.dtype)


def random_resized_crop(
    key: jax.Array,
    video: jax.Array,
    *,
    area: tuple[float, float] = (0.6, 1.0),
    aspect: tuple[float, float] = (0.8, 1.25),
) -> jax.Array:
    """Crop one random box from all frames (the same box in time) and resize it
    back to ``H x W``.

    Args:
        key: a ``jax.random`` key.
        video: ``[T, H, W, C]`` float.
        area: range of the box's area as a fraction of the frame.
        aspect: range of the box's width/height ratio (log-uniform).

    Returns:
        ``[T, H, W, C]``.

    >>> import jax, jax.numpy as jnp
    >>> random_resized_crop(jax.random.key(0), jnp.ones((2, 8, 8, 3))).shape
    (2, 8, 8, 3)
    """
    H, W = video.shape[-3:-1]
    key_area, key_aspect, key_y, key_x = jax.random.split(key, 4)
    frac = jax.random.uniform(key_area, (), minval=area[0], maxval=area[1])
    log_aspect = jax.random.uniform(
        key_aspect, (), minval=jnp.log(aspect[0]), maxval=jnp.log(aspect[1])
    )
    ratio = jnp.exp(log_aspect)
    height = jnp.minimum(H * jnp.sqrt(frac / ratio), H)
    width = jnp.minimum(W * jnp.sqrt(frac * ratio), W)
    top = jax.random.uniform(key_y, ()) * (H - height)
    left = jax.random.uniform(key_x, ()) * (W - width)
    return resized_crop(video, top, left, height, width)


def brightness_contrast(video: jax.Array, brightness, contrast) -> jax.Array:
    """``(video - m) * contrast + m + brightness``, clipped to [0, 1].

    ``m`` is the mean of the whole clip, so every frame gets the same affine map
    and brightness changes over time (fades) keep their direction.

    >>> import jax.numpy as jnp
    >>> video = jnp.array([0.2, 0.4, 0.6]).reshape(3, 1, 1, 1)  # mean 0.4
    >>> out = brightness_contrast(video, brightness=0.1, contrast=2.0)
    >>> [round(v, 4) for v in out[:, 0, 0, 0].tolist()]
    [0.1, 0.5, 0.9]
    """
    mean = jnp.mean(video)
    return jnp.clip((video - mean) * contrast + mean + brightness, 0.0, 1.0)


def random_brightness_contrast(
    key: jax.Array,
    video: jax.Array,
    *,
    brightness: float = 0.1,
    contrast: tuple[float, float] = (0.75, 1.25),
) -> jax.Array:
    """:func:`brightness_contrast` with a shift uniform in ``[-brightness,
    brightness]`` and a contrast factor uniform in ``contrast``.

    >>> import jax, jax.numpy as jnp
    >>> out = random_brightness_contrast(jax.random.key(0), jnp.full((2, 4, 4, 3), 0.5))
    >>> out.shape, bool((out >= 0).all() & (out <= 1).all())
    ((2, 4, 4, 3), True)
    """
    key_b, key_c = jax.random.split(key)
    shift = jax.random.uniform(key_b, (), minval=-brightness, maxval=brightness)
    factor = jax.random.uniform(key_c, (), minval=contrast[0], maxval=contrast[1])
    return brightness_contrast(video, shift, factor).astype(video.dtype)


def temporal_crop(key: jax.Array, video: jax.Array, num_frames: int) -> jax.Array:
    """Take ``num_frames`` consecutive frames at a random start (temporal jitter).

    Args:
        key: a ``jax.random`` key.
        video: ``[T, H, W, C]`` with ``T >= num_frames``.
        num_frames: output length (static).

    Returns:
        ``[num_frames, H, W, C]``.

    >>> import jax, jax.numpy as jnp
    >>> video = jnp.arange(8.0).reshape(8, 1, 1, 1)  # frame t has the value t
    >>> clip = temporal_crop(jax.random.key(0), video, 4)
    >>> clip.shape, bool((jnp.diff(clip[:, 0, 0, 0]) == 1).all())  # consecutive
    ((4, 1, 1, 1), True)
    """
    T = video.shape[0]
    if num_frames > T:
        raise ValueError(f"num_frames={num_frames} exceeds the clip's {T} frames")
    start = jax.random.randint(key, (), 0, T - num_frames + 1)
    return jax.lax.dynamic_slice_in_dim(video, start, num_frames, axis=0)


def random_frame_drop(key: jax.Array, video: jax.Array, num_frames: int) -> jax.Array:
    """Keep ``num_frames`` random frames, in their original order.

    The output length is fixed; the motion keeps its direction (only its speed
    varies), so every moving-shapes label stays valid.

    Args:
        key: a ``jax.random`` key.
        video: ``[T, H, W, C]`` with ``T >= num_frames``.
        num_frames: output length (static).

    Returns:
        ``[num_frames, H, W, C]``.

    >>> import jax, jax.numpy as jnp
    >>> video = jnp.arange(8.0).reshape(8, 1, 1, 1)  # frame t has the value t
    >>> kept = random_frame_drop(jax.random.key(0), video, 5)[:, 0, 0, 0]
    >>> kept.shape, bool((jnp.diff(kept) > 0).all())  # in their original order
    ((5,), True)
    """
    T = video.shape[0]
    if num_frames > T:
        raise ValueError(f"num_frames={num_frames} exceeds the clip's {T} frames")
    keep = jnp.sort(jax.random.choice(key, T, (num_frames,), replace=False))
    return jnp.take(video, keep, axis=0)


def augment(
    key: jax.Array,
    video: jax.Array,
    label: jax.Array,
    *,
    crop_area: tuple[float, float] | None = (0.6, 1.0),
    brightness: float = 0.1,
    contrast: tuple[float, float] = (0.75, 1.25),
    flip_h: bool = True,
    flip_v: bool = False,
    reverse: bool = False,
    num_frames: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """A standard chain: temporal crop, resized crop, colour, label-aware flips.

    Args:
        key: a ``jax.random`` key.
        video: ``[T, H, W, C]`` float in [0, 1].
        label: int scalar.
        crop_area: area range of :func:`random_resized_crop`; ``None`` skips it.
        brightness: range of :func:`random_brightness_contrast`'s shift.
        contrast: range of its contrast factor.
        flip_h: random horizontal flip (labels through ``HFLIP``).
        flip_v: random vertical flip (labels through ``VFLIP``).
        reverse: random time reversal (labels through ``REVERSED``).
        num_frames: if set, a :func:`temporal_crop` to this many frames.

    Returns:
        ``(video, label)``: ``[T', H, W, C]`` and int32.

    >>> import jax, jax.numpy as jnp
    >>> video, label = jnp.zeros((8, 16, 16, 3)), 0
    >>> out, new_label = augment(jax.random.key(0), video, label, num_frames=4)
    >>> out.shape, new_label.dtype
    ((4, 16, 16, 3), dtype('int32'))
    """
    keys = jax.random.split(key, 6)
    label = jnp.asarray(label, jnp.int32)
    if num_frames is not None:
        video = temporal_crop(keys[0], video, num_frames)
    if crop_area is not None:
        video = random_resized_crop(keys[1], video, area=crop_area)
    video = random_brightness_contrast(
        keys[2], video, brightness=brightness, contrast=contrast
    )
    if flip_h:
        video, label = random_hflip(keys[3], video, label)
    if flip_v:
        video, label = random_vflip(keys[4], video, label)
    if reverse:
        video, label = random_time_reverse(keys[5], video, label)
    return video, label


def augment_batch(
    key: jax.Array, videos: jax.Array, labels: jax.Array, **kwargs
) -> tuple[jax.Array, jax.Array]:
    """:func:`augment` over a batch ``[B, T, H, W, C]``, one key per clip.

    >>> videos, labels = jnp.zeros((4, 8, 16, 16, 3)), jnp.zeros(4, jnp.int32)
    >>> out, new = jax.jit(augment_batch)(jax.random.key(0), videos, labels)
    >>> out.shape, new.dtype
    ((4, 8, 16, 16, 3), dtype('int32'))
    """
    keys = jax.random.split(key, videos.shape[0])
    return jax.vmap(lambda k, v, y: augment(k, v, y, **kwargs))(keys, videos, labels)
