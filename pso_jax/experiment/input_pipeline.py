"""A run's input pipelines: data sources, batches, on-device augmentation.

- ``_source``, ``_first_source``: a split of the run's dataset (the procedural
  ``moving_shapes``, prepared on first use, or a TFDS video dataset); in a
  multi-process run process 0 prepares it first.
- ``_train_batches``: random access, element ``s`` the batch of step ``s`` (what
  makes resumes exact); ``_eval_batches``: one pass in order.
- ``_batch_fn``: the on-device augmentation inside the train step, also on a
  ``"data"`` mesh axis; ``_to_float``: uint8 clips to float32 on the device.
- ``_num_classes``, ``_clip_shape``, ``_label_names``: what the model and the
  reports read from the data.

:mod:`pso_jax.data` is imported inside the functions that use it, not at the
top: it imports ``tensorflow_datasets`` (about 0.5 s), which ``pso-jax --help``
and ``pso-jax minimize`` (whose parser imports this package) should not pay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from pso_jax import sharding
from pso_jax.experiment.config import TrainConfig


def _source(cfg: TrainConfig, split: str):
    """The ``split`` of the run's dataset (``moving_shapes`` prepared if needed)."""
    from pso_jax.data import load_moving_shapes, load_real  # slow: see the top

    if cfg.dataset == "moving_shapes":
        return load_moving_shapes(
            cfg.dataset_config, split=split, data_dir=cfg.data_dir
        )
    return load_real(cfg.dataset, split=split, data_dir=cfg.data_dir)


def _first_source(cfg: TrainConfig, split: str):
    """``_source``; in a multi-process run process 0 prepares the data first."""
    if jax.process_count() == 1:
        return _source(cfg, split)
    source = _source(cfg, split) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("pso_jax.experiment data prepared")
    return source if source is not None else _source(cfg, split)


def _num_classes(cfg: TrainConfig, source) -> int:
    """The config's class count, else the dataset's."""
    if cfg.num_classes is not None:
        return cfg.num_classes
    if cfg.dataset == "moving_shapes":
        from pso_jax.data import NUM_CLASSES  # slow: see the top

        return NUM_CLASSES
    info = getattr(source, "dataset_info", None)
    try:
        return int(info.features["label"].num_classes)
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(
            f"cannot read the number of classes of {cfg.dataset!r}; pass "
            "num_classes (--num-classes)"
        ) from e


def _label_names(cfg: TrainConfig):
    """The class names for reports (``moving_shapes``'), or ``None``."""
    if cfg.dataset != "moving_shapes":
        return None
    from pso_jax.data import LABEL_NAMES  # slow: see the top

    return LABEL_NAMES


def _clip_shape(cfg: TrainConfig, source) -> tuple[int, ...]:
    """The model's input clip shape ``[T, H, W, C]``."""
    video = np.asarray(source[0]["video"])
    if video.ndim == 3:
        video = video[..., None]
    if cfg.num_frames is not None:
        video = video[: cfg.num_frames]
    return tuple(video.shape)


def _train_batches(cfg: TrainConfig, source):
    """Random access: element ``s`` is the batch of step ``s`` (exact resumes)."""
    from pso_jax.data import make_dataset  # slow: see the top

    return make_dataset(
        source,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        num_epochs=None,
        num_frames=cfg.num_frames,
        float_video=False,  # uint8 to the device; converted there (4x less copy)
    )


def _eval_batches(cfg: TrainConfig, source, batch_size: int = 100) -> Iterator[dict]:
    """One pass over ``source`` in order, the last batch kept (float clips)."""
    from pso_jax.data import make_dataset  # slow: see the top

    ds = make_dataset(
        source,
        batch_size=min(batch_size, len(source)),
        seed=cfg.seed,
        shuffle=False,
        num_frames=cfg.num_frames,
        drop_remainder=False,
        float_video=True,
    )
    return iter(ds)


def _to_float(batch: dict) -> dict:
    """uint8 clips to float32 in ``[0, 1]`` (on the device, inside the chunk)."""
    out = {**batch, "video": batch["video"].astype(jnp.float32) / 255.0}
    if "select_video" in batch:
        out["select_video"] = batch["select_video"].astype(jnp.float32) / 255.0
    return out


def _batch_fn(cfg: TrainConfig, data: int) -> Callable | None:
    """The train step's ``batch_fn``: augmentation (``None`` without ``augment``).

    Args:
      cfg: the run's config.
      data: size of the mesh's ``"data"`` axis (1: unsharded, or no data axis).
    """
    if not cfg.augment:
        return None
    from pso_jax.data import augment_batch  # slow: see the top
    from pso_jax.data.augment import augment as augment_clip

    if data == 1:

        def batch_fn(key, batch):
            video, label = augment_batch(key, batch["video"], batch["label"])
            return {**batch, "video": video, "label": label}

        return batch_fn

    def sliced_batch_fn(key, batch):
        # This device's slice of the batch on the "data" axis: its clips' keys of
        # the whole batch's draw, so that every clip gets the augmentation it gets
        # on one device (augment_batch's keys).
        n = batch["video"].shape[0]
        keys = jax.random.split(key, n * data)
        row0 = jax.lax.axis_index(sharding.DATA_AXIS) * n
        keys = jax.lax.dynamic_slice_in_dim(keys, row0, n)
        video, label = jax.vmap(augment_clip)(keys, batch["video"], batch["label"])
        return {**batch, "video": video, "label": label}

    return sliced_batch_fn
