"""Type aliases, protocols and the checks of plain arguments (cf. optax ``base.py``).

The ``check_*`` functions are the one place where a plain argument (a count, a
real number, a key) is checked on entry: each raises a ``ValueError`` that names
the argument, the value it got and what it expects. They run on the host, on
Python values or on an array's static shape and dtype, so they add no device
work and are safe on tracers.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
PRNGKey = jax.Array  # a typed key from ``jax.random.key`` (raw uint32 keys work too)
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


def is_tracer(x: Any) -> bool:
    """Whether ``x`` is traced (its value is unknown until the computation runs).

    >>> import jax, jax.numpy as jnp
    >>> is_tracer(jnp.ones(2)), bool(jax.jit(lambda x: is_tracer(x))(1.0))
    (False, True)
    """
    return isinstance(x, jax.core.Tracer)


def is_real_dtype(dtype: Any) -> bool:
    """Whether ``dtype`` holds real numbers (a float or integer dtype, not bool).

    >>> import jax.numpy as jnp
    >>> is_real_dtype(jnp.float16), is_real_dtype(jnp.complex64), is_real_dtype(bool)
    (True, False, False)
    """
    return bool(
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    )


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as a Python ``int``, if it is an integer (not a bool) >= ``minimum``.

    Concrete 0-d integer arrays count as integers.

    Raises:
      ValueError: naming ``name`` and the value, for a non-integer (``2.5``,
        ``True``, ``"3"``) or one below ``minimum``.

    >>> check_int("num_steps", 3, minimum=1)
    3
    >>> check_int("num_steps", 2.5, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: num_steps=2.5: expected an integer >= 1, got float
    """
    expected = "an integer" + ("" if minimum is None else f" >= {minimum}")
    if (
        hasattr(value, "dtype")
        and np.ndim(value) == 0
        and not is_tracer(value)
        and jnp.issubdtype(value.dtype, jnp.integer)
    ):
        value = int(value)  # a concrete 0-d integer array
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r}: expected {expected}, got {_kind(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r}: expected {expected}")
    return int(value)


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    allow_inf: bool = False,
) -> float:
    """``value`` as a Python ``float``, if it is a real number, finite, >= ``minimum``.

    Concrete 0-d arrays count as numbers; bools do not.

    Raises:
      ValueError: naming ``name`` and the value, for a non-number, NaN, an
        infinity (unless ``allow_inf``), or a value below ``minimum``.

    >>> check_real("ftol", 1e-6, minimum=0.0)
    1e-06
    >>> check_real("ftol", float("nan"), minimum=0.0)
    Traceback (most recent call last):
    ...
    ValueError: ftol=nan: expected a finite real number >= 0.0
    """
    expected = ("a real number" if allow_inf else "a finite real number") + (
        "" if minimum is None else f" >= {minimum}"
    )
    if isinstance(value, bool | np.bool_) or not (
        isinstance(value, numbers.Real)
        or (
            hasattr(value, "dtype")
            and np.ndim(value) == 0
            and not is_tracer(value)
            and jnp.issubdtype(value.dtype, jnp.number)
            and not jnp.issubdtype(value.dtype, jnp.complexfloating)
        )
    ):
        raise ValueError(f"{name}={value!r}: expected {expected}, got {_kind(value)}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name}={v}: expected {expected}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}={v}: expected {expected}")
    return v


def check_key(key: Any, name: str = "key") -> None:
    """Check that ``key`` is one PRNG key: typed (``jax.random.key``) or raw.

    A typed key has shape ``()``; a raw key (``jax.random.PRNGKey``) is a 1-D
    ``uint32`` array. Only the static shape and dtype are read, so tracers pass.

    Raises:
      ValueError: naming ``name``, for anything else (an int seed, a batch of
        keys, a float array).

    >>> import jax
    >>> check_key(jax.random.key(0)); check_key(jax.random.PRNGKey(0))
    >>> check_key(0)
    Traceback (most recent call last):
    ...
    ValueError: key=0: expected one PRNG key (jax.random.key(seed), or a raw uint32 key), got int
    """  # noqa: E501
    dtype = getattr(key, "dtype", None)
    shape = getattr(key, "shape", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return
    elif dtype == np.uint32 and shape is not None and len(shape) == 1:
        return
    shown = f"{name}={key!r}" if dtype is None else name
    raise ValueError(
        f"{shown}: expected one PRNG key (jax.random.key(seed), or a raw uint32 "
        f"key), got {_kind(key)}"
    )


def _kind(value: Any) -> str:
    """A short description of a value's type, for error messages."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"{value.dtype}{list(value.shape)}"
    return type(value).__name__
