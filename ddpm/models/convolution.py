"""The models' 2-D convolution: lax's, with gradients XLA:CPU can run fast inside loops.

XLA:CPU runs a convolution with its fast (Eigen) kernels only when the dimensions are in
canonical order: input NHWC, kernel HWIO, output NHWC. The models' convolutions are, but
JAX's gradients of them are not: the weight gradient contracts over the batch
('f01b_i01o->01bf') and the input gradient takes the kernel with its features swapped.
XLA's ConvCanonicalization pass rewrites such convolutions with transposes, but only in
the entry computation; inside a loop (`training.steps_per_dispatch` scans the train step)
they stay as they are and run as plain loops (22x slower: four scanned SGD steps through
two 3x3 convolutions of 8x32x32x64, on the 2-core CPU). On a CPU, `conv_general_dilated`
therefore writes both gradients as canonical convolutions between explicit transposes,
the program the pass produces for a single step. GPUs and TPUs keep lax's as it is.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

CANONICAL = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
):
    """lax.conv_general_dilated, for nn.Conv's `conv_general_dilated` and direct calls.

    On a CPU backend it takes only what the models use: NHWC input, HWIO kernel, no
    dilation, one feature group; any other call is a ValueError there.
    """
    if jax.default_backend() != "cpu":
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, precision=precision,
        )  # fmt: skip
    canonical = lhs.ndim == 4 and lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, dimension_numbers
    ) == lax.conv_dimension_numbers(lhs.shape, rhs.shape, CANONICAL)
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if not canonical or dilated or feature_group_count != 1:
        raise ValueError(
            f"the models' convolution takes 2-D NHWC x HWIO without dilation or groups; got "
            f"shapes {lhs.shape} x {rhs.shape}, {dimension_numbers}, dilation "
            f"{lhs_dilation}/{rhs_dilation}, {feature_group_count} groups"
        )
    strides = tuple(window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    return _conv(lhs, rhs, strides, tuple(tuple(p) for p in padding), precision)


def _canonical(lhs, rhs, strides, padding, precision, lhs_dilation=None, rhs_dilation=None):
    return lax.conv_general_dilated(
        lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, CANONICAL, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, precision):
    return _canonical(x, w, strides, padding, precision)


def _conv_fwd(x, w, strides, padding, precision):
    return _canonical(x, w, strides, padding, precision), (x, w)


def _conv_bwd(strides, padding, precision, residuals, dy):
    """Both gradients as canonical convolutions.

    Per spatial axis: input size n, kernel size k, stride s, padding (lo, hi), output size
    o. The forward pass reads the padded input up to `reach` = s (o - 1) + k, so the
    weight gradient pads x with (lo, reach - n - lo) (hi less what a stride left unread).
    """
    x, w = residuals
    n, k, o = x.shape[1:3], w.shape[:2], dy.shape[1:3]
    reach = [s * (o_ - 1) + k_ for s, o_, k_ in zip(strides, o, k, strict=True)]
    # dw[a, b, c, f] = sum over (batch, i, j) of x_pad[batch, s i + a, s j + b, c] dy[.., f]:
    # a convolution of x [C, H, W, N] with dy [Ho, Wo, N, F] dilated by the stride.
    dw = _canonical(
        x.transpose(3, 1, 2, 0),
        dy.transpose(1, 2, 0, 3),
        (1, 1),
        [(lo, r - n_ - lo) for (lo, _), r, n_ in zip(padding, reach, n, strict=True)],
        precision,
        rhs_dilation=strides,
    ).transpose(1, 2, 0, 3)
    # dx: dy dilated by the stride, correlated with the kernel turned by 180 degrees and
    # its features swapped; the padding puts every x position under its taps.
    dx = _canonical(
        dy,
        jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2),
        (1, 1),
        [
            (k_ - 1 - lo, n_ - r + lo + k_ - 1)
            for (lo, _), r, n_, k_ in zip(padding, reach, n, k, strict=True)
        ],
        precision,
        lhs_dilation=strides,
    )
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)
