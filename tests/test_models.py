"""Tests for pso_jax.models (3D-conv video classifiers) and pso_jax.flax_utils."""

from __future__ import annotations

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pso_jax import flax_utils
from pso_jax.models import (
    MODELS,
    STEMS,
    conv3d,
    count_flops,
    depthwise_conv3d,
    flops_per_clip,
    layers,
    make_model,
    param_count,
    space_to_depth,
)
from pso_jax.models.base import decode_map
from pso_jax.models.layers import GroupNorm
from pso_jax.tree_utils import combine, partition

NUM_CLASSES = 5
WIDTH = 8
# Tiny clips: [B, T, H, W, C]; tubelet (2, 4, 4) -> 2 x 4 x 4 positions.
CLIP_SHAPE = (4, 16, 16, 3)
NUM_PARTICLES = 3

# Parameter counts at width 16, 10 classes (the documented small config).
PARAM_COUNTS = {
    ("c3d", "tubelet"): 71_642,
    ("c3d", "conv"): 71_402,
    ("r2plus1d", "tubelet"): 43_866,
    ("r2plus1d", "conv"): 43_626,
    ("x3d", "tubelet"): 22_570,
    ("x3d", "conv"): 22_330,
    ("vivit", "tubelet"): 10_970,  # its position embeddings: at CLIP_SHAPE
}
# The 3D-conv models; the Transformer's own tests are in test_vivit.py.
CONV_MODELS = sorted(n for n in MODELS if n != "vivit")
DN3 = ("NDHWC", "DHWIO", "NDHWC")


@pytest.fixture(scope="module")
def clips():
    return jax.random.normal(jax.random.key(1), (2, *CLIP_SHAPE))


def _model(name, **kwargs):
    return make_model(name, NUM_CLASSES, width=WIDTH, **kwargs)


def _apply(model):
    return flax_utils.apply_fn(model)


@functools.cache
def _swarm_init(name):
    """Jitted ``init_swarm_params`` for the tiny clips, compiled once per model."""
    sample = jax.ShapeDtypeStruct((1, *CLIP_SHAPE), jnp.float32)
    return jax.jit(
        lambda key: flax_utils.init_swarm_params(
            _model(name), key, NUM_PARTICLES, sample
        )
    )


@functools.cache
def _swarm(name, seed=0):
    """A swarm for the tiny clips, built once per test session."""
    return _swarm_init(name)(jax.random.key(seed))


def _params(name):
    return flax_utils.unstack(_swarm(name))[0]


def _xent(logits, labels):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


# --- layers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "ksize, cin, cout",
    [((3, 3, 3), 3, 5), ((3, 3, 3), 6, 2), ((1, 3, 3), 3, 5), ((3, 1, 1), 3, 5)]
    + [((1, 1, 1), 3, 5), ((5, 3, 1), 4, 4)],
)
def test_conv3d_matches_xla(ksize, cin, cout):
    # cin <= cout stacks time-shifted inputs; cin > cout sums shifted outputs.
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 4, 6, 6, cin))
    kernel = jax.random.normal(kk, (*ksize, cin, cout))
    want = lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME", dimension_numbers=DN3)
    chex.assert_trees_all_close(jax.jit(conv3d)(x, kernel), want, atol=1e-4)


@pytest.fixture(params=["cpu", "accelerator"])
def schedule(request, monkeypatch):
    """The vmap rules' CPU loops, or the plain vmap they take off the CPU.

    The accelerator branch is what a GPU runs; here it is forced on the CPU
    (it once recursed without end, which only a GPU run found).
    """
    if request.param == "accelerator":
        monkeypatch.setattr(layers, "_on_cpu", lambda: False)
    return request.param


@pytest.mark.parametrize("in_axes", [(0, 0), (None, 0), (0, None)])
def test_conv3d_vmap_rules_match_loop(in_axes, schedule):
    # (0, 0): one conv per particle; (None, 0): shared input folded into output
    # channels; (0, None): shared kernel folded into the batch.
    kx, kk = jax.random.split(jax.random.key(0))
    xs = jax.random.normal(kx, (3, 2, 4, 6, 6, 3))
    ks = jax.random.normal(kk, (3, 3, 3, 3, 3, 5))
    x_arg = xs if in_axes[0] == 0 else xs[0]
    k_arg = ks if in_axes[1] == 0 else ks[0]
    got = jax.jit(jax.vmap(conv3d, in_axes=in_axes))(x_arg, k_arg)
    want = jnp.stack(
        [
            conv3d(
                xs[i] if in_axes[0] == 0 else x_arg, ks[i] if in_axes[1] == 0 else k_arg
            )
            for i in range(3)
        ]
    )
    chex.assert_trees_all_close(got, want, atol=1e-4)


def test_conv3d_grad_matches_xla():
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (1, 4, 6, 6, 2))
    kernel = jax.random.normal(kk, (3, 3, 3, 2, 4))

    def xla(x, k):
        return lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=DN3)

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k)))

    chex.assert_trees_all_close(
        jax.jit(jax.grad(loss(conv3d), (0, 1)))(x, kernel),
        jax.jit(jax.grad(loss(xla), (0, 1)))(x, kernel),
        atol=1e-3,
    )


@pytest.mark.parametrize(
    "ksize, x_batched", [((3, 3, 3), True), ((1, 3, 3), True), ((3, 1, 1), False)]
)
def test_conv3d_grad_vmapped_over_particles_matches_xla_loop(
    ksize, x_batched, schedule
):
    # Under vmap over particles the backward pass takes the per-particle rules
    # (flipped-kernel convolution, shifted matmuls); compare with XLA's own
    # gradients particle by particle.
    kx, kk, kg = jax.random.split(jax.random.key(1), 3)
    P = 3
    x = jax.random.normal(kx, ((P,) if x_batched else ()) + (2, 4, 5, 6, 3))
    kernel = jax.random.normal(kk, (P, *ksize, 3, 4))

    def xla(x, k):
        return lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=DN3)

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k)))

    in_axes = (0 if x_batched else None, 0)
    got = jax.jit(jax.vmap(jax.grad(loss(conv3d), (0, 1)), in_axes=in_axes))(x, kernel)
    for p in range(P):
        xp = x[p] if x_batched else x
        want = jax.grad(loss(xla), (0, 1))(xp, kernel[p])
        chex.assert_trees_all_close((got[0][p], got[1][p]), want, atol=2e-3)


def test_model_grads_vmapped_over_particles_match_loop(clips, schedule):
    model = make_model("r2plus1d", num_classes=4, width=8)
    keys = jax.random.split(jax.random.key(3), 2)
    swarm = jax.vmap(lambda k: model.init(k, clips)["params"])(keys)
    labels = jnp.arange(clips.shape[0]) % 4

    def loss(p):
        logits = model.apply({"params": p}, clips)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])

    got = jax.jit(jax.vmap(jax.grad(loss)))(swarm)
    one = jax.jit(jax.grad(loss))  # compiled once; eager op-by-op is ~10x slower
    for p in range(2):
        want = one(jax.tree.map(lambda a, p=p: a[p], swarm))
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, p=p: a[p], got), want, atol=1e-4, rtol=1e-3
        )


def test_depthwise_conv3d_matches_xla():
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 4, 6, 6, 4))
    kernel = jax.random.normal(kk, (3, 3, 3, 1, 4))
    want = lax.conv_general_dilated(
        x, kernel, (1, 1, 1), "SAME", dimension_numbers=DN3, feature_group_count=4
    )
    chex.assert_trees_all_close(jax.jit(depthwise_conv3d)(x, kernel), want, atol=1e-4)


@pytest.mark.parametrize("num_groups", [1, 4, 16])
def test_group_norm_matches_flax(num_groups):
    x = 2.0 * jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 16)) + 1.0
    keys = jax.random.split(jax.random.key(1), 2)
    variables = {
        "params": {
            "scale": jax.random.normal(keys[0], (16,)),
            "bias": jax.random.normal(keys[1], (16,)),
        }
    }
    ours = jax.jit(GroupNorm(num_groups).apply)(variables, x)
    want = jax.jit(nn.GroupNorm(num_groups=num_groups).apply)(variables, x)
    chex.assert_trees_all_close(ours, want, atol=1e-5)


def test_space_to_depth():
    x = jnp.arange(2 * 4 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 4, 8, 8, 3)
    y = space_to_depth(x, (2, 4, 4))
    assert y.shape == (2, 2, 2, 2, 96)
    # Tubelet (0, 1, 1) of clip 1 holds frames 0-1, rows 4-7, columns 4-7.
    want = x[1, 0:2, 4:8, 4:8].reshape(-1)
    np.testing.assert_array_equal(y[1, 0, 1, 1], want)
    with pytest.raises(ValueError, match="divisible"):
        space_to_depth(x, (3, 4, 4))


# --- models -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("stem", STEMS)
def test_shapes_and_param_counts(name, stem, clips):
    model = _model(name, stem=stem)
    if (name, stem) == ("vivit", "conv"):
        with pytest.raises(ValueError, match="stem='conv'"):
            jax.eval_shape(model.init, jax.random.key(0), clips)
        return
    init = functools.partial(flax_utils.init_params, model)
    params = jax.eval_shape(init, jax.random.key(0), clips)
    out = jax.eval_shape(_apply(model), params, clips)
    assert out.shape == (clips.shape[0], NUM_CLASSES)
    assert out.dtype == jnp.float32
    # Param counts of the conv models do not depend on the clip size (global
    # pooling), only on the width.
    big = make_model(name, 10, width=16, stem=stem)
    abstract = jax.eval_shape(big.init, jax.random.key(0), clips)["params"]
    assert param_count(abstract) == PARAM_COUNTS[(name, stem)]
    assert 10_000 <= param_count(abstract) <= 100_000


def test_c3d_flops_formula():
    # Hand count, small config (8x32x32 -> 4x8x8 after the 2x4x4 tubelet), w=16.
    w, pos = 16, 4 * 8 * 8
    want = (
        2 * pos * 96 * w  # tubelet Dense
        + 2 * pos * 27 * w * 2 * w  # conv1 3x3x3
        + 2 * (pos // 8) * 27 * 2 * w * 4 * w  # conv2 after the 2x2x2 pool
        + 2 * 4 * w * 10  # head
    )
    assert flops_per_clip(make_model("c3d", 10), (8, 32, 32, 3)) == want
    assert count_flops(lambda a, b: a @ b, jnp.ones((3, 4)), jnp.ones((4, 5))) == 120


@pytest.mark.parametrize("name", CONV_MODELS)
def test_vmap_equals_loop_and_xla(name, clips):
    model = _model(name)
    swarm = _swarm(name)
    out = jax.jit(jax.vmap(_apply(model), in_axes=(0, None)))(swarm, clips)
    assert out.shape == (NUM_PARTICLES, clips.shape[0], NUM_CLASSES)
    one = jax.jit(_apply(model))
    loop = jnp.stack([one(p, clips) for p in flax_utils.unstack(swarm)])
    chex.assert_trees_all_close(out, loop, atol=1e-5)


def test_vmap_variants_agree(clips):
    # Plain vmap (no per-particle loop) and XLA's own convolutions: same function.
    swarm = _swarm("c3d")
    want = jax.jit(jax.vmap(_apply(_model("c3d")), in_axes=(0, None)))(swarm, clips)
    for model in (_model("c3d", map_particles=False), _model("c3d", impl="xla")):
        out = jax.jit(jax.vmap(_apply(model), in_axes=(0, None)))(swarm, clips)
        chex.assert_trees_all_close(out, want, atol=1e-4)


def test_vmap_frozen_backbone_equals_loop(clips):
    # Only the head carries a particle axis: the body runs once, shared.
    model = _model("r2plus1d")
    params = _params("r2plus1d")
    heads = _swarm("r2plus1d", seed=1)
    mask = flax_utils.head_mask(params)
    swarmed, _ = partition(heads, mask)
    _, frozen = partition(params, mask)

    def fitness(head, x):
        return _apply(model)(combine(head, frozen), x)

    out = jax.jit(jax.vmap(fitness, in_axes=(0, None)))(swarmed, clips)
    one = jax.jit(fitness)
    loop = jnp.stack([one(h, clips) for h in flax_utils.unstack(swarmed)])
    chex.assert_trees_all_close(out, loop, atol=1e-5)


def test_vmap_over_inputs_shared_params(clips):
    # The other vmap direction: one particle, a stack of batches.
    model = _model("c3d")
    params, batches = _params("c3d"), jnp.stack([clips, 2.0 * clips])
    out = jax.jit(jax.vmap(_apply(model), in_axes=(None, 0)))(params, batches)
    one = jax.jit(_apply(model))
    # Float rounding only: XLA picks its kernels per batch shape (measured here
    # 3.7e-6 relative on logits ~0.07, on this machine at HEAD too).
    chex.assert_trees_all_close(
        out, jnp.stack([one(params, b) for b in batches]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", CONV_MODELS)
def test_grad_finite(name, clips):
    model = _model(name)
    labels = jnp.arange(clips.shape[0]) % NUM_CLASSES

    def loss_fn(p):
        return _xent(_apply(model)(p, clips), labels)

    grads = jax.jit(jax.grad(loss_fn))(_params(name))
    chex.assert_tree_all_finite(grads)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", ["c3d"])
def test_jit_equals_no_jit(name, clips):
    # Eager evaluation dispatches op by op (seconds per model): one particle, one
    # clip, one model (the layers are shared by all three).
    model = _model(name)
    params, x = _params(name), clips[:1]
    fn = _apply(model)
    chex.assert_trees_all_close(jax.jit(fn)(params, x), fn(params, x), atol=1e-5)


def _drop_norms(tree):
    return {
        k: _drop_norms(v) if isinstance(v, dict) else v
        for k, v in tree.items()
        if not k.startswith("norm")
    }


@pytest.mark.parametrize("norm", ["layer", "none"])
def test_other_norms(norm, clips):
    model = _model("c3d", norm=norm)
    # LayerNorm has GroupNorm's parameters (scale, bias); "none" has none.
    params = _params("c3d")
    if norm == "none":
        params = _drop_norms(params)
    want = jax.eval_shape(model.init, jax.random.key(0), clips)["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(params, want)
    out = jax.jit(_apply(model))(params, clips)
    assert out.shape == (clips.shape[0], NUM_CLASSES)
    chex.assert_tree_all_finite(out)
    assert ("norm1" in params["body"]) == (norm != "none")


def test_make_model_errors():
    with pytest.raises(ValueError, match="unknown model"):
        make_model("resnet", 10)
    with pytest.raises(ValueError, match="norm"):
        make_model("c3d", 10, norm="batch")
    with pytest.raises(ValueError, match="stem"):
        make_model("c3d", 10, stem="patch")
    model = make_model("c3d", 10)
    with pytest.raises(ValueError, match="clips"):
        model.init(jax.random.key(0), jnp.zeros((4, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"decoder_grid=\(2, 4\): expected None"):
        make_model("c3d", 10, decoder_grid=(2, 4))
    with pytest.raises(ValueError, match=r"its 8 cells do not share num_classes=10"):
        make_model("c3d", 10, decoder_grid=(2, 2, 2))
    # C3D's map of 4 x 16 x 16 clips at (2, 4, 4) tubelets is 1 x 2 x 2.
    odd = make_model("c3d", 3 * 3, decoder_grid=(1, 3, 1), patch=(2, 4, 4))
    with pytest.raises(ValueError, match=r"feature map \(1, 2, 2\) does not divide"):
        odd.init(jax.random.key(0), jnp.zeros((1, *CLIP_SHAPE)))


class _Decoder(nn.Module):
    grid: tuple[int, int, int]
    num_outputs: int

    @nn.compact
    def __call__(self, x):
        return decode_map(x, self.grid, self.num_outputs)


@pytest.mark.parametrize("grid", [(4, 2, 6), (1, 2, 6)])
def test_decode_map_puts_every_cell_where_the_targets_are(grid):
    """Known answer: grid cell (t, h, w)'s values are the Dense outputs of the map
    cell above it, the slot of its offset under that cell; flat [T, H, W, C]."""
    values, feats = 2, 5
    x = jax.random.normal(jax.random.key(0), (3, 2, 1, 3, feats))  # map 2 x 1 x 3
    dec = _Decoder(grid, math.prod(grid) * values)
    params = dec.init(jax.random.key(1), x)["params"]
    out = np.asarray(dec.apply({"params": params}, x))
    kernel, bias = (np.asarray(params["head"][k]) for k in ("kernel", "bias"))
    xm = np.asarray(x)
    if grid[0] == 1:  # an axis of size 1 is the map's mean over it
        xm = xm.mean(axis=1, keepdims=True)
    r = [g // m for g, m in zip(grid, xm.shape[1:4], strict=True)]
    want = np.zeros((3, *grid, values))
    for t, h, w in np.ndindex(*grid):
        cell = xm[:, t // r[0], h // r[1], w // r[2]] @ kernel + bias
        slot = ((t % r[0]) * r[1] + h % r[1]) * r[2] + w % r[2]
        want[:, t, h, w] = cell.reshape(3, -1, values)[:, slot]
    np.testing.assert_allclose(out, want.reshape(3, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_dense_decoder_keeps_the_body(name, clips):
    """The body's parameters (what a fine-tuning reuses) are the pooled model's;
    the outputs cover the grid, and vmapped particles equal a loop."""
    grid = (2, 4, 4)  # CLIP_SHAPE's tubelet grid at the default (2, 4, 4) patch
    pooled = make_model(name, NUM_CLASSES, width=WIDTH)
    dense = make_model(name, 3 * 32, width=WIDTH, decoder_grid=grid)
    p_pooled = pooled.init(jax.random.key(0), clips)["params"]
    p_dense = dense.init(jax.random.key(0), clips)["params"]
    chex.assert_trees_all_equal(p_pooled["body"], p_dense["body"])
    swarm = jax.vmap(lambda k: dense.init(k, clips)["params"])(
        jax.random.split(jax.random.key(2), NUM_PARTICLES)
    )
    out = jax.vmap(lambda p: dense.apply({"params": p}, clips))(swarm)
    assert out.shape == (NUM_PARTICLES, clips.shape[0], 3 * 32)
    for i in range(NUM_PARTICLES):
        one = jax.tree.map(lambda a, i=i: a[i], swarm)
        np.testing.assert_allclose(
            out[i], dense.apply({"params": one}, clips), rtol=2e-4, atol=2e-5
        )


# --- flax_utils -----------------------------------------------------------------


def test_init_swarm_params_keys(clips):
    a = _swarm("c3d")
    b = _swarm_init("c3d")(jax.random.key(0))
    c = _swarm("c3d", seed=1)
    chex.assert_trees_all_equal(a, b)
    kernel = a["body"]["conv1"]["kernel"]
    assert kernel.shape[0] == NUM_PARTICLES
    assert not jnp.array_equal(kernel[0], kernel[1])  # particles differ
    assert not jnp.array_equal(kernel, c["body"]["conv1"]["kernel"])  # keys differ
    # init_swarm_params is init_params (= model.init) with the i-th split key.
    key = jax.random.split(jax.random.key(0), NUM_PARTICLES)[1]
    want = _model("c3d").init(key, jnp.zeros((1, *CLIP_SHAPE)))["params"]
    chex.assert_trees_all_close(flax_utils.unstack(a)[1], want)


def test_stack_unstack_round_trip():
    trees = [
        {"a": jnp.full((2,), i), "b": {"c": jnp.full((), 2.0 * i)}} for i in range(3)
    ]
    stacked = flax_utils.stack(trees)
    chex.assert_shape(stacked["a"], (3, 2))
    for got, want in zip(flax_utils.unstack(stacked), trees, strict=True):
        chex.assert_trees_all_equal(got, want)


def test_head_mask_selects_exactly_head(clips):
    params = _params("x3d")
    mask = flax_utils.head_mask(params)
    chex.assert_trees_all_equal_structs(mask, params)
    selected = [
        jax.tree_util.keystr(path)
        for path, m in jax.tree_util.tree_leaves_with_path(mask)
        if m
    ]
    assert selected == ["['head']['bias']", "['head']['kernel']"]
    both = flax_utils.head_mask(params, ("head", "conv5"))
    assert sum(jax.tree.leaves(both)) == 4
    with pytest.raises(ValueError, match="no parameter"):
        flax_utils.head_mask(params, ("classifier",))


def test_save_load_round_trip(tmp_path, clips):
    params = _params("c3d")
    path = tmp_path / "ckpt"
    flax_utils.save_params(path, params)
    for template in (None, params, jax.eval_shape(lambda: params)):
        loaded = flax_utils.load_params(path, template)
        chex.assert_trees_all_equal_structs(loaded, params)
        chex.assert_trees_all_equal(loaded, params)  # bitwise
    with pytest.raises(FileExistsError):
        flax_utils.save_params(path, params)
    flax_utils.save_params(path, params, force=True)


def test_load_errors(tmp_path, clips):
    params = _params("c3d")
    path = tmp_path / "ckpt"
    flax_utils.save_params(path, params)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        flax_utils.load_params(tmp_path / "missing", params)
    wide = make_model("c3d", NUM_CLASSES, width=16)
    wider = jax.eval_shape(wide.init, jax.random.key(0), clips)["params"]
    with pytest.raises(ValueError, match="body/conv1/bias"):
        flax_utils.load_params(path, wider)
    extra = {**params, "extra": {"kernel": jnp.zeros(2)}}
    with pytest.raises(ValueError, match="extra/kernel"):
        flax_utils.load_params(path, extra)


# -- mixed precision (flax_utils.with_compute_dtype) ---------------------------


@pytest.mark.parametrize("name", ["c3d", "r2plus1d", "x3d"])
def test_bfloat16_forward_is_finite_and_close_to_float32(name):
    model = make_model(name, 10, width=8)
    x = jax.random.uniform(jax.random.key(1), (4, 8, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]

    def apply(p, v):
        return model.apply({"params": p}, v)

    want = apply(params, x)
    got = flax_utils.with_compute_dtype(apply, "bfloat16")(params, x)
    assert got.dtype == jnp.float32 and bool(jnp.isfinite(got).all())
    # bfloat16 keeps 8 bits of mantissa: ~1 % of the logits' scale.
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(got - want).max()) < 0.05 * scale + 0.02
    assert flax_utils.with_compute_dtype(apply, "float32") is apply


def test_bfloat16_train_step_keeps_the_state_float32():
    from pso_jax import pso
    from pso_jax.train import make_train_step

    model = make_model("c3d", 10, width=8)
    x = jax.random.uniform(jax.random.key(1), (4, 8, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]
    apply = flax_utils.with_compute_dtype(
        lambda p, v: model.apply({"params": p}, v), "bfloat16"
    )
    trainer = make_train_step(apply, pso(num_particles=2), local_steps=1)
    state = trainer.init(jax.random.key(0), params)
    batch = {"video": x, "label": jnp.arange(4)}
    state, metrics = jax.jit(trainer.step)(jax.random.key(1), state, batch)
    for tree in (state.swarm.positions, state.swarm.pbest_params, state.opt_state):
        for leaf in jax.tree.leaves(tree):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32
    assert bool(jnp.isfinite(metrics.grad_loss).all())
    assert bool(jnp.isfinite(state.swarm.best_fitness))
    with pytest.raises(ValueError, match="dtype='float16'"):
        flax_utils.with_compute_dtype(apply, "float16")
