"""The U-Net of DDPM (Ho, Jain, Abbeel 2020, Appendix B), as in the official TF code.

A PixelCNN++-style U-Net: `num_res_blocks` residual blocks per resolution level on the
way down, `num_res_blocks + 1` on the way up (each consuming one skip connection),
single-head self-attention after every residual block whose feature map has a
resolution in `attn_resolutions`, and a (res, attn, res) middle. Every residual block
adds a projection of the sinusoidal timestep embedding.

Parameter names follow the official code, flattened: `conv_in`, `temb_dense_0/1`,
`down_{level}_block_{i}`, `down_{level}_attn_{i}`, `down_{level}_downsample`,
`mid_block_0`, `mid_attn`, `mid_block_1`, `up_{level}_block_{i}`, `up_{level}_attn_{i}`,
`up_{level}_upsample`, `norm_out`, `conv_out` (and `class_embed` when class-conditional,
`low_res_level_dense_0/1` when told the noise level of a super-resolution input).
`level` counts resolution levels from the full-size one (0) downwards, on both paths.
"""

import math
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm.models import convolution

Dtype = Any

# The official code initialises with variance_scaling(1, 'fan_avg', 'uniform') and zero
# biases; layers whose output is added to a residual start at zero (see `zeros`).
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros = nn.initializers.zeros

NUM_GROUPS = 32
NORM_EPS = 1e-6


def timestep_embedding(
    t: jax.Array, dim: int, *, flip_sin_to_cos: bool = False, freq_shift: float = 1.0
) -> jax.Array:
    """Sinusoidal embedding of timesteps.

    The defaults are the official DDPM code's; diffusers' `Timesteps(dim, flip_sin_to_cos,
    downscale_freq_shift)` is the same function (latent diffusion: flip True, shift 0).

    Args:
      t: [B] timesteps (integers, or floats for respaced/continuous times).
      dim: embedding size (even, >= 4).
      flip_sin_to_cos: [cos, sin] instead of [sin, cos].
      freq_shift: the frequencies are f_i = exp(-ln(10000) * i / (dim/2 - freq_shift)).

    Returns:
      [B, dim] float32: [sin(t * f_i), cos(t * f_i)], i = 0 .. dim/2 - 1 (or flipped).
    """
    if dim % 2 != 0 or dim < 4:
        raise ValueError(f"timestep embedding size must be even and >= 4, got {dim}")
    half_dim = dim // 2
    exponent = -math.log(10000.0) / (half_dim - freq_shift)
    freqs = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * exponent)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    return jnp.concatenate(parts, axis=1)


class GroupNorm(nn.Module):
    """Group normalisation of x [B, ..., C] over all positions and the channels of a group.

    The same function and parameters (`scale`, `bias`) as nn.GroupNorm: statistics in
    float32 even under bf16 compute, var = E[x^2] - E[x]^2, y = (x - mean) * rsqrt(var +
    eps) * scale + bias, in `dtype`. The sums run per channel over the positions first and
    over the channels of a group after: on XLA:CPU the forward pass runs 2.5-3x faster than
    nn.GroupNorm's single reduction over (positions, channels of a group), the gradient
    1-1.7x (CIFAR-10 shapes). The positions stay separate axes: summed over one merged
    axis, the backward pass's reductions ran up to 70x slower inside the train step.
    """

    num_groups: int
    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, channels, groups = x.shape[0], x.shape[-1], self.num_groups
        if channels % groups:
            raise ValueError(f"{channels} channels do not split into {groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", zeros, (channels,), self.param_dtype)
        h = x.astype(jnp.float32)
        positions = tuple(range(1, x.ndim - 1))
        count = math.prod(x.shape[1:-1]) * (channels // groups)

        def per_channel_group_mean(v):  # [B, ..., C] -> [B, 1.., C]: each channel its group's
            group = jnp.sum(v, axis=positions).reshape(batch, groups, -1).sum(axis=-1) / count
            return jnp.expand_dims(jnp.repeat(group, channels // groups, axis=1), positions)

        mean = per_channel_group_mean(h)
        var = jnp.maximum(per_channel_group_mean(h * h) - mean * mean, 0.0)
        h = (h - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return h.astype(self.dtype)


def group_norm(
    name: str, dtype: Dtype, param_dtype: Dtype, num_groups: int = NUM_GROUPS, eps=NORM_EPS
) -> GroupNorm:
    return GroupNorm(num_groups, eps, dtype=dtype, param_dtype=param_dtype, name=name)


def conv(features, name, dtype, param_dtype, *, kernel=3, strides=1, padding="SAME", init=None):
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        kernel_init=init or default_init,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        conv_general_dilated=convolution.conv_general_dilated,
    )


def dense(features, name, dtype, param_dtype, *, init=None):
    return nn.Dense(
        features, kernel_init=init or default_init, dtype=dtype, param_dtype=param_dtype, name=name
    )


def per_example_dropout(x: jax.Array, rate: float, keys: jax.Array, salt: int) -> jax.Array:
    """Inverted dropout of x [B, ...]: example b's mask comes from fold_in(keys[b], salt)
    alone, so it does not depend on the batch the example shares (nor its place there)."""
    keep = 1.0 - rate
    draw = lambda k: jax.random.bernoulli(jax.random.fold_in(k, salt), keep, x.shape[1:])  # noqa: E731
    return jnp.where(jax.vmap(draw)(keys), x / keep, 0.0).astype(x.dtype)


class ResnetBlock(nn.Module):
    """norm, swish, conv3x3, + Dense(swish(temb)), norm, swish, dropout, conv3x3, + skip.

    x: [B, H, W, C_in], temb: [B, D] or None (no time input: the autoencoder's blocks)
    -> [B, H, W, out_ch]. diffusers' ResnetBlock2D is the same block.
    """

    out_ch: int
    dropout: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    num_groups: int = NUM_GROUPS
    norm_eps: float = NORM_EPS

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        temb: jax.Array | None,
        *,
        train: bool,
        dropout_keys: jax.Array | None = None,
    ) -> jax.Array:
        """dropout_keys: see UNet.__call__."""
        dt, pdt, groups, eps = self.dtype, self.param_dtype, self.num_groups, self.norm_eps
        h = nn.swish(group_norm("norm_0", dt, pdt, groups, eps)(x))
        h = conv(self.out_ch, "conv_0", dt, pdt)(h)
        if temb is not None:
            h = h + dense(self.out_ch, "temb_proj", dt, pdt)(nn.swish(temb))[:, None, None, :]
        h = nn.swish(group_norm("norm_1", dt, pdt, groups, eps)(h))
        if self.dropout > 0.0 and train:
            if dropout_keys is None:  # flax's usual 'dropout' rng, one key for the batch
                dropout_keys = jax.random.split(self.make_rng("dropout"), x.shape[0])
            h = per_example_dropout(h, self.dropout, dropout_keys, zlib.crc32(self.name.encode()))
        # Zero init: every block starts as the identity, which keeps the deep net trainable.
        h = conv(self.out_ch, "conv_1", dt, pdt, init=zeros)(h)
        if x.shape[-1] != self.out_ch:
            x = conv(self.out_ch, "shortcut", dt, pdt, kernel=1)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection.

    x: [B, H, W, C] -> [B, H, W, C]. q, k, v and the output projection are 1x1 convs
    (Dense layers on the channel axis); logits are q.k / sqrt(C).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    num_groups: int = NUM_GROUPS
    norm_eps: float = NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        dt, pdt = self.dtype, self.param_dtype
        h = group_norm("norm", dt, pdt, self.num_groups, self.norm_eps)(x)
        h = h.reshape(batch, height * width, channels)
        q, k, v = (dense(channels, name, dt, pdt)(h) for name in ("q", "k", "v"))
        # Logits and softmax in float32: under bf16 compute the row sums over up to
        # 256 positions (16x16) would otherwise lose most of their precision.
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (channels**-0.5), axis=-1)
        h = jnp.einsum("bij,bjc->bic", weights.astype(v.dtype), v)
        h = dense(channels, "proj_out", dt, pdt, init=zeros)(h)
        return x + h.reshape(batch, height, width, channels)


class Downsample(nn.Module):
    """Halve H and W: conv3x3 with stride 2, or 2x2 average pooling. [B,H,W,C] -> [B,H/2,W/2,C].

    pad_after_only: pad one pixel after only (TF 'SAME' for a 3x3 stride-2 conv on an
    even size: DDPM, and diffusers' autoencoder), else one on each side (diffusers'
    UNet2DConditionModel, downsample_padding=1). The two sample different grids, so
    released weights need the one they were trained with.
    """

    with_conv: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    pad_after_only: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        padding = ((0, 1), (0, 1)) if self.pad_after_only else ((1, 1), (1, 1))
        return conv(x.shape[-1], "conv", self.dtype, self.param_dtype, strides=2, padding=padding)(
            x
        )


def _phase_taps(kernel: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """The 2-tap kernels, along `axis` of a 3-tap one [w0, w1, w2], that a 3-tap 'SAME'
    correlation of a nearest-neighbour 2x upsampled signal applies to the signal itself:
    even outputs 2i see x[i-1], x[i], x[i] ([w0, w1 + w2] at offsets -1, 0), odd outputs
    2i+1 see x[i], x[i], x[i+1] ([w0 + w1, w2] at offsets 0, +1)."""
    w0, w1, w2 = (jax.lax.index_in_dim(kernel, i, axis) for i in range(3))
    return jnp.concatenate([w0, w1 + w2], axis), jnp.concatenate([w0 + w1, w2], axis)


class UpsampleConv(nn.Module):
    """conv3x3('SAME') of the nearest-neighbour 2x upsampling of x, without upsampling x.

    Each output phase (row parity p, column parity q) is a 2x2 convolution of x with the
    3x3 kernel's taps summed (`_phase_taps`): 4 multiply-adds per output pixel and channel
    instead of 9, in both directions of autodiff, and no 4x larger input to hold. Its
    parameters are nn.Conv's (`kernel` [3, 3, C_in, C_out], `bias`), so it is a drop-in
    for nn.Conv on the upsampled input; the outputs agree to float32 rounding.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        kernel = self.param(
            "kernel", default_init, (3, 3, channels, self.features), self.param_dtype
        )
        bias = self.param("bias", zeros, (self.features,), self.param_dtype)
        x, bias = nn.dtypes.promote_dtype(x, bias, dtype=self.dtype)
        phases = []
        for p, rows in enumerate(_phase_taps(kernel, 0)):
            for q, taps in enumerate(_phase_taps(rows, 1)):
                phases.append(
                    convolution.conv_general_dilated(
                        x,
                        taps.astype(x.dtype),
                        window_strides=(1, 1),
                        padding=((1 - p, p), (1 - q, q)),
                        dimension_numbers=convolution.CANONICAL,
                    )
                )
        # [p, q, B, H, W, C] -> [B, H, p, W, q, C] -> [B, 2H, 2W, C]: out[2i+p, 2j+q].
        y = jnp.stack(phases).reshape(2, 2, batch, height, width, self.features)
        y = y.transpose(2, 3, 0, 4, 1, 5).reshape(batch, 2 * height, 2 * width, self.features)
        return y + bias


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then conv3x3. [B,H,W,C] -> [B,2H,2W,C].

    With the conv, both run as one `UpsampleConv`."""

    with_conv: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.with_conv:
            return UpsampleConv(x.shape[-1], self.dtype, self.param_dtype, name="conv")(x)
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def check_images_and_timesteps(x, t, ch_mult: tuple[int, ...], what: str = "image") -> None:
    """ValueError unless x is [B, H, W, C] with H, W divisible by 2**(len(ch_mult)-1), t is [B].

    The U-Nets' shared input check; `what` names x in the message ("image", "latent").
    """
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC [B, H, W, C], got shape {tuple(x.shape)}")
    batch, height, width, _ = x.shape
    divisor = 2 ** (len(ch_mult) - 1)
    if height % divisor or width % divisor:
        raise ValueError(
            f"{what} size {height}x{width} is not divisible by {divisor} = 2**(len(ch_mult)-1)"
            f" for ch_mult={tuple(ch_mult)}"
        )
    if jnp.ndim(t) != 1 or jnp.shape(t)[0] != batch:
        raise ValueError(
            f"t must have shape [{batch}] (one timestep per image), got {tuple(jnp.shape(t))}"
        )


class UNet(nn.Module):
    """The DDPM U-Net.

    Attributes:
      ch: base channel count; the timestep embedding has 4 * ch channels.
      ch_mult: channel multiplier per resolution level; len(ch_mult) - 1 halvings.
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: feature-map heights at which attention follows every res block.
      dropout: dropout rate inside the res blocks (used only with train=True).
      resamp_with_conv: conv (True) or pooling/plain nearest (False) resampling.
      out_channels: output channels (3 for eps, 6 for eps + learned variance).
      num_classes: if set, class-conditional; label `num_classes` means "no class"
        (for classifier-free guidance) and is used when y is None.
      low_res_conditioned: super-resolution (SR3; improved-diffusion's SuperResModel): the
        network takes `low_res`, upsampled to x's size and concatenated to x's channels.
      low_res_noise_conditioned: also takes `low_res_level` [B], the noise level of the
        low-res input (noise-conditioning augmentation), embedded like the timestep.
      dtype: compute dtype (e.g. jnp.bfloat16); the output is always float32.
      param_dtype: parameter dtype.
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    resamp_with_conv: bool = True
    out_channels: int = 3
    num_classes: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    low_res_conditioned: bool = False
    low_res_noise_conditioned: bool = False

    def _check_low_res(self, x, low_res, low_res_level) -> None:
        """A clear ValueError for a low-res input that the network was not built for."""
        if not self.low_res_conditioned:
            if low_res is not None or low_res_level is not None:
                raise ValueError("low_res given, but the UNet has low_res_conditioned=False")
            return
        if low_res is None:
            raise ValueError(
                "this super-resolution UNet needs low_res [B, h, w, C] (to sample from a "
                "super-resolution config: --mode=upsample)"
            )
        if low_res.ndim != 4 or low_res.shape[0] != x.shape[0]:
            raise ValueError(
                f"low_res must be NHWC [{x.shape[0]}, h, w, C], got {tuple(low_res.shape)}"
            )
        if self.low_res_noise_conditioned != (low_res_level is not None):
            raise ValueError(
                "low_res_level [B] is needed exactly when low_res_noise_conditioned "
                f"(={self.low_res_noise_conditioned})"
            )

    def _check_inputs(self, x, t, y) -> None:
        """Raise a clear ValueError for inputs the network cannot take, before any layer runs."""
        check_images_and_timesteps(x, t, self.ch_mult)
        batch = x.shape[0]
        if y is not None:
            if self.num_classes is None:
                raise ValueError("class labels y given, but the UNet has num_classes=None")
            if jnp.ndim(y) != 1 or jnp.shape(y)[0] != batch:
                raise ValueError(f"y must have shape [{batch}], got {tuple(jnp.shape(y))}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % NUM_GROUPS]
        if bad:
            raise ValueError(f"channel counts {bad} are not divisible by {NUM_GROUPS} groups")

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        *,
        train: bool,
        low_res: jax.Array | None = None,
        low_res_level: jax.Array | None = None,
        dropout_keys: jax.Array | None = None,
    ) -> jax.Array:
        """Predict eps (and optionally the variance interpolation) for noisy images.

        Args:
          x: [B, H, W, C_in] noisy images in [-1, 1]; H, W divisible by 2**(len(ch_mult)-1).
          t: [B] timesteps in {0, ..., T-1}.
          y: [B] class labels in {0, ..., num_classes}, or None.
          train: enables dropout.
          low_res: [B, h, w, C_lr] low-resolution images in [-1, 1] (super-resolution
            models only); any h, w: bicubic (Keys a = -0.5) upsampled to H, W, not clipped
            (the overshoot is information the network may use), antialias irrelevant
            for upsampling.
          low_res_level: [B] noise level of low_res (noise-conditioned models only).
          dropout_keys: [B] keys, training with dropout: example b's dropout masks come
            from dropout_keys[b] alone, so the same example gets the same masks in any
            batch, on any number of devices (the train step keys each example by its
            global index). None: split from the 'dropout' rng, one key for the batch.

        Returns:
          [B, H, W, out_channels] float32.
        """
        self._check_inputs(x, t, y)
        self._check_low_res(x, low_res, low_res_level)
        dt, pdt = self.dtype, self.param_dtype
        num_levels = len(self.ch_mult)
        temb = timestep_embedding(t, self.ch)
        temb = dense(4 * self.ch, "temb_dense_0", dt, pdt)(temb)
        temb = dense(4 * self.ch, "temb_dense_1", dt, pdt)(nn.swish(temb))
        if self.num_classes is not None:
            if y is None:
                y = jnp.full(x.shape[:1], self.num_classes, jnp.int32)
            # Added after the time MLP, as diffusers' class_embedding does.
            temb = temb + nn.Embed(
                self.num_classes + 1, 4 * self.ch, dtype=dt, param_dtype=pdt, name="class_embed"
            )(y)
        if low_res_level is not None:
            # A second sinusoid MLP, added like the class embedding (cascaded diffusion, Ho
            # et al. 2021: the augmentation level conditions the model like the timestep).
            level = timestep_embedding(low_res_level, self.ch)
            level = dense(4 * self.ch, "low_res_level_dense_0", dt, pdt)(level)
            temb = temb + dense(4 * self.ch, "low_res_level_dense_1", dt, pdt)(nn.swish(level))
        if low_res is not None:
            upsampled = jax.image.resize(
                low_res.astype(jnp.float32), (*x.shape[:3], low_res.shape[-1]), "bicubic"
            )
            x = jnp.concatenate([x.astype(jnp.float32), upsampled], axis=-1)

        def res_block(h, out_ch, name):
            block = ResnetBlock(out_ch, self.dropout, dt, pdt, name=name)
            return block(h, temb, train=train, dropout_keys=dropout_keys)

        def maybe_attn(h, name):
            # Attention placement follows the actual feature-map height, as in the official code.
            return AttnBlock(dt, pdt, name=name)(h) if h.shape[1] in self.attn_resolutions else h

        # Down path; `skips` collects every intermediate for the up path.
        h = conv(self.ch, "conv_in", dt, pdt)(x.astype(dt))
        skips = [h]
        for level in range(num_levels):
            for i in range(self.num_res_blocks):
                h = res_block(h, self.ch * self.ch_mult[level], f"down_{level}_block_{i}")
                h = maybe_attn(h, f"down_{level}_attn_{i}")
                skips.append(h)
            if level != num_levels - 1:
                h = Downsample(self.resamp_with_conv, dt, pdt, name=f"down_{level}_downsample")(h)
                skips.append(h)

        h = res_block(h, h.shape[-1], "mid_block_0")
        h = AttnBlock(dt, pdt, name="mid_attn")(h)
        h = res_block(h, h.shape[-1], "mid_block_1")

        # Up path: one more block per level than on the way down, to use up every skip.
        for level in reversed(range(num_levels)):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_block(h, self.ch * self.ch_mult[level], f"up_{level}_block_{i}")
                h = maybe_attn(h, f"up_{level}_attn_{i}")
            if level != 0:
                h = Upsample(self.resamp_with_conv, dt, pdt, name=f"up_{level}_upsample")(h)
        assert not skips

        h = nn.swish(group_norm("norm_out", dt, pdt)(h))
        # Zero init: the untrained model predicts eps = 0 rather than noise of random scale.
        h = conv(self.out_channels, "conv_out", dt, pdt, init=zeros)(h)
        return h.astype(jnp.float32)
