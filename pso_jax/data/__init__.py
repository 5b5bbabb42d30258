"""Video data: a procedural TFDS dataset, grain input pipelines, augmentation.

* :mod:`~pso_jax.data.moving_shapes`: the ``moving_shapes`` TFDS builder and
  :func:`generate_clips`, its NumPy generator.
* :mod:`~pso_jax.data.pipeline`: grain loaders, clip sampling, multi-scale batches.
* :mod:`~pso_jax.data.augment`: jittable, label-aware augmentation.
* :mod:`~pso_jax.data.real`: real datasets (``ucf101``, ``moving_mnist``, prepared
  TFDS folders); TFDS names need the ``video-tf`` extra (TensorFlow).

Needs ``tensorflow-datasets``, ``grain``, ``array-record`` and
``importlib_resources``, but not TensorFlow.
"""

from pso_jax.data import augment, moving_shapes, pipeline, real
from pso_jax.data.augment import augment_batch
from pso_jax.data.moving_shapes import (
    HFLIP,
    LABEL_NAMES,
    NUM_CLASSES,
    REVERSED,
    VFLIP,
    MovingShapes,
    MovingShapesConfig,
    generate_clips,
)
from pso_jax.data.pipeline import (
    load_moving_shapes,
    make_dataset,
    make_loader,
    multiscale_batches,
    resize_video,
    sample_clips,
)
from pso_jax.data.real import load_real

__all__ = [
    "HFLIP",
    "LABEL_NAMES",
    "NUM_CLASSES",
    "REVERSED",
    "VFLIP",
    "MovingShapes",
    "MovingShapesConfig",
    "augment",
    "augment_batch",
    "generate_clips",
    "load_moving_shapes",
    "load_real",
    "make_dataset",
    "make_loader",
    "moving_shapes",
    "multiscale_batches",
    "pipeline",
    "real",
    "resize_video",
    "sample_clips",
]
