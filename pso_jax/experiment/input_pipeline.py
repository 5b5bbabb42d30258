"""A run's input pipelines: data sources, batches, on-device augmentation.

- ``_source``, ``_first_source``: a split of the run's dataset (the procedural
  ``moving_shapes``, prepared on first use, or a TFDS video dataset); in a
  multi-process run process 0 prepares it first.
- ``_train_batches``: random access, element ``s`` the batch of step ``s`` (what
  makes resumes exact; clips only for a pretext run, the ``label_fraction``
  subset of the split); ``_eval_batches``: one pass in order.
- ``_batch_fn``: the on-device augmentation inside the train step, also on a
  ``"data"`` mesh axis; ``_to_float``: uint8 clips to float32 on the device.
- ``_num_classes``, ``_clip_shape``, ``_label_names``: what the model and the
  reports read from the data.
- ``_check_data``: the config against the data, on the host before anything
  compiles (the class count, the clip shape against the model, the batch size
  against the split; ``moving_shapes`` from its config, before it is
  generated); ``_check_labels``: every batch's labels against the class count.
  Both raise :class:`DataError`.

:mod:`pso_jax.data` is imported inside the functions that use it, not at the
top: it imports ``tensorflow_datasets`` (about 0.5 s), which ``pso-jax --help``
and ``pso-jax minimize`` (whose parser imports this package) should not pay.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from pso_jax import sharding
from pso_jax.experiment.config import ConfigError, TrainConfig
from pso_jax.pretext import make_task
from pso_jax.train import check_labels


class DataError(ValueError):
    """The dataset and the run's config disagree, or the dataset cannot be read.

    Attributes:
      field: the config field to change (``None`` if none), as in
        :class:`~pso_jax.experiment.config.ConfigError`.
      value: its value.
      expected: what is wrong and what is expected, in words.
    """

    def __init__(self, field: str | None, value: Any, expected: str):
        message = expected if field is None else f"{field}={value!r}: {expected}"
        super().__init__(message)
        self.field, self.value, self.expected = field, value, expected


def _source(cfg: TrainConfig, split: str):
    """The ``split`` of the run's dataset (``moving_shapes`` prepared if needed).

    Raises:
      DataError: a TFDS dataset that is not prepared, or needs TensorFlow.
    """
    from pso_jax.data import load_moving_shapes, load_real  # slow: see the top
    from pso_jax.data.real import DatasetNotPreparedError, MissingTensorFlowError

    if cfg.dataset == "moving_shapes":
        return load_moving_shapes(
            cfg.dataset_config, split=split, data_dir=cfg.data_dir
        )
    try:
        return load_real(cfg.dataset, split=split, data_dir=cfg.data_dir)
    except DatasetNotPreparedError as e:
        raise DataError(None, None, _not_prepared(cfg, str(e))) from None
    except MissingTensorFlowError as e:
        raise DataError(None, None, f"--dataset {cfg.dataset}: {e}") from None


def _not_prepared(cfg: TrainConfig, text: str) -> str:
    """A not-prepared dataset's error in the command line's words (its flags,
    the files to place and where), one line; ``text``: the library's."""
    if "source files are not in manual_dir" not in text:
        return f"--dataset {cfg.dataset}: {' '.join(text.split())}"
    # The library lists the missing source files one per indented line.
    missing = [
        line.strip()
        for line in text.splitlines()
        if line.startswith("    ") and not line.strip().startswith(("*", "load_"))
    ]
    root = os.path.expanduser(cfg.data_dir or "~/tensorflow_datasets")
    files = ", ".join(missing) or "its source archives"
    return (
        f"--dataset {cfg.dataset}: not prepared in {root} (--data-dir) and not "
        f"downloaded (offline): place {files} in {root}/downloads/manual/ and run "
        f"again, or pass --dataset with the folder of a copy prepared elsewhere "
        f"({root}/{cfg.dataset}/<config>/<version>, array_record format)"
    )


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
        raise DataError(
            "num_classes",
            None,
            f"cannot read the number of classes of {cfg.dataset!r}; pass "
            "num_classes (--num-classes)",
        ) from e


def _label_names(cfg: TrainConfig):
    """The class names for reports (``moving_shapes``'), or ``None``."""
    if cfg.dataset != "moving_shapes":
        return None
    from pso_jax.data import LABEL_NAMES  # slow: see the top

    return LABEL_NAMES


def _clip_shape(cfg: TrainConfig, source) -> tuple[int, ...]:
    """The model's input clip shape ``[T, H, W, C]``.

    ``T`` is ``num_frames`` when set: the pipeline cuts that many frames (and
    repeats the last frame of shorter clips).
    """
    shape = np.shape(source[0]["video"])
    if len(shape) == 3:
        shape = (*shape, 1)
    if cfg.num_frames is not None:
        shape = (cfg.num_frames, *shape[1:])
    return tuple(int(n) for n in shape)


class _DataFacts(NamedTuple):
    """What a dataset says about itself (for :func:`_check_data`).

    Attributes:
      name: for messages, e.g. ``"moving_shapes/small"``.
      num_classes: its class count, or ``None`` if it does not say.
      clip_shape: ``(T, H, W, C)``, ``None`` where clips differ.
      train_size: clips in the train split.
    """

    name: str
    num_classes: int | None
    clip_shape: tuple[int | None, ...]
    train_size: int


def _data_facts(cfg: TrainConfig, source=None) -> _DataFacts | None:
    """The dataset's facts: ``moving_shapes``' from its config (without generating
    it), another dataset's from its train ``source`` (``None`` without it)."""
    if cfg.dataset == "moving_shapes":
        from pso_jax.data import NUM_CLASSES, moving_shapes  # slow: see the top

        try:
            ms = moving_shapes.get_config(cfg.dataset_config)
        except ValueError:
            raise ConfigError(
                "dataset_config",
                cfg.dataset_config,
                f"choose from {tuple(sorted(moving_shapes.CONFIGS))} (moving_shapes)",
            ) from None
        name = f"moving_shapes/{ms.name}"
        return _DataFacts(name, NUM_CLASSES, ms.shape, ms.split_size("train"))
    if source is None:
        return None
    info = getattr(source, "dataset_info", None)
    num_classes = getattr(_feature(info, "label"), "num_classes", None)
    shape = getattr(_feature(info, "video"), "shape", None)
    if shape is None or len(shape) not in (3, 4):
        shape = np.shape(source[0]["video"])
    if len(shape) == 3:
        shape = (*shape, 1)
    return _DataFacts(cfg.dataset, num_classes, tuple(shape), len(source))


def _feature(info, name: str):
    """``info.features[name]`` of a TFDS ``DatasetInfo``, or ``None``."""
    try:
        return info.features[name]
    except (AttributeError, KeyError, TypeError):
        return None


def _check_data(cfg: TrainConfig, source=None) -> None:
    """Raise a :class:`DataError` where the config and the dataset disagree.

    On the host, before anything compiles: the class count (a model with fewer
    outputs than the dataset's labels scores every particle ``inf``), the batch
    size against the train split, the clip length (fixed, or cut by
    ``num_frames``), and the clip shape against the model (a tubelet that does
    not divide the clip, or pools that would leave a layer an empty input and
    the logits ``nan``: traced abstractly, nothing runs). ``moving_shapes`` is
    checked from its config, so without ``source``; another dataset needs its
    train ``source`` (without it nothing is checked).
    """
    facts = _data_facts(cfg, source)
    if facts is None:
        return
    n = facts.num_classes
    if cfg.num_classes is not None and n is not None and cfg.num_classes != n:
        raise DataError(
            "num_classes",
            cfg.num_classes,
            f"{facts.name} has {n} classes (labels 0..{n - 1}); omit num_classes "
            f"(--num-classes) to take the dataset's, or pass {n}",
        )
    if cfg.batch_size > facts.train_size:
        raise DataError(
            "batch_size",
            cfg.batch_size,
            f"larger than the train split of {facts.name} ({facts.train_size} "
            f"clips); choose a batch size of at most {facts.train_size}",
        )
    t, h, w, c = facts.clip_shape
    if t is None and cfg.num_frames is None:
        raise DataError(
            "num_frames",
            None,
            f"the clips of {facts.name} differ in length: pass num_frames "
            "(--num-frames) to cut windows of a fixed length",
        )
    if None in (h, w, c):
        raise DataError(
            None,
            None,
            f"the frames of {facts.name} differ in size ({facts.clip_shape}); "
            "resize them to one size when preparing the dataset",
        )
    clip = (cfg.num_frames or t, h, w, c)
    num_outputs, grid = cfg.num_classes or n or 2, None
    if cfg.objective is not None:
        try:
            task = make_task(cfg.objective, clip, cfg.patch, mask_ratio=cfg.mask_ratio)
        except ValueError as e:
            dims = "x".join(map(str, clip[:3]))
            raise DataError(
                None, None, f"{cfg.model} on clips of {dims} (T x H x W): {e}"
            ) from None
        num_outputs = task.num_outputs
        grid = task.grid if cfg.decoder == "dense" else None
    _check_model_input(cfg, clip, num_outputs, grid)


def _check_model_input(
    cfg: TrainConfig, clip: tuple[int, ...], num_classes: int, decoder_grid=None
):
    """Trace the model on one clip abstractly; raise where it does not fit."""
    from pso_jax.models import make_model

    model = make_model(
        cfg.model,
        num_classes,
        width=cfg.width,
        stem=cfg.stem,
        patch=cfg.patch,
        decoder_grid=decoder_grid,
    )
    dims = "x".join(map(str, clip[:3]))
    where = f"clips of {dims} (T x H x W"
    where += f", num_frames={cfg.num_frames})" if cfg.num_frames else ")"

    def init(x):
        return model.init_with_output(jax.random.key(0), x, capture_intermediates=True)

    try:
        out = jax.eval_shape(init, jax.ShapeDtypeStruct((1, *clip), jnp.float32))
    except ValueError as e:
        raise DataError(
            "patch", cfg.patch, f"{cfg.model} does not fit {where}: {e}"
        ) from None
    shapes = jax.tree_util.tree_leaves_with_path(out[1].get("intermediates", {}))
    for path, leaf in shapes:
        if 0 in leaf.shape:
            layer = "/".join(
                str(getattr(k, "key", k)) for k in path[:-2]
            )  # drop the ('__call__', 0) of the capture
            raise DataError(
                "patch",
                cfg.patch,
                f"on {where} the {cfg.model}'s pools leave layer {layer!r} an "
                f"empty output {tuple(leaf.shape)} (its logits would be nan): "
                "use a smaller patch, longer clips or larger frames",
            )


def _check_labels(labels, num_classes: int, where: str) -> None:
    """:func:`pso_jax.train.check_labels` as a :class:`DataError` of the config."""
    try:
        check_labels(labels, num_classes, where)
    except ValueError as e:
        raise DataError(
            "num_classes",
            num_classes,
            f"{e}: pass the dataset's class count (or omit num_classes / "
            "--num-classes)",
        ) from None


def _checked_batches(batches: Iterable[dict], num_classes: int, split: str):
    """``batches``, each checked by :func:`_check_labels` as it is read."""
    for i, batch in enumerate(batches):
        _check_labels(batch["label"], num_classes, f"batch {i} of the {split} split")
        yield batch


def _train_batches(cfg: TrainConfig, source):
    """Random access: element ``s`` is the batch of step ``s`` (exact resumes).

    A pretext run (``cfg.objective``) picks the clips only: no label is read.
    With ``label_fraction < 1``, the batches draw from :func:`_labeled_subset`.
    """
    from pso_jax.data import make_dataset  # slow: see the top

    return make_dataset(
        _labeled_subset(cfg, source),
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        num_epochs=None,
        num_frames=cfg.num_frames,
        float_video=False,  # uint8 to the device; converted there (4x less copy)
        label_key=None if cfg.objective else "label",
    )


def _labeled_subset(cfg: TrainConfig, source):
    """The ``label_fraction`` of ``source`` a run may read (all of it at 1).

    A fixed draw of the seed (a permutation of the indices, its first
    ``ceil(fraction * n)``; at least one batch), the same for every run of a
    seed whatever its model: pretrained and from-scratch runs fine-tune on the
    same clips.
    """
    if cfg.label_fraction >= 1:
        return source
    n = len(source)
    keep = min(max(math.ceil(cfg.label_fraction * n), cfg.batch_size), n)
    order = np.random.default_rng(cfg.seed).permutation(n)[:keep]
    return _Subset(source, tuple(int(i) for i in np.sort(order)))


class _Subset:
    """A read-only view of ``source`` at ``indices`` (``len`` and ``[i]``)."""

    __slots__ = ("indices", "source")

    def __init__(self, source, indices: tuple[int, ...]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]


def _eval_batches(
    cfg: TrainConfig,
    source,
    batch_size: int = 100,
    *,
    num_classes: int | None = None,
    split: str = "evaluation",
    labels: bool = True,
) -> Iterator[dict]:
    """One pass over ``source`` in order, the last batch kept (float clips).

    With ``num_classes``, every batch's labels are checked against it
    (:func:`_check_labels`; ``split`` names the split in the error). Without
    ``labels``, the clips only (a pretext run's evaluation: none is read).
    """
    from pso_jax.data import make_dataset  # slow: see the top

    ds = make_dataset(
        source,
        batch_size=min(batch_size, len(source)),
        seed=cfg.seed,
        shuffle=False,
        num_frames=cfg.num_frames,
        drop_remainder=False,
        float_video=True,
        label_key="label" if labels else None,
    )
    if num_classes is None:
        return iter(ds)
    return _checked_batches(ds, num_classes, split)


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
