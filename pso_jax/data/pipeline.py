"""Input pipelines for video: grain loaders, clip sampling and multi-scale batches.

The host side is a ``grain.MapDataset`` over a random-access TFDS data source
(``array_record``), so it needs no TensorFlow: shuffle with an explicit seed, an
optional random temporal window per example, batching with ``drop_remainder`` (every
batch has the same shape, so a jitted step compiles once) and conversion of the
uint8 frames to float32 in [0, 1] (not mean/std normalised; do that in the model
if wanted).

On the device side, :func:`sample_clips` cuts sub-clips at several granularities
(clip length x frame stride), each granularity with its own fixed shape, and
:func:`resize_video` resizes a batch to one of a few fixed spatial scales: a jitted
step then compiles once per granularity or scale and never again.

>>> import numpy as np
>>> videos, labels = moving_shapes.generate_clips(0, 8, "small")
>>> source = [{"video": v, "label": l} for v, l in zip(videos, labels)]
>>> batch = next(iter(make_dataset(source, batch_size=4, seed=0)))
>>> batch["video"].shape, batch["video"].dtype, batch["label"].dtype
((4, 8, 32, 32, 3), dtype('float32'), dtype('int32'))
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np

from pso_jax.data import moving_shapes

__all__ = [
    "Clips",
    "DEFAULT_SCALES",
    "choose_scale",
    "granularities",
    "load_moving_shapes",
    "make_dataset",
    "make_loader",
    "multiscale_batches",
    "resize_video",
    "resize_video_np",
    "sample_clips",
    "split_clips",
    "to_float",
]

# Spatial scales (height, width) for the 32x32 `small` config.
DEFAULT_SCALES = ((32, 32), (24, 24), (16, 16))


def load_moving_shapes(
    config: str | moving_shapes.MovingShapesConfig = "small",
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
):
    """Return a data source of the moving-shapes dataset, preparing it if absent.

    The first call generates and writes the dataset under ``data_dir`` (about 2 s
    for ``small``, a minute for ``default``); later calls only open it.

    Args:
        config: ``"small"``, ``"default"`` or a ``MovingShapesConfig``.
        split: ``"train"``, ``"validation"`` or ``"test"`` (TFDS slicing such as
            ``"train[:10%]"`` works too).
        data_dir: TFDS data directory; ``None`` uses TFDS's default
            (``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).

    Returns:
        A random-access source (``len``, ``[i]``) of dicts ``{"video": uint8
        [T, H, W, 3], "label": int}``.

    >>> import contextlib, dataclasses, io, tempfile
    >>> tiny = dataclasses.replace(
    ...     moving_shapes.CONFIGS["small"], name="tiny", num_train=4, num_validation=2,
    ...     num_test=2,
    ... )
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with contextlib.redirect_stdout(io.StringIO()):  # TFDS's progress
    ...         source = load_moving_shapes(tiny, split="validation", data_dir=tmp)
    ...     print(len(source), source[0]["video"].shape)
    2 (8, 32, 32, 3)
    """
    builder = moving_shapes.MovingShapes(
        config=moving_shapes.get_config(config), data_dir=data_dir
    )
    builder.download_and_prepare()  # A no-op when already prepared.
    return builder.as_data_source(split=split)


class _Example(grain.transforms.RandomMap):
    """Pick the video (and label), optionally a random window of ``num_frames``."""

    def __init__(self, video_key, label_key, num_frames):
        self.video_key, self.label_key, self.num_frames = (
            video_key,
            label_key,
            num_frames,
        )

    def random_map(self, record, rng: np.random.Generator):
        video = np.asarray(record[self.video_key])  # [T, H, W, C] uint8
        if self.num_frames is not None:
            length = video.shape[0]
            start = rng.integers(max(length - self.num_frames, 0) + 1)
            # Clips shorter than num_frames repeat their last frame.
            index = np.minimum(start + np.arange(self.num_frames), length - 1)
            video = video[index]
        if video.ndim == 3:  # [T, H, W]: grey scale without a channel axis.
            video = video[..., None]
        example = {"video": video}
        if self.label_key is not None:
            example["label"] = np.int32(record[self.label_key])
        return example


def to_float(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Convert ``batch["video"]`` from uint8 to float32 in [0, 1]; keep the rest.

    >>> import numpy as np
    >>> batch = {"video": np.full((1, 2, 2, 2, 3), 255, np.uint8), "label": np.zeros(1)}
    >>> out = to_float(batch)
    >>> out["video"].dtype, float(out["video"].max()), out["label"] is batch["label"]
    (dtype('float32'), 1.0, True)
    """
    video = np.asarray(batch["video"], np.float32)
    video *= np.float32(1 / 255)
    return {**batch, "video": video}


def make_dataset(
    source,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    num_frames: int | None = None,
    drop_remainder: bool = True,
    float_video: bool = True,
    video_key: str = "video",
    label_key: str | None = "label",
) -> grain.MapDataset:
    """Build a batched ``grain.MapDataset`` over a random-access source.

    Order of operations: shuffle (a new permutation each epoch), repeat, pick the
    video and label (and a random window of ``num_frames`` frames), batch, convert
    to float. Everything random derives from ``seed``, so the same seed gives the
    same batches.

    Args:
        source: anything with ``len`` and ``[i]`` returning a dict, e.g. a TFDS
            data source from :func:`load_moving_shapes` or a list.
        batch_size: examples per batch, ``B``.
        seed: seed of the shuffle and of the temporal windows.
        shuffle: shuffle the examples.
        num_epochs: passes over the data; ``None`` repeats forever.
        num_frames: if set, take a window of this many consecutive frames at a
            random start (temporal jitter on the host; shorter videos repeat their
            last frame), so videos of different lengths batch together.
        drop_remainder: drop a last, smaller batch. Keep it ``True`` under ``jit``:
            a ragged batch would compile the step a second time.
        float_video: convert the video to float32 in [0, 1]; ``False`` keeps uint8
            (four times less to copy to the device; convert there).
        video_key: the source's video feature.
        label_key: the source's label feature, or ``None`` for unlabelled data.

    Returns:
        A ``grain.MapDataset`` of dicts ``{"video": [B, T, H, W, C] float32 (or
        uint8), "label": [B] int32}``.

    >>> videos, labels = moving_shapes.generate_clips(0, 10, "small")
    >>> source = [{"video": v, "label": y} for v, y in zip(videos, labels)]
    >>> ds = make_dataset(source, batch_size=4, seed=0, num_frames=6)
    >>> [b["video"].shape for b in ds]  # 10 clips: two full batches, remainder dropped
    [(4, 6, 32, 32, 3), (4, 6, 32, 32, 3)]
    """
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.random_map(_Example(video_key, label_key, num_frames), seed=seed)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if float_video:
        ds = ds.map(to_float)
    return ds


def make_loader(source, *, worker_count: int = 0, **kwargs) -> Iterable[dict]:
    """Return an iterable of batches; :func:`make_dataset` documents ``kwargs``.

    Args:
        source: a random-access source, as for :func:`make_dataset`.
        worker_count: grain worker processes; ``0`` reads in this process, which
            is fastest for the small in-memory records of moving shapes.
        **kwargs: forwarded to :func:`make_dataset` (``batch_size`` and ``seed``
            are required).

    Returns:
        A ``grain.IterDataset`` (iterable; its iterators can be checkpointed).

    >>> videos, labels = moving_shapes.generate_clips(0, 8, "small")
    >>> source = [{"video": v, "label": y} for v, y in zip(videos, labels)]
    >>> loader = make_loader(source, batch_size=4, seed=0, num_epochs=None)
    >>> it = iter(loader)
    >>> [next(it)["label"].shape for _ in range(3)]  # repeats forever
    [(4,), (4,), (4,)]
    """
    ds = make_dataset(source, **kwargs).to_iter_dataset()
    if worker_count > 0:
        # grain 0.2.18 reads an absl flag in mp_prefetch and fails unless absl's
        # flags are parsed, which only absl.app programs do (google/grain#1355,
        # fixed after 0.2.18). Treat them as parsed (at their defaults) then.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=worker_count)
        ds = ds.mp_prefetch(options)
    return ds


class Clips(NamedTuple):
    """Sub-clips of one granularity.

    Attributes:
        video: ``[N, L, H, W, C]``, frames ``frame_index`` of the input video.
        frame_index: ``[N, L]`` int32, the frames taken, ``start + stride * l``.
    """

    video: jax.Array
    frame_index: jax.Array


def granularities(
    lengths: Sequence[int], strides: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """All ``(length, stride)`` pairs, in the order :func:`sample_clips` returns.

    >>> granularities((4, 8), (1, 2))
    ((4, 1), (4, 2), (8, 1), (8, 2))
    """
    return tuple((length, stride) for length in lengths for stride in strides)


def _check_span(num_frames: int, length: int, stride: int) -> int:
    span = (length - 1) * stride + 1
    if length < 1 or stride < 1 or span > num_frames:
        raise ValueError(
            f"a clip of {length} frames with stride {stride} spans {span} frames, "
            f"more than the video's {num_frames}"
        )
    return span


def sample_clips(
    key: jax.Array,
    video: jax.Array,
    *,
    lengths: Sequence[int] = (4, 8),
    strides: Sequence[int] = (1, 2),
    num_clips: int = 1,
) -> tuple[Clips, ...]:
    """Sample sub-clips of a video at several temporal granularities.

    For each granularity ``(L, s)`` of ``granularities(lengths, strides)``, draw
    ``num_clips`` start frames uniformly among those that fit and take frames
    ``start, start + s, ..., start + (L - 1) s``. Each granularity has its own fixed
    output shape; the starts are traced, so this runs under ``jit`` and ``vmap``
    (use ``jax.vmap`` with one key per video for a batch).

    Args:
        key: a ``jax.random`` key.
        video: ``[T, H, W, C]``, any dtype; no particle axis.
        lengths: clip lengths ``L`` (frames).
        strides: frame strides ``s``.
        num_clips: clips per granularity, ``N``.

    Returns:
        One :class:`Clips` per granularity, ``video`` ``[N, L, H, W, C]``.

    Raises:
        ValueError: if a granularity spans more than ``T`` frames.

    >>> video = jnp.arange(16.0).reshape(16, 1, 1, 1)
    >>> clips = sample_clips(jax.random.key(0), video, lengths=(4,), strides=(1, 3))
    >>> [c.video.shape for c in clips]
    [(1, 4, 1, 1, 1), (1, 4, 1, 1, 1)]
    >>> bool((clips[1].video[0, :, 0, 0, 0] == clips[1].frame_index[0]).all())
    True
    """
    num_frames = video.shape[0]
    pairs = granularities(lengths, strides)
    keys = jax.random.split(key, len(pairs))
    out = []
    for key_g, (length, stride) in zip(keys, pairs, strict=True):
        span = _check_span(num_frames, length, stride)
        start = jax.random.randint(key_g, (num_clips, 1), 0, num_frames - span + 1)
        index = start + stride * jnp.arange(length)  # [N, L]
        out.append(Clips(jnp.take(video, index, axis=0), index.astype(jnp.int32)))
    return tuple(out)


def split_clips(
    video: jax.Array, *, length: int, stride: int = 1, hop: int | None = None
) -> Clips:
    """Cut a video into every sub-clip of one granularity, ``hop`` frames apart.

    Args:
        video: ``[T, H, W, C]``.
        length: frames per clip, ``L``.
        stride: frame stride within a clip.
        hop: frames between the starts of consecutive clips; defaults to the span
            ``(L - 1) * stride + 1`` (non-overlapping clips).

    Returns:
        :class:`Clips` with ``video`` ``[N, L, H, W, C]``, where
        ``N = (T - span) // hop + 1``.

    >>> import jax.numpy as jnp
    >>> clips = split_clips(jnp.zeros((16, 2, 2, 3)), length=4, stride=2)  # span 7
    >>> clips.video.shape, clips.frame_index.tolist()
    ((2, 4, 2, 2, 3), [[0, 2, 4, 6], [7, 9, 11, 13]])
    """
    num_frames = video.shape[0]
    span = _check_span(num_frames, length, stride)
    hop = span if hop is None else hop
    start = jnp.arange(0, num_frames - span + 1, hop)[:, None]
    index = start + stride * jnp.arange(length)
    return Clips(jnp.take(video, index, axis=0), index.astype(jnp.int32))


def resize_video(
    video: jax.Array, size: tuple[int, int], method: str = "linear"
) -> jax.Array:
    """Resize the frames of a video (or batch of videos) to ``size`` on the device.

    ``size`` is static: under ``jit`` each distinct size is one compilation.

    Args:
        video: ``[..., H, W, C]`` float, e.g. ``[B, T, H, W, C]``.
        size: ``(height, width)`` of the output.
        method: a ``jax.image.resize`` method; ``"linear"`` antialiases when
            shrinking.

    Returns:
        ``[..., height, width, C]``, same dtype.

    >>> import jax.numpy as jnp
    >>> resize_video(jnp.zeros((2, 8, 32, 32, 3)), (16, 24)).shape
    (2, 8, 16, 24, 3)
    """
    shape = (*video.shape[:-3], *size, video.shape[-1])
    return jax.image.resize(video, shape, method=method).astype(video.dtype)


@functools.lru_cache(maxsize=64)
def _resize_matrix(size_in: int, size_out: int, method: str) -> np.ndarray:
    """``[size_out, size_in]`` matrix of ``jax.image.resize`` along one axis."""
    # jax.image.resize is linear and separable: resizing the identity gives it.
    eye = jnp.eye(size_in, dtype=jnp.float32)
    return np.asarray(jax.image.resize(eye, (size_in, size_out), method=method)).T


def resize_video_np(
    video: np.ndarray, size: tuple[int, int], method: str = "linear"
) -> np.ndarray:
    """Host (NumPy) twin of :func:`resize_video`, for the input pipeline.

    Two small matrix products, equal to :func:`resize_video` up to float rounding.

    >>> import jax.numpy as jnp, numpy as np
    >>> video = np.random.default_rng(0).random((8, 32, 32, 3), np.float32)
    >>> host = resize_video_np(video, (16, 16))
    >>> device = np.asarray(resize_video(jnp.asarray(video), (16, 16)))
    >>> host.shape, bool(np.allclose(host, device, atol=1e-5))
    ((8, 16, 16, 3), True)
    """
    height, width = video.shape[-3:-1]
    if (height, width) == tuple(size):
        return video
    rows = _resize_matrix(height, size[0], method)
    cols = _resize_matrix(width, size[1], method)
    out = np.einsum("oh,...hwc->...owc", rows, video, optimize=True)
    out = np.einsum("pw,...owc->...opc", cols, out, optimize=True)
    return out.astype(video.dtype, copy=False)


def choose_scale(
    seed: int, step: int, scales: Sequence[tuple[int, int]] = DEFAULT_SCALES
) -> tuple[int, int]:
    """The spatial scale of training step ``step``: uniform, reproducible.

    A host-side choice (a NumPy generator seeded with ``(seed, step)``), because
    the scale fixes array shapes and so must be static under ``jit``.

    >>> choose_scale(0, 5) in DEFAULT_SCALES, choose_scale(0, 5) == choose_scale(0, 5)
    (True, True)
    """
    rng = np.random.default_rng([seed, step])
    return tuple(scales[rng.integers(len(scales))])


def multiscale_batches(
    batches: Iterable[Mapping[str, Any]],
    *,
    seed: int,
    scales: Sequence[tuple[int, int]] = DEFAULT_SCALES,
) -> Iterator[dict[str, Any]]:
    """Resize each batch's video to the scale :func:`choose_scale` picks for it.

    Every batch has one of ``len(scales)`` fixed shapes, so a jitted step over these
    batches compiles at most once per scale. The resizing runs on the host
    (:func:`resize_video_np`); to resize on the device instead, call
    :func:`resize_video` inside the jitted step with the size as a static argument.

    Args:
        batches: an iterable of dicts with ``"video"`` ``[B, T, H, W, C]`` float.
        seed: seed of the scale choice.
        scales: ``(height, width)`` pairs.

    Yields:
        The batches, ``video`` resized to ``[B, T, h, w, C]``.

    >>> import numpy as np
    >>> batches = [{"video": np.zeros((2, 4, 32, 32, 3), np.float32)}] * 6
    >>> shapes = {b["video"].shape[2:4] for b in multiscale_batches(batches, seed=0)}
    >>> shapes <= set(DEFAULT_SCALES)
    True
    """
    for step, batch in enumerate(batches):
        size = choose_scale(seed, step, scales)
        yield {**batch, "video": resize_video_np(batch["video"], size)}
