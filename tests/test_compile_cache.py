"""pso_jax.compile_cache: where the CLI's persistent compilation cache lives,
turning it off, an unusable directory, and a real hit in a second process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import pytest

from pso_jax import cli, compile_cache

ENV = compile_cache.ENV_VAR


def test_resolve_dir_flag_then_env_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(ENV, raising=False)
    default = tmp_path / "xdg" / "pso_jax" / "jax_cache"
    assert compile_cache.resolve_dir() == default
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home" / ".cache" / "pso_jax" / "jax_cache"
    assert compile_cache.resolve_dir() == home
    monkeypatch.setenv(ENV, str(tmp_path / "env"))
    assert compile_cache.resolve_dir() == tmp_path / "env"
    assert compile_cache.resolve_dir(tmp_path / "flag") == tmp_path / "flag"


@pytest.mark.parametrize("value", ["", "0", "off", "False", " none "])
def test_env_disables(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    assert compile_cache.resolve_dir() is None
    before = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir == before


def test_flag_disables_whatever_else_says(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "env"))
    assert compile_cache.resolve_dir(tmp_path / "x", disabled=True) is None
    assert compile_cache.enable(tmp_path / "x", disabled=True) is None
    assert not (tmp_path / "x").exists() and not (tmp_path / "env").exists()


def test_unusable_dir_warns_once_and_keeps_the_cache_off(tmp_path):
    # Under a regular file: no directory can be made there, even as root.
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "cache"
    before = jax.config.jax_compilation_cache_dir
    with pytest.warns(compile_cache.CompileCacheWarning, match="not usable"):
        assert compile_cache.enable(bad) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compile_cache.enable(bad) is None  # once per directory
    assert jax.config.jax_compilation_cache_dir == before


@pytest.mark.parametrize(
    "argv, want",
    [
        (["minimize", "--compile-cache", "D"], ("D", False)),
        (["--compile-cache", "D", "minimize"], ("D", False)),
        (["minimize", "--no-compile-cache"], (None, True)),
        (["minimize"], (None, False)),
    ],
)
def test_cli_flags_reach_enable(monkeypatch, tmp_path, argv, want):
    calls = []

    def enable(path=None, disabled=False):
        calls.append((path, disabled))

    monkeypatch.setattr(compile_cache, "enable", enable)
    rest = ["--objective", "sphere", "--dims", "2", "--particles", "4"]
    rest += ["--steps", "2", "--workdir", str(tmp_path)]
    assert cli.main(argv + rest) == 0
    assert calls == [want]


def test_demo_forwards_the_flags():
    ns = argparse.Namespace
    assert cli._compile_cache_args(ns(no_compile_cache=True)) == ["--no-compile-cache"]
    assert cli._compile_cache_args(ns(compile_cache="D")) == ["--compile-cache", "D"]
    assert cli._compile_cache_args(ns()) == []


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def test_cli_with_an_unusable_dir_warns_and_runs(tmp_path):
    (tmp_path / "file").write_text("")
    out = subprocess.run(
        [Path(sys.executable).with_name("pso-jax"), "minimize", "--objective"]
        + ["sphere", "--dims", "2", "--particles", "4", "--steps", "2"]
        + ["--workdir", str(tmp_path / "run")]
        + ["--compile-cache", str(tmp_path / "file" / "cache")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("CompileCacheWarning") == 1
    assert (tmp_path / "run" / "summary.json").exists()


_WORKER = textwrap.dedent(
    """
    import json, sys, jax, jax.numpy as jnp
    from pso_jax import compile_cache
    events = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: events.append(name))
    where = compile_cache.enable()  # from the environment variable
    # This test's program compiles in milliseconds: write it anyway.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 17.0)
    y = f(jnp.ones((8, 8)))
    hits = events.count("/jax/compilation_cache/cache_hits")
    print(json.dumps(dict(where=str(where), hits=hits, y=float(y[0, 0]))))
    """
)


def test_second_process_hits_the_cache(tmp_path):
    cache = tmp_path / "cache"

    def run():
        out = subprocess.run(
            [sys.executable, "-c", _WORKER],
            capture_output=True,
            text=True,
            env=_env(**{ENV: str(cache)}),
            timeout=120,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run()
    entries = sorted(p.name for p in cache.iterdir() if p.name.startswith("jit_"))
    assert first["where"] == str(cache) and first["hits"] == 0
    assert any(name.startswith("jit__lambda") for name in entries), entries
    second = run()
    assert second["hits"] >= 1 and second["y"] == first["y"]
    after = sorted(p.name for p in cache.iterdir() if p.name.startswith("jit_"))
    assert after == entries  # read back, nothing new written
