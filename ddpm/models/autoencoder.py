"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and G).

diffusers' `AutoencoderKL`, built from the DDPM U-Net's blocks (`ddpm.models.unet`): an
encoder that maps an image to the mean and log-variance of a diagonal Gaussian over
latents (f = 2**(len(ch_mult)-1) times smaller), and a decoder back to pixels. Neither
side has a time input or skip connections.

    model = AutoencoderKL(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2)
    mean, logvar = model.apply(variables, images, method=AutoencoderKL.encode)
    images = model.apply(variables, latents, method=AutoencoderKL.decode)

Parameter names follow the U-Net's, under `encoder` and `decoder`: `conv_in`,
`down_{level}_block_{i}`, `down_{level}_downsample`, `mid_block_0`, `mid_attn`,
`mid_block_1`, `up_{level}_block_{i}`, `up_{level}_upsample`, `norm_out`, `conv_out`;
plus `quant_conv` and `post_quant_conv` (1x1 convs) at the top. Levels count from the
full-size one (0) downwards, on both sides.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm.models.unet import (
    AttnBlock,
    Downsample,
    ResnetBlock,
    Upsample,
    conv,
    group_norm,
)

Dtype = Any

# diffusers builds every autoencoder norm (res blocks, attention, output) with eps 1e-6.
NORM_EPS = 1e-6
# DiagonalGaussianDistribution's clamp: keeps exp(logvar) finite in float32.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def gaussian_sample(mean: jax.Array, logvar: jax.Array, noise: jax.Array) -> jax.Array:
    """A draw from N(mean, exp(logvar)) given standard normal `noise` of the same shape.

    The caller draws the noise, so the draw is a function of its key (per example).
    """
    return mean + jnp.exp(0.5 * logvar) * noise


def gaussian_kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch axis: [B, ...] -> [B]."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(axis=1)


def _res_block(h: jax.Array, out_ch: int, name: str, dtype, param_dtype, groups) -> jax.Array:
    """diffusers' ResnetBlock2D as the autoencoder has it: no time input, no dropout, eps 1e-6."""
    block = ResnetBlock(out_ch, 0.0, dtype, param_dtype, groups, NORM_EPS, name=name)
    return block(h, None, train=False)


def _mid_block(h: jax.Array, dtype, param_dtype, groups, with_attention: bool) -> jax.Array:
    """(res, attn, res) at the lowest resolution, named as the U-Net's middle: [B,h,w,C] -> same.

    A function rather than a module, so that the layers sit directly in the caller's
    params (`mid_block_0`, `mid_attn`, `mid_block_1`), as in the U-Net.
    """
    h = _res_block(h, h.shape[-1], "mid_block_0", dtype, param_dtype, groups)
    if with_attention:
        # diffusers' mid-block Attention has heads = C // attention_head_dim = 1.
        h = AttnBlock(dtype, param_dtype, groups, NORM_EPS, name="mid_attn")(h)
    return _res_block(h, h.shape[-1], "mid_block_1", dtype, param_dtype, groups)


class _Half(nn.Module):
    """The fields the encoder and the decoder share (see `AutoencoderKL`)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    out_channels: int
    num_groups: int
    mid_block_add_attention: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


class Encoder(_Half):
    """Image [B, H, W, C] -> [B, H/f, W/f, out_channels] (mean and logvar concatenated).

    diffusers' vae.Encoder with double_z=True (out_channels = 2 * latent_channels):
    conv_in, per level `num_res_blocks` res blocks and a stride-2 conv (not after the
    last level), the mid block, norm, swish, conv_out.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt, groups = self.dtype, self.param_dtype, self.num_groups
        h = conv(self.ch, "conv_in", dt, pdt)(x.astype(dt))
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = _res_block(h, self.ch * mult, f"down_{level}_block_{i}", dt, pdt, groups)
            if level != len(self.ch_mult) - 1:
                # diffusers' Downsample2D(padding=0) pads (0, 1, 0, 1) before the conv.
                downsample = Downsample(
                    True, dt, pdt, pad_after_only=True, name=f"down_{level}_downsample"
                )
                h = downsample(h)
        h = _mid_block(h, dt, pdt, groups, self.mid_block_add_attention)
        h = nn.swish(group_norm("norm_out", dt, pdt, groups, NORM_EPS)(h))
        return conv(self.out_channels, "conv_out", dt, pdt)(h)


class Decoder(_Half):
    """Latents [B, h, w, C] -> [B, h*f, w*f, out_channels].

    diffusers' vae.Decoder: conv_in, the mid block, per level from the lowest
    `num_res_blocks + 1` res blocks and a nearest-neighbour x2 + conv (not after the
    full-size level), norm, swish, conv_out.
    """

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        dt, pdt, groups = self.dtype, self.param_dtype, self.num_groups
        h = conv(self.ch * self.ch_mult[-1], "conv_in", dt, pdt)(z.astype(dt))
        h = _mid_block(h, dt, pdt, groups, self.mid_block_add_attention)
        for level in reversed(range(len(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                out_ch = self.ch * self.ch_mult[level]
                h = _res_block(h, out_ch, f"up_{level}_block_{i}", dt, pdt, groups)
            if level != 0:
                h = Upsample(True, dt, pdt, name=f"up_{level}_upsample")(h)
        h = nn.swish(group_norm("norm_out", dt, pdt, groups, NORM_EPS)(h))
        return conv(self.out_channels, "conv_out", dt, pdt)(h)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL (the `vqvae` of CompVis/ldm-text2im-large-256).

    Attributes (diffusers' config key in brackets):
      ch: channels of the full-size level [block_out_channels[0]].
      ch_mult: channel multiplier per level [block_out_channels / ch]; the latents are
        2**(len(ch_mult)-1) times smaller than the image on each side.
      num_res_blocks: res blocks per encoder level [layers_per_block]; the decoder has
        one more per level.
      latent_channels: channels of a latent [latent_channels].
      in_channels, out_channels: image channels in and out [in_channels, out_channels].
      num_groups: GroupNorm groups everywhere [norm_num_groups].
      mid_block_add_attention: attention between the two mid res blocks
        [mid_block_add_attention].
      use_quant_conv, use_post_quant_conv: the 1x1 convs after the encoder and before
        the decoder [use_quant_conv, use_post_quant_conv].
      dtype: compute dtype; encode and decode return float32.
      param_dtype: parameter dtype.
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        shared = dict(
            ch=self.ch,
            ch_mult=tuple(self.ch_mult),
            num_res_blocks=self.num_res_blocks,
            num_groups=self.num_groups,
            mid_block_add_attention=self.mid_block_add_attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.encoder = Encoder(out_channels=2 * self.latent_channels, **shared)
        self.decoder = Decoder(out_channels=self.out_channels, **shared)
        dt, pdt = self.dtype, self.param_dtype
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, None, dt, pdt, kernel=1)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, None, dt, pdt, kernel=1)

    def _check_spatial(self, x: jax.Array, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be NHWC [B, H, W, {channels}], got {tuple(x.shape)}")

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The posterior's parameters for images.

        Args:
          x: [B, H, W, in_channels] images in [-1, 1]; H, W divisible by 2**(len(ch_mult)-1).

        Returns:
          (mean, logvar), each [B, H/f, W/f, latent_channels] float32; logvar clamped to
          [-30, 20] as diffusers' DiagonalGaussianDistribution does.
        """
        self._check_spatial(x, self.in_channels, "images")
        divisor = 2 ** (len(self.ch_mult) - 1)
        if x.shape[1] % divisor or x.shape[2] % divisor:
            raise ValueError(f"image size {x.shape[1:3]} is not divisible by {divisor}")
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images for latents: [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels] float32.

        z is the unscaled latent; the pipeline divides its diffusion latents by the
        scaling factor (0.18215) first.
        """
        self._check_spatial(z, self.latent_channels, "latents")
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        """Reconstruct images: decode a posterior sample (its mean when noise is None).

        x: [B, H, W, in_channels]; noise: None or [B, H/f, W/f, latent_channels] standard
        normal. Returns [B, H, W, out_channels]. `init` through here creates every parameter.
        """
        mean, logvar = self.encode(x)
        return self.decode(mean if noise is None else gaussian_sample(mean, logvar, noise))
