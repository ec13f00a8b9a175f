"""The cross-attention U-Net of latent diffusion (Rombach et al. 2022, section 3.3).

DDPM's U-Net layout (ddpm/models/unet.py, whose residual blocks and resampling layers
this reuses) with a spatial transformer (transformer.py) in place of the single-head
self-attention: at every level listed in `cross_attn_levels` (and in the middle) each
residual block is followed by GroupNorm, a projection to tokens, `transformer_depth`
transformer blocks (self-attention, cross-attention to the conditioning sequence, GEGLU
feed-forward, each pre-LayerNorm and residual) and a projection back, added to the
block's input. This is diffusers' UNet2DConditionModel as CompVis/ldm-text2im-large-256
configures it (and LDM's openaimodel.UNetModel with use_spatial_transformer);
`ddpm.convert_cond_unet` reads its released weights.

Parameter names follow unet.py: `conv_in`, `temb_dense_0/1`, `down_{level}_block_{i}`,
`down_{level}_attn_{i}` (a SpatialTransformer), `down_{level}_downsample`,
`mid_block_0`, `mid_attn`, `mid_block_1`, `up_{level}_block_{i}`, `up_{level}_attn_{i}`,
`up_{level}_upsample`, `norm_out`, `conv_out`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm.models.transformer import SpatialTransformer
from ddpm.models.unet import (
    Downsample,
    Dtype,
    ResnetBlock,
    Upsample,
    check_images_and_timesteps,
    conv,
    dense,
    group_norm,
    timestep_embedding,
    zeros,
)


class CondUNet(nn.Module):
    """The latent-diffusion U-Net: eps(x_t, t, context). Defaults are ldm-text2im-large-256's.

    Attributes:
      ch: base channel count (diffusers' block_out_channels[0]); the timestep embedding
        has 4 * ch channels.
      ch_mult: channel multiplier per level (block_out_channels / ch); len - 1 halvings.
      num_res_blocks: residual blocks per level on the way down, one more on the way up
        (layers_per_block).
      cross_attn_levels: per level, whether a spatial transformer follows each residual
        block (CrossAttn*Block2D) or not (DownBlock2D / UpBlock2D). The middle always
        has one.
      num_heads: attention heads in every spatial transformer (diffusers' legacy
        `attention_head_dim`); each head has C // num_heads channels.
      context_dim: channels D of the context sequence (cross_attention_dim).
      transformer_depth: transformer blocks per spatial transformer
        (transformer_layers_per_block).
      out_channels: output channels.
      num_groups, norm_eps: GroupNorm groups and epsilon of the residual blocks and of
        the output norm (norm_num_groups, norm_eps). The transformers' own norms use
        diffusers' fixed eps (see transformer.py).
      dropout: dropout rate inside the residual blocks (used only with train=True). The
        transformers have none, as in diffusers and LDM.
      dtype: compute dtype (e.g. jnp.bfloat16); the output is always float32.
      param_dtype: parameter dtype.
    """

    ch: int = 320
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    cross_attn_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int = 8
    context_dim: int = 1280
    transformer_depth: int = 1
    out_channels: int = 4
    num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check_inputs(self, x, t, context) -> None:
        """Raise a clear ValueError for inputs or fields the network cannot take, before it runs."""
        if len(self.cross_attn_levels) != len(self.ch_mult):
            raise ValueError(
                f"cross_attn_levels {tuple(self.cross_attn_levels)} needs one entry per level of"
                f" ch_mult={tuple(self.ch_mult)}"
            )
        channels = [self.ch * m for m in self.ch_mult]
        if bad := [c for c in channels if c % self.num_groups]:
            raise ValueError(f"channel counts {bad} are not divisible by {self.num_groups} groups")
        if bad := [c for c in channels if c < self.num_heads]:
            raise ValueError(f"channel counts {bad} are fewer than num_heads={self.num_heads}")
        check_images_and_timesteps(x, t, self.ch_mult, what="latent")
        batch = x.shape[0]
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.context_dim:
            raise ValueError(
                f"context must have shape [{batch}, L, {self.context_dim}] (batch, tokens,"
                f" context_dim), got {tuple(context.shape)}"
            )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        context: jax.Array,
        *,
        train: bool,
        dropout_keys: jax.Array | None = None,
    ) -> jax.Array:
        """Predict eps for noisy latents, conditioned on a sequence (text encoder states).

        Args:
          x: [B, h, w, C_in] noisy latents; h, w divisible by 2**(len(ch_mult)-1).
          t: [B] timesteps in {0, ..., T-1}.
          context: [B, L, context_dim] conditioning sequence (e.g. LDMBert's last states).
          train: enables dropout.
          dropout_keys: [B] keys, one per example, or None (as UNet.__call__'s).

        Returns:
          [B, h, w, out_channels] float32.
        """
        self._check_inputs(x, t, context)
        dt, pdt = self.dtype, self.param_dtype
        num_levels = len(self.ch_mult)
        context = context.astype(dt)
        # diffusers' Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0): [cos, sin].
        temb = timestep_embedding(t, self.ch, flip_sin_to_cos=True, freq_shift=0.0)
        temb = dense(4 * self.ch, "temb_dense_0", dt, pdt)(temb.astype(dt))
        temb = dense(4 * self.ch, "temb_dense_1", dt, pdt)(nn.swish(temb))

        def res_block(h, out_ch, name):
            block = ResnetBlock(
                out_ch, self.dropout, dt, pdt, self.num_groups, self.norm_eps, name=name
            )
            return block(h, temb, train=train, dropout_keys=dropout_keys)

        def transformer(h, name):
            return SpatialTransformer(
                self.num_heads, self.transformer_depth, self.num_groups, dt, pdt, name=name
            )(h, context)

        # Down path; `skips` collects every intermediate for the up path.
        h = conv(self.ch, "conv_in", dt, pdt)(x.astype(dt))
        skips = [h]
        for level in range(num_levels):
            for i in range(self.num_res_blocks):
                h = res_block(h, self.ch * self.ch_mult[level], f"down_{level}_block_{i}")
                if self.cross_attn_levels[level]:
                    h = transformer(h, f"down_{level}_attn_{i}")
                skips.append(h)
            if level != num_levels - 1:
                # Padding 1 on each side, as diffusers' Downsample2D(padding=1).
                name = f"down_{level}_downsample"
                h = Downsample(True, dt, pdt, pad_after_only=False, name=name)(h)
                skips.append(h)

        h = res_block(h, h.shape[-1], "mid_block_0")
        h = transformer(h, "mid_attn")
        h = res_block(h, h.shape[-1], "mid_block_1")

        # Up path: one more block per level than on the way down, to use up every skip.
        for level in reversed(range(num_levels)):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_block(h, self.ch * self.ch_mult[level], f"up_{level}_block_{i}")
                if self.cross_attn_levels[level]:
                    h = transformer(h, f"up_{level}_attn_{i}")
            if level != 0:
                h = Upsample(True, dt, pdt, name=f"up_{level}_upsample")(h)
        assert not skips

        h = nn.swish(group_norm("norm_out", dt, pdt, self.num_groups, self.norm_eps)(h))
        # Zero init: the untrained model predicts eps = 0 rather than noise of random scale.
        h = conv(self.out_channels, "conv_out", dt, pdt, init=zeros)(h)
        return h.astype(jnp.float32)
