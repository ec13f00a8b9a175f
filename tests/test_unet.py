"""The DDPM U-Net: exact parameter counts, embedding formula, init, dropout, dtypes, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm.models.unet import UNet, timestep_embedding

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
