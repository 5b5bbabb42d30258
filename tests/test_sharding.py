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
- Training runs (``experiment.train``, ``pso-jax train``) on 2 and 4 devices:
  the same last-bit differences (pure PSO state to 1e-6; with gradient steps,
  Adam turns them into visible differences in biases whose gradient is zero up
  to rounding, so those runs compare metrics and test results). Two processes
  of 2 devices equal one process of 4 bit for bit.

The training runs start together in a second module fixture (one process with
8 devices running ``experiment.train`` and ``pso-jax`` in-process, and two
``pso-jax train`` processes joined by ``--coordinator``).
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
# The training runs: about 5 min alone on 2 cores, more beside the other workers.
EXPERIMENT_TIMEOUT_S = 1800


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
    return _wait_all(procs, TIMEOUT_S)


def _wait_all(procs: dict, timeout_s: float, out: Path | None = None) -> dict:
    """Wait for every process; their failures by name (stdout kept in ``out``)."""
    errors = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            errors[name] = f"timed out after {timeout_s} s\n{stderr[-3000:]}"
            continue
        if out is not None:
            (out / f"{name}.stdout").write_text(stdout)
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
    return _once_per_session(tmp_path_factory, "sharding-checks", _start_workers)


def _once_per_session(tmp_path_factory, name: str, start) -> tuple[Path, dict]:
    """``start(out) -> errors`` run once per test session (xdist workers share it).

    The first worker runs it under a file lock in the session's shared temporary
    folder and records the errors; the others wait for the lock and read them.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent  # shared by the session
    else:
        root = tmp_path_factory.mktemp(name)
    out = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / f"{name}.json"
        if not done.exists():
            out.mkdir(exist_ok=True)
            done.write_text(json.dumps(start(out)))
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
    [
        "pure/2x1",
        "pure/4x1",
        "pure/8x1",
        "pure/4x2",
        "hybrid-macro_f1/4x2",
        "pbt/4x1",
        "subspace-recenter/4x1",
        "split/4x1",
    ],
)
def test_video_train_step_equals_unsharded(runs, case):
    r = _results(runs, "train")[f"train/{case}"]
    n, data = map(int, case.split("/")[1].split("x"))
    assert r["rows_per_shard"] == [worker.NUM_PARTICLES // n]
    if n <= 2 and data == 1:
        assert r["state"]["bitwise"] and r["metrics"]["bitwise"], r
    tol = 1e-6 if data == 1 else 1e-5
    assert r["state"]["max_abs_diff"] < tol and r["metrics"]["max_abs_diff"] < tol
    assert r["diversity"] < 1e-5
    if case.startswith("subspace"):
        assert r["epoch"] == 2  # re-centred after each of the 2 steps
    if case.startswith("split"):
        assert "split over the particles or over the data axis" in r.get(
            "data_axis_error", ""
        )


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


# -- training runs: experiment.train and pso-jax on several devices ---------------


def _start_experiment(out: Path, data_dir: str) -> dict[str, str]:
    """The experiment worker (8 devices) and two 2-device CLI processes."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")
    }
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    two = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port = str(_free_port())
    flags = worker.experiment_flags(data_dir)
    cmds = {
        "experiment": ([str(WORKER), "experiment", str(out), data_dir], env),
        **{
            f"cli{rank}": (
                [
                    "-m",
                    "pso_jax.cli",
                    *flags,
                    "--workdir",
                    str(out / "mp"),
                    "--coordinator",
                    f"localhost:{port}",
                    "--num-processes",
                    "2",
                    "--process-id",
                    str(rank),
                ],
                two,
            )
            for rank in (0, 1)
        },
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, *args],
            env=penv,
            cwd=out,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, penv) in cmds.items()
    }
    return _wait_all(procs, EXPERIMENT_TIMEOUT_S, out)


@pytest.fixture(scope="module")
def experiment_runs(tmp_path_factory):
    """The training runs' output folder and failures (once, as ``runs``)."""
    from pso_jax import experiment

    def start(out: Path) -> dict:
        # Prepared once here: the three processes would race to build it.
        data_dir = str(out / "tfds")
        for split in ("train", "test"):
            experiment._source(experiment.get_config("smoke", data_dir=data_dir), split)
        return _start_experiment(out, data_dir)

    return _once_per_session(tmp_path_factory, "experiment-checks", start)


def _experiment(experiment_runs, key: str, groups=("experiment",)) -> dict:
    out, errors = experiment_runs
    for group in groups:
        if group in errors:
            pytest.fail(f"worker {group!r} failed: {errors[group]}")
    return json.loads((out / "experiment.json").read_text())[key]


def _read_checkpoint(directory: Path, step: int) -> list[np.ndarray]:
    """A checkpoint's arrays (any layout it was saved with) on this one device."""
    import orbax.checkpoint as ocp

    from pso_jax import checkpoint

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with checkpoint._manager(directory, max_to_keep=None, create=False) as mngr:
        stored = mngr.item_metadata(step)["state"]
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), stored
        )
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        state = mngr.restore(step, args=args)["state"]
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _same_run(ref: dict, got: dict, devices: int, data: int = 1) -> None:
    """Equal summaries of two runs (test results exactly, the rest to 1e-6)."""
    assert got.pop("parallel") == {
        "devices": devices,
        "data": data,
        "processes": 1,
        "swarm_size": 4,
    }
    ref.pop("parallel")
    assert got.pop("best_train_fitness") == pytest.approx(
        ref.pop("best_train_fitness"), abs=1e-6
    )
    assert got == ref


@pytest.mark.parametrize(
    ("name", "devices", "data"),
    [("pure-4", 4, 1), ("pure-2x2", 4, 2), ("aug-2x2", 4, 2)],
)
def test_experiment_train_on_devices_equals_one_device(
    experiment_runs, name, devices, data
):
    r = _experiment(experiment_runs, f"experiment/{name}")
    _same_run(*r["summary"], devices=devices, data=data)
    assert r["metrics"]["same_steps"] and r["metrics"]["max_abs_diff"] < 1e-6
    assert r["metrics"]["diversity_rel_diff"] < 1e-5
    assert r["state"]["max_abs_diff"] < 1e-6


def test_experiment_hybrid_on_4_devices_and_its_restore_onto_2(experiment_runs):
    r = _experiment(experiment_runs, "experiment/hybrid-4")
    _same_run(*r["summary"], devices=4)
    assert r["metrics"]["same_steps"] and r["metrics"]["max_abs_diff"] < 1e-5
    # Diversity is a small difference of positions (the swarm near its best),
    # so the states' 1e-6 differences between layouts show in it relatively
    # larger (observed 1.7e-4).
    assert r["metrics"]["diversity_rel_diff"] < 1e-3
    restore = _experiment(experiment_runs, "experiment/hybrid-restore-2")
    # Saved on 4 devices, read straight into 2 devices' layout, Adam state too.
    assert restore == {
        "restored": {"max_abs_diff": 0.0, "bitwise": True},
        "opt_state_rows": [2],
        "devices": 2,
    }


def test_experiment_pretext_run_on_2x2_devices_equals_one_device(experiment_runs):
    r = _experiment(experiment_runs, "experiment/pretext-2x2")
    assert r["parallel"] == {"devices": 4, "data": 2, "processes": 1, "swarm_size": 4}
    one, four = r["test_loss"]
    assert four == pytest.approx(one, rel=1e-5) and four < r["initial_test_loss"][1]
    assert r["initial_test_loss"][1] == pytest.approx(r["initial_test_loss"][0])
    assert r["metrics"]["same_steps"] and r["metrics"]["max_abs_diff"] < 1e-5
    assert r["backbone_max_abs_diff"] < 1e-5


@pytest.mark.parametrize(("name", "devices"), [("resume-2", 2), ("resume-1", 1)])
def test_experiment_checkpoint_on_4_devices_resumes_on_fewer(
    experiment_runs, name, devices
):
    r = _experiment(experiment_runs, f"experiment/{name}")
    assert r["interrupted"] == {"interrupted": True, "signal": 15, "steps": 2}
    assert r["checkpoints"] == [2, 4]
    _same_run(*r["summary"], devices=devices)
    assert r["metrics"]["same_steps"] and r["metrics"]["max_abs_diff"] < 1e-6
    assert r["versus_4"]["max_abs_diff"] < 1e-6  # the uninterrupted 4-device run
    assert r["state"]["max_abs_diff"] < 1e-6


def test_experiment_particles_must_divide_the_devices_or_pad(experiment_runs):
    r = _experiment(experiment_runs, "experiment/pad")
    for part in ("particles=6", "valid counts: 4, 8, 12", "--pad", "2 inert"):
        assert part in r["error"], r["error"]
    assert r["wrote_nothing"]  # raised before the work directory or a compile
    s = r["summary"]
    assert s["particles"] == 6 and s["ensemble_size"] == 6  # top_k=8 clipped
    assert s["parallel"]["swarm_size"] == r["swarm_rows"] == 8
    assert r["inert_pbest_fitness"] == [float("inf")] * 2  # never a best
    # The evaluated ensemble: the 6 real particles' personal bests, best first.
    assert r["evaluated_fitness"] == r["real_pbest_fitness_sorted"]
    assert all(np.isfinite(m["mean_fitness"]) for m in r["metrics"])
    assert all(m["num_nonfinite"] == 0 for m in r["metrics"])
    # Its checkpoint holds 8 rows: 2 devices (6 particles, no padding) refuse it.
    assert "holds a swarm of 8 particles" in r["restore_on_2_error"]


def test_cli_train_and_evaluate_on_devices(experiment_runs):
    r = _experiment(experiment_runs, "experiment/cli")
    assert r["train"]["rc"] == 0 and r["evaluate"]["rc"] == 0, r
    _same_run(*r["summary"], devices=2)
    assert r["metrics"]["max_abs_diff"] < 1e-6
    for name in ("summary.json", "evaluation.json", "confusion.png", "checkpoints"):
        assert name in r["files"]
    ev = r["evaluation"]  # evaluated on 4 devices: the run's test results
    assert ev["test_accuracy"] == r["summary"][1]["test_accuracy"]
    assert ev["ensemble_test_accuracy"] == r["summary"][1]["ensemble_test_accuracy"]
    assert ev["parallel"]["devices"] == 4
    for case, parts in (
        ("six", ("particles=6", "valid counts: 4, 8, 12", "--pad")),
        ("too_many", ("devices=16", "only 8 cpu", "xla_force_host_platform")),
        ("bad_data", ("data=4 does not divide devices=2", "[1, 2]")),
    ):
        assert r[case]["rc"] == 2, (case, r[case])
        for part in parts:
            assert part in r[case]["stderr"], (case, r[case]["stderr"])


def test_cli_two_processes_equal_one_process(experiment_runs):
    out, _ = experiment_runs
    _experiment(experiment_runs, "experiment/pure-4", ("experiment", "cli0", "cli1"))
    one, two = out / "runs" / "pure-4", out / "mp"
    # Process 0 alone wrote the reports: one record per step, one summary line.
    assert json.loads((two / "summary.json").read_text())["parallel"] == {
        "devices": 4,
        "data": 1,
        "processes": 2,
        "swarm_size": 4,
    }
    assert (two / "metrics.jsonl").read_text().count('"step": 3,') == 1
    assert "test accuracy" in (out / "cli0.stdout").read_text()
    assert "test accuracy" not in (out / "cli1.stdout").read_text()

    def log(workdir):
        return [
            {k: v for k, v in json.loads(x).items() if k != "wall_seconds"}
            for x in (workdir / "metrics.jsonl").read_text().splitlines()
        ]

    assert log(two) == log(one)
    # Both processes wrote their shards of the checkpoints: bitwise the same
    # arrays as one process of 4 devices.
    for step in (2, 4):
        a = _read_checkpoint(two / "checkpoints", step)
        b = _read_checkpoint(one / "checkpoints", step)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert x.tobytes() == y.tobytes()


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

    trainer = pso_jax.make_train_step(
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
        sharding.shard_optimizer(pso_jax.pso(num_particles=4), mesh, pso_jax.PSOState)
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
