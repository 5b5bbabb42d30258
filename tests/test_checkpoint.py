"""Checkpoints: bitwise round trips, checksums that catch damage, argument checks.

The damage cases flip, overwrite or truncate bytes of a step's largest file (the
biggest leaf's data) the way a bad disk or an interrupted copy would, and check
that :func:`pso_jax.checkpoint.restore` refuses the step, names it and its first
damaged leaf, offers the newest intact step, and leaves every file as it was.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import struct

from pso_jax import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]

# Orbax's failed reads leave coroutines behind that asyncio reports at exit.
orbax_noise = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


@struct.dataclass
class _Swarm:
    positions: dict
    step: jax.Array


def _state(seed: int = 0) -> dict:
    """A small run state: the biggest leaf (a kernel) dominates the files."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "swarm": _Swarm(
            positions={
                "conv1": {
                    "kernel": jax.random.normal(k1, (4, 3, 3, 3, 8)),  # [P, ...]
                    "bias": jnp.zeros((4, 8)),
                }
            },
            step=jnp.asarray(seed, jnp.int32),
        ),
        "key_data": jax.random.key_data(k2),
    }


BIG_LEAF = "swarm/positions/conv1/kernel"


def _bits(x) -> np.ndarray:
    """A leaf's raw bits (key data for typed keys), for bitwise comparison."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x)
    return x.reshape(-1).view(np.uint8)


def _assert_bitwise(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert (x.shape, x.dtype) == (y.shape, y.dtype)
        np.testing.assert_array_equal(_bits(x), _bits(y))


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=os.path.getsize)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip1":  # one byte in the middle
        data[len(data) // 2] ^= 0xFF
    elif how == "flip399":  # a run of bytes, as in the report
        for i in range(len(data) // 2, len(data) // 2 + 399):
            data[i] ^= 0x5A
    elif how == "garbage":
        data = bytearray(b"garbage")
    elif how == "truncate":
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


def _three_steps(directory: Path) -> dict[int, dict]:
    states = {s: _state(s) for s in (1, 2, 3)}
    for s, state in states.items():
        ckpt.save(directory, s, state, meta={"step": s}, max_to_keep=None)
    return states


# -- round trips -----------------------------------------------------------------


ROUND_TRIPS = {
    "run_state": lambda: _state(7),
    "dtypes": lambda: {
        "f32": jnp.linspace(-1.0, 1.0, 7),
        "bf16": jnp.arange(5, dtype=jnp.bfloat16) / 3,
        "i32": jnp.arange(-3, 3, dtype=jnp.int32),
        "u8": jnp.arange(4, dtype=jnp.uint8),
        "bool": jnp.array([True, False, True]),
        "scalar": jnp.float32(np.pi),
        "nan_inf": jnp.array([np.nan, np.inf, -np.inf, -0.0]),
    },
    "typed_keys": lambda: {
        "key": jax.random.key(3),
        "keys": jax.random.split(jax.random.key(4), 5),
        "rbg": jax.random.key(5, impl="rbg"),
        "x": jnp.ones((2, 2)),
    },
    "numpy_leaves": lambda: {"a": np.arange(6.0).reshape(2, 3), "b": np.int64(9)},
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("abstract", [False, True], ids=["arrays", "shapes"])
def test_round_trip_is_bitwise(tmp_path, name, abstract):
    state = ROUND_TRIPS[name]()
    ckpt.save(tmp_path, 4, state, meta={"run": name, "tuple": (1, 2)})
    template = (
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        if abstract
        else state
    )
    got, meta = ckpt.restore(tmp_path, template)
    _assert_bitwise(got, state)
    assert meta == {"run": name, "tuple": [1, 2]}  # no reserved key
    assert ckpt.read_meta(tmp_path) == meta


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_typed_keys_restore_as_typed_keys(tmp_path, impl):
    keys = jax.random.split(jax.random.key(11, impl=impl), 3)
    ckpt.save(tmp_path, 0, {"keys": keys})
    template = {"keys": jax.random.split(jax.random.key(0, impl=impl), 3)}
    got, _ = ckpt.restore(tmp_path, template)
    assert jax.dtypes.issubdtype(got["keys"].dtype, jax.dtypes.prng_key)
    assert str(jax.random.key_impl(got["keys"])) == impl
    np.testing.assert_array_equal(
        jax.random.key_data(got["keys"]), jax.random.key_data(keys)
    )
    # A restored key draws the same numbers as the saved one.
    np.testing.assert_array_equal(
        jax.random.uniform(got["keys"][1], (4,)), jax.random.uniform(keys[1], (4,))
    )


def test_typed_key_restores_as_key_data_into_a_uint32_template(tmp_path):
    # The project's TrainState keeps its key as uint32 key data: that still works,
    # and a typed-key checkpoint restores into such a template as its key data.
    key = jax.random.key(2)
    ckpt.save(tmp_path, 0, {"k": key})
    got, _ = ckpt.restore(tmp_path, {"k": jax.random.key_data(key)})
    assert got["k"].dtype == jnp.uint32
    np.testing.assert_array_equal(got["k"], jax.random.key_data(key))


@pytest.mark.parametrize(
    "saved, template, match",
    [
        # Same key-data shape, another generator: the impl names differ.
        ("rbg", "unsafe_rbg", r"stores the key at 'k' as a 'rbg' key.*'unsafe_rbg'"),
        # Another key-data shape: the tree check names the leaf.
        (
            "threefry2x32",
            "rbg",
            r"at 'k': it has uint32\[2\], the template uint32\[4\]",
        ),
    ],
)
def test_key_of_another_generator_is_refused(tmp_path, saved, template, match):
    ckpt.save(tmp_path, 0, {"k": jax.random.key(0, impl=saved)})
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.restore(tmp_path, {"k": jax.random.key(0, impl=template)})


# -- damage ------------------------------------------------------------------------


@orbax_noise
@pytest.mark.parametrize(
    "how, reason",
    [
        ("flip1", rf"leaf '{BIG_LEAF}' checksum mismatch \(stored sha256 "),
        ("flip399", rf"leaf '{BIG_LEAF}' checksum mismatch"),
        ("garbage", r"its files could not be read"),
        ("truncate", r"its files could not be read"),
    ],
)
def test_damaged_largest_file_is_refused_and_left_as_it_is(tmp_path, how, reason):
    states = _three_steps(tmp_path)
    victim = _largest_file(tmp_path / "3")
    assert victim.stat().st_size > 1000  # the kernel's data, not a metadata file
    _damage(victim, how)
    before = _files(tmp_path)
    step_dir = os.path.join(os.fspath(tmp_path), "3")
    for call in (
        lambda: ckpt.restore(tmp_path, _state()),
        lambda: ckpt.restore(tmp_path, jax.eval_shape(_state), step=3),
    ):
        with pytest.raises(ckpt.CheckpointError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(f"checkpoint {step_dir} is damaged: "), msg
        assert re.search(reason, msg), msg
        assert "the newest intact step is 2: restore it with step=2" in msg, msg
        assert "Nothing was deleted or rewritten" in msg
    # Nothing was deleted or rewritten; the offered step restores.
    assert _files(tmp_path) == before
    assert ckpt.all_steps(tmp_path) == [1, 2, 3]
    got, meta = ckpt.restore(tmp_path, _state(), step=2)
    _assert_bitwise(got, states[2])
    assert meta == {"step": 2}


@orbax_noise
@pytest.mark.parametrize(
    "damaged, step, hint, intact",
    [
        ({3}, None, "the newest intact step is 2: restore it with step=2", 2),
        ({2, 3}, None, "the newest intact step is 1: restore it with step=1", 1),
        ({2, 3}, 2, "the newest intact step is 1: restore it with step=1", 1),
        ({1, 2, 3}, None, "no earlier step ([1, 2]) is intact either", None),
        ({1}, 1, "there is no earlier step", 3),
    ],
)
def test_newest_intact_step_is_offered(tmp_path, damaged, step, hint, intact):
    _three_steps(tmp_path)
    for s in damaged:
        _damage(_largest_file(tmp_path / str(s)), "flip1")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.restore(tmp_path, _state(), step=step)
    assert hint in str(err.value)
    assert ckpt.latest_intact_step(tmp_path, _state()) == intact


@orbax_noise
@pytest.mark.parametrize(
    "before, want",
    [(None, 2), (4, 2), (3, 2), (2, 1), (1, None), (0, None)],
)
def test_latest_intact_step_below(tmp_path, before, want):
    _three_steps(tmp_path)
    _damage(_largest_file(tmp_path / "3"), "flip1")
    snapshot = _files(tmp_path)
    assert ckpt.latest_intact_step(tmp_path, _state(), before=before) == want
    assert _files(tmp_path) == snapshot


def test_latest_intact_step_of_nothing(tmp_path):
    assert ckpt.latest_intact_step(tmp_path / "absent", _state()) is None
    with pytest.raises(ValueError, match=r"before must be an int >= 0, got -1"):
        ckpt.latest_intact_step(tmp_path, _state(), before=-1)


@orbax_noise
@pytest.mark.parametrize(
    "relpath, how, reason",
    [
        ("meta/metadata", "garbage", r"its files could not be read \(JSONDecodeError"),
        ("state/_METADATA", "garbage", r"its state metadata is unreadable"),
        ("state/manifest.ocdbt", "flip1", r"its state metadata is unreadable"),
    ],
)
def test_damage_that_orbax_trips_on_names_the_step(tmp_path, relpath, how, reason):
    _three_steps(tmp_path)
    _damage(tmp_path / "3" / relpath, how)
    snapshot = _files(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=reason) as err:
        ckpt.restore(tmp_path, _state())
    assert f"checkpoint {os.path.join(os.fspath(tmp_path), '3')} is damaged" in str(
        err.value
    )
    assert "the newest intact step is 2" in str(err.value)
    assert _files(tmp_path) == snapshot


def test_tampered_checksum_is_a_mismatch(tmp_path):
    # The checksums sit in the meta item: a damaged record is damage too.
    state = _state()
    ckpt.save(tmp_path, 0, state)
    meta_file = tmp_path / "0" / "meta" / "metadata"
    record = json.loads(meta_file.read_text())
    record[ckpt.INTEGRITY_KEY]["leaves"]["swarm/step"] = "0" * 64
    meta_file.write_text(json.dumps(record))
    with pytest.raises(ckpt.CheckpointError, match=r"leaf 'swarm/step' checksum"):
        ckpt.restore(tmp_path, state)


def _save_without_checksums(directory: Path, step: int, state, meta: dict) -> None:
    """Write a step as the code before checksums did (orbax, no integrity record)."""
    with ckpt._manager(directory, max_to_keep=None, create=True) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        mngr.wait_until_finished()


@pytest.mark.parametrize("abstract", [False, True], ids=["arrays", "shapes"])
def test_checkpoint_without_checksums_still_restores(tmp_path, abstract):
    state = _state(5)
    _save_without_checksums(tmp_path, 5, state, {"run": "old"})
    template = jax.eval_shape(_state) if abstract else _state()
    got, meta = ckpt.restore(tmp_path, template)
    _assert_bitwise(got, state)
    assert meta == {"run": "old"}
    assert ckpt.latest_intact_step(tmp_path, template) == 5
    # Unverified (documented): a flipped byte goes unnoticed in such a step.
    _damage(_largest_file(tmp_path / "5"), "flip1")
    got, _ = ckpt.restore(tmp_path, template)
    assert not np.array_equal(
        _bits(got["swarm"].positions["conv1"]["kernel"]),
        _bits(state["swarm"].positions["conv1"]["kernel"]),
    )


@orbax_noise
def test_several_processes_write_unverified_steps(tmp_path, monkeypatch):
    # jax.process_count() > 1: no checksums (arrays not fully addressable), and
    # earlier steps are not searched (processes could disagree and deadlock).
    monkeypatch.setattr(ckpt, "_processes", lambda: 2)
    _three_steps(tmp_path)
    record = json.loads((tmp_path / "3" / "meta" / "metadata").read_text())[
        ckpt.INTEGRITY_KEY
    ]
    assert record["algorithm"] is None
    assert "written by 2 processes" in record["unverified"]
    _damage(tmp_path / "3" / "state" / "_METADATA", "garbage")
    with pytest.raises(ckpt.CheckpointError, match="earlier steps were not checked"):
        ckpt.restore(tmp_path, _state())
    monkeypatch.setattr(ckpt, "_processes", lambda: 1)
    _assert_bitwise(ckpt.restore(tmp_path, _state(), step=2)[0], _state(2))


# -- save's arguments -----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(step=-1), ValueError, r"step must be an int >= 0, got -1$"),
        (dict(step=2.7), TypeError, r"step must be an int >= 0, got 2\.7 \(float\)"),
        (dict(step=2.0), TypeError, r"step must be an int >= 0, got 2\.0 \(float\)"),
        (dict(step=True), TypeError, r"step must be an int >= 0, got the bool True"),
        (dict(step="3"), TypeError, r"step must be an int >= 0, got '3' \(str\)"),
        (dict(step=None), TypeError, r"step must be an int >= 0, got None"),
        (dict(max_to_keep=0), ValueError, r"max_to_keep must be an int >= 1, got 0"),
        (dict(max_to_keep=-2), ValueError, r"max_to_keep must be an int >= 1, got -2"),
        (
            dict(max_to_keep=1.5),
            TypeError,
            r"max_to_keep must be an int >= 1, got 1\.5",
        ),
        (dict(max_to_keep=False), TypeError, r"max_to_keep .* got the bool False"),
        (dict(meta=[1, 2]), TypeError, r"meta must be a JSON-serialisable dict .*list"),
        (dict(meta="run"), TypeError, r"meta must be a JSON-serialisable dict .*str"),
        (
            dict(meta={"a": {"w": np.zeros(2)}}),
            TypeError,
            r"meta must be JSON-serialisable: meta\['a'\]\['w'\] is array",
        ),
        (
            dict(meta={"a": [1, {2, 3}]}),
            TypeError,
            r"meta\['a'\]\[1\] is \{2, 3\} \(set\)",
        ),
        (dict(meta={(1, 2): 3}), TypeError, r"meta has the key \(1, 2\) \(tuple\)"),
        (
            dict(meta={ckpt.INTEGRITY_KEY: {}}),
            ValueError,
            r"meta must not hold the reserved key '__pso_jax_integrity__'",
        ),
    ],
)
def test_bad_save_arguments_are_refused_before_writing(tmp_path, kwargs, error, match):
    args = dict(step=1, meta=None, max_to_keep=3) | kwargs
    directory = tmp_path / "ckpt"
    with pytest.raises(error, match=match):
        ckpt.save(directory, args.pop("step"), {"x": jnp.ones(2)}, **args)
    assert not directory.exists()


@pytest.mark.parametrize(
    "step, want",
    [(np.int64(4), 4), (np.uint8(5), 5), (jnp.int32(6), 6), (0, 0)],
)
def test_integer_like_steps_are_accepted(tmp_path, step, want):
    path = ckpt.save(tmp_path, step, {"x": jnp.ones(2)})
    assert path.name == str(want)
    assert ckpt.all_steps(tmp_path) == [want]


@pytest.mark.parametrize(
    "max_to_keep, steps, kept",
    [(1, [1, 2, 3], [3]), (2, [1, 2, 3], [2, 3]), (None, [1, 2, 3], [1, 2, 3])],
)
def test_max_to_keep(tmp_path, max_to_keep, steps, kept):
    for s in steps:
        ckpt.save(
            tmp_path, s, {"x": jnp.full(2, s, jnp.float32)}, max_to_keep=max_to_keep
        )
    assert ckpt.all_steps(tmp_path) == kept
    got, _ = ckpt.restore(tmp_path, {"x": jnp.zeros(2)})
    np.testing.assert_array_equal(got["x"], [kept[-1]] * 2)


def test_existing_step_is_never_overwritten(tmp_path):
    ckpt.save(tmp_path, 1, {"x": jnp.ones(2)})
    before = _files(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="step 1 already exists"):
        ckpt.save(tmp_path, 1, {"x": jnp.zeros(2)})
    assert _files(tmp_path) == before


@pytest.mark.parametrize(
    "step, error, match",
    [
        (9, ckpt.CheckpointError, r"no checkpoint step 9 in .*; available: \[1\]"),
        (1.0, TypeError, r"step must be an int >= 0, got 1\.0 \(float\)"),
        (True, TypeError, r"step must be an int >= 0, got the bool True"),
    ],
)
def test_restore_and_read_meta_check_the_step(tmp_path, step, error, match):
    ckpt.save(tmp_path, 1, {"x": jnp.ones(2)})
    with pytest.raises(error, match=match):
        ckpt.restore(tmp_path, {"x": jnp.zeros(2)}, step=step)
    with pytest.raises(error, match=match):
        ckpt.read_meta(tmp_path, step=step)


# -- another device layout ---------------------------------------------------------

_LAYOUT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from pso_jax import checkpoint

    out = sys.argv[1]
    devices = jax.devices()
    mesh8, mesh2 = (Mesh(np.array(devices[:n]), ("particles",)) for n in (8, 2))
    rows = lambda m: NamedSharding(m, P("particles"))
    x = jax.random.normal(jax.random.key(0), (16, 1024))
    keys = jax.random.split(jax.random.key(1), 16)
    state8 = {"positions": jax.device_put(x, rows(mesh8)),
              "keys": jax.device_put(keys, rows(mesh8)),
              "best": jax.device_put(x[0], NamedSharding(mesh8, P()))}
    state1 = {"positions": x, "keys": keys, "best": x[0]}
    checkpoint.save(out + "/eight", 1, state8)
    checkpoint.save(out + "/one", 1, state1)
    read = lambda d: json.load(open(d + "/1/meta/metadata"))[checkpoint.INTEGRITY_KEY]
    template = {"positions": jax.ShapeDtypeStruct((16, 1024), x.dtype,
                                                  sharding=rows(mesh2)),
                "keys": jax.ShapeDtypeStruct((16,), keys.dtype, sharding=rows(mesh2)),
                "best": jax.ShapeDtypeStruct((1024,), x.dtype,
                                             sharding=NamedSharding(mesh2, P()))}
    got, _ = checkpoint.restore(out + "/eight", template)
    print(json.dumps({
        "same_checksums": read(out + "/eight") == read(out + "/one"),
        "devices": {k: len(v.sharding.device_set) for k, v in got.items()},
        "equal": bool(np.array_equal(got["positions"], x)
                      and np.array_equal(got["best"], x[0])
                      and np.array_equal(jax.random.key_data(got["keys"]),
                                         jax.random.key_data(keys))),
        "typed": str(got["keys"].dtype),
    }))
    """
)


def test_saved_on_8_devices_verifies_on_2(tmp_path):
    # A fresh process: the device count is fixed when JAX starts.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _LAYOUT_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "same_checksums": True,  # the checksum does not depend on the layout
        "devices": {"positions": 2, "keys": 2, "best": 2},
        "equal": True,
        "typed": "key<fry>",
    }
    # This process (one device) verifies the 8-device step too, into a template
    # of arrays or of shapes without shardings, and catches damage.
    x = jax.random.normal(jax.random.key(0), (16, 1024))
    template = {"positions": x, "keys": jax.random.split(jax.random.key(1), 16)}
    template["best"] = x[0]
    for t in (template, jax.eval_shape(lambda: template)):
        got, _ = ckpt.restore(tmp_path / "eight", t)
        _assert_bitwise(got, template)
    _damage(_largest_file(tmp_path / "eight" / "1"), "flip1")
    with pytest.raises(ckpt.CheckpointError, match=r"leaf 'positions' checksum"):
        ckpt.restore(tmp_path / "eight", template)
