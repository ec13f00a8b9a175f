"""Super-resolution (SR3, Saharia et al. 2021; improved-diffusion's SuperResModel).

The U-Net (models/unet.py with low_res_conditioned) takes the low-res image [B, h, w, C]
in [-1, 1] and upsamples it itself (bicubic) before concatenating it to x_t. This module
is what surrounds it: the config checks, the low-res inputs of a training step (with
noise-conditioning augmentation), the denoise_fn closure that the samplers take, and
area downsampling and bicubic upsampling of uint8 images on the host (sources, metrics).

Noise-conditioning augmentation (SR3 Sec. 2.5, Ho et al. 2021 "cascaded diffusion"):
the low-res input is noised to a level s in {0, ..., S}: s = 0 is the clean image, s > 0
is q_sample at timestep s - 1 of the model's own (full, unrespaced) schedule, and the
network is told s. Training draws s uniformly per example, S = round(model.low_res_noise
* T); sampling uses the fixed upsample.low_res_noise_level.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm import diffusion as D
from ddpm import images, samplers
from ddpm.metrics import sr

# fold_in purpose of a training step's key for the augmentation (label dropout uses 3).
LOW_RES_NOISE_PURPOSE = 5
# fold_in purpose of a sample's key for the noise of its low-res input at sampling.
SAMPLE_LOW_RES_NOISE_PURPOSE = 1


def is_super_resolution(config: ml_collections.ConfigDict) -> bool:
    return bool(config.data.get("low_res_size", 0))


def max_noise_level(config: ml_collections.ConfigDict) -> int:
    """S: the largest augmentation level of training (0: no augmentation)."""
    return round(config.model.get("low_res_noise", 0.0) * config.diffusion.num_timesteps)


def check_low_res_size(data: ml_collections.ConfigDict) -> None:
    """ValueError unless data.low_res_size is 0 (no super-resolution) or divides image_size."""
    low_res_size = data.get("low_res_size", 0)
    if low_res_size and (low_res_size < 1 or data.image_size % low_res_size):
        raise ValueError(
            f"data.low_res_size={low_res_size} must divide data.image_size={data.image_size}: "
            "the low-res image is an area downsampling by an integer factor."
        )


def check_config(config: ml_collections.ConfigDict) -> None:
    """Super-resolution settings a model cannot be built with: one clear ValueError."""
    size, noise = config.data.get("low_res_size", 0), config.model.get("low_res_noise", 0.0)
    if not size:
        if noise:
            raise ValueError(
                f"model.low_res_noise={noise} needs a super-resolution config "
                "(data.low_res_size > 0)"
            )
        return
    check_low_res_size(config.data)
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"model.low_res_noise must be in [0, 1] (a fraction of T), got {noise}")
    if config.training.num_grid_samples or config.training.get("fid_every", 0):
        raise ValueError(
            "sample grids and FID during training draw samples without low-res inputs: set "
            "training.num_grid_samples=0 and training.fid_every=0 for a super-resolution "
            "config, and use --mode=upsample and --mode=eval on its checkpoints"
        )


def example_inputs(config: ml_collections.ConfigDict, model) -> dict:
    """Zero low-res keyword inputs of batch 1 for model.init ({} for other models)."""
    if not model.low_res_conditioned:
        return {}
    size = config.data.low_res_size
    inputs = {"low_res": jnp.zeros((1, size, size, config.data.num_channels), jnp.float32)}
    if model.low_res_noise_conditioned:
        inputs["low_res_level"] = jnp.zeros((1,), jnp.int32)
    return inputs


def noised_low_res(d: D.Diffusion, low_res, levels, noise) -> jax.Array:
    """low_res [B, h, w, C] in [-1, 1] at levels [B] (0: clean; s > 0: q_sample at s - 1).

    d must be the full T-step diffusion: a respaced one indexes other timesteps.
    """
    noisy = D.q_sample(d, low_res, jnp.maximum(levels - 1, 0), noise)
    return jnp.where((levels > 0)[:, None, None, None], noisy, low_res)


def training_inputs(model, d: D.Diffusion, batch, step_rng, global_index, max_level) -> dict:
    """The low-res keyword inputs of model.apply in a train step ({} for other models).

    batch['low_res']: uint8 [b, h, w, C]. With a noise-conditioned model, example i's
    level and noise are drawn from fold_in(step key + purpose, global index i), like its
    t and noise, so the step does not depend on the device count and resumes exactly.
    """
    if not model.low_res_conditioned:
        return {}
    low_res = images.to_model_range(batch["low_res"])
    if not model.low_res_noise_conditioned:
        return {"low_res": low_res}
    level_rng, noise_rng = jax.random.split(jax.random.fold_in(step_rng, LOW_RES_NOISE_PURPOSE))
    levels = samplers.per_example(
        level_rng, global_index, lambda k: jax.random.randint(k, (), 0, max_level + 1)
    )
    noise = samplers.per_example(
        noise_rng, global_index, lambda k: jax.random.normal(k, low_res.shape[1:])
    )
    return {"low_res": noised_low_res(d, low_res, levels, noise), "low_res_level": levels}


def sampling_inputs(model, d: D.Diffusion, low_res_uint8, keys, level: int) -> dict:
    """The low-res keyword inputs at sampling: clean, or noised to the fixed `level`.

    low_res_uint8 [B, h, w, C]; keys [B] the samples' keys (the noise of sample i's
    input is drawn from fold_in(keys[i], SAMPLE_LOW_RES_NOISE_PURPOSE)).
    """
    low_res = images.to_model_range(low_res_uint8)
    if not model.low_res_noise_conditioned:
        return {"low_res": low_res}
    levels = jnp.full(low_res.shape[:1], level, jnp.int32)
    noise = jax.vmap(
        lambda k: jax.random.normal(
            jax.random.fold_in(k, SAMPLE_LOW_RES_NOISE_PURPOSE), low_res.shape[1:]
        )
    )(keys)
    return {"low_res": noised_low_res(d, low_res, levels, noise), "low_res_level": levels}


def denoiser(model, params, low_res_inputs: dict) -> D.DenoiseFn:
    """The network in eval mode, conditioned on low_res_inputs, as denoise_fn (x_t, t)."""
    return lambda x, t: model.apply({"params": params}, x, t, train=False, **low_res_inputs)


# ---------------------------------------------------------------------------- host side


def area_downsample_uint8(images_uint8: np.ndarray, low_res_size: int) -> np.ndarray:
    """uint8 [N, S, S, C] -> uint8 [N, s, s, C]: the pipeline's low-res images (the mean of
    each k x k block, k = S / s, rounded half to even)."""
    size = images_uint8.shape[1]
    if size % low_res_size:
        raise ValueError(f"cannot area-downsample {size}x{size} images to {low_res_size}: "
                         "the size must be an integer multiple")  # fmt: skip
    return np.round(sr.area_mean(images_uint8, size // low_res_size)).astype(np.uint8)


def bicubic_upsample(low_res_uint8: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, h, w, C] -> uint8 [N, size, size, C]: the model's own bicubic upsampling
    (jax.image.resize, Keys a = -0.5), clipped and rounded: the baseline of the metrics."""
    low_res = images.to_model_range(low_res_uint8)
    shape = (low_res.shape[0], size, size, low_res.shape[-1])
    return images.to_uint8(jax.image.resize(low_res, shape, "bicubic"))
