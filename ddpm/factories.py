"""Building the model, diffusion, optimiser and train state from a config.

The one place where config fields become objects: the model and the diffusion math
never see the config themselves.
"""

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm import diffusion as D
from ddpm import super_resolution
from ddpm.models.autoencoder import AutoencoderKL
from ddpm.models.cond_unet import CondUNet
from ddpm.models.latent_denoiser import LatentDenoiser
from ddpm.models.ldmbert import LDMBert
from ddpm.models.unet import UNet
from ddpm.schedules import get_beta_schedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 []: the number of updates applied.
    params: Any
    ema_params: Any  # Exponential moving average of params: used to sample and evaluate.
    opt_state: Any


def create_model(config: ml_collections.ConfigDict):
    """The network that config.pipeline trains: the pixel U-Net (with output channels for
    the configured variance), the autoencoder of stage 1, or the latent denoiser of stage 2."""
    if config.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}")
    if config.pipeline == "autoencoder":
        return create_autoencoder(config)
    if config.pipeline == "latent":
        return LatentDenoiser(
            unet=create_cond_unet(config, out_channels=config.autoencoder.latent_channels),
            num_classes=config.model.num_classes,
            text_encoder=create_text_encoder(config) if uses_text(config) else None,
        )
    if config.pipeline != "pixel":
        raise ValueError(f"config.pipeline={config.pipeline!r} cannot be trained or sampled here")
    super_resolution.check_config(config)
    learned_var = config.diffusion.var_type in D.LEARNED_VAR_TYPES
    return UNet(
        ch=config.model.ch,
        ch_mult=tuple(config.model.ch_mult),
        num_res_blocks=config.model.num_res_blocks,
        attn_resolutions=tuple(config.model.attn_resolutions),
        dropout=config.model.dropout,
        resamp_with_conv=config.model.resamp_with_conv,
        out_channels=config.data.num_channels * (2 if learned_var else 1),
        num_classes=config.model.num_classes or None,
        dtype=DTYPES[config.model.dtype],
        low_res_conditioned=super_resolution.is_super_resolution(config),
        low_res_noise_conditioned=bool(config.model.get("low_res_noise")),
    )


def latent_shape(config) -> tuple[int, int, int]:
    """(h, w, c) of the latents of data.image_size images under config.autoencoder."""
    factor = 2 ** (len(config.autoencoder.ch_mult) - 1)
    size = config.data.image_size
    if size % factor:
        raise ValueError(f"data.image_size={size} is not divisible by the autoencoder's f={factor}")
    return size // factor, size // factor, config.autoencoder.latent_channels


def uses_text(config) -> bool:
    """Whether a latent model (pipeline 'latent') is conditioned on prompts, not labels."""
    condition = config.latent.condition
    if condition not in ("label", "text"):
        raise ValueError(f"latent.condition must be 'label' or 'text', got {condition!r}")
    return condition == "text"


class Text2ImageModels(NamedTuple):
    """The three networks of latent text-to-image (config.pipeline = 'text2image')."""

    autoencoder: AutoencoderKL  # images <-> latents (config.autoencoder)
    text_encoder: LDMBert  # token ids -> text states (config.text_encoder)
    unet: CondUNet  # the latent diffusion model, cross-attending to the text (config.model)


def create_autoencoder(config: ml_collections.ConfigDict) -> AutoencoderKL:
    a = config.autoencoder
    return AutoencoderKL(
        ch=a.ch,
        ch_mult=tuple(a.ch_mult),
        num_res_blocks=a.num_res_blocks,
        latent_channels=a.latent_channels,
        in_channels=config.data.num_channels,
        out_channels=config.data.num_channels,
        num_groups=a.get("num_groups", 32),
        dtype=DTYPES[config.model.dtype],
    )


def create_text_encoder(config: ml_collections.ConfigDict) -> LDMBert:
    e = config.text_encoder
    if config.model.context_dim != e.d_model:
        raise ValueError(
            f"model.context_dim={config.model.context_dim} must equal "
            f"text_encoder.d_model={e.d_model}"
        )
    return LDMBert(
        vocab_size=e.vocab_size,
        max_length=e.max_length,
        d_model=e.d_model,
        num_layers=e.num_layers,
        num_heads=e.num_heads,
        head_dim=e.head_dim,
        ffn_dim=e.ffn_dim,
        dtype=DTYPES[config.model.dtype],
    )


def create_cond_unet(config: ml_collections.ConfigDict, out_channels: int) -> CondUNet:
    m = config.model
    return CondUNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        cross_attn_levels=tuple(m.cross_attn_levels),
        num_heads=m.num_heads,
        context_dim=m.context_dim,
        out_channels=out_channels,
        num_groups=m.get("num_groups", 32),
        dropout=m.dropout,
        dtype=DTYPES[m.dtype],
    )


def create_text2image_models(config: ml_collections.ConfigDict) -> Text2ImageModels:
    return Text2ImageModels(
        autoencoder=create_autoencoder(config),
        text_encoder=create_text_encoder(config),
        unet=create_cond_unet(config, out_channels=config.autoencoder.latent_channels),
    )


def create_diffusion(config: ml_collections.ConfigDict, *, use_timesteps=None) -> D.Diffusion:
    c = config.diffusion
    betas = get_beta_schedule(
        c.schedule, num_timesteps=c.num_timesteps, beta_start=c.beta_start, beta_end=c.beta_end
    )
    return D.create_diffusion(
        betas,
        mean_type=c.mean_type,
        var_type=c.var_type,
        loss_type=c.loss_type,
        min_snr_gamma=c.min_snr_gamma,
        use_timesteps=use_timesteps,
    )


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """A linear warm-up from 0 to the learning rate, then constant (the official code)."""
    return optax.linear_schedule(0.0, optim.learning_rate, max(optim.warmup_steps, 1))


def create_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    adam = optax.adam(learning_rate_schedule(optim), b1=optim.beta1, b2=optim.beta2, eps=optim.eps)
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adam)
    return adam


def create_train_state(config, model, tx: optax.GradientTransformation, rng) -> TrainState:
    return state_from_params(init_params(config, model, rng), tx)


def example_inputs(config, model) -> tuple[tuple, dict]:
    """Zero inputs of batch 1 for `model` (create_model) at the config's shapes: the
    (args, kwargs) of model.init and of a forward pass, model.apply(variables, ...)."""
    size, channels = config.data.image_size, config.data.num_channels
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    if isinstance(model, AutoencoderKL):
        return (x,), {}
    t = jnp.zeros((1,), jnp.int32)
    if isinstance(model, LatentDenoiser):
        x = jnp.zeros((1, *latent_shape(config)), jnp.float32)
        text = model.text_encoder is not None
        y = jnp.zeros((1, config.text_encoder.max_length) if text else (1,), jnp.int32)
        return (x, t, y), {"train": False}
    y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    return (x, t, y), {"train": False, **super_resolution.example_inputs(config, model)}


def init_params(config, model, rng):
    """Freshly initialised params of `model` (create_model) for the config's inputs."""
    args, kwargs = example_inputs(config, model)
    return model.init(rng, *args, **kwargs)["params"]


def state_from_params(params, tx) -> TrainState:
    """A fresh state (step 0, new optimiser) that starts from the given params."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params)
    )
