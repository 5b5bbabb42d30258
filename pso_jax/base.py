"""The optimizer interface: a NamedTuple of pure functions (like optax's)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import struct

from pso_jax.types import InitFn, StepFn, TellFn

PARTICLE_AXIS_FIELD = "particle_axis"  # field metadata: a leading particle axis
SUBSTATE_FIELD = "substate"  # field metadata: a nested state of this type


def particle_field(**kwargs: Any) -> Any:
    """A state field whose leaves have a leading particle axis ``P``.

    Sharded swarms split such leaves over the devices of the particle axis
    (:func:`pso_jax.sharding.state_specs`); other fields are swarm-wide.
    """
    return struct.field(metadata={PARTICLE_AXIS_FIELD: True}, **kwargs)


def substate_field(state_type: type, **kwargs: Any) -> Any:
    """A state field holding another state (whose own fields say their layout)."""
    return struct.field(metadata={SUBSTATE_FIELD: state_type}, **kwargs)


class StepInfo(NamedTuple):
    """Diagnostics of one swarm step that the next step does not need.

    All fields are arrays, in the user's sign (higher is better when maximising).

    Attributes:
      fitness: ``[P]`` float, this step's fitness of every particle, non-finite
        values replaced by the worst value (``+inf``, or ``-inf`` when maximising).
      best_fitness: ``()`` float, the swarm's best fitness so far.
      mean_fitness: ``()`` float, mean of this step's finite fitness values
        (NaN when none is finite).
      num_nonfinite: ``()`` int32, particles whose fitness was NaN or inf.
      num_improved: ``()`` int32, particles whose personal best improved.
      stall_count: ``()`` int32, steps since the best improved by more than the
        tolerance.
      restarted: ``()`` bool, whether a stagnation remedy was applied this step.
    """

    fitness: jax.Array
    best_fitness: jax.Array
    mean_fitness: jax.Array
    num_nonfinite: jax.Array
    num_improved: jax.Array
    stall_count: jax.Array
    restarted: jax.Array


class SwarmOptimizer(NamedTuple):
    """A swarm optimizer as a bundle of pure functions.

    Attributes:
      init: ``init(key, params_template, hparams) -> state``.
      step: ``step(key, state, batch, hparams) -> (state, StepInfo)``: evaluates
        the fitness function given to the factory on every particle, updates the
        bests and moves the swarm, all in one traceable call. ``init``, ``step``
        and ``tell`` check their arguments on the host first (the key, the
        state, concrete hyperparameters; traced ones cannot be read, so under
        ``jit`` they are checked where they were built), and raise a
        ``ValueError`` naming the argument and the value.
      tell: ``tell(key, state, fitness, hparams) -> (state, StepInfo)``: the same
        without evaluation, for fitness computed elsewhere (a simulator, say) on
        the positions returned by ``ask``.
      ask: ``ask(state) -> params``: the full parameters of every particle
        (``[P, ...]`` leaves; frozen leaves are broadcast, not stored).
      rescore: ``rescore(state, pbest_fitness, best_fitness) -> state``: the
        personal and swarm bests' fitness measured again (``[P]`` and ``()``),
        e.g. on a new minibatch, so that a best scored on one lucky batch does
        not hold the swarm; bests not yet found keep the worst value.
      default_hparams: a ``PSOHyperParams`` with the variant's defaults.
      num_particles: static swarm size ``P``.
      config: the static configuration, for inspection and checkpoints.
    """

    init: InitFn
    step: StepFn
    tell: TellFn
    ask: Any
    rescore: Any
    default_hparams: Any
    num_particles: int
    config: Any
