"""Stage 2 of latent diffusion: the cross-attention U-Net with a class or a prompt as context.

ddpm/latent.py trains it on the latents of a frozen autoencoder. Parameter names: `unet`
(cond_unet.py's), and `label_embed` or `text_encoder` (ldmbert.py's).
"""

from typing import ClassVar

import flax.linen as nn
import jax

from ddpm.models.cond_unet import CondUNet
from ddpm.models.ldmbert import LDMBert


class LatentDenoiser(nn.Module):
    """eps(z_t, t, y): the cross-attention U-Net with a class or prompt as its context.

    Attributes:
      unet: the CondUNet over latents.
      num_classes: labels 0..num_classes-1; num_classes is the null label.
      text_encoder: None: y is a label [B] and the context is one learned token per class
        (`label_embed`, num_classes + 1 rows). An LDMBert: y is token ids [B, L] and the
        context its last states.
    """

    unet: CondUNet
    num_classes: int
    text_encoder: LDMBert | None = None
    low_res_conditioned: ClassVar[bool] = False  # no super-resolution inputs (the train step)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array,
        *,
        train: bool,
        dropout_keys: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, h, w, c] noisy latents, t [B], y labels [B] or token ids [B, L] -> [B, h, w, c];
        dropout_keys as UNet.__call__'s."""
        if self.text_encoder is None:
            embed = nn.Embed(self.num_classes + 1, self.unet.context_dim, name="label_embed")
            context = embed(y)[:, None]
        else:
            context = self.text_encoder(y)
        return self.unet(x, t, context, train=train, dropout_keys=dropout_keys)
