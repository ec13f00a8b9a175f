"""Latent text-to-image: CompVis/ldm-text2im-large-256 (Rombach et al. 2022), from its files.

diffusers' LDMTextToImagePipeline in JAX (ddpm/text2image.py): a KL autoencoder (f = 8,
4 latent channels, latents scaled by 0.18215), the LDMBert text encoder (32 layers,
1280-d, BERT uncased WordPiece, 77 tokens) and a U-Net of 320 channels that
cross-attends to the text; DDIM with classifier-free guidance, the empty prompt as the
unconditional input. With the release's files (model_index.json, vqvae/, bert/, unet/,
tokenizer/, scheduler/) in ldm-text2im-large-256/:
  python main.py --mode=convert --config=configs/ldm_text2im.py \\
    --source=ldm-text2im-large-256 --workdir=runs/ldm-text2im
  python main.py --mode=sample --config=configs/ldm_text2im.py --workdir=runs/ldm-text2im \\
    --config.sampling.prompt="a painting of a squirrel eating a burger"
"""

import ml_collections

from configs import default


def get_config():
    config = default.get_config()
    config.pipeline = "text2image"
    config.data.image_size = 256
    config.data.num_channels = 3

    # The latent diffusion U-Net (diffusers' UNet2DConditionModel of the release).
    config.model = ml_collections.ConfigDict()
    config.model.ch = 320
    config.model.ch_mult = (1, 2, 4, 4)
    config.model.num_res_blocks = 2
    config.model.cross_attn_levels = (True, True, True, False)  # levels with text attention
    config.model.num_heads = 8
    config.model.context_dim = 1280  # = text_encoder.d_model
    config.model.dropout = 0.0
    config.model.dtype = "float32"

    config.autoencoder = ml_collections.ConfigDict()
    config.autoencoder.ch = 128
    config.autoencoder.ch_mult = (1, 2, 4, 4)  # f = 2**3 = 8: 256x256 images, 32x32 latents
    config.autoencoder.num_res_blocks = 2
    config.autoencoder.latent_channels = 4
    # The diffusion runs on latents * scaling_factor (LDM: 1 / std of the training latents).
    config.autoencoder.scaling_factor = 0.18215

    config.text_encoder = ml_collections.ConfigDict()
    config.text_encoder.vocab_size = 30522  # bert-base-uncased
    config.text_encoder.max_length = 77
    config.text_encoder.d_model = 1280
    config.text_encoder.num_layers = 32
    config.text_encoder.num_heads = 8
    config.text_encoder.head_dim = 64
    config.text_encoder.ffn_dim = 5120

    config.diffusion.schedule = "scaled_linear"
    config.diffusion.beta_start = 0.00085
    config.diffusion.beta_end = 0.012

    # The pipeline's documented use: DDIM, 50 steps, eta 0.3, diffusers guidance_scale 6,
    # which is w = 5 here (eps = (1 + w) eps(text) - w eps(empty prompt); s = 1 + w).
    config.sampling.method = "ddim"
    config.sampling.num_steps = 50
    config.sampling.eta = 0.3
    config.sampling.guidance_scale = 5.0
    config.sampling.clip_denoised = False  # latents are not bounded to [-1, 1]
    config.sampling.num_samples = 4
    config.sampling.batch_size = 4
    # One prompt, or a .txt file of prompts (one a line); sample i gets prompt i mod count.
    config.sampling.prompt = "a painting of a squirrel eating a burger"
    return config
