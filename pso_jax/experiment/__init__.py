"""Training runs end to end: configs, the host loop, checkpoints, reports.

:func:`train` is what ``pso-jax train`` runs: it loads the data (preparing the
procedural ``moving_shapes`` dataset if needed), builds the model, the swarm and
the fused train step (:func:`pso_jax.train.make_train_step`), then runs
``steps_per_call`` steps per jitted ``lax.scan`` call with the state donated,
logging every step to ``metrics.jsonl``, checkpointing with orbax, and finally
evaluating on the test split the best particle and the top-k ensemble (with
validation on: the candidate that wins on validation among the best particle,
the elite, the weight soups and the ensemble).

Self-supervised pretraining (``objective``, ``pso-jax pretrain``): the same
loop on a pretext task of the train split's clips (:mod:`pso_jax.pretext`; no
label is read), the task's loss as fitness and gradient loss; the run ends by
writing ``backbone/``, which a later run's ``pretrained`` fine-tunes (whole, or
``swarm_over="head"``), on all or a ``label_fraction`` of the labels.

Successive halving (``narrow_at``, ``pso-jax train --narrow-at 40:1``): after
a step of the list, the particles best on validation go on alone and the loop
continues with their smaller swarm (its own compiled step; checkpoints after
it hold the smaller swarm, and a resume or ``pso-jax evaluate`` rebuilds it).

Exact resumes: the batch of step ``s`` is element ``s`` of a seeded, repeated
grain dataset (random access, no iterator state), every random draw derives from
the state's key and step, and checkpoints fall on call boundaries, so a run that
is interrupted (SIGTERM, Ctrl-C) and resumed ends bit for bit where the
uninterrupted run ends.

Several devices and hosts: ``parallel=Parallelism(devices=4)`` (``pso-jax train
--devices 4``) shards the swarm over a mesh (:mod:`pso_jax.sharding`): each device
holds and trains ``particles / devices`` particles in the same jitted
``lax.scan``; the run's numbers are those of the one-device run up to float
rounding. The layout is not part of ``config.json``: a run checkpointed on 8
devices resumes on 2 or on 1. In a multi-process run (after
:func:`pso_jax.sharding.initialize_distributed`) every process runs
:func:`train` alike; checkpoints are written by all of them together (the work
directory must be shared), everything else by process 0 only.

Work directory::

    config.json        the run's TrainConfig (a resume must match it, but for
                       RESUME_MAY_CHANGE's fields, written back)
    metrics.jsonl      one record per step (and per validation)
    checkpoints/<s>/   orbax checkpoints of the full TrainState
    summary.json       test metrics, timings, throughput (atomic); a
                       pretext run's: its task's test loss, start and end
    backbone/          a pretext run's returned backbone (orbax), for
                       pretrained=
    elite/             with validation: the best model it saw (kept on resume)
    convergence.png    best / mean fitness and validation accuracy vs step
    confusion.png      the best particle's test confusion matrix
    evaluation.json, evaluation_confusion.png   pso-jax evaluate's
    pso-jax.lock       while a command writes there: its pid, host and command

Damage and concurrency: one process writes into a work directory at a time
(:func:`lock_workdir`; a second fails at once naming the holder); every JSON
file is strict JSON (a non-finite number is ``null``, listed in a
``"non_finite"`` field); a torn last line of ``metrics.jsonl`` (an interrupted
write) is skipped with a note, other damage is a :class:`RunFileError` naming
the file and line or field; the config is checked against the data and the
model (:class:`DataError`) before anything compiles; a SIGTERM/SIGINT before
the run has a state raises :class:`Interrupted` with nothing written, after it
checkpoints at the end of the block of steps it arrives in (blocks of at most
about 2 s, one compiled step; a second signal: :class:`SecondInterrupt`).

Modules (split as in the flax examples and scenic: configs, input pipeline,
the run, the loop, metrics, reports):

- :mod:`~pso_jax.experiment.config`: :class:`TrainConfig`, :data:`CONFIGS`,
  :func:`get_config`, :func:`validate_config`, :func:`read_config`,
  :class:`Parallelism`, :class:`ConfigError`, :class:`RunFileError`,
  :func:`particles_at` and :func:`particle_steps` (a narrowing run's size and
  compute, ``narrow_at``).
- :mod:`~pso_jax.experiment.input_pipeline`: data sources, train and
  evaluation batches, on-device augmentation.
- :mod:`~pso_jax.experiment.run`: the model, swarm and jitted train step a run
  builds from its config; restoring a checkpoint into its layout.
- :mod:`~pso_jax.experiment.loop`: :func:`train` and :func:`evaluate_workdir`
  (resumes, checkpoints, signals), :func:`lock_workdir`.
- :mod:`~pso_jax.experiment.metrics`: ``metrics.jsonl`` records, evaluations,
  the summary's test metrics.
- :mod:`~pso_jax.experiment.selection`: what the run keeps and returns: the
  particles that survive a narrowing, the elite (back-off), soups, ensemble,
  chosen on validation.
- :mod:`~pso_jax.experiment.report`: the progress bar and the plots.
- :mod:`~pso_jax.experiment.pretraining` and
  :mod:`~pso_jax.experiment.pretrained`: a pretext run's evaluations and
  ``backbone/``; ``pretrained`` read back and checked against the model.

>>> cfg = get_config("smoke", steps=4)
>>> cfg.model, cfg.particles, cfg.steps
('c3d', 4, 4)
"""

from pso_jax.experiment.compression import compress_workdir
from pso_jax.experiment.config import (
    CONFIGS,
    RESUME_MAY_CHANGE,
    ConfigError,
    Parallelism,
    RunFileError,
    TrainConfig,
    get_config,
    particle_steps,
    particles_at,
    read_config,
    validate_config,
)
from pso_jax.experiment.input_pipeline import DataError
from pso_jax.experiment.input_pipeline import _source as _source
from pso_jax.experiment.loop import (
    LOCK_FILE,
    Interrupted,
    SecondInterrupt,
    WorkdirLockedError,
    evaluate_workdir,
    lock_workdir,
    train,
)
from pso_jax.experiment.run import _restore as _restore
from pso_jax.experiment.run import _Run as _Run

__all__ = [
    "CONFIGS",
    "LOCK_FILE",
    "ConfigError",
    "DataError",
    "Interrupted",
    "Parallelism",
    "RESUME_MAY_CHANGE",
    "RunFileError",
    "SecondInterrupt",
    "TrainConfig",
    "WorkdirLockedError",
    "compress_workdir",
    "evaluate_workdir",
    "get_config",
    "lock_workdir",
    "particle_steps",
    "particles_at",
    "read_config",
    "train",
    "validate_config",
]

# Private, so not in __all__: `_Run`, `_restore` and `_source` are imported above
# because tests/test_sharding.py and tests/sharding_worker.py reach them as
# `experiment._Run`, `experiment._restore` and `experiment._source`.
