"""pso_jax.compress: quantisation, pruning, sizes, the search, ``pso-jax compress``."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pso_jax import cli
from pso_jax import compress as cp


def _tree():
    """A Dense kernel [4, 4] of distinct magnitudes, and its bias [4]."""
    kernel = jnp.array(
        [
            [0.1, -2.0, 0.3, 4.0],
            [-0.5, 0.6, -0.7, 0.8],
            [0.9, -1.0, 1.1, -1.2],
            [1.3, 1.4, -1.5, 1.6],
        ]
    )
    return {"dense": {"kernel": kernel, "bias": jnp.array([1.0, 2.0, 3.0, 4.0])}}


def test_quantize_known_answer():
    params = _tree()
    q = cp.quantize(params, bits=8)
    w = params["dense"]["kernel"]
    scale = np.abs(np.asarray(w)).max(axis=0) / 127  # per output channel
    np.testing.assert_allclose(q.scales["dense"]["kernel"], scale, rtol=1e-6)
    assert q.codes["dense"]["kernel"].dtype == jnp.int8
    np.testing.assert_array_equal(
        q.codes["dense"]["kernel"], np.round(np.asarray(w) / scale)
    )
    error = np.abs(np.asarray(q.params["dense"]["kernel"]) - np.asarray(w))
    assert (error <= scale / 2 * (1 + 1e-6)).all()
    # Biases (and norm scales) stay float32, untouched.
    assert q.scales["dense"]["bias"] is None
    chex.assert_trees_all_equal(q.params["dense"]["bias"], params["dense"]["bias"])
    assert int(q.num_bytes) == 16 + 4 * 4 + 4 * 4  # codes, scales, bias


def test_quantize_conv_kernel_scales_per_output_channel():
    w = jax.random.normal(jax.random.key(0), (3, 3, 3, 4, 6))
    q = jax.jit(cp.quantize, static_argnums=1)({"conv": {"kernel": w}}, 4)
    scale = np.abs(np.asarray(w)).reshape(-1, 6).max(0) / 7
    np.testing.assert_allclose(q.scales["conv"]["kernel"], scale, rtol=1e-6)
    codes = np.asarray(q.codes["conv"]["kernel"])
    assert codes.min() >= -7 and codes.max() <= 7
    error = np.abs(np.asarray(q.params["conv"]["kernel"]) - np.asarray(w))
    assert (error <= scale / 2 * (1 + 1e-6)).all()


def test_prune_half_zeroes_exactly_the_smallest_half():
    params = _tree()
    pruned, keep = cp.prune(params, 0.5)
    w = np.abs(np.asarray(params["dense"]["kernel"])).ravel()
    out = np.asarray(pruned["dense"]["kernel"]).ravel()
    smallest = np.argsort(w)[:8]
    assert (out == 0).sum() == 8 and (out[smallest] == 0).all()
    np.testing.assert_array_equal(np.asarray(keep["dense"]["kernel"]).ravel(), out != 0)
    assert keep["dense"]["bias"] is None
    chex.assert_trees_all_equal(pruned["dense"]["bias"], params["dense"]["bias"])
    # Global: the smallest of both kernels together; per layer: half of each.
    two = {"a": {"kernel": jnp.full((2, 2), 0.1)}, "b": {"kernel": jnp.ones((2, 2))}}
    g, _ = cp.prune(two, 0.5)
    assert (np.asarray(g["a"]["kernel"]) == 0).all() and (g["b"]["kernel"] == 1).all()
    layer, _ = cp.prune(two, 0.5, scope="layer")
    assert [int((layer[k]["kernel"] == 0).sum()) for k in "ab"] == [2, 2]


@pytest.mark.parametrize(
    "bits, sparsity, expected",
    [
        (8, 0.0, 16 + 16 + 16),  # int8 codes, 4 scales, 4 biases
        (8, 0.5, 2 + 8 + 16 + 16),  # bitmask, 8 codes, scales, biases
        (4, 0.0, 8 + 16 + 16),  # two 4-bit codes a byte
        (2, 0.0, 4 + 16 + 16),
        (16, 0.0, 32 + 16 + 16),
        (32, 0.0, 64 + 16),  # float32, no scales
        (32, 0.5, 2 + 32 + 16),  # float32 values of the 8 kept, bitmask
    ],
)
def test_sizes_in_bytes_are_exact_and_pack_round_trips(bits, sparsity, expected):
    params = _tree()
    out = cp.compress_params(params, bits, sparsity)
    assert out.float_bytes == 4 * (16 + 4)
    assert int(out.num_bytes) == expected
    packed = cp.pack(params, bits, sparsity)
    assert sum(v.nbytes for k, v in packed.items() if k != "__meta__") == expected
    chex.assert_trees_all_close(cp.unpack(packed, params), out.params, rtol=1e-6)


def test_per_layer_settings():
    two = {
        "a": {"kernel": jax.random.normal(jax.random.key(1), (8, 4))},
        "b": {"kernel": jax.random.normal(jax.random.key(2), (4, 2))},
    }
    assert cp.kernel_names(two) == ("a/kernel", "b/kernel")
    out = cp.compress_params(two, [4, 32], [0.5, 0.0], scope="layer")
    a = cp.compress_params({"k": {"kernel": two["a"]["kernel"]}}, 4, 0.5)
    chex.assert_trees_all_equal(out.params["a"], a.params["k"])
    chex.assert_trees_all_equal(out.params["b"], two["b"])  # float32: as it was
    assert int(out.num_bytes) == int(a.num_bytes) + 4 * 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), r"sparsity=1\.0"),
        (dict(sparsity=-0.1), r"sparsity=-0\.1"),
        (dict(sparsity=float("nan")), "sparsity=nan"),
        (dict(bits=3), r"bits=3: not supported"),
        (dict(bits=[8, 8]), r"one per kernel \(1\)"),
        (dict(sparsity=[0.1], scope="global"), "needs scope='layer'"),
        (dict(scope="row"), "scope='row'"),
    ],
)
def test_bad_settings_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cp.compress_params(_tree(), **kwargs)


def test_bad_inputs_of_the_other_functions():
    with pytest.raises(ValueError, match="bits=32: not supported"):
        cp.quantize(_tree(), bits=32)
    with pytest.raises(ValueError, match="no kernel"):
        cp.compress_params({"bias": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"sparsity=1\.5"):
        cp.prune(_tree(), 1.5)
    with pytest.raises(ValueError, match=r"lam=-1\.0"):
        cp.search(lambda p: 0.0, _tree(), key=jax.random.key(0), lambdas=(-1.0,))


def test_jit_equals_no_jit():
    params = {
        "conv": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 3, 2, 4))},
        **_tree(),
    }

    def fn(p, bits, sparsity):
        out = cp.compress_params(p, bits, sparsity, scope="layer")
        return out.params, out.num_bytes

    jitted = jax.jit(fn)
    bits, sparsity = jnp.array([4, 8]), jnp.array([0.3, 0.5])
    chex.assert_trees_all_close(
        fn(params, bits, sparsity), jitted(params, bits, sparsity)
    )
    small = _tree()
    chex.assert_trees_all_close(
        cp.prune(small, 0.25), jax.jit(lambda p: cp.prune(p, 0.25))(small)
    )
    chex.assert_trees_all_close(
        cp.quantize(small, 4), jax.jit(lambda p: cp.quantize(p, 4))(small)
    )
    # vmap over settings (the search's swarm) equals a loop.
    many = (
        jnp.array([[2, 32], [8, 4], [16, 8]]),
        jnp.array([[0, 0.9], [0.5, 0.1], [0.2, 0]]),
    )
    stacked = jax.vmap(fn, in_axes=(None, 0, 0))(params, *many)
    for i in range(3):
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, i=i: a[i], stacked),
            jitted(params, many[0][i], many[1][i]),
        )


def _dominated(point, others):
    return any(
        o["num_bytes"] <= point["num_bytes"]
        and o["val_accuracy"] >= point["val_accuracy"]
        and (
            o["num_bytes"] < point["num_bytes"]
            or o["val_accuracy"] > point["val_accuracy"]
        )
        for o in others
    )


def test_pareto_front_is_non_dominated():
    rng = np.random.default_rng(0)
    sizes, acc = rng.integers(1, 20, 50).tolist(), rng.random(50).round(1).tolist()
    points = [
        {"num_bytes": s, "val_accuracy": a} for s, a in zip(sizes, acc, strict=True)
    ]
    front = cp.pareto_front(sizes, acc)
    assert not any(_dominated(points[i], points) for i in front)
    # Every other point is dominated by (or equal to) a point of the front.
    for j in set(range(50)) - set(front):
        assert _dominated(points[j], [points[i] for i in front]) or any(
            points[i] == points[j] for i in front
        )


def test_search_returns_a_non_dominated_front():
    key_w, key_x = jax.random.split(jax.random.key(0))
    params = {
        "a": {"kernel": jax.random.normal(key_w, (6, 8)), "bias": jnp.zeros(8)},
        "b": {"kernel": jax.random.normal(key_x, (8, 3))},
    }
    x = jax.random.normal(jax.random.key(3), (64, 6))

    def logits(p, x):
        return jax.nn.relu(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]

    labels = jnp.argmax(logits(params, x), -1)  # the float model is exact

    def accuracy_fn(p):
        return jnp.mean(jnp.argmax(logits(p, x), -1) == labels)

    res = cp.search(
        accuracy_fn,
        params,
        key=jax.random.key(1),
        lambdas=(0.3,),
        num_particles=4,
        num_steps=4,
    )
    assert len(res.candidates) == 4 + 4  # personal bests + uniform widths
    assert not any(_dominated(r, res.candidates) for r in res.front)
    sizes = [r["num_bytes"] for r in res.front]
    assert sizes == sorted(sizes)
    full = cp.float_bytes(params)
    assert all(r["size_ratio"] == full / r["num_bytes"] for r in res.front)
    f32 = next(c for c in res.candidates if c["source"] == "uniform float32")
    assert f32["val_accuracy"] == 1.0 and f32["num_bytes"] == full


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One smallest run (smoke, width 16 so that the kernels dominate its size)."""
    workdir = tmp_path_factory.mktemp("run")
    argv = ["train", "--config", "smoke", "--data-dir", data_dir, "--width", "16"]
    argv += ["--particles", "2", "--top-k", "1", "--steps", "1"]
    argv += ["--steps-per-call", "1", "--checkpoint-every", "1"]
    argv += ["--workdir", str(workdir), "--no-progress"]
    assert cli.main(argv) == 0
    return workdir


def test_cli_compress_writes_accuracy_and_sizes(trained, capsys):
    before = json.loads((trained / "summary.json").read_text())
    # --search is left out here (its compile costs ~20 s on 2 cores): the
    # search itself is test_search_returns_a_non_dominated_front's.
    argv = ["compress", "--workdir", str(trained)]
    assert cli.main(argv) == 0
    assert "x smaller" in capsys.readouterr().out
    summary = json.loads((trained / "summary.json").read_text())
    entry = summary["compression"]
    assert {k: summary[k] for k in before} == before  # the rest is kept
    assert entry["test_accuracy_before"] == pytest.approx(before["test_accuracy"])
    assert 0.0 <= entry["test_accuracy_after"] <= 1.0
    assert entry["model"] == "best_particle" and entry["bits"] == 8
    assert entry["size_ratio"] >= 3.9
    assert entry["size_ratio"] == entry["float_bytes"] / entry["compressed_bytes"]
    stored = np.load(trained / entry["file"])
    assert (
        sum(stored[k].nbytes for k in stored if k != "__meta__")
        == (entry["compressed_bytes"])
    )
    assert not list(trained.glob("*.tmp"))  # nothing half-written


def test_cli_compress_errors(trained, tmp_path, capsys):
    assert cli.main(["compress", "--workdir", str(tmp_path)]) == 4
    assert "no trained model" in capsys.readouterr().err
    argv = ["compress", "--workdir", str(trained)]
    assert cli.main([*argv, "--sparsity", "1.0"]) == 2
    assert "sparsity=1.0" in capsys.readouterr().err
    assert cli.main([*argv, "--bits", "3"]) == 2
    assert "bits=3: not supported" in capsys.readouterr().err
