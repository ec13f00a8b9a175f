"""The DDPM U-Net: exact parameter counts, embedding formula, init, dropout, dtypes, errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm.models.unet import (
    GroupNorm,
    UNet,
    UpsampleConv,
    per_example_dropout,
    timestep_embedding,
)

# One small class-conditional model with dropout serves most tests, so that only a few
# programs are compiled (XLA CPU compiles dominate this file's runtime).
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.3)
NUM_CLASSES = 4


def key(seed: int) -> jax.Array:
    # RBG keys compile much faster on CPU than threefry; the model is agnostic to the impl.
    return jax.random.key(seed, impl="unsafe_rbg")


def count_params(model: UNet, image_shape: tuple[int, int, int]) -> int:
    """Parameter count from shapes only (jax.eval_shape: nothing is compiled or run)."""
    x = jnp.zeros((1, *image_shape))
    t = jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(key(0), x, t, train=False))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


def random_params(model: UNet, x, t, seed: int = 0):
    """Random weights everywhere (zero-initialised layers included), activations O(1).

    Built with numpy from the init shapes, so that nothing is compiled.
    """
    shapes = jax.eval_shape(lambda: model.init(key(0), x, t, train=False))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "scale":
            return 1.0 + 0.2 * noise
        if name == "bias":
            return 0.1 * noise
        if name == "kernel":
            return noise / math.sqrt(math.prod(leaf.shape[:-1]))  # fan-in scaling
        return noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_batch(batch: int = 2, size: int = 8, channels: int = 3):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, channels)), jnp.float32)
    t = jnp.asarray([0, 999, 500, 17][:batch], jnp.int32)
    return x, t


@pytest.fixture(scope="module")
def tiny():
    model = UNet(**TINY, num_classes=NUM_CLASSES)
    x, t = tiny_batch()
    return dict(
        model=model,
        x=x,
        t=t,
        apply=jax.jit(model.apply, static_argnames="train"),
        random_params=random_params(model, x, t),
    )


@pytest.mark.parametrize(
    "config, image_shape, expected",
    [
        (dict(ch_mult=(1, 2, 2, 2), dropout=0.1), (32, 32, 3), 35_746_307),
        (dict(ch_mult=(1, 2, 2, 2), dropout=0.1, out_channels=6), (32, 32, 3), 35_749_766),
        (dict(ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0), (256, 256, 3), 113_673_219),
    ],
    ids=["cifar10", "cifar10-learned-variance", "256x256"],
)
def test_paper_parameter_counts(config, image_shape, expected):
    # The counts of the official TF models; attention once per up level would give 35,218,947.
    model = UNet(ch=128, num_res_blocks=2, attn_resolutions=(16,), **config)
    assert count_params(model, image_shape) == expected


def test_timestep_embedding_matches_float64_formula():
    t = np.array([0, 1, 17, 500, 999])
    for dim in (32, 128):
        half = dim // 2
        freqs = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float64) / (half - 1))
        args = t[:, None].astype(np.float64) * freqs[None, :]
        expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
        got = np.asarray(timestep_embedding(jnp.asarray(t, jnp.int32), dim))
        assert got.shape == (len(t), dim) and got.dtype == np.float32
        # float32 arguments t * f_i carry a relative error of a few 1e-8 (f_i from exp, one
        # product), i.e. up to ~1e-4 absolute at t = 999; sin/cos pass that on unchanged.
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)
        # t = 0 is exact: [0, ..., 0, 1, ..., 1].
        np.testing.assert_array_equal(got[0], np.r_[np.zeros(half), np.ones(half)])


def test_fresh_model_outputs_exactly_zero(tiny):
    model, x, t = tiny["model"], tiny["x"], tiny["t"]
    params = jax.jit(model.init, static_argnames="train")(key(1), x, t, train=False)["params"]
    out = tiny["apply"]({"params": params}, x, t, train=False)
    assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32
    assert not np.any(np.asarray(out))
    # conv_out makes the output zero; the res blocks' conv_1 and attention proj_out start
    # at zero too (identity blocks), while every other kernel is random.
    for name, layer in params.items():
        for sub, leaves in layer.items():
            if isinstance(leaves, dict) and "kernel" in leaves:
                zero_init = name == "conv_out" or sub in ("conv_1", "proj_out")
                assert np.any(np.asarray(leaves["kernel"])) != zero_init, (name, sub)


def test_dropout_acts_only_when_training(tiny):
    apply, x, t = tiny["apply"], tiny["x"], tiny["t"]
    variables = {"params": tiny["random_params"]}

    def run(train, seed):
        return np.asarray(apply(variables, x, t, train=train, rngs={"dropout": key(seed)}))

    eval_out = np.asarray(apply(variables, x, t, train=False))  # no rng needed
    np.testing.assert_array_equal(run(False, 1), eval_out)
    np.testing.assert_array_equal(run(True, 1), run(True, 1))
    assert np.abs(run(True, 1) - eval_out).max() > 1e-2
    assert np.abs(run(True, 1) - run(True, 2)).max() > 1e-2


def test_dropout_keys_give_each_example_its_own_masks(tiny):
    """With dropout_keys, example b's output depends on dropout_keys[b] alone: the same in
    a batch of one as next to another example, and different under another key."""
    apply, x, t = tiny["apply"], tiny["x"], tiny["t"]
    variables = {"params": tiny["random_params"]}
    keys = jax.random.split(jax.random.key(3), 2)  # threefry: vmap of rbg draws is not a loop

    def run(x, t, keys):
        return np.asarray(apply(variables, x, t, train=True, dropout_keys=keys))

    both = run(x, t, keys)
    np.testing.assert_allclose(both[1:], run(x[1:], t[1:], keys[1:]), rtol=1e-5, atol=1e-5)
    swapped = run(x[::-1], t[::-1], keys[::-1])[::-1]  # each example keeps its key
    np.testing.assert_allclose(both, swapped, rtol=1e-5, atol=1e-5)
    other = run(x, t, jax.random.split(jax.random.key(4), 2))
    assert np.abs(both - other).max() > 1e-2
    assert np.abs(both - np.asarray(apply(variables, x, t, train=False))).max() > 1e-2
    # The rate, and the inverted scaling: 0.3 of the entries are zeroed, the rest / 0.7.
    h = jnp.ones((64, 8, 8, 32))
    dropped = per_example_dropout(h, 0.3, jax.random.split(jax.random.key(5), 64), salt=7)
    assert abs(float(jnp.mean(dropped == 0)) - 0.3) < 0.01
    np.testing.assert_allclose(np.unique(np.asarray(dropped)), [0.0, 1 / 0.7], rtol=1e-6)


def test_class_conditioning_defaults_to_the_no_class_index(tiny):
    apply, x, t = tiny["apply"], tiny["x"], tiny["t"]
    params = tiny["random_params"]
    assert params["class_embed"]["embedding"].shape == (NUM_CLASSES + 1, 4 * TINY["ch"])
    variables = {"params": params}
    unconditional = apply(variables, x, t, None, train=False)
    no_class = apply(variables, x, t, jnp.full((2,), NUM_CLASSES, jnp.int32), train=False)
    np.testing.assert_array_equal(unconditional, no_class)
    conditional = apply(variables, x, t, jnp.array([0, 1], jnp.int32), train=False)
    assert np.abs(conditional - no_class).max() > 1e-3


def test_bf16_compute_keeps_float32_params_and_output(tiny):
    x, t = tiny["x"], tiny["t"]
    bf16 = UNet(**TINY, num_classes=NUM_CLASSES, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: bf16.init(key(0), x, t, train=False))["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    variables = {"params": tiny["random_params"]}
    out32 = np.asarray(tiny["apply"](variables, x, t, train=False))
    out16 = jax.jit(bf16.apply, static_argnames="train")(variables, x, t, train=False)
    assert out16.dtype == jnp.float32
    rel_rms = np.sqrt(np.mean((np.asarray(out16) - out32) ** 2) / np.mean(out32**2))
    print(f"bf16 vs f32 relative RMS difference: {rel_rms:.2e}")
    # bf16 keeps 8 significant bits (rounding error <= 2**-9 ~ 2e-3 per op); rounding the
    # input, weights and activations of about twenty layers in series compounds that to
    # 1.5e-2 .. 1.8e-2 (measured over five weight seeds). A wrong computation would be off
    # by O(1); exactly 0 would mean bf16 was never used.
    assert 0 < rel_rms < 4e-2, rel_rms


def test_jitted_training_steps_do_not_retrace():
    # The smallest U-Net (3 res blocks, 2 attention blocks): the backward pass compiles slowly.
    model = UNet(ch=32, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(8,), dropout=0.1)
    x, t = tiny_batch()
    eps = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape), jnp.float32)
    params = random_params(model, x, t)
    optimizer = optax.adam(1e-3)
    traces = 0

    @jax.jit
    def train_step(params, opt_state, rng):
        nonlocal traces
        traces += 1  # runs only while tracing

        def loss_fn(p):
            pred = model.apply({"params": p}, x, t, train=True, rngs={"dropout": rng})
            return jnp.mean((pred - eps) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    for step in range(5):
        params, opt_state, loss = train_step(params, opt_state, key(step))
        losses.append(float(loss))
    assert traces == 1
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_any_size_divisible_by_the_downsampling_factor():
    model = UNet(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    x, t = jnp.zeros((2, 8, 12, 1)), jnp.zeros((2,), jnp.int32)
    out, variables = jax.eval_shape(lambda: model.init_with_output(key(0), x, t, train=False))
    assert out.shape == (2, 8, 12, 3)
    # Attention sits where the feature map is 4 high (level 1), not at a configured level.
    assert "down_1_attn_0" in variables["params"] and "down_0_attn_0" not in variables["params"]


def test_resampling_without_conv_has_no_resampling_params():
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                 resamp_with_conv=False)  # fmt: skip
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
    out, variables = jax.eval_shape(lambda: model.init_with_output(key(0), x, t, train=False))
    assert out.shape == (1, 8, 8, 3)
    assert not any("sample" in name for name in variables["params"])


@pytest.mark.parametrize(
    "x_shape, t_shape, y_shape, message",
    [
        ((2, 18, 16, 3), (2,), None, r"image size 18x16 is not divisible by 4"),
        ((2, 16, 30, 3), (2,), None, r"image size 16x30 is not divisible by 4"),
        ((16, 16, 3), (2,), None, r"x must be NHWC"),
        ((2, 16, 16, 3), (), None, r"t must have shape \[2\]"),
        ((2, 16, 16, 3), (3,), None, r"t must have shape \[2\]"),
        ((2, 16, 16, 3), (2, 1), None, r"t must have shape \[2\]"),
        ((2, 16, 16, 3), (2,), (2,), r"num_classes=None"),
    ],
)
def test_bad_inputs_raise_clear_errors(x_shape, t_shape, y_shape, message):
    model = UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    y = None if y_shape is None else jnp.zeros(y_shape, jnp.int32)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(
            lambda: model.init(
                key(0), jnp.zeros(x_shape), jnp.zeros(t_shape, jnp.int32), y, train=False
            )
        )


def test_bad_class_label_shape():
    model = UNet(**TINY, num_classes=3)
    x, t = tiny_batch()
    with pytest.raises(ValueError, match=r"y must have shape \[2\]"):
        jax.eval_shape(lambda: model.init(key(0), x, t, jnp.zeros((3,), jnp.int32), train=False))


def numpy_group_norm(x, scale, bias, groups, eps):
    """float64 GroupNorm of x [B, H, W, C] from its definition (Wu & He 2018, eq. 1-3)."""
    b, h, w, c = x.shape
    xg = np.asarray(x, np.float64).reshape(b, h * w, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_group_norm_matches_float64_definition_and_flax_gradients():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 6, 64)) * rng.uniform(0.5, 3, 64) + rng.uniform(-2, 2, 64)
    x = jnp.asarray(x, jnp.float32)
    params = {"scale": 1 + 0.2 * rng.standard_normal(64), "bias": 0.3 * rng.standard_normal(64)}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    ours, flax_gn = GroupNorm(32, 1e-6), nn.GroupNorm(num_groups=32, epsilon=1e-6)
    y = ours.apply({"params": params}, x)
    expected = numpy_group_norm(x, params["scale"], params["bias"], 32, 1e-6)
    np.testing.assert_allclose(y, expected, rtol=0, atol=2e-5)
    # Gradients against flax's nn.GroupNorm (an independent implementation of the same
    # function), for a loss that weights every output differently.
    weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def grads(module):
        loss = lambda p, x: jnp.sum(module.apply({"params": p}, x) * weights)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(params, x)

    for got, want in zip(
        jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(flax_gn)), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # bf16 compute: statistics in float32, output in bf16 (within bf16 rounding, 2**-8).
    y16 = GroupNorm(32, 1e-6, dtype=jnp.bfloat16).apply({"params": params}, x)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), expected, rtol=8e-3, atol=8e-3)
    with pytest.raises(ValueError, match="64 channels do not split into 24 groups"):
        GroupNorm(24, 1e-6).init(key(0), x)


def numpy_upsample_conv(x, kernel, bias, g):
    """float64 nearest 2x upsampling then 'SAME' 3x3 correlation, and the gradients of
    sum(y * g) with respect to x, kernel and bias, by explicit shifted sums."""
    x, kernel, g = (np.asarray(a, np.float64) for a in (x, kernel, g))
    n, h, w, _ = x.shape
    padded = np.pad(x.repeat(2, axis=1).repeat(2, axis=2), ((0, 0), (1, 1), (1, 1), (0, 0)))
    window = lambda a, i, j: a[:, i : i + 2 * h, j : j + 2 * w]  # noqa: E731
    y = sum(window(padded, i, j) @ kernel[i, j] for i in range(3) for j in range(3)) + bias
    d_kernel = np.stack([
        np.stack([np.einsum("nhwc,nhwo->co", window(padded, i, j), g) for j in range(3)])
        for i in range(3)
    ])  # fmt: skip
    d_padded = np.zeros_like(padded)
    for i in range(3):
        for j in range(3):
            window(d_padded, i, j)[...] += g @ kernel[i, j].T
    d_x = d_padded[:, 1:-1, 1:-1].reshape(n, h, 2, w, 2, -1).sum(axis=(2, 4))
    return y, d_x, d_kernel, g.sum(axis=(0, 1, 2))


def test_upsample_conv_matches_conv_of_nearest_upsampling_in_float64():
    """UpsampleConv's four 2x2 phase convolutions equal a 3x3 conv of the 2x nearest
    upsampled input, forward and backward, to float32 rounding (1e-5 relative)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 3, 5, 8)), jnp.float32)  # odd, non-square
    params = {
        "kernel": jnp.asarray(rng.standard_normal((3, 3, 8, 6)) / 8, jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(6), jnp.float32),
    }
    g = jnp.asarray(rng.standard_normal((2, 6, 10, 6)), jnp.float32)
    module = UpsampleConv(6)
    assert jax.tree.map(jnp.shape, module.init(key(0), x)["params"]) == {
        "kernel": (3, 3, 8, 6),
        "bias": (6,),
    }
    y, vjp = jax.vjp(lambda p, x: module.apply({"params": p}, x), params, x)
    d_params, d_x = vjp(g)
    want = numpy_upsample_conv(x, params["kernel"], params["bias"], g)
    for got, expected in zip((y, d_x, d_params["kernel"], d_params["bias"]), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
