"""Moving shapes: a procedural video classification dataset, as a TFDS builder.

Each clip shows one *actor* shape (circle, square or triangle; random colour, size,
position and angle) on a noisy textured background, with one or two smaller
*distractor* shapes doing a random walk behind it. The label is the motion of the
actor, and the ten classes come in time-reversed pairs:

======  ==============  ======  ==============
label   motion          label   motion
======  ==============  ======  ==============
0       move left       1       move right
2       move up         3       move down
4       rotate cw       5       rotate ccw
6       grow            7       shrink
8       fade in         9       fade out
======  ==============  ======  ==============

Up is towards row 0 and clockwise is as seen on screen. Circles are drawn in two
tones so that their rotation is visible. A fade changes the actor's opacity, i.e.
its brightness against the background.

Every clip is drawn for the first class of its pair, then, each with probability
1/2 and independently, reversed in time, flipped left-right and flipped up-down,
with the label mapped through :data:`REVERSED`, :data:`HFLIP` and :data:`VFLIP`.
The data distribution is therefore *exactly* invariant under these three
transformations with their label maps: a clip of class ``c`` played backwards is
distributed as a clip of class ``REVERSED[c]``. In particular the time-averaged
frame, a frame taken at a uniformly random time, or any other statistic that
ignores the order of the frames, carries no information about which class of a
pair a clip belongs to; only the order of the frames does. (A frame at a *fixed*
time index does: the first frame of "grow" shows a smaller actor than the first
frame of "shrink".)

Generation is procedural (no download) and deterministic: clip ``i`` of a stream is
drawn from ``np.random.default_rng([*seed, i])``, so the same seed gives the same
bytes on one platform (NumPy's vectorised ``sin`` may round differently on other
CPUs, which can move a rare pixel by one grey level).

>>> from pso_jax.data import moving_shapes
>>> videos, labels = moving_shapes.generate_clips(0, 4, "small")
>>> videos.shape, videos.dtype, labels.shape
((4, 8, 32, 32, 3), dtype('uint8'), (4,))
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

__all__ = [
    "CONFIGS",
    "HFLIP",
    "LABEL_NAMES",
    "NUM_CLASSES",
    "REVERSED",
    "SHAPES",
    "SPLITS",
    "VFLIP",
    "MovingShapes",
    "MovingShapesConfig",
    "generate_clips",
    "get_config",
    "split_seed",
]

NUM_CLASSES = 10
LABEL_NAMES = (
    "left",
    "right",
    "up",
    "down",
    "rotate_cw",
    "rotate_ccw",
    "grow",
    "shrink",
    "fade_in",
    "fade_out",
)
# Label of a clip played backwards.
REVERSED = (1, 0, 3, 2, 5, 4, 7, 6, 9, 8)
# Label of a clip mirrored left-right (x -> W - 1 - x): left<->right, cw<->ccw.
HFLIP = (1, 0, 2, 3, 5, 4, 6, 7, 8, 9)
# Label of a clip mirrored up-down (y -> H - 1 - y): up<->down, cw<->ccw.
VFLIP = (0, 1, 3, 2, 5, 4, 6, 7, 8, 9)
SHAPES = ("circle", "square", "triangle")
SPLITS = ("train", "validation", "test")

# Motion magnitudes, in units of L = min(height, width) pixels unless stated.
_ACTOR_RADIUS = (0.11, 0.17)  # mid-clip radius
_TRANSLATION = (0.25, 0.4)  # total displacement over the clip
_ROTATION = (0.5 * math.pi, 0.8 * math.pi)  # total angle (rad) over the clip
_GROWTH = (1.6, 2.2)  # ratio of last to first radius
_FADE = (0.55, 0.8)  # change of opacity over the clip
_OPACITY_MIN = 0.1
_STATIC_OPACITY = (0.75, 1.0)  # opacity when the actor does not fade
_DISTRACTOR_RADIUS = (0.07, 0.11)
_DISTRACTOR_STEP = 0.04  # std of each random-walk step, per axis
_DARK_TONE = 0.55  # brightness of the darker half of a two-tone circle


@dataclasses.dataclass(eq=False)
class MovingShapesConfig(tfds.core.BuilderConfig):
    """Configuration of the moving-shapes dataset.

    Attributes:
        num_frames: frames per clip, ``T`` (at least 2).
        height: frame height ``H`` in pixels.
        width: frame width ``W`` in pixels.
        num_train: clips in the ``train`` split.
        num_validation: clips in the ``validation`` split.
        num_test: clips in the ``test`` split.
        seed: base seed; the splits use :func:`split_seed` of it.
        num_distractors: inclusive range of the number of distractor shapes.
        noise_std: std of the per-frame pixel noise (uniform, independent per
            pixel, channel and frame), on the [0, 1] scale.
        clean: draw the actor alone on black: no texture, noise or distractors
            (for tests of the label semantics).
    """

    num_frames: int = 16
    height: int = 64
    width: int = 64
    num_train: int = 5000
    num_validation: int = 1000
    num_test: int = 1000
    seed: int = 0
    num_distractors: tuple[int, int] = (1, 2)
    noise_std: float = 0.03
    clean: bool = False

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape of one clip, ``(T, H, W, 3)``."""
        return (self.num_frames, self.height, self.width, 3)

    def split_size(self, split: str) -> int:
        """Number of clips in ``split``."""
        return {
            "train": self.num_train,
            "validation": self.num_validation,
            "test": self.num_test,
        }[split]


CONFIGS = {
    "small": MovingShapesConfig(
        name="small",
        description="8 frames of 32x32 RGB; 2000/500/500 clips. For tests and CI.",
        num_frames=8,
        height=32,
        width=32,
        num_train=2000,
        num_validation=500,
        num_test=500,
    ),
    "default": MovingShapesConfig(
        name="default",
        description="16 frames of 64x64 RGB; 5000/1000/1000 clips (1.1 GB).",
    ),
}


def get_config(config: str | MovingShapesConfig) -> MovingShapesConfig:
    """Return the config named ``config`` (``"small"``, ``"default"``) or itself.

    Raises:
        ValueError: for an unknown name.

    >>> cfg = get_config("small")
    >>> cfg.shape, cfg.num_train
    ((8, 32, 32, 3), 2000)
    >>> get_config(cfg) is cfg
    True
    """
    if isinstance(config, MovingShapesConfig):
        return config
    try:
        return CONFIGS[config]
    except KeyError:
        raise ValueError(
            f"Unknown moving_shapes config {config!r}; choose one of "
            f"{sorted(CONFIGS)} or pass a MovingShapesConfig."
        ) from None


def split_seed(config: str | MovingShapesConfig, split: str) -> tuple[int, int]:
    """Seed that :class:`MovingShapes` passes to :func:`generate_clips` for a split.

    ``generate_clips(split_seed(cfg, "train"), cfg.num_train, cfg)`` reproduces the
    prepared ``train`` split, clip for clip and byte for byte.

    >>> split_seed("small", "validation")
    (0, 2)
    >>> videos, labels = generate_clips(split_seed("small", "validation"), 2, "small")
    >>> videos.shape  # the first two clips of the prepared validation split
    (2, 8, 32, 32, 3)
    """
    return (get_config(config).seed, SPLITS.index(split) + 1)


def generate_clips(
    seed: int | Sequence[int],
    num: int,
    config: str | MovingShapesConfig = "small",
    *,
    start: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``num`` labelled clips on the host, without TFDS.

    Clip ``i`` depends only on ``seed`` and ``start + i`` (it is drawn from
    ``np.random.default_rng([*seed, start + i])``), so a stream can be generated
    in chunks.

    Args:
        seed: a non-negative int or a sequence of them.
        num: number of clips.
        config: a config name or a :class:`MovingShapesConfig`.
        start: index of the first clip in the stream.

    Returns:
        ``(videos, labels)``: uint8 ``[num, T, H, W, 3]`` and int64 ``[num]`` in
        ``[0, 10)``.

    >>> videos, labels = generate_clips(0, 3, "small")
    >>> videos.shape, videos.dtype, labels.tolist()
    ((3, 8, 32, 32, 3), dtype('uint8'), [5, 7, 4])
    >>> later, _ = generate_clips(0, 1, "small", start=2)  # clip 2 of the stream
    >>> bool((later[0] == videos[2]).all())
    True
    """
    cfg = get_config(config)
    seed = (seed,) if isinstance(seed, (int, np.integer)) else tuple(seed)
    videos = np.empty((num, *cfg.shape), np.uint8)
    labels = np.empty((num,), np.int64)
    y, x = np.mgrid[0 : cfg.height, 0 : cfg.width].astype(np.float32) + 0.5
    for i in range(num):
        rng = np.random.default_rng([*seed, start + i])
        labels[i] = _render_clip(rng, cfg, x, y, out=videos[i])
    return videos, labels


def _hsv_colour(rng: np.random.Generator, sat, val) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*sat), rng.uniform(*val))
    return np.asarray(rgb, np.float32)


def _uniform_noise(rng: np.random.Generator, std: float, shape) -> np.ndarray:
    """Zero-mean uniform noise with standard deviation ``std`` (float32)."""
    # Uniform rather than Gaussian: drawing it is 6x faster, which matters here.
    noise = rng.random(shape, dtype=np.float32) - np.float32(0.5)
    noise *= np.float32(std * math.sqrt(12.0))
    return noise


def _background(rng: np.random.Generator, L: int, x, y) -> np.ndarray:
    """Static texture: a base colour, three plane waves and pixel noise."""
    base = _hsv_colour(rng, (0.0, 0.4), (0.25, 0.5))
    img = np.broadcast_to(base, (*x.shape, 3)).astype(np.float32)
    for _ in range(3):
        freq = rng.uniform(1.0, 5.0) * 2 * math.pi / L
        angle = rng.uniform(0, 2 * math.pi)
        phase = rng.uniform(0, 2 * math.pi)
        amplitude = rng.uniform(0.03, 0.08)
        tint = rng.uniform(0.5, 1.0, 3).astype(np.float32)
        wave = np.sin(freq * (math.cos(angle) * x + math.sin(angle) * y) + phase)
        img = img + (amplitude * wave.astype(np.float32))[..., None] * tint
    return img + _uniform_noise(rng, 0.03, img.shape)


def _shape_alpha(shape, cx, cy, radius, angle, x, y):
    """Anti-aliased coverage of a shape, and its tone, on the pixel grid.

    Args:
        shape: an entry of ``SHAPES``.
        cx, cy, radius, angle: ``[T]`` (or scalar) centre, radius (px) and angle
            (rad; increasing is clockwise on screen since y points down).
        x, y: ``[H, W]`` pixel-centre coordinates.

    Returns:
        ``(alpha, tone)``, each ``[T, H, W]`` in [0, 1] (tone multiplies colour).
    """
    cx, cy, radius, angle = (
        np.asarray(v, np.float32)[:, None, None] for v in (cx, cy, radius, angle)
    )
    dx, dy = x - cx, y - cy
    cos, sin = np.cos(angle), np.sin(angle)
    # Coordinates in the shape's own frame (rotate back by -angle).
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    tone = np.ones_like(u)
    if shape == "circle":
        dist = np.sqrt(u * u + v * v) - radius
        tone = _DARK_TONE + (1 - _DARK_TONE) * np.clip(0.5 + u, 0.0, 1.0)
    elif shape == "square":
        dist = np.maximum(np.abs(u), np.abs(v)) - 0.85 * radius
    elif shape == "triangle":
        circumradius = 1.3 * radius
        dist = -np.inf
        for k in range(3):
            phi = 2 * math.pi * k / 3
            dist = np.maximum(dist, math.cos(phi) * u + math.sin(phi) * v)
        dist = dist - 0.5 * circumradius
    else:
        raise ValueError(f"unknown shape {shape!r}")
    # One pixel wide linear ramp across the edge.
    return np.clip(0.5 - dist, 0.0, 1.0), tone


def _paint(frames, shape, cx, cy, radius, angle, colour, x, y, opacity=None):
    """Composite a shape over ``frames`` [T, H, W, 3] in place.

    Only the box that the shape covers in some frame is computed: the shape's
    circumradius is at most 1.3 * radius and its edge ramp one pixel wide.
    """
    H, W = x.shape
    reach = 1.3 * radius + 1.0
    x0 = max(int(np.floor((cx - reach).min())), 0)
    x1 = min(int(np.ceil((cx + reach).max())), W)
    y0 = max(int(np.floor((cy - reach).min())), 0)
    y1 = min(int(np.ceil((cy + reach).max())), H)
    box = (slice(y0, y1), slice(x0, x1))
    alpha, tone = _shape_alpha(shape, cx, cy, radius, angle, x[box], y[box])
    if opacity is not None:
        alpha *= np.asarray(opacity, np.float32)[:, None, None]
    view = frames[:, y0:y1, x0:x1]
    paint = colour * tone[..., None]  # [T, h, w, 3]
    paint -= view
    paint *= alpha[..., None]
    view += paint


def _render_clip(
    rng: np.random.Generator, cfg: MovingShapesConfig, x, y, out: np.ndarray
) -> int:
    """Draw one clip into ``out`` (uint8 ``[T, H, W, 3]``) and return its label.

    ``x`` and ``y`` are the ``[H, W]`` pixel-centre coordinates.
    """
    T, H, W = cfg.num_frames, cfg.height, cfg.width
    if T < 2:
        raise ValueError(f"num_frames must be >= 2, got {T}")
    L = min(H, W)
    tau = np.linspace(-0.5, 0.5, T)  # time, centred on the clip's midpoint

    if cfg.clean:
        frames = np.zeros((T, H, W, 3), np.float32)
    else:
        frames = np.broadcast_to(_background(rng, L, x, y), (T, H, W, 3)).copy()
        # Distractors: smaller shapes doing a random walk, drawn behind the actor.
        lo, hi = cfg.num_distractors
        for _ in range(rng.integers(lo, hi + 1)):
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = _hsv_colour(rng, (0.3, 1.0), (0.5, 1.0))
            radius = rng.uniform(*_DISTRACTOR_RADIUS) * L
            low = np.array([1.3 * radius, 1.3 * radius])
            high = np.array([W, H]) - low
            steps = rng.normal(0, _DISTRACTOR_STEP * L, (T, 2))
            path = np.clip(rng.uniform(low, high) + np.cumsum(steps, 0), low, high)
            angle = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, 0.2, T))
            radii = np.full(T, radius)
            _paint(frames, shape, path[:, 0], path[:, 1], radii, angle, colour, x, y)

    # The actor, drawn for the first class of pair `kind`, as a function of tau.
    kind = int(rng.integers(5))  # translate x, translate y, rotate, size, fade
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = _hsv_colour(rng, (0.5, 1.0), (0.75, 1.0))
    radius = np.full(T, rng.uniform(*_ACTOR_RADIUS) * L)
    angle = np.full(T, rng.uniform(0, 2 * math.pi))
    opacity = np.full(T, rng.uniform(*_STATIC_OPACITY))
    if kind == 2:  # rotate clockwise
        angle += rng.uniform(*_ROTATION) * tau
    elif kind == 3:  # grow: log-radius linear in time
        radius *= rng.uniform(*_GROWTH) ** tau
    elif kind == 4:  # fade in
        change = rng.uniform(*_FADE)
        mid = rng.uniform(_OPACITY_MIN + change / 2, 1 - change / 2)
        opacity = mid + change * tau
    # Keep the whole shape (its circumradius is at most 1.3 * radius) in frame.
    margin = 1.3 * radius.max() + 1.0
    displacement = rng.uniform(*_TRANSLATION) * L if kind < 2 else 0.0
    low = np.full(2, margin)
    if kind < 2:
        low[kind] += displacement / 2
    centre = rng.uniform(low, np.array([W, H]) - low)
    cx, cy = np.full(T, centre[0]), np.full(T, centre[1])
    if kind == 0:  # move left
        cx -= displacement * tau
    elif kind == 1:  # move up (towards row 0)
        cy -= displacement * tau
    _paint(frames, shape, cx, cy, radius, angle, colour, x, y, opacity)

    if not cfg.clean and cfg.noise_std > 0:
        frames += _uniform_noise(rng, cfg.noise_std, frames.shape)

    # Symmetrise: each transformation with probability 1/2, label mapped along.
    label = 2 * kind
    reverse, hflip, vflip = rng.integers(2, size=3)
    if reverse:
        frames, label = frames[::-1], REVERSED[label]
    if hflip:
        frames, label = frames[:, :, ::-1], HFLIP[label]
    if vflip:
        frames, label = frames[:, ::-1], VFLIP[label]
    np.clip(frames, 0.0, 1.0, out=frames)
    frames *= 255
    np.rint(frames, out=frames)
    out[...] = frames
    return label


class MovingShapes(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the procedural moving-shapes video dataset.

    Generated on the spot (no download) from the config's seed and written as
    ``array_record`` by default, so it is read with random access and without
    TensorFlow: ``builder.as_data_source(split)`` or ``tfds.data_source``. The
    examples are stored in generation order (shuffling is disabled): example ``i``
    of a split is clip ``i`` of ``generate_clips(split_seed(config, split), ...)``.

    Features: ``video`` uint8 ``[T, H, W, 3]`` (stored as raw bytes) and ``label``,
    a ``ClassLabel`` with :data:`LABEL_NAMES`.

    >>> import contextlib, dataclasses, io, tempfile
    >>> cfg = dataclasses.replace(
    ...     CONFIGS["small"], name="doc", num_train=4, num_validation=2, num_test=2
    ... )
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     builder = MovingShapes(config=cfg, data_dir=tmp)
    ...     with contextlib.redirect_stdout(io.StringIO()):  # TFDS's progress
    ...         builder.download_and_prepare()
    ...     source = builder.as_data_source(split="train")
    ...     print(len(source), source[0]["video"].shape, source[0]["label"])
    4 (8, 32, 32, 3) 7
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = list(CONFIGS.values())
    DEFAULT_CONFIG_NAME = "small"

    def __init__(self, *, config=None, file_format=None, **kwargs):
        """Create the builder; ``file_format`` defaults to ``"array_record"``."""
        if (
            isinstance(config, MovingShapesConfig)
            and config.name in CONFIGS
            and dataclasses.asdict(config) == dataclasses.asdict(CONFIGS[config.name])
        ):
            # A copy of a registered config (e.g. unpickled in a grain worker):
            # TFDS rejects a config object that shares a registered name.
            config = config.name
        super().__init__(
            config=config, file_format=file_format or "array_record", **kwargs
        )

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        # DatasetInfo is built directly: `dataset_info_from_configs` looks for
        # metadata files next to a packaged dataset, which this is not.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Procedural clips of a shape moving on a noisy textured background "
                "with distractors. Ten classes in time-reversed pairs: "
                + ", ".join(LABEL_NAMES)
                + ". A clip played backwards is distributed as a clip of the "
                "paired class."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "video": tfds.features.Tensor(
                        shape=cfg.shape,
                        dtype=np.uint8,
                        encoding=tfds.features.Encoding.BYTES,
                    ),
                    "label": tfds.features.ClassLabel(names=LABEL_NAMES),
                }
            ),
            supervised_keys=("video", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        seed, num = split_seed(cfg, split), cfg.split_size(split)
        chunk = 256
        for start in range(0, num, chunk):
            videos, labels = generate_clips(
                seed, min(chunk, num - start), cfg, start=start
            )
            for i, (video, label) in enumerate(zip(videos, labels, strict=True)):
                yield start + i, {"video": video, "label": int(label)}
