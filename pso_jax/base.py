"""The optimizer interface: a NamedTuple of pure functions (like optax's)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from pso_jax.types import InitFn, StepFn, TellFn


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
        bests and moves the swarm, all in one traceable call.
      tell: ``tell(key, state, fitness, hparams) -> (state, StepInfo)``: the same
        without evaluation, for fitness computed elsewhere (a simulator, say) on
        the positions returned by ``ask``.
      ask: ``ask(state) -> params``: the full parameters of every particle
        (``[P, ...]`` leaves; frozen leaves are broadcast, not stored).
      default_hparams: a ``PSOHyperParams`` with the variant's defaults.
      num_particles: static swarm size ``P``.
      config: the static configuration, for inspection and checkpoints.
    """

    init: InitFn
    step: StepFn
    tell: TellFn
    ask: Any
    default_hparams: Any
    num_particles: int
    config: Any
