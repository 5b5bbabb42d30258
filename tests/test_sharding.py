"""A swarm sharded over devices and processes equals the unsharded swarm.

The multi-device checks run in subprocesses (see ``sharding_worker.py``): two
with 8 CPU devices (``--xla_force_host_platform_device_count=8``), and two real
processes of 4 devices each joined by ``jax.distributed`` on localhost, all four
started together by one module fixture. This process (one device) asserts on
their numbers and runs the cheap single-device checks itself.

Where equality is bitwise, and why not elsewhere:

- The swarm (init, steps under ``lax.scan``, ``minimize``, checkpoint restore
  onto another device count, two processes vs one) is bitwise equal on 1, 2, 4
  and 8 devices: random numbers are drawn per global particle row, bests cross
  devices by exact selections (``argmin`` + a ``psum`` of bit patterns), and the
  fitness used is a max (exact in any order).
- CSO's swarm mean and anything on a ``"data"`` axis (the batch split, the
  fitness averaged over devices) are sums in another order: equal to float
  rounding (a few ulp), asserted with a tolerance.
- The video train step on 4 and 8 devices: its tiny test model has leaves of 3
  and 4 floats, and the model is compiled for 2P/devices + 1 particles per
  device (33 on one device, 5 on eight): XLA:CPU's loops for those sizes round
  some results differently in the last bit. Asserted to 1e-6.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharding_worker as worker  # tests/ is on sys.path under pytest
from jax.sharding import PartitionSpec as P

import pso_jax
from pso_jax import sharding, topology

WORKER = Path(__file__).with_name("sharding_worker.py")
ROOT = Path(__file__).resolve().parents[1]

TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_workers(out: Path) -> dict[str, str]:
    """Run the four worker processes side by side; their failures by name."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")
    }
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    port = str(_free_port())
    cmds = {
        "swarm": ["checks", "swarm", str(out)],
        "train": ["checks", "train", str(out)],
        "process0": ["process", "0", port, str(out)],
        "process1": ["process", "1", port, str(out)],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            env=env,
            cwd=out,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in cmds.items()
    }
    errors = {}
    for name, proc in procs.items():
        try:
            _, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
            errors[name] = f"timed out after {TIMEOUT_S} s\n{stderr[-3000:]}"
            continue
        if proc.returncode:
            errors[name] = f"exit code {proc.returncode}\n{stderr[-3000:]}"
    return errors


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The workers' output folder and failures, computed once per test session.

    Under pytest-xdist every worker process that runs a test of this module
    asks for this fixture: the first one runs the subprocesses, under a file
    lock in the session's shared temporary folder; the others wait and read.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent  # shared by the session
    else:
        root = tmp_path_factory.mktemp("sharding")
    out = root / "sharding-checks"
    with open(root / "sharding-checks.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "sharding-checks.json"
        if not done.exists():
            out.mkdir(exist_ok=True)
            done.write_text(json.dumps(_start_workers(out)))
        errors = json.loads(done.read_text())
    return out, errors


def _results(runs, group: str) -> dict:
    out, errors = runs
    if group in errors:
        pytest.fail(f"worker {group!r} failed: {errors[group]}")
    return json.loads((out / f"checks-{group}.json").read_text())


def _npz(path: Path) -> list[np.ndarray]:
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


# -- 8 devices in one process ----------------------------------------------------


@pytest.mark.parametrize("name", [name for name, _ in worker.CONFIGS])
def test_swarm_equals_unsharded(runs, name):
    res = _results(runs, "swarm")
    counts = worker.DEVICE_COUNTS if name in worker.ALL_COUNTS else (8,)
    for n in counts:
        r = res[f"traj/{name}/{n}"]
        assert r["init"] == {"max_abs_diff": 0.0, "bitwise": True}, (n, r)
        if name == "cso":  # its swarm mean is a sum over shards
            assert r["scan"]["max_abs_diff"] < 1e-6, (n, r)
        else:
            assert r["scan"] == {"max_abs_diff": 0.0, "bitwise": True}, (n, r)
        if n > 1:
            assert r["spec"] == "P('particles',)"
        if "resample" in name or "perturb" in name:
            assert r["restarts"] == worker.NUM_STEPS - 1  # the remedy ran


@pytest.mark.parametrize("n", worker.DEVICE_COUNTS)
def test_each_device_holds_only_its_particles(runs, n):
    r = _results(runs, "swarm")[f"layout/{n}"]
    assert r["rows_per_shard"] == [worker.NUM_PARTICLES // n]
    assert r["devices"] == n
    assert r["bytes_per_device"] == [r["bytes_total"] // n]
    assert r["replicated_full"]  # bests and counters: whole on every device


@pytest.mark.parametrize("topo", ["ring1", "ring3", "von_neumann1"])
def test_neighbour_bests_across_shard_boundaries(runs, topo):
    r = _results(runs, "swarm")[f"neighbours/{topo}/8"]
    assert r["mismatches"] == 0
    assert r["cross_shard"] >= 5  # the check does cross shard boundaries


def test_padding_particles_never_become_bests(runs):
    r = _results(runs, "swarm")["padding"]
    for part in ("num_particles=10", "4 devices", "valid counts: 4, 8, 12", "pad=True"):
        assert part in r["error"]
    for case in ("inertia-ring", "cso-global"):
        c = r[case]
        assert (c["num_particles"], c["num_inert"], c["rows"]) == (12, 2, [3])
        # Told the padding scored -1e9, the best is still the real best, 1.
        assert c["told"] == {
            "best_fitness": 1.0,
            "inert_pbest_fitness": [float("inf")] * 2,
            "num_nonfinite": 0,
            "mean_fitness": 5.5,
        }
        assert c["inert_pbest_fitness"] == [float("inf")] * 2
        assert c["best_fitness"] == c["best_real_pbest"] < 1.0


def test_minimize_sharded_equals_unsharded(runs):
    r = _results(runs, "train")["minimize/8"]
    assert r["history"]["bitwise"] and r["best_params"]["bitwise"]
    assert r["num_steps"] == [30, 30]
    assert r["rows"] == [2]


def test_data_axis_splits_the_batch(runs):
    r = _results(runs, "train")["data_axis"]
    assert r["mesh"] == {"particles": 4, "data": 2}
    assert r["rows_per_shard"] == [4]
    assert r["scan"]["max_abs_diff"] < 1e-5  # a mean over 2 devices' halves


@pytest.mark.parametrize(
    "case",
    ["pure/2x1", "pure/4x1", "pure/8x1", "pure/4x2", "hybrid-macro_f1/4x2"],
)
def test_video_train_step_equals_unsharded(runs, case):
    r = _results(runs, "train")[f"train/{case}"]
    n, data = map(int, case.split("/")[1].split("x"))
    assert r["rows_per_shard"] == [worker.NUM_PARTICLES // n]
    if n <= 2 and data == 1:
        assert r["state"]["bitwise"] and r["metrics"]["bitwise"], r
    tol = 1e-6 if data == 1 else 1e-5
    assert r["state"]["max_abs_diff"] < tol and r["metrics"]["max_abs_diff"] < tol


def test_checkpoint_saved_on_8_devices_restores_on_2(runs):
    r = _results(runs, "train")["checkpoint"]
    assert r["restored"]["bitwise"]
    assert (r["restored_devices"], r["restored_rows"]) == (2, [8])
    assert r["continued"]["bitwise"]  # 3 more steps on 2 devices == on 8


# -- two processes of 4 devices --------------------------------------------------


@pytest.mark.parametrize("name", worker.PROCESS_RUNS)
def test_two_processes_equal_one(runs, name):
    out, errors = runs
    for group in ("process0", "process1", "swarm"):
        if group in errors:
            pytest.fail(f"worker {group!r} failed: {errors[group]}")
    for rank in (0, 1):
        info = json.loads((out / f"process{rank}.json").read_text())[name]
        assert info == {
            "local_rows": [2],
            "local_devices": 4,
            "fully_addressable": False,
        }
    two = _npz(out / f"{name}-mp.npz")
    one = _npz(out / f"{name}.npz")  # one process, 8 devices
    ref = _npz(out / f"{name}-ref.npz")  # unsharded
    assert len(two) == len(one) == len(ref)
    for a, b, c in zip(two, one, ref, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.tobytes() == c.tobytes()


# -- in this process (one device) -------------------------------------------------


def _sphere(x, _=None):
    return jnp.sum(jnp.square(x))


def test_one_device_mesh_matches_unsharded_and_keeps_layout():
    mesh = sharding.make_mesh(1)
    ref = pso_jax.pso(_sphere, num_particles=6, topology="ring")
    opt = pso_jax.pso(_sphere, num_particles=6, topology="ring", mesh=mesh)
    hp, key = ref.default_hparams, jax.random.key(0)
    want = jax.jit(ref.init)(key, jnp.ones(8), hp)
    state = jax.jit(opt.init)(key, jnp.ones(8), hp)
    chex.assert_trees_all_equal(state, want)
    step = jax.jit(opt.step)
    new, info = step(key, state, None, hp)
    new_ref, info_ref = jax.jit(ref.step)(key, want, None, hp)
    chex.assert_trees_all_equal((new, info), (new_ref, info_ref))
    # Structure, shapes, dtypes and shardings preserved by the step.
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
    assert jax.tree.map(lambda x: x.sharding, new) == jax.tree.map(
        lambda x: x.sharding, state
    )


def test_state_shardings_of_swarm_and_train_states():
    mesh = sharding.make_mesh(1)
    opt = pso_jax.pso(num_particles=4, topology="random", mesh=mesh)
    abstract = jax.eval_shape(opt.init, jax.random.key(0), {"w": jnp.zeros((2, 3))})
    specs = sharding.state_specs(abstract)
    assert specs.positions["w"] == P("particles")
    assert specs.links == P("particles")
    assert specs.best_params["w"] == P() and specs.step == P()
    shardings = sharding.state_shardings(abstract, mesh)
    assert shardings.pbest_fitness.spec == P("particles")
    target = sharding.abstract_state(abstract, mesh)
    assert target.positions["w"].shape == (4, 2, 3)
    assert target.positions["w"].sharding.spec == P("particles")

    import optax

    trainer = sharding.make_train_step(
        lambda p, x: x @ p["w"], opt, local_steps=1, grad_optimizer=optax.adam(1e-3)
    )
    tstate = jax.eval_shape(trainer.init, jax.random.key(0), {"w": jnp.zeros((2, 3))})
    tspecs = sharding.state_specs(tstate)
    assert tspecs.swarm.velocities["w"] == P("particles")
    assert all(s == P("particles") for s in jax.tree.leaves(tspecs.opt_state))
    assert tspecs.key_data == P()


def test_make_mesh_and_mesh_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"num_devices=2: must be in \[1, 1\]"):
        sharding.make_mesh(2)
    with pytest.raises(ValueError, match="data=2 does not divide num_devices=1"):
        sharding.make_mesh(1, data=2)
    assert dict(sharding.make_mesh(1).shape) == {"particles": 1}
    bad = jax.make_mesh((1,), ("batch",))
    with pytest.raises(ValueError, match=r"got \('batch',\)"):
        pso_jax.pso(num_particles=4, mesh=bad)


def test_particle_count_errors_and_padding():
    assert sharding.padded_num_particles(12, 4) == 12
    assert sharding.padded_num_particles(10, 4, pad=True) == 12
    with pytest.raises(
        ValueError,
        match=r"num_particles=10 is not divisible by 4 devices .*valid counts: "
        r"4, 8, 12, .* pass pad=True to add 2 inert",
    ):
        sharding.padded_num_particles(10, 4)


def test_pso_sharding_argument_errors():
    mesh = sharding.make_mesh(1)
    with pytest.raises(ValueError, match="rng='jax' cannot be sharded"):
        pso_jax.pso(num_particles=4, mesh=mesh, rng="jax")
    with pytest.raises(ValueError, match="pad=True needs a mesh"):
        pso_jax.pso(num_particles=4, pad=True)
    with pytest.raises(ValueError, match="not sharded"):
        sharding.shard_optimizer(pso_jax.pso(num_particles=4), mesh)
    with pytest.raises(ValueError, match="ShardedSwarmOptimizer"):
        sharding.make_train_step(lambda p, x: x, pso_jax.pso(num_particles=4))
    opt = pso_jax.pso(num_particles=4, mesh=mesh)
    state = jax.eval_shape(opt.init, jax.random.key(0), jnp.zeros(2))
    with pytest.raises(ValueError, match=r"fitness must have shape \(4,\).*\(3,\)"):
        opt.tell(jax.random.key(0), state, jnp.zeros(3))


@pytest.fixture
def no_dist_env(monkeypatch):
    for env in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(env, raising=False)
    return monkeypatch


def test_initialize_distributed_validates_before_starting(no_dist_env):
    init = sharding.initialize_distributed
    assert init() is False  # nothing configured: one process
    assert init("localhost:1234", 1, 0) is False  # one process needs no runtime
    with pytest.raises(ValueError, match=r"num_processes \(\$JAX_NUM_PROCESSES\)"):
        init("localhost:1234")
    with pytest.raises(ValueError, match=r"process_id=3: must be in \[0, "):
        init("localhost:1234", 2, 3)
    with pytest.raises(ValueError, match="coordinator='localhost': expected"):
        init("localhost", 2, 0)
    no_dist_env.setenv("JAX_PROCESS_ID", "x")
    with pytest.raises(ValueError, match=r"process_id='x' \(or \$JAX_PROCESS_ID\)"):
        init("localhost:1234", 2)
    no_dist_env.setenv("JAX_PROCESS_ID", "5")
    with pytest.raises(ValueError, match=r"process_id=5"):
        init(num_processes=2, coordinator="localhost:1234")  # read from the env
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize(("topo", "k"), [("ring", 1), ("ring", 3), ("von_neumann", 1)])
@pytest.mark.parametrize("num_shards", [1, 2, 4, 8])
def test_shard_tables_index_the_same_neighbours(topo, k, num_shards):
    p = 16
    table = topology.neighbour_table(topo, p, k)
    halo, tables = topology.shard_tables(table, num_shards)
    n = p // num_shards
    for s in range(num_shards):
        block = (np.arange(-halo, n + halo) + s * n) % p  # the extended block
        np.testing.assert_array_equal(block[tables[s]], table[s * n : (s + 1) * n])


def test_random_links_rows_equal_the_full_matrix():
    full = np.asarray(topology.random_links(jax.random.key(0), 12, 3))
    rows = [
        np.asarray(
            topology.random_links(jax.random.key(0), 12, 3, row_offset=o, num_rows=4)
        )
        for o in (0, 4, 8)
    ]
    np.testing.assert_array_equal(np.concatenate(rows), full)
