"""JAX's persistent compilation cache, as the ``pso-jax`` command line uses it.

XLA keeps compiled programs on disk (``jax_compilation_cache_dir``), keyed by the
program, the jax/jaxlib versions, the compile options and the devices, so a
second process that compiles the same program reads it back instead (the demo's
fused train step: ~24 s to compile, well under a second to load;
``benchmarks/results/compile_time.md``). The CLI turns it on
(:func:`enable`); importing :mod:`pso_jax` never does. In a notebook or script::

    from pso_jax.compile_cache import enable; enable()  # or enable("/some/dir")

Where the CLI's cache lives, first match wins:

1. ``--compile-cache DIR`` (``--no-compile-cache``: none);
2. the ``PSO_JAX_COMPILE_CACHE`` environment variable: a directory, or ``""``,
   ``0``, ``off``, ``false``, ``no`` or ``none``: no cache;
3. ``$XDG_CACHE_HOME/pso_jax/jax_cache``, else ``~/.cache/pso_jax/jax_cache``.

The cache is trusted code: anyone who can write to its directory can make your
jax processes run their programs (jax's own warning), so keep it private. It
has no size limit (delete the directory to clear it). A directory that cannot
be created or written warns once (:class:`CompileCacheWarning`) and the run
continues without a cache.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import jax

__all__ = [
    "DISABLED_VALUES",
    "ENV_VAR",
    "MIN_COMPILE_SECONDS",
    "CompileCacheWarning",
    "default_dir",
    "enable",
    "resolve_dir",
]

ENV_VAR = "PSO_JAX_COMPILE_CACHE"
# Values of ENV_VAR (lower-cased, stripped) that turn the cache off.
DISABLED_VALUES = ("", "0", "off", "false", "no", "none")
# Programs that compile faster than this are not written (jax's default, 1 s):
# loading an entry costs a file read and a deserialisation, and the CLI's many
# small programs would each add a file. The train step, the evaluation and the
# swarm's init are all above it at the demo's size.
MIN_COMPILE_SECONDS = 1.0


_WARNED: set[Path] = set()  # unusable directories already warned about


class CompileCacheWarning(UserWarning):
    """The compilation cache's directory is unusable; running without a cache."""


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/pso_jax/jax_cache`` (else ``~/.cache/pso_jax/jax_cache``).

    >>> default_dir().parts[-2:]
    ('pso_jax', 'jax_cache')
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pso_jax" / "jax_cache"


def resolve_dir(flag: str | os.PathLike | None = None, *, disabled: bool = False):
    """The cache directory to use, or ``None`` for no cache.

    Args:
      flag: ``--compile-cache DIR`` (``None``: not given); wins over the
        environment.
      disabled: ``--no-compile-cache``: no cache, whatever else says.

    Returns:
      A :class:`~pathlib.Path`, or ``None`` (disabled by the flag or by
      :data:`ENV_VAR` set to one of :data:`DISABLED_VALUES`).

    >>> resolve_dir("/tmp/c")
    PosixPath('/tmp/c')
    >>> resolve_dir("/tmp/c", disabled=True) is None
    True
    """
    if disabled:
        return None
    if flag is not None:
        return Path(flag).expanduser()
    value = os.environ.get(ENV_VAR)
    if value is None:
        return default_dir()
    if value.strip().lower() in DISABLED_VALUES:
        return None
    return Path(value).expanduser()


def _writable(path: Path) -> str | None:
    """``None`` if ``path`` is (made) a writable directory, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def enable(
    path: str | os.PathLike | None = None, *, disabled: bool = False
) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``path``.

    Call it before the first compilation (jax reads the setting when it first
    compiles). Programs that take at least :data:`MIN_COMPILE_SECONDS` to
    compile are written to ``path`` and read back by later processes.

    Args:
      path: the cache directory (created if missing); ``None``: the
        environment variable's or the default (:func:`resolve_dir`), which
        may say no cache.
      disabled: leave the cache off (the CLI's ``--no-compile-cache``).

    Returns:
      The directory in use, or ``None`` when the cache stays off (disabled, or
      the directory is unusable: then a :class:`CompileCacheWarning`, once
      per directory and process).
    """
    where = resolve_dir(path, disabled=disabled)
    if where is None:
        return None
    problem = _writable(where)
    if problem is not None:
        if where in _WARNED:
            return None
        _WARNED.add(where)
        warnings.warn(
            f"pso-jax: compilation cache {where} is not usable ({problem}); "
            f"running without it (--compile-cache DIR or ${ENV_VAR} chooses "
            "another, --no-compile-cache turns it off)",
            CompileCacheWarning,
            stacklevel=2,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return where
