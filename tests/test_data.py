"""Tests for pso_jax.data: moving shapes, grain pipeline, clip sampling, augmentation,
real datasets."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pso_jax.data import augment, pipeline, real
from pso_jax.data import moving_shapes as ms

SMALL = ms.CONFIGS["small"]
TINY = dataclasses.replace(
    SMALL, name="tiny", num_train=24, num_validation=8, num_test=8
)
CLEAN = dataclasses.replace(SMALL, name="clean", clean=True)


def _prepare(config, data_dir):
    builder = ms.MovingShapes(config=config, data_dir=str(data_dir))
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS's progress messages
        builder.download_and_prepare()
    return builder


@pytest.fixture(scope="module")
def tiny_builder(tmp_path_factory):
    return _prepare(TINY, tmp_path_factory.mktemp("tfds"))


# --- Reading motion back from the pixels of a clean clip (actor alone on black) --


def _motion_stats(video):
    """Least-squares rates over the clip of a clean clip's actor.

    Returns:
        ``(dx, dy, growth, fade, omega)``: centroid displacement (px, over the
        clip), log change of the rms radius, log change of the total intensity,
        and angular velocity (rad/frame, positive = clockwise on screen) from
        brightness constancy, ``dI/dt = -omega dI/dphi``.
    """
    v = np.asarray(video, np.float64)
    v = v.mean(-1) / (255.0 if video.dtype == np.uint8 else 1.0)  # [T, H, W]
    T, H, W = v.shape
    y, x = np.mgrid[0:H, 0:W] + 0.5
    mask = (v > 0.02).astype(np.float64)
    area = mask.sum((1, 2))
    cx = (mask * x).sum((1, 2)) / area
    cy = (mask * y).sum((1, 2)) / area
    dxs, dys = x - cx[:, None, None], y - cy[:, None, None]
    rho = np.sqrt((mask * (dxs**2 + dys**2)).sum((1, 2)) / area)
    t = np.arange(T) - (T - 1) / 2

    def change(s):  # least-squares slope times the clip's duration
        return (t * s).sum() / (t * t).sum() * (T - 1)

    gy, gx = np.gradient(v, axis=(1, 2))
    dphi = dxs * gy - dys * gx  # dI/dphi, phi = atan2(y, x): clockwise on screen
    dphi = 0.5 * (dphi[1:] + dphi[:-1])
    omega = -((v[1:] - v[:-1]) * dphi).sum() / (dphi**2).sum()
    return np.array(
        [
            change(cx),
            change(cy),
            change(np.log(rho)),
            change(np.log(v.sum((1, 2)))),
            omega,
        ]
    )


def _motion_class(video):
    """Decode the motion class of a clean clip from its pixels."""
    dx, dy, growth, fade, omega = _motion_stats(video)
    L = min(video.shape[1:3])
    if max(abs(dx), abs(dy)) > 0.15 * L:  # translations move >= 0.25 L
        if abs(dx) > abs(dy):
            return 0 if dx < 0 else 1
        return 2 if dy < 0 else 3
    if abs(growth) > np.log(1.3):  # the radius changes by a factor >= 1.6
        return 6 if growth > 0 else 7
    if abs(fade) > np.log(1.8):  # the opacity changes by a factor >= 2
        return 8 if fade > 0 else 9
    return 4 if omega > 0 else 5


@pytest.fixture(scope="module")
def clean_clips():
    return ms.generate_clips(7, 400, CLEAN)


# --- Moving shapes: generation -------------------------------------------------


def test_generate_clips_shapes_and_determinism():
    videos, labels = ms.generate_clips(3, 20, "small")
    assert videos.shape == (20, 8, 32, 32, 3) and videos.dtype == np.uint8
    assert labels.shape == (20,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < ms.NUM_CLASSES
    again, labels_again = ms.generate_clips(3, 20, SMALL)
    assert videos.tobytes() == again.tobytes()
    np.testing.assert_array_equal(labels, labels_again)
    other, _ = ms.generate_clips(4, 20, "small")
    assert (other != videos).mean() > 0.5  # A different seed: different pixels.
    # Clip i depends only on (seed, i): generating in chunks changes nothing.
    tail, tail_labels = ms.generate_clips(3, 5, "small", start=15)
    assert tail.tobytes() == videos[15:].tobytes()
    np.testing.assert_array_equal(tail_labels, labels[15:])


def test_default_config_shapes():
    videos, _ = ms.generate_clips(0, 2, "default")
    assert videos.shape == (2, 16, 64, 64, 3)
    with pytest.raises(ValueError, match="Unknown moving_shapes config"):
        ms.generate_clips(0, 2, "huge")


def test_label_maps():
    classes = np.arange(ms.NUM_CLASSES)
    rev, hf, vf = (np.asarray(m) for m in (ms.REVERSED, ms.HFLIP, ms.VFLIP))
    np.testing.assert_array_equal(rev, classes ^ 1)  # pairs (0,1), (2,3), ...
    for table in (rev, hf, vf):
        np.testing.assert_array_equal(table[table], classes)  # involutions
    np.testing.assert_array_equal(hf[rev], rev[hf])  # they commute
    np.testing.assert_array_equal(vf[hf], hf[vf])
    np.testing.assert_array_equal(np.flatnonzero(hf != classes), [0, 1, 4, 5])
    np.testing.assert_array_equal(np.flatnonzero(vf != classes), [2, 3, 4, 5])
    assert ms.LABEL_NAMES[4] == "rotate_cw" and ms.LABEL_NAMES[9] == "fade_out"


def test_classes_balanced():
    _, labels = ms.generate_clips(1, 2000, CLEAN)
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 150 and counts.max() < 250  # 200 +- 3.6 std


def test_clean_clips_show_their_label(clean_clips):
    videos, labels = clean_clips
    decoded = np.array([_motion_class(v) for v in videos])
    np.testing.assert_array_equal(decoded, labels)
    # The same pixels played backwards / mirrored show the mapped class.
    for transform, table in (
        (lambda v: v[::-1], ms.REVERSED),
        (lambda v: v[:, :, ::-1], ms.HFLIP),
        (lambda v: v[:, ::-1], ms.VFLIP),
    ):
        decoded = np.array([_motion_class(transform(v)) for v in videos])
        np.testing.assert_array_equal(decoded, np.asarray(table)[labels])


@pytest.mark.parametrize(
    "name, transform, table",
    [
        ("reverse", lambda v: v[::-1], ms.REVERSED),
        ("hflip", lambda v: v[:, :, ::-1], ms.HFLIP),
        ("vflip", lambda v: v[:, ::-1], ms.VFLIP),
    ],
)
def test_transformed_clips_distributed_as_mapped_class(
    clean_clips, name, transform, table
):
    """transform(clips of class c) ~ clips of class table[c]: motion statistics."""
    del name
    videos, labels = clean_clips
    stats = np.array([_motion_stats(v) for v in videos])  # [N, 5]
    moved = np.array([_motion_stats(transform(v)) for v in videos])
    for c in range(ms.NUM_CLASSES):
        a, b = moved[labels == c], stats[labels == table[c]]
        se = np.sqrt(a.var(0) / len(a) + b.var(0) / len(b)) + 1e-3
        z = np.abs(a.mean(0) - b.mean(0)) / se
        assert z.max() < 5, (c, z)


def _ridge_accuracy(train, y_train, test, y_test, lam=0.1):
    mu, sd = train.mean(0), train.std(0) + 1e-6
    a = np.c_[(train - mu) / sd, np.ones(len(train))]
    b = np.c_[(test - mu) / sd, np.ones(len(test))]
    w = np.linalg.solve(
        a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ (2.0 * y_train - 1)
    )
    return ((b @ w > 0) == y_test).mean()


def test_time_averaged_frame_carries_no_pair_information():
    """Which class of its pair a clip is (label % 2) is at chance from the mean frame,
    and well above chance from a time-ordered feature (a positive control)."""
    v_train, l_train = ms.generate_clips(11, 500, SMALL)
    v_test, l_test = ms.generate_clips(12, 500, SMALL)

    def features(videos, weights):
        f = np.einsum("t,nthwc->nhwc", weights, videos.astype(np.float32) / 255)
        return f.reshape(len(f), 8, 4, 8, 4, 3).mean((2, 4)).reshape(len(f), -1)

    T = SMALL.num_frames
    mean = np.full(T, 1 / T)
    ramp = np.arange(T) - (T - 1) / 2
    acc_mean = _ridge_accuracy(
        features(v_train, mean), l_train % 2, features(v_test, mean), l_test % 2
    )
    acc_ramp = _ridge_accuracy(
        features(v_train, ramp), l_train % 2, features(v_test, ramp), l_test % 2
    )
    assert abs(acc_mean - 0.5) < 0.1, acc_mean
    assert acc_ramp > 0.65, acc_ramp
    # The pair itself (label // 2: which kind of motion) is visible in the mean.
    train_pair, test_pair = (l_train // 2 == 0), (l_test // 2 == 0)
    acc_pair = _ridge_accuracy(
        features(v_train, mean), train_pair, features(v_test, mean), test_pair
    )
    assert acc_pair > 0.7, acc_pair


# --- Moving shapes: TFDS ---------------------------------------------------------


def test_tfds_round_trip_equals_generate_clips(tiny_builder):
    info = tiny_builder.info
    assert info.features["video"].shape == (8, 32, 32, 3)
    assert info.features["label"].num_classes == 10
    assert str(info.file_format.value) == "array_record"
    for split in ms.SPLITS:
        source = tiny_builder.as_data_source(split=split)
        num = TINY.split_size(split)
        assert len(source) == num
        videos, labels = ms.generate_clips(ms.split_seed(TINY, split), num, TINY)
        read = np.stack([source[i]["video"] for i in range(num)])
        assert read.dtype == np.uint8
        assert read.tobytes() == videos.tobytes()
        np.testing.assert_array_equal([source[i]["label"] for i in range(num)], labels)


def test_tfds_two_builds_in_different_dirs_identical(tiny_builder, tmp_path):
    other = _prepare(TINY, tmp_path)
    for split in ms.SPLITS:
        a, b = tiny_builder.as_data_source(split), other.as_data_source(split)
        for i in range(len(a)):
            assert a[i]["video"].tobytes() == b[i]["video"].tobytes()
            assert a[i]["label"] == b[i]["label"]
    # Splits are distinct streams.
    train, test = (
        tiny_builder.as_data_source("train"),
        tiny_builder.as_data_source("test"),
    )
    assert not np.array_equal(train[0]["video"], test[0]["video"])


def test_load_moving_shapes_prepares_once(tiny_builder, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        source = pipeline.load_moving_shapes(
            TINY, split="validation", data_dir=tmp_path
        )
    assert len(source) == 8
    assert (
        tmp_path / "moving_shapes" / "tiny" / "1.0.0" / "dataset_info.json"
    ).exists()
    start = time.perf_counter()
    again = pipeline.load_moving_shapes(TINY, split="validation", data_dir=tmp_path)
    assert time.perf_counter() - start < 2.0  # Opened, not generated again.
    np.testing.assert_array_equal(again[3]["video"], source[3]["video"])


# --- grain pipeline --------------------------------------------------------------


def test_make_dataset_fixed_shapes_and_values(tiny_builder):
    source = tiny_builder.as_data_source("train")
    ds = pipeline.make_dataset(source, batch_size=5, seed=0, num_epochs=2)
    batches = list(ds)
    assert len(batches) == 48 // 5  # drop_remainder: 9 full batches of 2 epochs
    for batch in batches:
        assert batch["video"].shape == (5, 8, 32, 32, 3)
        assert batch["video"].dtype == np.float32
        assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32
        assert batch["video"].min() >= 0.0 and batch["video"].max() <= 1.0
    # Every batch row is a source example / 255, with its label; each epoch is a
    # permutation of the source.
    raw = np.stack([source[i]["video"] for i in range(len(source))]).astype(np.float32)
    flat = raw.reshape(len(raw), -1)
    ids = []
    for batch in batches:
        for video, label in zip(batch["video"], batch["label"], strict=True):
            match = np.flatnonzero((np.abs(flat - video.ravel() * 255) < 1e-3).all(1))
            assert len(match) == 1 and source[match[0]]["label"] == label
            ids.append(match[0])
    assert sorted(ids[:24]) == list(range(24))
    assert ids[:24] != ids[24:48]  # a new permutation in the second epoch


def test_make_dataset_seeded_order():
    source = [
        {"video": np.full((4, 2, 2, 3), i, np.uint8), "label": i} for i in range(12)
    ]

    def labels(seed, **kw):
        return np.concatenate(
            [
                b["label"]
                for b in pipeline.make_dataset(source, batch_size=3, seed=seed, **kw)
            ]
        )

    np.testing.assert_array_equal(labels(1), labels(1))
    assert not np.array_equal(labels(1), labels(2))
    np.testing.assert_array_equal(labels(1, shuffle=False), np.arange(12))
    uint8 = next(
        iter(pipeline.make_dataset(source, batch_size=3, seed=0, float_video=False))
    )
    assert uint8["video"].dtype == np.uint8


def test_make_dataset_temporal_window():
    # Frame t of video i holds the value 10 * i + t.
    source = [
        {
            "video": (10 * i + np.arange(8, dtype=np.uint8))[:, None, None, None]
            * np.ones((1, 2, 2, 3), np.uint8),
            "label": i,
        }
        for i in range(6)
    ]
    ds = pipeline.make_dataset(
        source, batch_size=3, seed=0, num_frames=4, float_video=False
    )
    starts = []
    for batch in ds:
        assert batch["video"].shape == (3, 4, 2, 2, 3)
        for video, label in zip(batch["video"], batch["label"], strict=True):
            frames = video[:, 0, 0, 0].astype(int) - 10 * label
            np.testing.assert_array_equal(frames, frames[0] + np.arange(4))
            starts.append(frames[0])
    assert min(starts) >= 0 and max(starts) <= 4 and len(set(starts)) > 1
    # A clip shorter than num_frames repeats its last frame.
    short = [{"video": np.arange(2, dtype=np.uint8).reshape(2, 1, 1, 1), "label": 0}]
    batch = next(
        iter(
            pipeline.make_dataset(
                short, batch_size=1, seed=0, num_frames=4, float_video=False
            )
        )
    )
    np.testing.assert_array_equal(batch["video"][0, :, 0, 0, 0], [0, 1, 1, 1])


def test_make_loader_iterates(tiny_builder):
    loader = pipeline.make_loader(
        tiny_builder.as_data_source("test"), batch_size=4, seed=0, worker_count=0
    )
    shapes = [b["video"].shape for b in loader]
    assert shapes == [(4, 8, 32, 32, 3)] * 2


# --- clip sampling and multi-scale -----------------------------------------------


def test_sample_clips_shapes_and_content():
    T = 16
    video = jnp.arange(T, dtype=jnp.float32)[:, None, None, None] + jnp.zeros(
        (T, 4, 5, 3)
    )
    lengths, strides = (4, 8), (1, 2)
    sample = jax.jit(
        lambda k, v: pipeline.sample_clips(
            k, v, lengths=lengths, strides=strides, num_clips=6
        )
    )
    clips = sample(jax.random.key(0), video)
    assert [(c.video.shape, c.frame_index.shape) for c in clips] == [
        ((6, L, 4, 5, 3), (6, L)) for L, _ in pipeline.granularities(lengths, strides)
    ]
    for (length, stride), c in zip(
        pipeline.granularities(lengths, strides), clips, strict=True
    ):
        index = np.asarray(c.frame_index)
        start = index[:, :1]
        np.testing.assert_array_equal(index, start + stride * np.arange(length))
        assert start.min() >= 0 and index.max() <= T - 1
        np.testing.assert_array_equal(np.asarray(c.video), np.asarray(video)[index])
    chex.assert_trees_all_equal(
        clips,
        pipeline.sample_clips(
            jax.random.key(0), video, lengths=lengths, strides=strides, num_clips=6
        ),
    )
    other = pipeline.sample_clips(
        jax.random.key(1), video, lengths=lengths, strides=strides, num_clips=6
    )
    assert any(
        not np.array_equal(a.frame_index, b.frame_index)
        for a, b in zip(clips, other, strict=True)
    )
    with pytest.raises(ValueError, match="spans 15 frames"):
        pipeline.sample_clips(jax.random.key(0), video[:8], lengths=(8,), strides=(2,))


def test_sample_clips_vmaps_over_a_batch():
    videos = jnp.arange(3 * 8, dtype=jnp.float32).reshape(3, 8, 1, 1, 1)
    keys = jax.random.split(jax.random.key(0), 3)
    (clips,) = jax.vmap(
        lambda k, v: pipeline.sample_clips(
            k, v, lengths=(3,), strides=(2,), num_clips=2
        )
    )(keys, videos)
    assert clips.video.shape == (3, 2, 3, 1, 1, 1)
    expected = np.asarray(videos)[
        np.arange(3)[:, None, None], np.asarray(clips.frame_index)
    ]
    np.testing.assert_array_equal(clips.video, expected)


def test_split_clips():
    video = jnp.arange(10.0)[:, None, None, None]
    clips = pipeline.split_clips(video, length=3, stride=2)  # span 5, hop 5
    np.testing.assert_array_equal(clips.frame_index, [[0, 2, 4], [5, 7, 9]])
    np.testing.assert_array_equal(clips.video[..., 0, 0, 0], [[0, 2, 4], [5, 7, 9]])
    overlapping = pipeline.split_clips(video, length=4, hop=2)
    assert overlapping.video.shape == (4, 4, 1, 1, 1)
    np.testing.assert_array_equal(overlapping.frame_index[:, 0], [0, 2, 4, 6])


def test_resize_host_equals_device():
    video = np.random.default_rng(0).random((2, 3, 32, 32, 3), dtype=np.float32)
    for size in [(16, 16), (24, 20), (40, 48)]:
        host = pipeline.resize_video_np(video, size)
        device = pipeline.resize_video(jnp.asarray(video), size)
        assert host.shape == device.shape == (2, 3, *size, 3)
        np.testing.assert_allclose(host, device, atol=1e-5)
    constant = np.full((1, 2, 32, 32, 3), 0.25, np.float32)
    np.testing.assert_allclose(
        pipeline.resize_video_np(constant, (16, 16)), 0.25, atol=1e-6
    )


def test_multiscale_batches_compile_once_per_scale():
    scales = ((32, 32), (24, 24), (16, 16))
    assert pipeline.choose_scale(0, 5, scales) == pipeline.choose_scale(0, 5, scales)
    assert {pipeline.choose_scale(0, s, scales) for s in range(50)} == set(scales)
    batches = (
        {
            "video": np.zeros((2, 8, 32, 32, 3), np.float32),
            "label": np.zeros(2, np.int32),
        }
        for _ in range(20)
    )
    traces = []

    @jax.jit
    def step(video):
        traces.append(video.shape)  # runs once per compilation
        return video.sum()

    seen = []
    for batch in pipeline.multiscale_batches(batches, seed=0, scales=scales):
        seen.append(batch["video"].shape[2:4])
        step(batch["video"])
    assert set(seen) <= set(scales) and len(set(seen)) == 3
    assert sorted(traces) == sorted({(2, 8, *s, 3) for s in scales})


# --- augmentation -----------------------------------------------------------------


def _moving_square(direction):
    """A white 4x4 square moving 2 px per frame along ``direction`` (dy, dx)."""
    video = np.zeros((6, 24, 24, 3), np.float32)
    for t in range(6):
        y, x = (10 + d * (2 * t - 5) for d in direction)
        video[t, y : y + 4, x : x + 4] = 1.0
    return jnp.asarray(video)


def _centroid(video):
    v = np.asarray(video).mean(-1)
    y, x = np.mgrid[0 : v.shape[1], 0 : v.shape[2]]
    mass = v.sum((1, 2))
    return (v * x).sum((1, 2)) / mass, (v * y).sum((1, 2)) / mass


def test_hflip_reverses_x_motion_and_label():
    video = _moving_square((0, 1))  # moves right: label 1
    cx, _ = _centroid(video)
    assert np.all(np.diff(cx) > 0)
    flipped, label = augment.hflip(video, jnp.int32(1))
    fx, _ = _centroid(flipped)
    assert np.all(np.diff(fx) < 0) and int(label) == 0  # now moves left: label 0
    np.testing.assert_allclose(fx, 24 - 1 - cx)
    # Vertical motion and flips.
    down = _moving_square((1, 0))  # moves down: label 3
    up, label = augment.vflip(down, jnp.int32(3))
    assert np.all(np.diff(_centroid(up)[1]) < 0) and int(label) == 2
    same, label = augment.hflip(down, jnp.int32(3))
    assert np.all(np.diff(_centroid(same)[1]) > 0) and int(label) == 3
    back, label = augment.time_reverse(video, jnp.int32(1))
    assert np.all(np.diff(_centroid(back)[0]) < 0) and int(label) == 0


def test_augment_flips_keep_labels_true(clean_clips):
    """On generated clips, every label-changing augmentation maps the label to the
    class that the pixels show."""
    videos, labels = clean_clips
    videos = jnp.asarray(videos[:120], jnp.float32) / 255
    labels = jnp.asarray(labels[:120], jnp.int32)
    for fn in (augment.hflip, augment.vflip, augment.time_reverse):
        out, new = jax.jit(jax.vmap(fn))(videos, labels)
        decoded = [_motion_class(np.asarray(v)) for v in out]
        np.testing.assert_array_equal(decoded, new)
    keys = jax.random.split(jax.random.key(0), len(labels))
    for fn in (augment.random_hflip, augment.random_vflip, augment.random_time_reverse):
        out, new = jax.jit(jax.vmap(fn))(keys, videos, labels)
        decoded = [_motion_class(np.asarray(v)) for v in out]
        np.testing.assert_array_equal(decoded, new)
        changed = np.any(np.asarray(out) != np.asarray(videos), axis=(1, 2, 3, 4))
        assert 0.3 < changed.mean() < 0.7


def test_augment_batch_jit_determinism_and_labels(clean_clips):
    videos = jnp.asarray(clean_clips[0][:6], jnp.float32) / 255
    labels = jnp.asarray(clean_clips[1][:6], jnp.int32)
    traces = []

    def fn(key, v, y):
        traces.append(1)
        return augment.augment_batch(key, v, y, flip_v=True, reverse=True)

    jitted = jax.jit(fn)
    out, new = jitted(jax.random.key(0), videos, labels)
    other, _ = jitted(jax.random.key(1), videos, labels)
    assert len(traces) == 1  # a new key does not retrace
    assert not np.array_equal(out, other)
    chex.assert_trees_all_equal((out, new), jitted(jax.random.key(0), videos, labels))
    chex.assert_trees_all_close(
        (out, new), fn(jax.random.key(0), videos, labels), atol=1e-5
    )  # jit == no jit
    chex.assert_shape(out, videos.shape)
    assert new.dtype == jnp.int32 and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # Without spatial crop/colour changes the labels must match the pixels exactly.
    exact = functools.partial(
        augment.augment_batch,
        crop_area=None,
        brightness=0.0,
        contrast=(1.0, 1.0),
        flip_v=True,
        reverse=True,
    )
    videos = jnp.asarray(clean_clips[0][:32], jnp.float32) / 255
    labels = jnp.asarray(clean_clips[1][:32], jnp.int32)
    out, new = jax.jit(exact)(jax.random.key(2), videos, labels)
    np.testing.assert_array_equal([_motion_class(np.asarray(v)) for v in out], new)
    assert not np.array_equal(new, labels)  # some labels did change


def test_resized_crop():
    video = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3))
    np.testing.assert_allclose(
        augment.resized_crop(video, 0.0, 0.0, 16.0, 16.0), video, atol=1e-6
    )
    # Crop the top-left quarter: away from the border it is a 2x upsampling.
    ramp = jnp.broadcast_to(jnp.arange(16.0)[None, None, :, None], (2, 16, 16, 1))
    out = augment.resized_crop(ramp, 0.0, 0.0, 8.0, 8.0)
    np.testing.assert_allclose(
        out[0, 0, 1:-1, 0], 0.5 * jnp.arange(1, 15) - 0.25, atol=1e-5
    )
    crop = jax.jit(augment.random_resized_crop)(jax.random.key(1), video)
    assert crop.shape == video.shape
    full = augment.random_resized_crop(
        jax.random.key(1), video, area=(1.0, 1.0), aspect=(1.0, 1.0)
    )
    np.testing.assert_allclose(full, video, atol=1e-5)


def test_brightness_contrast_keeps_fades():
    video = jnp.linspace(0.2, 0.8, 6)[:, None, None, None] * jnp.ones((6, 4, 4, 3))
    out = augment.brightness_contrast(video, 0.1, 1.2)
    means = np.asarray(out.mean((1, 2, 3)))
    assert np.all(np.diff(means) > 0)  # a fade in stays a fade in
    np.testing.assert_allclose(
        means, (np.linspace(0.2, 0.8, 6) - 0.5) * 1.2 + 0.6, atol=1e-6
    )
    rand = augment.random_brightness_contrast(jax.random.key(0), video)
    assert np.all(np.diff(np.asarray(rand.mean((1, 2, 3)))) > 0)


def test_temporal_crop_and_frame_drop():
    video = jnp.arange(12.0)[:, None, None, None] * jnp.ones((12, 2, 2, 1))
    crop = augment.temporal_crop(jax.random.key(0), video, 5)
    first = float(crop[0, 0, 0, 0])
    np.testing.assert_array_equal(crop[:, 0, 0, 0], first + np.arange(5))
    keys = jax.random.split(jax.random.key(1), 30)
    crops = jax.vmap(lambda k: augment.temporal_crop(k, video, 5))(keys)
    starts = set(np.asarray(crops[:, 0, 0, 0, 0]).tolist())
    assert len(starts) > 3 and min(starts) >= 0 and max(starts) <= 7
    drop = jax.jit(augment.random_frame_drop, static_argnums=2)(
        jax.random.key(0), video, 8
    )
    kept = np.asarray(drop[:, 0, 0, 0])
    assert drop.shape == (8, 2, 2, 1) and np.all(np.diff(kept) > 0) and kept.max() <= 11
    with pytest.raises(ValueError, match="exceeds"):
        augment.temporal_crop(jax.random.key(0), video, 13)


# --- real datasets ----------------------------------------------------------------


@pytest.mark.skipif(real.has_tensorflow(), reason="tests the path without TensorFlow")
@pytest.mark.parametrize("name", ["ucf101", "moving_mnist"])
def test_real_dataset_without_tensorflow_fails_at_once(name, tmp_path):
    start = time.perf_counter()
    with pytest.raises(real.MissingTensorFlowError) as err:
        real.load_real(name, data_dir=tmp_path)
    assert time.perf_counter() - start < 5.0
    message = str(err.value)
    assert 'pip install "pso_jax[video-tf]"' in message
    assert "manual_dir" in message and "prepared" in message
    assert name in message and str(tmp_path) in message


def test_real_loads_a_prepared_folder_without_tensorflow(tiny_builder):
    folder = tiny_builder.data_dir  # .../moving_shapes/tiny/1.0.0
    source = real.load_real(folder, split="test")
    expected = tiny_builder.as_data_source("test")
    assert len(source) == len(expected) == 8
    np.testing.assert_array_equal(source[5]["video"], expected[5]["video"])
    keys = real.video_keys("moving_shapes/tiny")
    batch = next(
        iter(
            pipeline.make_dataset(
                source, batch_size=4, seed=0, video_key=keys.video, label_key=keys.label
            )
        )
    )
    assert batch["video"].shape == (4, 8, 32, 32, 3)
    assert real.video_keys("moving_mnist") == ("image_sequence", None)
