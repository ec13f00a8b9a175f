"""The configured sampler: config.sampling and a model -> one compiled chain over all devices.

`make_sampler` is what --mode=sample, evaluation, training's sample grids and FID draw
with; its pieces (the network as a denoise_fn, with or without guidance, the respaced
diffusion the chain walks, spreading examples over devices) serve the other jobs'
chains (inpainting, upsampling, text-to-image). The chains themselves are in
samplers.py; evaluation.py holds the jobs that run them and cache their results, and
the data and TensorFlow that those need: nothing here imports TensorFlow.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm import diffusion as D
from ddpm import guidance, images, latent, samplers
from ddpm.factories import create_diffusion, latent_shape, uses_text


def denoiser(model, params, labels=None) -> D.DenoiseFn:
    """The network in eval mode (no dropout) as a denoise_fn (x_t, t) -> output.

    A class-conditional network is told `labels` [B] (None: the null label).
    """
    return lambda x, t: model.apply({"params": params}, x, t, labels, train=False)


def guided_denoiser(model, params, labels, guidance_scale, mean_channels,
                    null=None) -> D.DenoiseFn:  # fmt: skip
    """The class-conditional network in eval mode with classifier-free guidance of weight w.

    null: the unconditional input (default: the null label num_classes).
    """
    return guidance.guided_denoiser(
        lambda x, t, y: model.apply({"params": params}, x, t, y, train=False),
        labels,
        jnp.full_like(labels, model.num_classes) if null is None else null,
        guidance_scale,
        mean_channels=mean_channels,
    )


def check_conditioning(config) -> None:
    """Guidance settings that the model cannot take: a clear error before anything compiles."""
    c = config.sampling
    if config.model.num_classes:
        guidance.parse_labels(c.labels, config.model.num_classes)
        return
    if c.guidance_scale:
        raise ValueError(
            f"sampling.guidance_scale={c.guidance_scale} needs a class-conditional model "
            "(model.num_classes > 0)"
        )
    if str(c.labels).strip():
        raise ValueError(
            f"sampling.labels={c.labels!r} needs a class-conditional model (model.num_classes > 0)"
        )


def sampling_diffusion(config, num_steps_field: str = "sampling.num_steps") -> D.Diffusion:
    """The diffusion the sampler walks: all T steps, or a respaced subset of them.

    The chain's length is the config field `num_steps_field` (0 means all T).
    """
    c, T = config.sampling, config.diffusion.num_timesteps
    section, field = num_steps_field.split(".")
    num_steps = config[section][field] or T
    if not 1 <= num_steps <= T:
        raise ValueError(f"{num_steps_field} must be in [1, {T}] (or 0 for all), got {num_steps}")
    if c.method == "ddim":
        return create_diffusion(config, use_timesteps=samplers.ddim_timesteps(T, num_steps))
    if c.method == "ddpm":
        steps = None if num_steps == T else D.space_timesteps(T, [num_steps])
        return create_diffusion(config, use_timesteps=steps)
    raise ValueError(f"sampling.method must be 'ddpm' or 'ddim', got {c.method!r}")


def over_devices(fn: Callable, num_replicated: int, devices=None) -> Callable:
    """fn pmapped over devices; the result takes per-example arrays [n, ...] of any n.

    The first `num_replicated` arguments go to every device whole; the others are split
    over the devices along their first axis, after padding n to a multiple of the device
    count by repeating examples. Work is per example, so padding and dropping the extras
    leaves the real results unchanged. Returns fn's output [n, ...].
    """
    devices = devices or jax.local_devices()
    mapped = None

    def run(*args):
        nonlocal mapped
        if mapped is None:
            in_axes = (None,) * num_replicated + (0,) * (len(args) - num_replicated)
            mapped = jax.pmap(fn, in_axes=in_axes, devices=devices)
        per_example = args[num_replicated:]
        n = len(per_example[0])
        index = np.arange(n + -n % len(devices)) % n
        split = [a[index].reshape(len(devices), -1, *a.shape[1:]) for a in per_example]
        out = mapped(*args[:num_replicated], *split)
        return out.reshape(-1, *out.shape[2:])[:n]

    return run


def make_sampler(config: ml_collections.ConfigDict, model, devices=None, autoencoder=None
                 ) -> Callable:  # fmt: skip
    """(params, keys [N], labels [N] | None, guidance_scale=None) -> uint8 [N, H, W, C].

    N is spread over the local devices. A class-conditional model samples `labels` (None:
    the null label) with classifier-free guidance of weight `guidance_scale` (default
    sampling.guidance_scale), a traced value: another w reuses the compiled chain.

    Latent diffusion (autoencoder: latent.Frozen): the chain runs on latents, decoded at
    the end. A prompt-conditioned model takes labels (each becomes its class's prompt in
    a phrasing drawn from the sample's key) or token ids [N, L] (free prompts); its
    unconditional input is the empty prompt.
    """
    check_conditioning(config)
    d = sampling_diffusion(config)
    shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    clip = config.sampling.clip_denoised
    table = None
    if autoencoder is not None:
        shape = latent_shape(config)
        table = latent.prompt_table(config) if uses_text(config) else None

    def sample(params, frozen, guidance_scale, keys, labels):
        null = None
        if table is not None:
            if labels.ndim == 1:  # class labels -> their prompts' token ids
                labels = latent.prompt_ids(table, labels, keys)
            null = jnp.broadcast_to(table[-1, 0], labels.shape)  # the empty prompt
        if model.num_classes:
            denoise_fn = guided_denoiser(model, params, labels, guidance_scale, shape[-1], null)
        else:
            denoise_fn = denoiser(model, params)
        method, eta = config.sampling.method, config.sampling.eta
        x = samplers.sample(d, denoise_fn, keys, shape, method, eta=eta, clip_denoised=clip)
        return x if autoencoder is None else autoencoder.decode(frozen, x)

    mapped = over_devices(sample, num_replicated=3, devices=devices)
    frozen = None if autoencoder is None else autoencoder.params

    def run(params, keys, labels=None, guidance_scale=None):
        if labels is not None and not model.num_classes:
            raise ValueError("labels given, but the model is unconditional (model.num_classes=0)")
        if guidance_scale is None:
            guidance_scale = config.sampling.guidance_scale
        if labels is None:
            labels = np.full(len(keys), model.num_classes or 0, np.int32)
        out = mapped(params, frozen, np.float32(guidance_scale), keys, np.asarray(labels, np.int32))
        return images.to_uint8(out)

    return run
