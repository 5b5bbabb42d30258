"""Self-supervised pretext tasks (pso_jax.pretext) and their use in the train step."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pso_jax import pretext, sharding
from pso_jax.models import ViViT, make_model
from pso_jax.train import check_batch, hybrid_pso, make_train_step

CLIP = (8, 16, 16, 3)
PATCH = (2, 4, 4)  # a 4 x 4 x 4 grid of tubelets


def _video(b=6, seed=0):
    return jax.random.uniform(jax.random.key(seed), (b, *CLIP))


def test_masked_hides_exactly_the_ratio_and_scores_only_hidden_tubelets():
    task = pretext.make_task("masked", CLIP, PATCH, mask_ratio=0.75)
    assert task.num_outputs == 64 * 3 and not task.classes and task.grid == (4, 4, 4)
    video = _video()
    batch = task.make_batch(jax.random.key(1), video)
    means, mask = batch["label"][:, :192], batch["label"][:, 192:]
    np.testing.assert_array_equal(mask.sum(1), [48] * 6)  # 0.75 of 64, each clip
    # The targets are the clean tubelets' mean colours.
    cells = video.reshape(6, 4, 2, 4, 4, 4, 4, 3).mean(axis=(2, 4, 6))
    np.testing.assert_allclose(means, cells.reshape(6, -1), rtol=1e-6)
    # Masked tubelets are 0 in the input, the others untouched.
    hidden = np.repeat(np.repeat(np.repeat(mask.reshape(6, 4, 4, 4), 2, 1), 4, 2), 4, 3)
    inputs = np.asarray(batch["video"])
    assert (inputs[hidden.astype(bool)] == 0).all()
    np.testing.assert_array_equal(
        inputs[~hidden.astype(bool)], np.asarray(video)[~hidden.astype(bool)]
    )
    # The loss: 0 for the right means; wrong values where nothing is masked
    # change nothing; a known error on the masked ones.
    assert float(task.loss(means, batch["label"])) == 0.0
    off = jnp.where(jnp.repeat(mask, 3, axis=1) > 0, means, means + 5.0)
    assert float(task.loss(off, batch["label"])) == 0.0
    np.testing.assert_allclose(float(task.loss(means + 0.5, batch["label"])), 0.25)
    # A fresh key, fresh masks.
    other = task.make_batch(jax.random.key(2), video)["label"][:, 192:]
    assert (np.asarray(other) != np.asarray(mask)).any()


def test_next_frame_hides_the_last_frame_and_predicts_it_pooled():
    task = pretext.make_task("next_frame", CLIP, PATCH)
    assert task.num_outputs == 4 * 4 * 3 and task.grid == (1, 4, 4)
    video = _video()
    batch = task.make_batch(jax.random.key(0), video)
    assert (np.asarray(batch["video"][:, -1]) == 0).all()
    np.testing.assert_array_equal(batch["video"][:, :-1], video[:, :-1])
    want = video[:, -1].reshape(6, 4, 4, 4, 4, 3).mean(axis=(2, 4)).reshape(6, -1)
    np.testing.assert_allclose(batch["label"], want, rtol=1e-6)
    np.testing.assert_allclose(float(task.loss(want + 0.25, batch["label"])), 0.25)


def test_order_shuffles_half_never_identity_nor_reversal():
    task = pretext.make_task("order", CLIP, PATCH)
    assert task.num_outputs == 2 and task.classes
    video = _video(b=64)
    batch = task.make_batch(jax.random.key(3), video)
    labels = np.asarray(batch["label"])
    assert labels.dtype == np.int32 and 20 <= labels.sum() <= 44
    slabs = np.asarray(video).reshape(64, 4, 2, *CLIP[1:])
    got = np.asarray(batch["video"]).reshape(64, 4, 2, *CLIP[1:])
    for i in range(64):
        # Which original slab sits at each place (slabs are distinct noise).
        perm = [
            int(np.argmin([np.abs(got[i, j] - slabs[i, k]).sum() for k in range(4)]))
            for j in range(4)
        ]
        assert sorted(perm) == [0, 1, 2, 3]
        np.testing.assert_array_equal(got[i], slabs[i, perm])
        if labels[i]:
            assert perm == [0, 1, 2, 3]
        else:
            assert perm not in ([0, 1, 2, 3], [3, 2, 1, 0])
    logits = jnp.where(labels[:, None] == jnp.arange(2), 30.0, -30.0)
    assert float(task.loss(logits, batch["label"])) < 1e-6


@pytest.mark.parametrize(
    "name, clip, patch, ratio, match",
    [
        ("order", (4, 16, 16, 3), (2, 4, 4), 0.9, "at least 3 time steps"),
        ("masked", (2, 8, 8, 3), (2, 4, 4), 0.9, "at least one must be masked"),
        ("masked", CLIP, PATCH, 1.0, r"mask_ratio=1.0: must be in \(0, 1\)"),
        ("masked", (8, 18, 16, 3), PATCH, 0.9, "must divide by the model's patch"),
        ("jigsaw", CLIP, PATCH, 0.9, "objective='jigsaw'"),
    ],
)
def test_tasks_a_clip_cannot_serve_are_refused_naming_the_value(
    name, clip, patch, ratio, match
):
    with pytest.raises(ValueError, match=match):
        pretext.make_task(name, clip, patch, mask_ratio=ratio)


@pytest.mark.parametrize("name", pretext.TASKS)
def test_batch_fn_split_over_data_draws_what_the_whole_batch_draws(name):
    task = pretext.make_task(name, CLIP, PATCH)
    video = _video(b=8)
    whole = pretext.task_batch_fn(task)(jax.random.key(4), {"video": video})
    split = jax.vmap(
        pretext.task_batch_fn(task, data=2),
        in_axes=(None, 0),
        axis_name=sharding.DATA_AXIS,
    )(jax.random.key(4), {"video": video.reshape(2, 4, *CLIP)})
    split = jax.tree.map(lambda a: a.reshape(8, *a.shape[2:]), split)
    # The same draws (masks, shuffles: the inputs bit for bit); the targets'
    # means up to the float rounding of another reduction order.
    np.testing.assert_array_equal(split["video"], whole["video"])
    np.testing.assert_allclose(split["label"], whole["label"], rtol=1e-6)


def test_batch_fn_never_passes_labels_on():
    task = pretext.make_task("order", CLIP, PATCH)
    batch = {"video": _video(), "label": jnp.full((6,), 7, jnp.int32)}
    out = pretext.task_batch_fn(task)(jax.random.key(0), batch)
    assert set(out) == {"video", "label"} and int(out["label"].max()) <= 1
    plain = pretext.task_batch_fn(task)(jax.random.key(0), {"video": _video()})
    chex.assert_trees_all_equal(out, plain)


@pytest.mark.parametrize(
    "name, local_steps, model_name, dense",
    # The Transformer on every task too (VideoMAE's masked one first), and the
    # dense decoder on both reconstruction tasks.
    [
        ("masked", 2, "c3d", False),
        ("order", 0, "c3d", False),
        ("masked", 2, "vivit", False),
        ("next_frame", 2, "vivit", False),
        ("order", 2, "vivit", False),
        ("masked", 2, "c3d", True),
        ("next_frame", 2, "vivit", True),
    ],
)
def test_a_task_trains_as_fitness_and_gradient_loss(
    name, local_steps, model_name, dense
):
    task = pretext.make_task(name, CLIP, PATCH)
    grid = task.grid if dense else None
    if model_name == "vivit":  # one block each: what the task needs of it
        model = ViViT(
            task.num_outputs, width=32, patch=PATCH, depth=(1, 1), decoder_grid=grid
        )
    else:
        model = make_model(
            model_name, task.num_outputs, width=8, patch=PATCH, decoder_grid=grid
        )
    video = jax.random.uniform(jax.random.key(5), (16, *CLIP))
    params = model.init(jax.random.key(0), video[:1])["params"]

    def apply_fn(p, x):
        return model.apply({"params": p}, x)

    opt = hybrid_pso(4) if local_steps else hybrid_pso(4, inertia=0.7)
    trainer = make_train_step(
        apply_fn,
        opt,
        fitness=task.loss,
        grad_loss=task.loss,
        local_steps=local_steps,
        batch_fn=pretext.task_batch_fn(task),
    )
    state = jax.jit(trainer.init)(jax.random.key(1), params)  # as experiment runs do
    step = jax.jit(trainer.step)
    _, first = step(None, state, {"video": video})
    for _ in range(15):
        state, metrics = step(None, state, {"video": video})
    assert np.isfinite(float(metrics.best_fitness))
    assert float(metrics.best_fitness) < float(first.best_fitness)
    # Class ids have an accuracy; regression targets do not.
    assert np.isnan(float(metrics.batch_accuracy)) == (not task.classes)


def test_real_targets_need_a_callable_fitness():
    batch = {"video": jnp.zeros((2, 4)), "label": jnp.zeros((2, 3))}
    with pytest.raises(TypeError, match="class labels must be integers"):
        check_batch(batch)
    check_batch(batch, targets=True)
    with pytest.raises(ValueError, match=r"expected targets \[B, ...\]"):
        check_batch({**batch, "label": jnp.zeros((3, 3))}, targets=True)
