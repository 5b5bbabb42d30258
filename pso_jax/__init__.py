"""pso_jax: particle swarm optimization in JAX over parameter pytrees.

Every particle is one full set of parameters (a vector, a Flax params dict); the
swarm is a pytree with a leading particle axis, and optimizers are pairs of pure
functions, ``init`` and ``step``, in the manner of optax and blackjax.
"""

from pso_jax import (
    compress,
    fitness,
    flax_utils,
    objectives,
    particle_space,
    pretext,
    sharding,
)
from pso_jax.base import StepInfo, SwarmOptimizer
from pso_jax.bounds import BOUND_HANDLERS
from pso_jax.compress import (
    Compressed,
    Quantized,
    SearchResult,
    compress_params,
    kernel_names,
    pack,
    pareto_front,
    prune,
    quantize,
    unpack,
)
from pso_jax.minimize import (
    STOP_REASONS,
    Bounds,
    MinimizeResult,
    RunInfo,
    minimize,
    minimize_defaults,
    run,
    scan_chunks,
    scan_steps,
    step_key,
)
from pso_jax.pso import (
    RANDOM_FACTORS,
    VARIANTS,
    PSOConfig,
    PSOHyperParams,
    PSOState,
    best_solution,
    pso,
    validate_hparams,
)
from pso_jax.sharding import (
    ShardedSwarmOptimizer,
    initialize_distributed,
    make_mesh,
)
from pso_jax.topology import TOPOLOGIES
from pso_jax.train import (
    HYBRID_DEFAULTS,
    Trainer,
    TrainState,
    evaluate,
    hybrid_pso,
    make_train_step,
)
from pso_jax.velocity import (
    PSOConvergenceWarning,
    constriction_factor,
    in_stability_region,
)

__version__ = "0.1.0"

__all__ = [
    "BOUND_HANDLERS",
    "HYBRID_DEFAULTS",
    "RANDOM_FACTORS",
    "STOP_REASONS",
    "TOPOLOGIES",
    "TrainState",
    "Trainer",
    "VARIANTS",
    "Bounds",
    "Compressed",
    "MinimizeResult",
    "PSOConfig",
    "PSOConvergenceWarning",
    "PSOHyperParams",
    "PSOState",
    "Quantized",
    "RunInfo",
    "SearchResult",
    "ShardedSwarmOptimizer",
    "StepInfo",
    "SwarmOptimizer",
    "best_solution",
    "compress",
    "compress_params",
    "constriction_factor",
    "evaluate",
    "fitness",
    "flax_utils",
    "in_stability_region",
    "kernel_names",
    "hybrid_pso",
    "initialize_distributed",
    "make_mesh",
    "make_train_step",
    "minimize",
    "minimize_defaults",
    "objectives",
    "pack",
    "pareto_front",
    "particle_space",
    "pretext",
    "prune",
    "pso",
    "quantize",
    "run",
    "scan_chunks",
    "scan_steps",
    "sharding",
    "step_key",
    "unpack",
    "validate_hparams",
]
