"""Self-supervised pretext tasks: a training signal from unlabeled clips.

A :class:`PretextTask` turns a batch of clips ``[B, T, H, W, C]`` (float, in
``[0, 1]``) into model inputs and targets, and scores the model's outputs
against those targets. Any video model of :mod:`pso_jax.models` serves every
task: the task's targets are what its ``"head"`` Dense predicts from the pooled
features (``num_outputs`` of them), so the backbone (``"body"``) learns the
task and a classifier later reuses it (``pso-jax train --pretrained``). The
loss is minimised and is both the swarm's fitness and the hybrid's gradient
loss (:func:`pso_jax.train.make_train_step` with ``fitness=task.loss``,
``grad_loss=task.loss`` and ``batch_fn=task_batch_fn(task)``).

The tasks (``patch = (pt, ph, pw)`` is the model's tubelet; ``T' = T / pt``
etc. the tubelet grid):

- ``"masked"``: masked-tubelet reconstruction after VideoMAE (Tong et al.,
  2022): ``mask_ratio`` (default 0.9, VideoMAE's) of the ``T' H' W'`` tubelets
  of each clip, drawn at random, are set to 0 in the input; the model
  predicts the mean colour of every tubelet (``T' H' W' C`` outputs) and the
  loss is the mean squared error over the masked ones only. A conv model sees
  the zeros where a Transformer would drop the tokens (the same task; the
  compute of a ViViT is not reduced here). The targets are tubelet means, not
  pixels: a decoder from one pooled feature vector to every pixel would be
  most of the model.
- ``"next_frame"``: predict frame ``T`` from frames ``1..T-1``: the last frame
  is set to 0 in the input (the clip keeps its shape, so a ViViT's time
  embeddings fit the fine-tuned clips) and the model predicts it pooled to the
  ``H' x W'`` tubelet grid (``H' W' C`` outputs); L1 loss.
- ``"order"``: frame-order verification (after Misra et al., "Shuffle and
  Learn", 2016): half the clips, drawn at random, have their ``T'`` temporal
  slabs of tubelets permuted (never the identity and never the exact
  reversal: a moving shape played backwards is a shape moving the other way,
  so a reversal is not detectable); the model says which (2 outputs, label 1
  = in order); cross-entropy. No decoder: the cheapest task for a swarm to
  score. Needs ``T' >= 3``.

What the head can learn. By default (``decoder="pooled"`` of a run) the
reconstruction targets are decoded from one pooled feature vector, and a conv
backbone's global average pool keeps little of *where* things are, so with
``c3d`` the ``masked`` and ``next_frame`` heads learn mostly the average clip:
on ``moving_shapes/small`` after ``pso-jax pretrain``'s 300 steps, masked test
MSE 0.0110 against 0.0131 for the best constant guess, next-frame L1 0.065
against 0.089, while ``order``, which needs no position, is learned (0.956 of
the test clips told right; ``benchmarks/results/pretrain_finetune.md``). The
dense decoder (``decoder="dense"``, ``pso-jax pretrain --decoder dense``; a
model's ``decoder_grid = task.grid``, :func:`pso_jax.models.base.decode_map`)
puts one Dense at every cell of the feature map before the pool, predicting
the targets under it (VideoMAE's per-token linear decoder): next-frame L1
0.036, masked MSE 0.0075 at ``mask_ratio=0.5`` (pooled: 0.0107; constant
guess 0.0131), but 0.0110 at 0.9, where a conv cell's receptive field sees
almost no visible tubelet (``benchmarks/results/pretrain_dense/``). The run's
summary reports the constant guess's loss (``constant_test_loss``) beside the
model's.

Randomness (masks, permutations) is drawn per clip from the step's key, one
key per clip of the whole batch, so that a batch split over a ``"data"``
mesh axis draws what it draws unsplit (:func:`task_batch_fn`).

>>> import jax, jax.numpy as jnp
>>> task = make_task("masked", (8, 32, 32, 3), (2, 8, 8))
>>> task.num_outputs  # 4 x 4 x 4 tubelets x 3 colours
192
>>> batch = task.make_batch(jax.random.key(0), jnp.ones((2, 8, 32, 32, 3)))
>>> batch["video"].shape, batch["label"].shape  # targets: means, then the mask
((2, 8, 32, 32, 3), (2, 256))
>>> float(task.loss(jnp.ones((2, 192)), batch["label"]))  # a perfect guess
0.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pso_jax import sharding
from pso_jax.train import cross_entropy
from pso_jax.types import PRNGKey

__all__ = ["TASKS", "PretextTask", "check_task", "make_task", "task_batch_fn"]

TASKS = ("masked", "next_frame", "order")


class PretextTask(NamedTuple):
    """A self-supervised task (:func:`make_task` builds it).

    Attributes:
      name: one of :data:`TASKS`.
      num_outputs: the model's head size for this task.
      make_pair: ``make_pair(key, clip [T, H, W, C]) -> (input, target)`` for
        one clip, pure and jittable (:meth:`make_batch` maps it over a batch).
        ``"order"``'s target is a class id ``()``; the others' float ``[K]``.
      loss: ``loss(outputs [B, num_outputs], targets) -> ()``, minimised.
      classes: whether the targets are class ids (accuracy then means something).
      clip_shape, patch: what the task was built for.
      grid: ``(T, H, W)`` when the targets are ``num_outputs / (T H W)`` values
        per cell of that grid, flattened in ``[T, H, W, values]`` order (a
        dense decoder's ``decoder_grid``, :func:`pso_jax.models.make_model`);
        ``None`` for ``"order"``.
    """

    name: str
    num_outputs: int
    make_pair: Callable[[PRNGKey, jax.Array], tuple[jax.Array, jax.Array]]
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    classes: bool
    clip_shape: tuple[int, ...]
    patch: tuple[int, int, int]
    grid: tuple[int, int, int] | None = None

    def make_batch(self, key: PRNGKey, video: jax.Array) -> dict:
        """``{"video": inputs, "label": targets}`` of ``video [B, T, H, W, C]``,
        clip ``i`` drawn with ``jax.random.split(key, B)[i]``."""
        inputs, targets = jax.vmap(self.make_pair)(
            jax.random.split(key, video.shape[0]), video
        )
        return {"video": inputs, "label": targets}


def _grid(clip_shape, patch) -> tuple[int, int, int]:
    t, h, w = clip_shape[:3]
    pt, ph, pw = patch
    return t // pt, h // ph, w // pw


def check_task(
    name: str, clip_shape: tuple[int, ...], patch: tuple[int, ...], mask_ratio=0.9
) -> None:
    """Raise a ``ValueError`` naming the value when ``name`` cannot be served.

    Args:
      name: a task of :data:`TASKS`.
      clip_shape: one clip, ``(T, H, W, C)``.
      patch: the model's tubelet ``(pt, ph, pw)``; T, H, W must divide by it.
      mask_ratio: ``"masked"``'s share of masked tubelets, in ``(0, 1)``; at
        least one tubelet must be masked and one kept.

    >>> check_task("order", (4, 32, 32, 3), (2, 4, 4))
    Traceback (most recent call last):
    ...
    ValueError: objective='order' needs at least 3 time steps of tubelets to shuffle (T / pt = 4 / 2 = 2): a clip of 2 can only be reversed, which a moving shape cannot tell from motion the other way; use more frames or a smaller patch[0]
    """  # noqa: E501
    if name not in TASKS:
        raise ValueError(f"objective={name!r}: expected one of {TASKS}")
    if len(clip_shape) != 4:
        raise ValueError(f"clip shape {tuple(clip_shape)}: expected (T, H, W, C)")
    if len(patch) != 3 or any(p < 1 for p in patch):
        raise ValueError(f"patch={tuple(patch)}: expected 3 positive sizes")
    dims = clip_shape[:3]
    if any(d % p for d, p in zip(dims, patch, strict=True)):
        raise ValueError(
            f"objective={name!r}: the clip's (T, H, W) = {tuple(dims)} must divide "
            f"by the model's patch {tuple(patch)}"
        )
    t_grid, h_grid, w_grid = _grid(clip_shape, patch)
    if name == "order" and t_grid < 3:
        raise ValueError(
            f"objective='order' needs at least 3 time steps of tubelets to shuffle "
            f"(T / pt = {dims[0]} / {patch[0]} = {t_grid}): a clip of 2 can only "
            "be reversed, which a moving shape cannot tell from motion the other "
            "way; use more frames or a smaller patch[0]"
        )
    if name == "next_frame" and dims[0] < 2:
        raise ValueError(
            f"objective='next_frame' needs at least 2 frames, got T={dims[0]}"
        )
    if name == "masked":
        if not (isinstance(mask_ratio, int | float) and 0 < mask_ratio < 1):
            raise ValueError(f"mask_ratio={mask_ratio!r}: must be in (0, 1)")
        n = t_grid * h_grid * w_grid
        masked = round(mask_ratio * n)
        if not 1 <= masked < n:
            raise ValueError(
                f"mask_ratio={mask_ratio} masks {masked} of the clip's {n} "
                "tubelets: at least one must be masked and one kept"
            )


def make_task(
    name: str,
    clip_shape: tuple[int, ...],
    patch: tuple[int, int, int],
    *,
    mask_ratio: float = 0.9,
) -> PretextTask:
    """The pretext task ``name`` for clips of ``clip_shape`` and a model's ``patch``.

    Args:
      name: ``"masked"``, ``"next_frame"`` or ``"order"`` (module docstring).
      clip_shape: one clip ``(T, H, W, C)``.
      patch: the model's tubelet ``(pt, ph, pw)``.
      mask_ratio: ``"masked"``'s share of masked tubelets (VideoMAE: 0.9).

    Raises:
      ValueError: see :func:`check_task`.
    """
    check_task(name, clip_shape, patch, mask_ratio)
    clip_shape, patch = tuple(clip_shape), tuple(patch)
    grid = _grid(clip_shape, patch)
    channels = clip_shape[3]
    if name == "masked":
        n = grid[0] * grid[1] * grid[2]
        masked = round(mask_ratio * n)
        one_clip = _masked_clip(patch, masked)
        loss = _masked_loss(n, channels)
        return PretextTask(
            name, n * channels, one_clip, loss, False, clip_shape, patch, grid
        )
    if name == "next_frame":
        return PretextTask(
            name,
            grid[1] * grid[2] * channels,
            _next_frame_clip(patch),
            _l1,
            False,
            clip_shape,
            patch,
            (1, grid[1], grid[2]),
        )
    return PretextTask(
        name, 2, _order_clip(patch[0]), cross_entropy, True, clip_shape, patch
    )


def _tubelet_means(clip: jax.Array, patch) -> jax.Array:
    """``[T, H, W, C] -> [T', H', W', C]``: each tubelet's mean colour."""
    t, h, w, c = clip.shape
    pt, ph, pw = patch
    x = clip.reshape(t // pt, pt, h // ph, ph, w // pw, pw, c)
    return x.mean(axis=(1, 3, 5))


def _masked_clip(patch, masked: int):
    def one_clip(key, clip):
        grid = _grid(clip.shape, patch)
        n = grid[0] * grid[1] * grid[2]
        # Exactly `masked` tubelets, at random places.
        rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, (n,))))
        mask = rank < masked  # [n]
        targets = _tubelet_means(clip, patch).reshape(-1)  # [n * C]
        cells = mask.reshape(grid)
        for axis, size in enumerate(patch):
            cells = jnp.repeat(cells, size, axis)
        inputs = jnp.where(cells[..., None], 0.0, clip)
        return inputs, jnp.concatenate([targets, mask.astype(targets.dtype)])

    return one_clip


def _masked_loss(n: int, channels: int):
    def masked_mse(outputs, targets):
        b = outputs.shape[0]
        means, mask = targets[:, : n * channels], targets[:, n * channels :]
        err = (outputs.astype(jnp.float32) - means).reshape(b, n, channels)
        per_cell = jnp.mean(jnp.square(err), axis=-1)  # [B, n]
        return jnp.sum(per_cell * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return masked_mse


def _next_frame_clip(patch):
    _, ph, pw = patch

    def one_clip(key, clip):
        del key  # deterministic: the last frame is always the one predicted
        targets = _tubelet_means(clip[-1:], (1, ph, pw)).reshape(-1)
        return clip.at[-1].set(0.0), targets

    return one_clip


def _l1(outputs, targets):
    return jnp.mean(jnp.abs(outputs.astype(jnp.float32) - targets))


def _order_clip(pt: int):
    def one_clip(key, clip):
        slabs = clip.shape[0] // pt
        ident = jnp.arange(slabs)
        key_flip, key_perm = jax.random.split(key)
        perm = jax.random.permutation(key_perm, slabs)
        # Identity or exact reversal: swap the first two (slabs >= 3), which
        # makes it neither.
        plain = jnp.all(perm == ident) | jnp.all(perm == ident[::-1])
        swapped = perm.at[0].set(perm[1]).at[1].set(perm[0])
        perm = jnp.where(plain, swapped, perm)
        in_order = jax.random.bernoulli(key_flip)
        perm = jnp.where(in_order, ident, perm)
        frames = (perm[:, None] * pt + jnp.arange(pt)).reshape(-1)
        return clip[frames], in_order.astype(jnp.int32)

    return one_clip


def task_batch_fn(task: PretextTask, data: int = 1) -> Callable[[PRNGKey, dict], dict]:
    """``batch_fn(key, batch) -> batch`` for :func:`pso_jax.train.make_train_step`.

    Reads only ``batch["video"]`` (and ``batch["select_video"]``, the clips
    the fitness is measured on, if present, with its own key) and returns the
    task's inputs and targets as ``"video"``/``"label"`` (and
    ``"select_video"``/``"select_label"``). Any label in ``batch`` is dropped,
    never read.

    Args:
      task: from :func:`make_task`.
      data: size of the mesh's ``"data"`` axis the batch is split over (1:
        unsplit). Split, each device draws its clips' part of the whole
        batch's draw (the step passes the same key to every slice), so the
        inputs are those of the unsplit run.
    """

    def make(key, video):
        if data == 1:
            return task.make_batch(key, video)
        # This slice's part of the whole batch's per-clip keys (make_batch's).
        n = video.shape[0]
        row0 = jax.lax.axis_index(sharding.DATA_AXIS) * n
        keys = jax.random.split(key, n * data)
        keys = jax.lax.dynamic_slice_in_dim(keys, row0, n)
        inputs, targets = jax.vmap(task.make_pair)(keys, video)
        return {"video": inputs, "label": targets}

    def batch_fn(key, batch):
        key_fit, key_select = jax.random.split(key)
        out = make(key_fit, batch["video"])
        if "select_video" in batch:
            sel = make(key_select, batch["select_video"])
            out = {**out, "select_video": sel["video"], "select_label": sel["label"]}
        return out

    return batch_fn
