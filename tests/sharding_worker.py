"""Multi-device checks for tests/test_sharding.py, run in subprocesses.

pytest's own process has one CPU device, and the device count is fixed when JAX
starts, so the checks that need 8 devices run here, in a fresh process started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``: one process runs
them all (JAX starts once) and writes the measured numbers as JSON; the test
file asserts on them.

    python tests/sharding_worker.py checks {swarm,train} OUT_DIR
    python tests/sharding_worker.py process RANK PORT OUT_DIR   # 2 x 4 devices

``process`` is one of two real processes on localhost (``jax.distributed``, gloo
CPU collectives) that together run the runs of :data:`PROCESS_RUNS` over 8
devices; ``checks`` saves the same runs on one 8-device process for comparison.
"""

from __future__ import annotations

import json
import os
import sys
import time

NUM_PARTICLES = 16
NUM_STEPS = 5
# One particle's parameters: leaves of 32 and 8 floats (see the test file for
# why sizes matter to bitwise equality).
TEMPLATE_SHAPES = {"w": (4, 8), "b": (8,)}

# (name, pso kwargs): every variant and topology, bounds and stagnation remedies.
CONFIGS = [
    (
        # Halos of 3 particles, wider than a shard on 8 devices; a remedy every
        # step (no step counts as progress); bounds; per-particle factors.
        "ring3-perturb",
        dict(
            topology="ring",
            ring_neighbors=3,
            stagnation="perturb",
            stall_patience=1,
            stall_tol=10.0,
            bounds=(-1.0, 1.0),
            random_factors="per_particle",
        ),
    ),
    ("spso2011-random", dict(variant="spso2011", topology="random")),
    ("constriction-vonneumann", dict(variant="constriction", topology="von_neumann")),
    (
        "global-resample",
        dict(
            stagnation="resample",
            stall_patience=1,
            stall_tol=10.0,
            bounds=(-1.0, 1.0),
            bound_handling="resample",
        ),
    ),
    ("cso", dict(variant="cso")),
]
# Runs that the two-process test repeats across processes.
PROCESS_RUNS = ("ring3-perturb",)
# (One device: tests/test_sharding.py checks it in its own process.)
DEVICE_COUNTS = (2, 4, 8)
# Every config runs on 8 devices (the smallest shards, halos spanning several
# shards); these also on 2 and 4 (compiles are the cost of this file).
ALL_COUNTS = ("ring3-perturb", "spso2011-random")


def _setup(num_devices: int):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={num_devices}"
    )


def exact_fitness(params, _batch=None):
    """Chebyshev distance to 0.3: a max, exact in any order (unlike a sum)."""
    import jax
    import jax.numpy as jnp

    return jnp.max(
        jnp.stack([jnp.max(jnp.abs(x - 0.3)) for x in jax.tree.leaves(params)])
    )


def _template():
    import jax.numpy as jnp

    return {k: jnp.full(s, 0.5, jnp.float32) for k, s in TEMPLATE_SHAPES.items()}


def _np(tree):
    import jax
    import numpy as np

    return jax.tree.map(np.asarray, tree)


def _compare(a, b) -> dict:
    """Max |a - b| over all leaves, and whether every leaf is bitwise equal."""
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(_np(a)), jax.tree.leaves(_np(b))
    assert len(la) == len(lb), (len(la), len(lb))
    diff, bitwise = 0.0, True
    for x, y in zip(la, lb, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape)
        bitwise &= x.tobytes() == y.tobytes()
        if x.size and np.issubdtype(x.dtype, np.floating):
            with np.errstate(invalid="ignore"):
                d = np.abs(x.astype(np.float64) - y.astype(np.float64))
            same = (x == y) | (np.isnan(x) & np.isnan(y))
            diff = max(diff, float(np.max(np.where(same, 0.0, d))))
        elif x.size:
            diff = max(diff, float(np.max(x != y)))
    return {"max_abs_diff": diff, "bitwise": bool(bitwise)}


def _run(opt, key, hp, num_steps=NUM_STEPS):
    """Init, then ``num_steps`` steps under ``lax.scan`` (every step's info).

    Two jits, as a user would write them: XLA may round a formula differently
    (by an ulp) when it fuses it with the code around it, e.g. init's last
    operations with the first step's in one jit, so one jit around both would
    compare compiler choices rather than the sharding.
    """
    import jax

    import pso_jax

    state0 = jax.jit(opt.init)(key, _template(), hp)

    def steps(state0, hp):
        return pso_jax.scan_steps(key, opt, state0, hp, num_steps)

    return state0, jax.jit(steps)(state0, hp)


def _rows(x) -> list[int]:
    """The distinct particle counts of ``x``'s addressable shards."""
    return sorted({s.data.shape[0] for s in x.addressable_shards})


def check_trajectories(out: dict, saved: dict) -> None:
    import jax

    import pso_jax
    from pso_jax import sharding

    key = jax.random.key(0)
    for name, kw in CONFIGS:
        ref = pso_jax.pso(exact_fitness, num_particles=NUM_PARTICLES, **kw)
        hp = ref.default_hparams  # passed as jit arguments, never baked in
        r0, rn = _run(ref, key, hp)
        saved[f"{name}-ref"] = _np(rn[0])
        for n in DEVICE_COUNTS if name in ALL_COUNTS else (8,):
            opt = pso_jax.pso(
                exact_fitness,
                num_particles=NUM_PARTICLES,
                mesh=sharding.make_mesh(n),
                **kw,
            )
            s0, sn = _run(opt, key, hp)
            out[f"traj/{name}/{n}"] = {
                "init": _compare(r0, s0),
                "scan": _compare(rn, sn),
                "restarts": int(sn[0].num_restarts),
                "spec": str(sn[0].positions["w"].sharding.spec),
            }
            if name == "spso2011-random":  # has every kind of per-particle leaf
                layout(out, n, sn[0])
            if n == 8 and name in PROCESS_RUNS:
                saved[name] = _np(sn[0])


def layout(out: dict, n: int, state) -> None:
    """How ``state`` (on ``n`` devices) is laid out: rows and bytes per device."""
    import jax

    from pso_jax import sharding

    per_particle = {
        "positions": state.positions,
        "velocities": state.velocities,
        "pbest_params": state.pbest_params,
        "fitness": state.fitness,
        "pbest_fitness": state.pbest_fitness,
        "links": state.links,
    }
    per_device = sharding.bytes_per_device(per_particle)
    replicated = [
        s.data.shape == x.shape
        for x in jax.tree.leaves((state.best_params, state.best_fitness, state.step))
        for s in x.addressable_shards
    ]
    out[f"layout/{n}"] = {
        "rows_per_shard": sorted(
            {r for leaf in jax.tree.leaves(per_particle) for r in _rows(leaf)}
        ),
        "devices": len(per_device),
        "bytes_per_device": sorted(set(per_device.values())),
        "bytes_total": sum(x.nbytes for x in jax.tree.leaves(per_particle)),
        "replicated_full": all(replicated),
    }


def check_neighbours(out: dict) -> None:
    """Neighbourhood bests across shard boundaries, read back from velocities.

    With positions 0, velocities 0, ``w = c1 = 0``, no fitness improvement and
    particle ``i``'s personal best ``[1, i + 1]``, a step moves particle ``i`` by
    ``c2 r2 [1, j + 1]`` with ``j`` its neighbourhood best: ``j`` is recovered as
    ``v[1] / v[0] - 1`` and compared with a brute-force reference.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pso_jax
    from pso_jax import sharding, topology

    p, n = NUM_PARTICLES, 8
    # Personal-best scores: a fixed permutation, so that many neighbourhoods'
    # bests lie in another shard.
    score = np.asarray(jax.random.permutation(jax.random.key(3), p), np.float32)
    kw = dict(velocity_clamp=None, random_factors="per_particle")
    plain = pso_jax.pso(num_particles=p, topology="ring", **kw)
    hp = plain.default_hparams.replace(
        inertia=jnp.float32(0.0), cognitive=jnp.float32(0.0)
    )
    state = jax.jit(plain.init)(jax.random.key(0), jnp.zeros(2), hp)
    pbest = np.stack([np.ones(p), np.arange(1, p + 1)], 1).astype(np.float32)
    state = state.replace(
        positions=jnp.zeros_like(state.positions),
        velocities=jnp.zeros_like(state.velocities),
        pbest_params=jnp.asarray(pbest),
        pbest_fitness=jnp.asarray(score),
    )
    mesh = sharding.make_mesh(n)
    state = sharding.shard_state(state, mesh)
    fitness = jnp.full((p,), jnp.inf)  # no personal best improves
    for topo, k in (("ring", 1), ("ring", 3), ("von_neumann", 1)):
        table = topology.neighbour_table(topo, p, k)
        want = np.array([row[np.argmin(score[row])] for row in table])
        opt = pso_jax.pso(
            num_particles=p, topology=topo, ring_neighbors=k, mesh=mesh, **kw
        )
        new, _ = jax.jit(opt.tell)(jax.random.key(1), state, fitness, hp)
        v = np.asarray(new.velocities)
        got = np.rint(v[:, 1] / v[:, 0]).astype(int) - 1
        shard = np.arange(p) // (p // n)
        out[f"neighbours/{topo}{k}/{n}"] = {
            "mismatches": int(np.sum(got != want)),
            "cross_shard": int(np.sum(shard[want] != shard)),
        }


def check_padding(out: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pso_jax
    from pso_jax import sharding

    mesh = sharding.make_mesh(4)
    try:
        pso_jax.pso(exact_fitness, num_particles=10, mesh=mesh)
        message = None
    except ValueError as e:
        message = str(e)
    res = {"error": message}
    for variant, topo in (("inertia", "ring"), ("cso", "global")):
        opt = pso_jax.pso(
            exact_fitness,
            num_particles=10,
            variant=variant,
            topology=topo,
            mesh=mesh,
            pad=True,
        )

        def run(key, opt=opt):
            state = opt.init(key, _template())
            # Told that the 2 padding particles are far better than any real
            # one, the swarm must still ignore them.
            fitness = jnp.concatenate([jnp.arange(10.0) + 1, jnp.full((2,), -1e9)])
            told, info = opt.tell(key, state, fitness)
            last, _ = pso_jax.scan_steps(key, opt, told, opt.default_hparams, 10)
            return told, info, last

        told, info, last = jax.jit(run)(jax.random.key(0))
        res[f"{variant}-{topo}"] = {
            "num_particles": opt.num_particles,
            "num_inert": opt.config.num_inert,
            "told": {
                "best_fitness": float(told.best_fitness),
                "inert_pbest_fitness": np.asarray(told.pbest_fitness)[10:].tolist(),
                "num_nonfinite": int(info.num_nonfinite),
                "mean_fitness": float(info.mean_fitness),
            },
            "inert_pbest_fitness": np.asarray(last.pbest_fitness)[10:].tolist(),
            "best_fitness": float(last.best_fitness),
            "best_real_pbest": float(np.min(np.asarray(last.pbest_fitness)[:10])),
            "rows": _rows(last.fitness),
        }
    out["padding"] = res


def check_minimize(out: dict) -> None:
    import jax

    import pso_jax
    from pso_jax import sharding

    def f(x):
        return exact_fitness(x)

    kw = dict(num_dims=16, key=jax.random.key(0), num_particles=16, num_steps=30)
    ref = pso_jax.minimize(f, (-5.0, 5.0), topology="ring", **kw)
    mesh = sharding.make_mesh(8)
    got = pso_jax.minimize(f, (-5.0, 5.0), topology="ring", mesh=mesh, **kw)
    out["minimize/8"] = {
        "history": _compare(ref.history, got.history),
        "best_params": _compare(ref.best_params, got.best_params),
        "num_steps": [ref.num_steps, got.num_steps],
        "rows": _rows(got.state.positions),
    }


def check_data_axis(out: dict) -> None:
    """A ("particles", "data") mesh: the batch split, the fitness a mean."""
    import jax
    import jax.numpy as jnp

    import pso_jax
    from pso_jax import sharding

    def mse(params, batch):
        pred = batch["x"] @ params["w"] + params["b"]  # [B, 8]
        return jnp.mean(jnp.square(pred - batch["y"]))

    kb = jax.random.split(jax.random.key(5))
    batch = {
        "x": jax.random.normal(kb[0], (8, 4)),
        "y": jax.random.normal(kb[1], (8, 8)),
    }

    def run(opt):
        def go(key, hp, batch):
            s = opt.init(key, _template(), hp)
            return pso_jax.scan_steps(key, opt, s, hp, 3, batch)

        return jax.jit(go)(jax.random.key(0), opt.default_hparams, batch)

    want = run(pso_jax.pso(mse, num_particles=NUM_PARTICLES, topology="ring"))
    mesh = sharding.make_mesh(8, data=2)
    opt = pso_jax.pso(mse, num_particles=NUM_PARTICLES, topology="ring", mesh=mesh)
    got = run(opt)
    out["data_axis"] = {
        "mesh": dict(mesh.shape),
        "scan": _compare(want, got),
        "rows_per_shard": _rows(got[0].positions["w"]),
    }


def _video_setup():
    """A 3D-conv video classifier, Conv3D(4, 3^3) -> relu -> mean -> Dense(3)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3, 3))(x)
            return nn.Dense(3)(jax.nn.relu(x).mean(axis=(1, 2, 3)))

    model = Tiny()
    video = jax.random.normal(jax.random.key(1), (8, 4, 6, 6, 2))
    batch = {"video": video, "label": jnp.arange(8) % 3}
    params = model.init(jax.random.key(2), video)["params"]

    def apply_fn(p, x):
        return model.apply({"params": p}, x)

    return apply_fn, params, batch


def _train_run(trainer, params, batch, hp, steps=2):
    """Init, then ``steps`` train steps under ``lax.scan``; state and metrics."""
    import jax

    state = jax.jit(trainer.init)(jax.random.key(0), params, hp)

    def run(state, batch, hp):
        def body(s, _):
            return trainer.step(None, s, batch, hp)

        return jax.lax.scan(body, state, None, length=steps)

    return jax.jit(run)(state, batch, hp)


def check_train(out: dict) -> None:
    import optax

    import pso_jax
    from pso_jax import sharding, train

    apply_fn, params, batch = _video_setup()
    # (name, make_train_step kwargs, (particle devices, data devices) meshes)
    hybrid = dict(local_steps=1, grad_optimizer=optax.sgd(0.1), fitness="macro_f1")
    cases = [
        ("pure", {}, [(n, 1) for n in DEVICE_COUNTS] + [(4, 2)]),
        # Gradient steps (their loss a mean over the data axis) and macro-F1
        # (from confusion matrices summed over it).
        ("hybrid-macro_f1", hybrid, [(4, 2)]),
    ]
    for name, kw, meshes in cases:
        maximize = kw.get("fitness") == "macro_f1"
        ref = pso_jax.pso(num_particles=NUM_PARTICLES, maximize=maximize)
        hp = ref.default_hparams
        want = _train_run(train.make_train_step(apply_fn, ref, **kw), params, batch, hp)
        for n, data in meshes:
            mesh = sharding.make_mesh(n * data, data=data)
            opt = pso_jax.pso(num_particles=NUM_PARTICLES, maximize=maximize, mesh=mesh)
            trainer = sharding.make_train_step(apply_fn, opt, **kw)
            got = _train_run(trainer, params, batch, hp)
            out[f"train/{name}/{n}x{data}"] = {
                "state": _compare(want[0], got[0]),
                "metrics": _compare(want[1], got[1]),
                "rows_per_shard": _rows(got[0].swarm.positions["Conv_0"]["kernel"]),
            }


def check_checkpoint(out: dict, tmp: str) -> None:
    """A swarm checkpointed on 8 devices, restored onto 2, continues identically."""
    import jax

    import pso_jax
    from pso_jax import checkpoint, sharding

    key = jax.random.key(0)
    runs = {}
    for n in (8, 2):
        mesh = sharding.make_mesh(n)
        opt = pso_jax.pso(
            exact_fitness, num_particles=NUM_PARTICLES, topology="ring", mesh=mesh
        )
        scan = jax.jit(lambda s, h, o=opt: pso_jax.scan_steps(key, o, s, h, 3))
        runs[n] = (opt, scan)
    opt8, scan8 = runs[8]
    hp = opt8.default_hparams
    state8, _ = scan8(jax.jit(opt8.init)(key, _template(), hp), hp)
    path = os.path.join(tmp, "ckpt")
    checkpoint.save(path, 3, state8)
    opt2, scan2 = runs[2]
    abstract = jax.eval_shape(opt2.init, key, _template())
    state2, _ = checkpoint.restore(path, sharding.abstract_state(abstract, opt2.mesh))
    cont8, _ = scan8(state8, hp)
    cont2, _ = scan2(state2, hp)
    out["checkpoint"] = {
        "restored": _compare(state8, state2),
        "restored_devices": len(state2.positions["w"].sharding.device_set),
        "restored_rows": _rows(state2.positions["w"]),
        "continued": _compare(cont8, cont2),
    }


# Two groups of about equal cost, run as two processes side by side.
GROUPS = {
    "swarm": {
        "trajectories": lambda out, saved, tmp: check_trajectories(out, saved),
        "neighbours": lambda out, saved, tmp: check_neighbours(out),
        "padding": lambda out, saved, tmp: check_padding(out),
    },
    "train": {
        "train": lambda out, saved, tmp: check_train(out),
        "data_axis": lambda out, saved, tmp: check_data_axis(out),
        "minimize": lambda out, saved, tmp: check_minimize(out),
        "checkpoint": lambda out, saved, tmp: check_checkpoint(out, tmp),
    },
}


def run_checks(group: str, out_dir: str) -> None:
    _setup(8)
    import jax
    import numpy as np

    assert jax.device_count() == 8, jax.devices()
    out: dict = {"timings": {}}
    saved: dict = {}
    for name, fn in GROUPS[group].items():
        t = time.perf_counter()
        fn(out, saved, out_dir)
        out["timings"][name] = round(time.perf_counter() - t, 2)
    for name, tree in saved.items():
        np.savez(os.path.join(out_dir, f"{name}.npz"), *jax.tree.leaves(tree))
    with open(os.path.join(out_dir, f"checks-{group}.json"), "w") as f:
        json.dump(out, f, indent=1)


def run_process(rank: int, port: int, out_dir: str) -> None:
    """One of two processes with 4 CPU devices each: the PROCESS_RUNS on 8."""
    _setup(4)
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import pso_jax
    from pso_jax import sharding

    assert sharding.initialize_distributed(f"localhost:{port}", 2, rank)
    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    assert jax.local_device_count() == 4
    key = jax.random.key(0)
    mesh = sharding.make_mesh()  # all 8 devices, of both processes
    info = {}
    for name, kw in CONFIGS:
        if name not in PROCESS_RUNS:
            continue
        opt = pso_jax.pso(exact_fitness, num_particles=NUM_PARTICLES, mesh=mesh, **kw)
        _, (state, _) = _run(opt, key, opt.default_hparams)
        info[name] = {
            "local_rows": _rows(state.positions["w"]),
            "local_devices": len(state.positions["w"].addressable_shards),
            "fully_addressable": bool(state.positions["w"].is_fully_addressable),
        }
        full = multihost_utils.process_allgather(state, tiled=True)
        if rank == 0:
            np.savez(os.path.join(out_dir, f"{name}-mp.npz"), *jax.tree.leaves(full))
    with open(os.path.join(out_dir, f"process{rank}.json"), "w") as f:
        json.dump(info, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "checks":
        run_checks(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "process":
        run_process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit(__doc__)
