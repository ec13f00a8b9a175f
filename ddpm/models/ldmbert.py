"""LDMBert: the text encoder of CompVis/ldm-text2im-large-256 (diffusers' LDMBertModel).

A pre-LayerNorm transformer encoder (BART's attention code): token embedding plus a
learned position embedding, `num_layers` blocks of [x + attn(LN(x)), x + FFN(LN(x))], and
a final LayerNorm. Its last hidden state [B, L, d_model] is what the U-Net cross-attends
to. diffusers calls it without an attention mask, so [PAD] tokens are attended to as well.

Details that differ from a textbook BERT and matter for released weights:
- the attention width is num_heads * head_dim (8 * 64 = 512), not d_model (1280);
- q, k and v have no bias, the output projection has one;
- queries are scaled by head_dim**-0.5;
- the FFN activation is the exact (erf) GELU; LayerNorm eps is torch's 1e-5;
- there is no embedding scaling and no embedding LayerNorm.

Parameter names: `embed_tokens`, `embed_positions`, `layer_{i}` with `norm_attn`,
`self_attn` (`q`, `k`, `v`, `out`: ddpm.models.transformer's attention), `norm_ffn`, `fc1`,
`fc2`; `norm_out`. The checkpoint's masked-language-model head (`to_logits`, 39M
parameters for the release) is never used by the pipeline and is not part of the model.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm.models.transformer import MultiHeadAttention, layer_norm
from ddpm.models.unet import Dtype, dense

# BART's initialisation (init_std): normal(0.02) weights, zero biases.
default_init = nn.initializers.normal(0.02)


class EncoderLayer(nn.Module):
    """x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x)))): [B, L, D] -> [B, L, D]."""

    num_heads: int
    head_dim: int
    ffn_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        attention = MultiHeadAttention(
            self.num_heads, self.head_dim, dt, pdt, kernel_init=default_init, name="self_attn"
        )
        x = x + attention(layer_norm("norm_attn", dt, pdt)(x))  # no mask: [PAD] is attended
        h = layer_norm("norm_ffn", dt, pdt)(x)
        # transformers' "gelu" is torch's exact erf GELU, not the tanh approximation.
        h = nn.gelu(dense(self.ffn_dim, "fc1", dt, pdt, init=default_init)(h), approximate=False)
        return x + dense(x.shape[-1], "fc2", dt, pdt, init=default_init)(h)


class LDMBert(nn.Module):
    """Token ids [B, L] -> last hidden state [B, L, d_model] float32.

    Attributes (LDMBertConfig's key in brackets; released values in parentheses):
      vocab_size: token embedding rows [vocab_size] (30522).
      max_length: learned positions; L may not exceed it [max_position_embeddings] (77).
      d_model: hidden size [d_model] (1280).
      num_layers: encoder layers [encoder_layers] (32).
      num_heads: attention heads [encoder_attention_heads] (8).
      head_dim: width of one head [head_dim] (64).
      ffn_dim: hidden size of the feed-forward block [encoder_ffn_dim] (5120).
      dtype: compute dtype; the output is float32.
      param_dtype: parameter dtype.
    """

    vocab_size: int = 30522
    max_length: int = 77
    d_model: int = 1280
    num_layers: int = 32
    num_heads: int = 8
    head_dim: int = 64
    ffn_dim: int = 5120
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, token_ids: jax.Array) -> jax.Array:
        """token_ids: [B, L] int, L <= max_length. Returns [B, L, d_model] float32."""
        if token_ids.ndim != 2 or token_ids.shape[1] > self.max_length:
            raise ValueError(
                f"token_ids must be [B, L] with L <= {self.max_length},"
                f" got {tuple(token_ids.shape)}"
            )
        dt, pdt = self.dtype, self.param_dtype

        def embed(rows, name):
            return nn.Embed(
                rows,
                self.d_model,
                embedding_init=default_init,
                dtype=dt,
                param_dtype=pdt,
                name=name,
            )

        length = token_ids.shape[1]
        h = embed(self.vocab_size, "embed_tokens")(token_ids)
        h = h + embed(self.max_length, "embed_positions")(jnp.arange(length))[None]
        for i in range(self.num_layers):
            h = EncoderLayer(
                self.num_heads, self.head_dim, self.ffn_dim, dt, pdt, name=f"layer_{i}"
            )(h)
        return layer_norm("norm_out", dt, pdt)(h).astype(jnp.float32)
