"""Pretrained backbones: what ``pso-jax pretrain`` writes, ``--pretrained`` reads.

A pretext run (:class:`~pso_jax.experiment.TrainConfig` ``objective``) ends
by writing ``backbone/`` in its work directory: the returned model's
``"body"`` parameters (orbax, :func:`pso_jax.flax_utils.save_params`), without
the pretext head, whose outputs a classifier does not share. Its
``config.json`` says which model they belong to.

- ``_save_backbone``: ``workdir/backbone`` from a run's returned parameters.
- ``_load_pretrained``: a run's starting parameters from ``cfg.pretrained``:
  a pretext work directory (its backbone, the model checked against the
  run's, a fresh head) or params saved with ``save_params`` (the whole
  model, as before).
"""

from __future__ import annotations

from pathlib import Path

from pso_jax import flax_utils
from pso_jax.experiment.config import ConfigError, TrainConfig, read_config
from pso_jax.types import PyTree

BACKBONE = "backbone"
BODY = "body"
# The fields that decide the backbone's parameters.
_MODEL_FIELDS = ("model", "width", "stem", "patch")


def _save_backbone(workdir: Path, params: PyTree) -> Path:
    """Write ``params["body"]`` to ``workdir/backbone`` (atomic; replaced)."""
    path = workdir / BACKBONE
    flax_utils.save_params(path, {BODY: params[BODY]}, force=True)
    return path


def _load_pretrained(cfg: TrainConfig, template: PyTree) -> PyTree:
    """The run's starting parameters from ``cfg.pretrained`` (``template``'s tree).

    Raises:
      ConfigError: a pretext work directory of another model (naming the
        field that differs), one without ``backbone/`` (the run did not
        finish), or parameters of another shape (naming the key path).
    """
    path = Path(cfg.pretrained)
    if not (path / "config.json").exists():  # a whole model, save_params'
        try:
            return flax_utils.load_params(path, template)
        except ValueError as e:
            raise ConfigError(
                "pretrained",
                cfg.pretrained,
                f"{e} (params of another model, or of another model size: "
                "--model, --width, --patch, --num-classes)",
            ) from None
    saved = read_config(path / "config.json")
    if saved.objective is None:
        raise ConfigError(
            "pretrained",
            cfg.pretrained,
            "is a training work directory, not a pretraining one (`pso-jax "
            "pretrain` writes backbone/); pass one, or params saved with "
            "pso_jax.flax_utils.save_params",
        )
    for name in _MODEL_FIELDS:
        theirs, ours = getattr(saved, name), getattr(cfg, name)
        if theirs != ours:
            flag = "--" + name.replace("_", "-")
            value = " ".join(map(str, theirs)) if name == "patch" else theirs
            raise ConfigError(
                "pretrained",
                cfg.pretrained,
                f"holds a backbone of {name}={theirs!r} (objective "
                f"{saved.objective!r}); this run has {name}={ours!r}: pass "
                f"{flag} {value} to fine-tune it",
            )
    backbone = path / BACKBONE
    if not backbone.is_dir():
        raise ConfigError(
            "pretrained",
            cfg.pretrained,
            "has no backbone/: its pretraining has not finished (`pso-jax "
            "pretrain --resume` completes it)",
        )
    try:
        loaded = flax_utils.load_params(backbone, {BODY: template[BODY]})
    except ValueError as e:
        raise ConfigError("pretrained", cfg.pretrained, str(e)) from None
    return {**template, BODY: loaded[BODY]}
