"""Type aliases and protocols shared across pso_jax (cf. optax ``_src/base.py``)."""

from __future__ import annotations

from typing import Any, Protocol

import jax

PyTree = Any
PRNGKey = jax.Array  # a typed key from ``jax.random.key``
Fitness = jax.Array  # [P] float, one value per particle
Batch = Any  # whatever the fitness function takes besides the parameters


class InitFn(Protocol):
    """Builds a swarm state: ``init(key, params_template, hparams) -> state``."""

    def __call__(self, key: PRNGKey, params_template: PyTree, hparams: Any) -> Any: ...


class StepFn(Protocol):
    """Evaluates and moves the swarm: ``step(key, state, batch, hparams)``."""

    def __call__(
        self, key: PRNGKey, state: Any, batch: Batch, hparams: Any
    ) -> tuple[Any, Any]: ...


class TellFn(Protocol):
    """Moves the swarm given fitness computed elsewhere."""

    def __call__(
        self, key: PRNGKey, state: Any, fitness: Fitness, hparams: Any
    ) -> tuple[Any, Any]: ...
