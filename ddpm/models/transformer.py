"""Transformer layers of latent diffusion: multi-head (cross-)attention, GEGLU, blocks.

`SpatialTransformer` runs a transformer over the positions of a feature map,
conditioned on a sequence (Rombach et al. 2022, section 3.3): diffusers'
Transformer2DModel with BasicTransformerBlocks, LDM's SpatialTransformer. CondUNet
(cond_unet.py) places one after residual blocks; `MultiHeadAttention` with no context
is plain multi-head self-attention for any transformer.

Parameter names: a SpatialTransformer has `norm`, `proj_in`, `block_{j}`, `proj_out`; a
TransformerBlock `norm_self_attn`, `self_attn`, `norm_cross_attn`, `cross_attn`,
`norm_ff`, `ff` (`proj`, `out`); a MultiHeadAttention `q`, `k`, `v` (no bias) and `out`.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm.models.unet import Dtype, default_init, dense, group_norm, zeros

# Fixed inside diffusers' Transformer2DModel / BasicTransformerBlock (and LDM's
# SpatialTransformer), whatever the U-Net's own norm_eps is.
TRANSFORMER_GROUP_NORM_EPS = 1e-6
LAYER_NORM_EPS = 1e-5
FEED_FORWARD_MULT = 4


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    # Flax computes the statistics in float32 even when dtype is bf16.
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype, name=name)


class MultiHeadAttention(nn.Module):
    """Multi-head attention of the tokens x to themselves or to a context sequence.

    x: [B, N, C], context: [B, L, D] or None (self-attention) -> [B, N, C]. Queries,
    keys and values are bias-free projections to num_heads * head_dim channels; logits
    are q.k / sqrt(head_dim) per head; the heads are concatenated and projected back to
    C with a bias (diffusers' Attention, LDM's CrossAttention; with no context also
    BART's / LDMBert's self-attention). kernel_init initialises all four projections.
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = default_init

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        context = x if context is None else context
        inner = self.num_heads * self.head_dim

        def project(name, source):
            h = nn.Dense(
                inner,
                use_bias=False,
                kernel_init=self.kernel_init,
                dtype=dt,
                param_dtype=pdt,
                name=name,
            )(source)
            return h.reshape(*h.shape[:-1], self.num_heads, self.head_dim)  # [B, len, heads, d]

        q, k, v = project("q", x), project("k", context), project("v", context)
        # Logits and softmax in float32 even under bf16 compute (see jax's implementation).
        h = jax.nn.dot_product_attention(q, k, v)
        out = dense(x.shape[-1], "out", dt, pdt, init=self.kernel_init)
        return out(h.reshape(*x.shape[:-1], inner))


class GegluFeedForward(nn.Module):
    """x [B, N, C] -> [B, N, C]: Dense to 2 * mult * C, value * gelu(gate), Dense to C.

    GEGLU (Shazeer 2020) with the exact (erf) GELU, as diffusers and LDM compute it; the
    first half of the projection is the value, the second the gate.
    """

    mult: int = FEED_FORWARD_MULT
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        channels = x.shape[-1]
        value, gate = jnp.split(dense(2 * self.mult * channels, "proj", dt, pdt)(x), 2, axis=-1)
        return dense(channels, "out", dt, pdt)(value * nn.gelu(gate, approximate=False))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the context, GEGLU feed-forward.

    x: [B, N, C] tokens, context: [B, L, D] -> [B, N, C]; each of the three is added to
    its input (diffusers' BasicTransformerBlock, LDM's BasicTransformerBlock).
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        heads, head_dim = self.num_heads, self.head_dim
        h = layer_norm("norm_self_attn", dt, pdt)(x)
        x = x + MultiHeadAttention(heads, head_dim, dt, pdt, name="self_attn")(h)
        h = layer_norm("norm_cross_attn", dt, pdt)(x)
        x = x + MultiHeadAttention(heads, head_dim, dt, pdt, name="cross_attn")(h, context)
        h = layer_norm("norm_ff", dt, pdt)(x)
        return x + GegluFeedForward(dtype=dt, param_dtype=pdt, name="ff")(h)


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, conditioned on a context.

    x: [B, H, W, C], context: [B, L, D] -> [B, H, W, C]. GroupNorm, projection to
    num_heads * (C // num_heads) channels, `depth` TransformerBlocks, projection back to
    C, added to x. The projections are Dense layers: diffusers' 1x1 convs
    (use_linear_projection=False) and its Linear layers (True) are the same map.
    """

    num_heads: int
    depth: int = 1
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        dt, pdt = self.dtype, self.param_dtype
        head_dim = channels // self.num_heads
        h = group_norm("norm", dt, pdt, self.num_groups, TRANSFORMER_GROUP_NORM_EPS)(x)
        h = h.reshape(batch, height * width, channels)
        h = dense(self.num_heads * head_dim, "proj_in", dt, pdt)(h)
        for j in range(self.depth):
            h = TransformerBlock(self.num_heads, head_dim, dt, pdt, name=f"block_{j}")(h, context)
        # Zero init, as LDM does (zero_module): the whole transformer starts as the
        # identity. Its inner residual branches keep a random init, so that they get
        # gradients as soon as this projection has moved off zero.
        h = dense(channels, "proj_out", dt, pdt, init=zeros)(h)
        return x + h.reshape(batch, height, width, channels)
