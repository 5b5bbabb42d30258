"""Analytic parameter and FLOP counts for the reference models.

FLOPs count a multiply-add as 2 and include only the contractions:

- a dot (Dense, einsum): ``2 * |output| * K``, K the contracted size;
- a convolution: ``2 * |output| * kt * kh * kw * C_in / groups``;

norms, activations, biases, pooling and the shifted sums of the fast lowering are
not counted (they are O(|output|), memory-bound work). The count is read off the
jaxpr of the model with ``impl="xla"`` (plain convolutions), so it is the same for
every lowering and does not depend on how XLA fuses or pads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core


def param_count(params: Any) -> int:
    """Number of scalars in a params pytree (one particle).

    >>> import jax.numpy as jnp
    >>> param_count({"kernel": jnp.zeros((32, 10)), "bias": jnp.zeros(10)})
    330
    """
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _jaxpr_flops(jaxpr: Any) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (O, I, *spatial)
            per_out = math.prod(rhs[d] for d in spec[1:])  # I/groups * kernel
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_out
        for sub in jex_core.jaxprs_in_params(eqn.params):
            total += _jaxpr_flops(sub)
    return total


def count_flops(fn: Any, *args: Any) -> int:
    """Analytic FLOPs of ``fn(*args)`` (dots and convolutions only, see module).

    >>> import jax.numpy as jnp
    >>> count_flops(lambda a, b: a @ b, jnp.zeros((4, 8)), jnp.zeros((8, 2)))  # 2*4*2*8
    128
    """
    closed = jax.make_jaxpr(fn)(*args)
    return _jaxpr_flops(closed.jaxpr)


def flops_per_clip(model: nn.Module, clip_shape: Sequence[int]) -> int:
    """Analytic forward FLOPs of one particle on one clip ``[T, H, W, C]``.

    Args:
      model: a model from :func:`pso_jax.models.make_model`.
      clip_shape: ``(T, H, W, C)``.

    Returns:
      FLOPs (multiply-add = 2) of ``model.apply`` on a ``[1, T, H, W, C]`` batch.

    >>> from pso_jax.models import make_model
    >>> flops_per_clip(make_model("c3d", 10, width=8), (8, 32, 32, 3)) > 0
    True
    """
    model = model.clone(impl="xla")
    x = jax.ShapeDtypeStruct((1, *clip_shape), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return count_flops(lambda p, x: model.apply({"params": p}, x), params, x)
