"""Real video datasets through TFDS: ``ucf101``, ``moving_mnist``, prepared folders.

Two ways in:

* A **prepared dataset folder** (the ``<data_dir>/<name>/<config>/<version>``
  directory holding ``dataset_info.json``), written by TFDS on any machine with
  ``file_format="array_record"``. It loads with ``tfds.builder_from_directory``
  and random access, *without* TensorFlow (video features decode with Pillow).
* A **TFDS dataset name**. TFDS's video builders (and ``features.Video``
  encoding) need TensorFlow: install the optional extra with
  ``pip install "pso_jax[video-tf]"``. Nothing is downloaded unless
  ``download=True``; offline, put the source files in a ``manual_dir`` (TFDS
  then takes them from there and still checks their checksums). Preparing
  ``ucf101`` also needs ``ffmpeg`` on the ``PATH`` (TFDS decodes the ``.avi``
  files with it).

Either way, when something is missing the error comes at once, before any network
access (TFDS's own download retries for minutes when offline), and says what to
install and where to put which files.

The result is a random-access source for :func:`pso_jax.data.pipeline.make_dataset`
(use :func:`video_keys` for its ``video_key`` and ``label_key``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

from etils import epath

__all__ = [
    "EXTRA",
    "INSTALL_HINT",
    "KNOWN_DATASETS",
    "DatasetNotPreparedError",
    "MissingTensorFlowError",
    "VideoKeys",
    "has_tensorflow",
    "load_real",
    "video_keys",
]

EXTRA = "video-tf"
INSTALL_HINT = f'pip install "pso_jax[{EXTRA}]"'


class VideoKeys(NamedTuple):
    """Feature names of a dataset's video and label (``None``: unlabelled)."""

    video: str
    label: str | None


KNOWN_DATASETS = {
    "ucf101": VideoKeys("video", "label"),
    "moving_mnist": VideoKeys("image_sequence", None),
    "moving_shapes": VideoKeys("video", "label"),
}


class MissingTensorFlowError(ImportError):
    """A TFDS dataset needs TensorFlow, which is not installed."""


class DatasetNotPreparedError(FileNotFoundError):
    """A dataset is neither prepared nor preparable without a download."""


def has_tensorflow() -> bool:
    """Whether TensorFlow is importable (checked without importing it).

    >>> isinstance(has_tensorflow(), bool)
    True
    """
    return importlib.util.find_spec("tensorflow") is not None


def video_keys(name: str) -> VideoKeys:
    """Feature names of a known dataset's video and label.

    Args:
        name: a TFDS name, optionally with config and version (``"ucf101/..."``).

    Raises:
        KeyError: for a dataset not in :data:`KNOWN_DATASETS`.

    >>> video_keys("ucf101/ucf101_1_256:2.0.0")
    VideoKeys(video='video', label='label')
    >>> video_keys("moving_mnist").label is None  # unlabelled
    True
    """
    return KNOWN_DATASETS[name.split("/")[0].split(":")[0]]


def _where_to_put(name: str, data_dir) -> str:
    root = epath.Path(data_dir or "~/tensorflow_datasets").expanduser()
    return (
        f"  * or pass the folder of a dataset already prepared (on a machine with "
        f"TensorFlow, with\n    file_format='array_record'): "
        f"load_real('{root}/{name}/<config>/<version>'); it loads without "
        f"TensorFlow;\n"
        f"  * offline, put the dataset's source files (the archives TFDS would "
        f"download) in a\n    manual_dir, e.g. {root}/downloads/manual, and pass "
        f"load_real('{name}', manual_dir=...)."
    )


def _is_prepared_dir(path: epath.Path) -> bool:
    return (path / "dataset_info.json").exists()


def _from_directory(path: epath.Path, split: str):
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(path)
    try:
        return builder.as_data_source(split=split)
    except Exception as e:  # TFDS raises several types for a wrong file format.
        raise DatasetNotPreparedError(
            f"{path} holds {builder.name} in the {builder.info.file_format} format, "
            "which has no random access. Convert it once (needs TensorFlow: "
            f"{INSTALL_HINT}):\n  tfds convert_format --dataset_dir={path} "
            "--out_file_format=array_record"
        ) from e


def load_real(
    name_or_dir: str | os.PathLike,
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = False,
):
    """Return a random-access source of a real TFDS video dataset.

    Args:
        name_or_dir: a TFDS name, optionally with config and version
            (``"ucf101"``, ``"ucf101/ucf101_1_256"``, ``"moving_mnist"``), or the
            path of a prepared dataset folder (one with ``dataset_info.json``).
        split: the split, with TFDS slicing (``"train[:10%]"``).
        data_dir: TFDS data directory (default ``~/tensorflow_datasets``).
        manual_dir: a folder with the dataset's source files, used instead of
            downloading them.
        download: allow TFDS to download what is neither prepared nor in
            ``manual_dir``. Off by default, so that an offline machine fails at
            once rather than after minutes of retries.

    Returns:
        An ``array_record`` data source (``len``, ``[i]`` -> dict of NumPy arrays).

    Raises:
        MissingTensorFlowError: a dataset name was given and TensorFlow is not
            installed.
        DatasetNotPreparedError: the dataset is not prepared and its source files
            are neither in ``manual_dir`` nor allowed to be downloaded.

    A prepared folder loads without TensorFlow; here one of ``moving_shapes``:

    >>> import contextlib, dataclasses, io, tempfile
    >>> from pso_jax.data import moving_shapes
    >>> tiny = dataclasses.replace(
    ...     moving_shapes.CONFIGS["small"], name="tiny", num_train=2, num_validation=2,
    ...     num_test=2,
    ... )
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     builder = moving_shapes.MovingShapes(config=tiny, data_dir=tmp)
    ...     with contextlib.redirect_stdout(io.StringIO()):  # TFDS's progress
    ...         builder.download_and_prepare()
    ...     source = load_real(builder.data_dir, split="test")
    ...     print(len(source), sorted(source[0]))
    2 ['label', 'video']
    """
    path = epath.Path(name_or_dir).expanduser()
    if _is_prepared_dir(path):
        return _from_directory(path, split)
    name = str(name_or_dir)
    if not has_tensorflow():
        raise MissingTensorFlowError(
            f"Loading the TFDS dataset {name!r} needs TensorFlow (TFDS's video "
            "builders use it), which is not installed. Either\n"
            f"  * install the optional extra: {INSTALL_HINT}\n"
            f"{_where_to_put(name.split('/')[0], data_dir)}"
        )

    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        missing = _missing_sources(builder, manual_dir)
        if missing and not download:
            listed = "\n".join(f"    {m}" for m in missing)
            raise DatasetNotPreparedError(
                f"{builder.name} is not prepared in {builder.data_dir}, and these "
                f"source files are not in manual_dir={manual_dir}:\n{listed}\n"
                f"Either\n  * pass download=True (needs network access);\n"
                f"{_where_to_put(builder.name, data_dir)}"
            )
        # try_download_gcs would fetch a prepared copy from GCS: network again.
        config = tfds.download.DownloadConfig(
            manual_dir=manual_dir, try_download_gcs=download
        )
        builder.download_and_prepare(download_config=config)
    return builder.as_data_source(split=split)


def _missing_sources(builder, manual_dir) -> list[str]:
    """Source files of ``builder`` that are not in ``manual_dir``, as
    ``"filename  (url)"`` lines; all of them when ``manual_dir`` is ``None``."""
    manual = epath.Path(manual_dir).expanduser() if manual_dir else None
    url_infos = builder.url_infos or {}
    missing = []
    for url, info in sorted(url_infos.items()):
        filename = info.filename or os.path.basename(url)
        if manual is None or not (manual / filename).exists():
            missing.append(f"{filename}  ({url})")
    if not url_infos and manual is None:
        missing.append("(TFDS records no checksums for this dataset)")
    return missing
