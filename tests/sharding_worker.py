"""Multi-device checks for tests/test_sharding.py, run in subprocesses.

pytest's own process has one CPU device, and the device count is fixed when JAX
starts, so the checks that need 8 devices run here, in a fresh process started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``: one process runs
them all (JAX starts once) and writes the measured numbers as JSON; the test
file asserts on them.

    python tests/sharding_worker.py checks {swarm,train} OUT_DIR
    python tests/sharding_worker.py process RANK PORT OUT_DIR   # 2 x 4 devices
    python tests/sharding_worker.py experiment OUT_DIR DATA_DIR

``process`` is one of two real processes on localhost (``jax.distributed``, gloo
CPU collectives) that together run the runs of :data:`PROCESS_RUNS` over 8
devices; ``checks`` saves the same runs on one 8-device process for comparison.
``experiment`` runs :func:`pso_jax.experiment.train` and the ``pso-jax`` command
line on 1, 2 and 4 of 8 devices (:data:`EXPERIMENT`, a smaller smoke config).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
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


# The training runs of `experiment`: the smoke config made smaller (seconds per
# run), pure PSO (local_steps=0: see check_experiment for the hybrid). The test
# file passes the same values as pso-jax flags (experiment_flags).
EXPERIMENT = dict(
    width=4, steps=4, steps_per_call=2, checkpoint_every=2, num_frames=4, local_steps=0
)


def experiment_flags(data_dir: str, **overrides) -> list[str]:
    """``pso-jax train`` flags for the smoke config with :data:`EXPERIMENT`."""
    flags = ["train", "--config", "smoke", "--data-dir", data_dir, "--no-progress"]
    for name, value in {**EXPERIMENT, **overrides}.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


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
            "num_inert": opt.config.axis.num_inert,
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


def _conv0(positions):
    return positions["Conv_0"]["kernel"]


def _train_record(want, got, rows) -> dict:
    """An unsharded and a sharded ``_train_run`` compared; ``rows(positions)``
    is the leaf whose rows per shard are counted.

    diversity: a diagnostic from per-device row sums, equal to float rounding
    (compared on its own, relative); the other metrics bitwise as before.
    """
    return {
        "state": _compare(want[0], got[0]),
        "metrics": _compare(_no_diversity(want[1]), _no_diversity(got[1])),
        "diversity": _rel_diff(want[1].diversity, got[1].diversity),
        "rows_per_shard": _rows(rows(got[0].swarm.positions)),
    }


def check_train(out: dict) -> None:
    import optax

    import pso_jax
    from pso_jax import sharding, train

    apply_fn, params, batch = _video_setup()
    # (name, make_train_step kwargs, (particle devices, data devices) meshes)
    hybrid = dict(local_steps=1, grad_optimizer=optax.sgd(0.1), fitness="macro_f1")
    pbt = dict(
        local_steps=1,
        grad_hparams={"learning_rate": (1e-3, 1e-1)},
        exploit_every=1,
        hparam_move="both",  # the exploit, then PSO on the log learning rates
    )
    cases = [
        ("pure", {}, [(n, 1) for n in DEVICE_COUNTS] + [(4, 2)]),
        # Gradient steps (their loss a mean over the data axis) and macro-F1
        # (from confusion matrices summed over it).
        ("hybrid-macro_f1", hybrid, [(4, 2)]),
        # Per-particle learning rates, PBT's exploit and the hyperparameter
        # move every step: the clones' sources and the best sit on other shards.
        ("pbt", pbt, [(4, 1)]),
    ]
    for name, kw, meshes in cases:
        maximize = kw.get("fitness") == "macro_f1"
        ref = pso_jax.pso(num_particles=NUM_PARTICLES, maximize=maximize)
        hp = ref.default_hparams
        want = _train_run(train.make_train_step(apply_fn, ref, **kw), params, batch, hp)
        for n, data in meshes:
            mesh = sharding.make_mesh(n * data, data=data)
            opt = pso_jax.pso(num_particles=NUM_PARTICLES, maximize=maximize, mesh=mesh)
            trainer = train.make_train_step(apply_fn, opt, **kw)
            got = _train_run(trainer, params, batch, hp)
            out[f"train/{name}/{n}x{data}"] = _train_record(want, got, _conv0)
    _check_train_subspace(out, apply_fn, params, batch)
    _check_train_split(out, apply_fn, params, batch)


def _check_train_split(out: dict, apply_fn, params, batch) -> None:
    """``split_batch``: every particle fits its own clip of 16, on 4 devices
    (each device's particles take their rows of the batch)."""
    import jax.numpy as jnp
    import optax

    import pso_jax
    from pso_jax import sharding, train

    video = jnp.concatenate([batch["video"], -batch["video"]])
    batch = {"video": video, "label": jnp.arange(16) % 3}
    kw = dict(local_steps=2, grad_optimizer=optax.adam(0.05), split_batch=True)
    ref = pso_jax.pso(num_particles=NUM_PARTICLES)
    hp = ref.default_hparams
    want = _train_run(train.make_train_step(apply_fn, ref, **kw), params, batch, hp)
    opt = pso_jax.pso(num_particles=NUM_PARTICLES, mesh=sharding.make_mesh(4))
    got = _train_run(train.make_train_step(apply_fn, opt, **kw), params, batch, hp)
    out["train/split/4x1"] = _train_record(want, got, _conv0)
    data_mesh = sharding.make_mesh(4, data=2)
    opt = pso_jax.pso(num_particles=NUM_PARTICLES, mesh=data_mesh)
    try:
        train.make_train_step(apply_fn, opt, **kw)
    except ValueError as e:
        out["train/split/4x1"]["data_axis_error"] = str(e)


def _check_train_subspace(out: dict, apply_fn, params, batch) -> None:
    """Subspace particles re-centred every step (the base moves in the
    replicated frozen leaves, from the global best) on 4 devices."""
    import pso_jax
    from pso_jax import particle_space, sharding, train

    space = particle_space.subspace(8)
    tree = space.template(params)
    kw = dict(
        recenter_fn=lambda s: particle_space.recenter(space, s, redraw=True),
        recenter_every=1,
    )
    ref = pso_jax.pso(num_particles=NUM_PARTICLES, mask=space.mask(tree))
    hp = ref.default_hparams
    apply_tree = space.wrap(apply_fn)
    want = _train_run(train.make_train_step(apply_tree, ref, **kw), tree, batch, hp)
    mesh = sharding.make_mesh(4)
    opt = pso_jax.pso(num_particles=NUM_PARTICLES, mask=space.mask(tree), mesh=mesh)
    got = _train_run(train.make_train_step(apply_tree, opt, **kw), tree, batch, hp)
    out["train/subspace-recenter/4x1"] = {
        **_train_record(want, got, lambda x: x["coords"]["z"]),
        "epoch": int(got[0].swarm.frozen_params["base"]["epoch"]),
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


def _metrics(workdir: str) -> list[dict]:
    """A run's metrics.jsonl without its wall-clock times."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [
            {k: v for k, v in json.loads(line).items() if k != "wall_seconds"}
            for line in f
            if line.strip()
        ]


def _compare_metrics(a: list[dict], b: list[dict]) -> dict:
    """Max |a - b| over every metric of every step; whether the steps match.

    ``diversity`` (per-device row sums: equal to float rounding) is compared
    on its own, relatively.
    """
    same_steps = [r["step"] for r in a] == [r["step"] for r in b]
    pairs = list(zip(a, b, strict=False))
    # Non-finite values are written as null and listed under "non_finite"
    # (strict JSON): those must agree exactly, the numbers to max_abs_diff.
    skip = ("diversity", "non_finite")
    diff = max(
        (
            abs(x[k] - y[k]) if x[k] is not None and y[k] is not None else 0.0
            for x, y in pairs
            for k in x
            if k not in skip
        ),
        default=0.0,
    )
    div = [(x["diversity"], y["diversity"]) for x, y in pairs if "diversity" in x]
    strip = [{k: v for k, v in r.items() if k != "diversity"} for r in a]
    strip_b = [{k: v for k, v in r.items() if k != "diversity"} for r in b]
    return {
        "same_steps": same_steps,
        "max_abs_diff": float(diff),
        "equal": strip == strip_b,
        "diversity_rel_diff": max(
            (abs(x - y) / max(abs(x), 1e-30) for x, y in div), default=0.0
        ),
    }


def _no_diversity(metrics):
    return metrics._replace(diversity=metrics.diversity * 0)


def _rel_diff(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30)))


SUMMARY_KEYS = (
    "test_accuracy",
    "test_macro_f1",
    "ensemble_test_accuracy",
    "ensemble_size",
    "best_train_fitness",
    "steps",
    "parallel",
)


def _summary(summary: dict) -> dict:
    return {k: summary.get(k) for k in SUMMARY_KEYS} | {
        "particles": summary.get("config", {}).get("particles")
    }


def check_experiment(out: dict, tmp: str, data_dir: str) -> None:
    """``experiment.train`` and ``pso-jax`` on 1, 2 and 4 devices (and a data axis).

    Pure PSO runs are compared leaf by leaf. With gradient steps (the hybrid),
    Adam moves the biases that feed a normalisation layer (gradient zero up to
    rounding) by the sign of rounding noise: those leaves differ between any two
    compilations (one device vs four, as two XLA versions would), so the hybrid
    runs compare their metrics and test results instead, and the hybrid
    checkpoint's restore onto another device count is compared bitwise.
    """
    import dataclasses

    import jax
    import numpy as np

    from pso_jax import checkpoint, cli, experiment, flax_utils
    from pso_jax.experiment import Parallelism

    pure = experiment.get_config("smoke", data_dir=data_dir, **EXPERIMENT)
    hybrid = dataclasses.replace(pure, local_steps=1)
    final: dict[str, object] = {}

    def run(name, cfg, parallel, **kw):
        def grab(step, state):
            final[name] = _np(state)

        workdir = os.path.join(tmp, name)
        t = time.perf_counter()
        summary = experiment.train(
            cfg, workdir, progress=False, parallel=parallel, on_step=grab, **kw
        )
        out["timings"][f"run {name}"] = round(time.perf_counter() - t, 2)
        return summary, workdir

    def versus(name, ref, got_summary, got_dir, state=True):
        res = {
            "summary": [_summary(ref[0]), _summary(got_summary)],
            "metrics": _compare_metrics(_metrics(ref[1]), _metrics(got_dir)),
        }
        if state:
            res["state"] = _compare(final[ref[2]], final[name])
        out[f"experiment/{name}"] = res

    # (a) 4 devices, and 2 x 2 with a data axis, against one device.
    s1, d1 = run("pure-1", pure, Parallelism())
    ref = (s1, d1, "pure-1")
    for name, parallel in (
        ("pure-4", Parallelism(devices=4)),
        ("pure-2x2", Parallelism(devices=4, data=2)),
    ):
        versus(name, ref, *run(name, pure, parallel))
    # On-device augmentation on a data axis: each device augments its slice of
    # the batch with those clips' keys of the whole batch's draw.
    aug = dataclasses.replace(pure, augment=True)
    sa1, da1 = run("aug-1", aug, Parallelism())
    parallel = Parallelism(devices=4, data=2)
    versus("aug-2x2", (sa1, da1, "aug-1"), *run("aug-2x2", aug, parallel))

    # (b) Interrupted at step 2 on 4 devices, resumed on 2 (and on 1).
    def kill_at_2(step, state):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    part = os.path.join(tmp, "resume-2")
    first = experiment.train(
        pure, part, progress=False, parallel=Parallelism(devices=4), on_step=kill_at_2
    )
    shutil.copytree(part, os.path.join(tmp, "resume-1"))
    for name, parallel in (
        ("resume-2", Parallelism(devices=2)),
        ("resume-1", Parallelism()),
    ):
        summary, workdir = run(name, pure, parallel, resume=True)
        versus(name, (s1, d1, "pure-1"), summary, workdir)
        out[f"experiment/{name}"] |= {
            "interrupted": first,
            "checkpoints": checkpoint.all_steps(os.path.join(workdir, "checkpoints")),
            "versus_4": _compare(final["pure-4"], final[name]),
        }

    # The hybrid (gradient steps, per-particle Adam state) on 4 devices.
    sh1, dh1 = run("hybrid-1", hybrid, Parallelism())
    sh4, dh4 = run("hybrid-4", hybrid, Parallelism(devices=4))
    versus("hybrid-4", (sh1, dh1, "hybrid-1"), sh4, dh4, state=False)
    source = experiment._source(hybrid, "train")
    run2 = experiment._Run(hybrid, source, Parallelism(devices=2))
    restored, _ = experiment._restore(run2, os.path.join(dh4, "checkpoints"))
    opt_leaf = jax.tree.leaves(restored.opt_state)[-1]
    out["experiment/hybrid-restore-2"] = {
        "restored": _compare(final["hybrid-4"], restored),
        "opt_state_rows": _rows(opt_leaf),
        "devices": len(opt_leaf.sharding.device_set),
    }

    # (c) 6 particles on 4 devices: an error before anything is written or
    # compiled; with pad, 8 on the devices, 6 reported and evaluated.
    six = dataclasses.replace(pure, particles=6, top_k=8)
    try:
        experiment.train(
            six, os.path.join(tmp, "six"), progress=False, parallel=Parallelism(4)
        )
        error = None
    except ValueError as e:
        error = str(e)
    summary, workdir = run("pad-6", six, Parallelism(devices=4, pad=True))
    state = final["pad-6"]
    run_pad = experiment._Run(six, source, Parallelism(devices=4, pad=True))
    restored, _ = experiment._restore(run_pad, os.path.join(workdir, "checkpoints"))
    view = run_pad.eval_state(restored, 6).swarm
    real = np.asarray(state.swarm.pbest_fitness)[:6]
    try:  # onto 2 devices: 6 particles, no padding, another swarm size
        experiment._restore(
            experiment._Run(six, source, Parallelism(devices=2)),
            os.path.join(workdir, "checkpoints"),
        )
        restore_error = None
    except checkpoint.CheckpointError as e:
        restore_error = str(e)
    out["experiment/pad"] = {
        "error": error,
        "wrote_nothing": not os.path.exists(os.path.join(tmp, "six")),
        "summary": _summary(summary),
        "swarm_rows": int(state.swarm.fitness.shape[0]),
        "inert_pbest_fitness": np.asarray(state.swarm.pbest_fitness)[6:].tolist(),
        "evaluated_fitness": np.asarray(view.pbest_fitness).tolist(),
        "real_pbest_fitness_sorted": sorted(real.tolist()),
        "metrics": _metrics(workdir),
        "restore_on_2_error": restore_error,
    }

    # (d) Pretraining (masked tubelets, pure PSO): the task's masks are drawn
    # per clip of the whole batch, so 2 data shards x 2 particle shards train
    # what one device trains (up to the data axis's sums).
    pre = dataclasses.replace(pure, objective="masked")
    sp1, dp1 = run("pre-1", pre, Parallelism())
    sp4, dp4 = run("pre-2x2", pre, Parallelism(devices=4, data=2))
    backbones = [
        jax.tree.leaves(flax_utils.load_params(os.path.join(d, "backbone")))
        for d in (dp1, dp4)
    ]
    out["experiment/pretext-2x2"] = {
        "test_loss": [sp1["test_loss"], sp4["test_loss"]],
        "initial_test_loss": [sp1["initial_test_loss"], sp4["initial_test_loss"]],
        "parallel": sp4["parallel"],
        "metrics": _compare_metrics(_metrics(dp1), _metrics(dp4)),
        "backbone_max_abs_diff": max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(*backbones, strict=True)
        ),
    }

    # (e) The command line in this process: train on 2 devices, evaluate on 4,
    # and its layout errors (exit code 2, the message on stderr).
    def cli_main(argv):
        err = io.StringIO()
        t = time.perf_counter()
        with contextlib.redirect_stderr(err):
            rc = cli.main(argv)
        out["timings"][" ".join(argv[:1] + argv[-4:])] = round(
            time.perf_counter() - t, 2
        )
        return {"rc": rc, "stderr": err.getvalue()[-2000:]}

    flags = experiment_flags(data_dir)
    cli_dir = os.path.join(tmp, "cli-2")
    train_rc = cli_main([*flags, "--workdir", cli_dir, "--devices", "2"])
    eval_rc = cli_main(["evaluate", "--workdir", cli_dir, "--devices", "4"])
    with open(os.path.join(cli_dir, "summary.json")) as f:
        cli_summary = json.load(f)
    with open(os.path.join(cli_dir, "evaluation.json")) as f:
        evaluation = json.load(f)
    six_flags = [*flags, "--particles", "6", "--workdir", os.path.join(tmp, "c6")]
    out["experiment/cli"] = {
        "train": train_rc,
        "evaluate": eval_rc,
        "summary": [_summary(s1), _summary(cli_summary)],
        "evaluation": _summary(evaluation),
        "metrics": _compare_metrics(_metrics(d1), _metrics(cli_dir)),
        "files": sorted(os.listdir(cli_dir)),
        "six": cli_main([*six_flags, "--devices", "4"]),
        "too_many": cli_main([*flags, "--workdir", cli_dir + "x", "--devices", "16"]),
        "bad_data": cli_main(
            [*flags, "--workdir", cli_dir + "y", "--devices", "2", "--data", "4"]
        ),
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


def run_experiment(out_dir: str, data_dir: str) -> None:
    """The ``experiment`` checks on 8 CPU devices; ``experiment.json`` in OUT_DIR."""
    _setup(8)
    import jax

    assert jax.device_count() == 8, jax.devices()
    # The runs compile the same programs again (a _Run per run): cache hits.
    jax.config.update("jax_compilation_cache_dir", os.path.join(out_dir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    out: dict = {"timings": {}}
    t = time.perf_counter()
    check_experiment(out, os.path.join(out_dir, "runs"), data_dir)
    out["timings"]["all"] = round(time.perf_counter() - t, 2)
    with open(os.path.join(out_dir, "experiment.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "checks":
        run_checks(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "experiment":
        run_experiment(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "process":
        run_process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit(__doc__)
