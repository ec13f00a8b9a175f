"""The models' convolution (ddpm/models/convolution.py): its values and both gradients
against a float64 numpy oracle written from the definition, against lax's gradients in
float32, and the promise it exists for: inside a loop, XLA:CPU keeps every convolution
in the canonical form its fast kernels need."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ddpm.models.convolution import CANONICAL, conv_general_dilated

# (height, width, kernel, stride, padding): the models' convolutions. 3x3 'SAME'; the
# stride-2 downsampling with TF's padding (after only) and diffusers' (both sides), on
# even and odd sizes (an odd one leaves the last row unread); 1x1 shortcuts; the 2x2
# phases of UpsampleConv.
CASES = [
    (8, 6, 3, 1, ((1, 1), (1, 1))),
    (8, 6, 3, 2, ((0, 1), (0, 1))),
    (8, 6, 3, 2, ((1, 1), (1, 1))),
    (7, 9, 3, 2, ((1, 1), (0, 1))),
    (8, 6, 1, 1, ((0, 0), (0, 0))),
    (8, 6, 2, 1, ((1, 0), (0, 1))),
]


def oracle(x, w, stride, padding, dy):
    """float64 y[n, i, j, f] = sum_{a, b, c} x_pad[n, s i + a, s j + b, c] w[a, b, c, f],
    and the gradients of <y, dy> with respect to x and w, one kernel tap at a time."""
    x_pad = np.pad(x, ((0, 0), *padding, (0, 0)))
    (out_h, out_w), kernel = dy.shape[1:3], w.shape[:2]
    y, dx_pad, dw = np.zeros(dy.shape), np.zeros(x_pad.shape), np.zeros(w.shape)
    for a in range(kernel[0]):
        for b in range(kernel[1]):
            rows = slice(a, a + stride * (out_h - 1) + 1, stride)
            cols = slice(b, b + stride * (out_w - 1) + 1, stride)
            patch = x_pad[:, rows, cols, :]
            y += np.einsum("nijc,cf->nijf", patch, w[a, b])
            dw[a, b] = np.einsum("nijc,nijf->cf", patch, dy)
            dx_pad[:, rows, cols, :] += np.einsum("nijf,cf->nijc", dy, w[a, b])
    (top, _), (left, _) = padding
    return y, dx_pad[:, top : top + x.shape[1], left : left + x.shape[2]], dw


def draw(height, width, kernel, stride, padding, dtype):
    rng = np.random.default_rng(height * 100 + kernel * 10 + stride)
    x = rng.standard_normal((2, height, width, 3)).astype(dtype)
    w = rng.standard_normal((kernel, kernel, 3, 4)).astype(dtype)
    out = [
        (n + sum(p) - kernel) // stride + 1 for n, p in zip((height, width), padding, strict=True)
    ]
    dy = rng.standard_normal((2, *out, 4)).astype(dtype)
    return x, w, dy


def vjp(conv, x, w, stride, padding, dy):
    y, pullback = jax.vjp(
        lambda x, w: conv(x, w, (stride, stride), padding, dimension_numbers=CANONICAL), x, w
    )
    return (y, *pullback(dy))


@pytest.mark.parametrize("height, width, kernel, stride, padding", CASES)
def test_value_and_gradients_match_the_float64_definition(height, width, kernel, stride, padding):
    x, w, dy = draw(height, width, kernel, stride, padding, np.float64)
    with jax.enable_x64():
        ours = vjp(conv_general_dilated, x, w, stride, padding, dy)
    for name, got, want in zip(
        ("y", "dx", "dw"), ours, oracle(x, w, stride, padding, dy), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("height, width, kernel, stride, padding", CASES)
def test_float32_gradients_match_lax_within_1e_5(height, width, kernel, stride, padding):
    x, w, dy = draw(height, width, kernel, stride, padding, np.float32)
    ours = vjp(conv_general_dilated, x, w, stride, padding, dy)
    lax_ = vjp(lax.conv_general_dilated, x, w, stride, padding, dy)
    for name, got, want in zip(("y", "dx", "dw"), ours, lax_, strict=True):
        error = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        assert error < 1e-5, (name, error)


def test_string_padding_is_lax_padding():
    x, w, dy = draw(8, 6, 3, 2, ((0, 1), (0, 1)), np.float32)
    for padding in ("SAME", "VALID"):
        ours = conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=CANONICAL)
        want = lax.conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=CANONICAL)
        np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6)


def test_inside_a_loop_every_convolution_stays_canonical():
    """Two scanned SGD steps of a two-layer net: XLA canonicalizes convolutions in the
    entry computation only, so lax's gradients would reach the loop body as
    'f01b_i01o->01bf' (weight) and 'b01f_01oi->b01f' (input) and run as plain loops."""
    x = jnp.ones((2, 8, 8, 4))

    def loss(w):
        h = jnp.tanh(conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=CANONICAL))
        return jnp.sum(conv_general_dilated(h, w, (2, 2), "SAME", dimension_numbers=CANONICAL))

    def steps(w):
        return lax.scan(lambda w, _: (w - 0.1 * jax.grad(loss)(w), None), w, length=2)[0]

    hlo = jax.jit(steps).lower(jnp.ones((3, 3, 4, 4))).compile().as_text()
    assert "while" in hlo
    labels = re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", hlo)
    # The first layer's forward (the second's output feeds only the sum), both weight
    # gradients and the second layer's input gradient.
    assert len(labels) == 4, labels
    assert set(labels) == {"b01f_01io->b01f"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dimension_numbers": ("NCHW", "OIHW", "NCHW")}, "NHWC x HWIO"),
        ({"rhs_dilation": (2, 2)}, "dilation"),
        ({"lhs_dilation": (2, 1)}, "dilation"),
        ({"feature_group_count": 3}, "groups"),
        ({"dimension_numbers": ("NWC", "WIO", "NWC"), "window_strides": (1,)}, "2-D"),
    ],
)
def test_other_convolutions_raise_clear_errors(kwargs, message):
    kwargs = {"window_strides": (1, 1), "dimension_numbers": CANONICAL, **kwargs}
    x, w = jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 3, 3))
    if len(kwargs["window_strides"]) == 1:
        x, w = x[0], w[0]
    with pytest.raises(ValueError, match=message):
        conv_general_dilated(x, w, padding="SAME", **kwargs)
