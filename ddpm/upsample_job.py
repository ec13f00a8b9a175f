"""--mode=upsample: super-resolve low-res images with a trained super-resolution model.

A super-resolution config (data.low_res_size > 0) upsamples `upsample.num_images` images
of `upsample.source`: a folder of low-res images, each exactly low_res_size square, or
(empty) the data's split `upsample.split` area-downsampled on the fly, so the originals
are known. Each image gets `upsample.samples_per_image` independent samples from the
newest checkpoint's EMA weights, by sampling.method (DDPM or DDIM, sampling.num_steps,
sampling.eta, sampling.clip_denoised). Sample j (image j // samples_per_image) uses the
key fold_in(key, j) alone, so results do not depend on the device count. Work is done in
chunks of sampling.batch_size, cached on disk, so an interrupted job resumes; the output
folder's name carries a hash of every setting that changes the result.
"""

import json
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from ddpm import (
    data_sources,
    evaluation,
    images,
    input_pipeline,
    npz,
    samplers,
    sampling,
    super_resolution,
)
from ddpm.factories import create_diffusion

UPSAMPLE_PURPOSE = 105  # fold_in purpose of the run's key (see evaluation's purposes)
GRID_IMAGES, GRID_SAMPLES = 16, 4


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates the upsample settings before anything loads or compiles."""
    if not super_resolution.is_super_resolution(config):
        raise ValueError(
            "--mode=upsample needs a super-resolution config (data.low_res_size > 0), e.g. "
            "configs/mnist_sr.py"
        )
    super_resolution.check_config(config)
    c = config.upsample
    if c.num_images < 1:
        raise ValueError(f"upsample.num_images must be >= 1, got {c.num_images}")
    if c.samples_per_image < 1:
        raise ValueError(f"upsample.samples_per_image must be >= 1, got {c.samples_per_image}")
    sampling.sampling_diffusion(config)  # checks sampling.method and num_steps
    if c.source and not epath.Path(c.source).is_dir():
        raise ValueError(f"upsample.source={c.source!r} is not a folder of images")
    level, num_timesteps = c.low_res_noise_level, config.diffusion.num_timesteps
    if level and not config.model.low_res_noise:
        raise ValueError(
            f"upsample.low_res_noise_level={level} needs a noise-conditioned model "
            "(model.low_res_noise > 0)"
        )
    if not 0 <= level <= num_timesteps:
        raise ValueError(f"upsample.low_res_noise_level must be in [0, {num_timesteps}], "
                         f"got {level}")  # fmt: skip


class Inputs(NamedTuple):
    """What is upsampled: n images of the source, in stored order."""

    positions: np.ndarray  # int [n]: positions in the source
    low_res: np.ndarray  # uint8 [n, s, s, C]
    originals: np.ndarray | None  # uint8 [n, S, S, C] for a data split; None for a folder
    labels: np.ndarray | None  # int32 [n] for a data split


def _chosen(count: int, num_images: int) -> np.ndarray:
    """All positions if there are no more than num_images, else a fixed random subset
    (seed 0) in stored order, so every run sees the same images."""
    if count <= num_images:
        return np.arange(count)
    return np.sort(np.random.default_rng(0).permutation(count)[:num_images])


def read_low_res_folder(path: str, size: int, num_channels: int, num_images: int) -> Inputs:
    """The folder's images (sorted by path, a fixed subset if more) as uint8 [n, s, s, C].

    An image that is not size x size is an error naming the file: a wrong size means a
    wrong model or a wrong folder, and silently resizing it would hide that.
    """
    paths, _ = data_sources.list_images(path)
    positions = _chosen(len(paths), num_images)
    mode = "L" if num_channels == 1 else "RGB"
    found = []
    for position in positions:
        with epath.Path(paths[position]).open("rb") as f, Image.open(f) as image:
            if image.size != (size, size):
                raise ValueError(
                    f"{paths[position]} is {image.size[0]}x{image.size[1]}, but the model "
                    f"upsamples {size}x{size} images (data.low_res_size={size}): every "
                    "upsample.source image must be that size"
                )
            found.append(np.asarray(image.convert(mode), np.uint8).reshape(size, size, -1))
    return Inputs(positions, np.stack(found), None, None)


def source_inputs(config: ml_collections.ConfigDict) -> Inputs:
    """upsample.source's low-res images, or upsample.split's images area-downsampled."""
    c, data = config.upsample, config.data
    if c.source:
        return read_low_res_folder(c.source, data.low_res_size, data.num_channels, c.num_images)
    originals, labels = input_pipeline.load_examples(data, c.split)
    positions = _chosen(len(originals), c.num_images)
    originals = originals[positions]
    low_res = super_resolution.area_downsample_uint8(originals, data.low_res_size)
    return Inputs(positions, low_res, originals, labels[positions])


def make_upsampler(config: ml_collections.ConfigDict, model, devices=None):
    """(params, keys [N], low_res uint8 [N, s, s, C]) -> uint8 results [N, S, S, C]."""
    d = sampling.sampling_diffusion(config)
    full = create_diffusion(config)  # the augmentation noise uses the unrespaced schedule
    c, level = config.sampling, config.upsample.low_res_noise_level
    shape = (config.data.image_size, config.data.image_size, config.data.num_channels)

    def upsample(params, keys, low_res):
        inputs = super_resolution.sampling_inputs(model, full, low_res, keys, level)
        denoise_fn = super_resolution.denoiser(model, params, inputs)
        return samplers.sample(
            d, denoise_fn, keys, shape, c.method, eta=c.eta, clip_denoised=c.clip_denoised
        )

    mapped = sampling.over_devices(upsample, num_replicated=1, devices=devices)
    return lambda params, keys, low_res: images.to_uint8(mapped(params, keys, low_res))


def settings(config: ml_collections.ConfigDict) -> dict:
    """Everything besides the checkpoint that changes the results, for the folder's hash."""
    data_keys = ("source", "dataset", "path", "image_size", "num_channels", "low_res_size")
    return {
        **evaluation.sampling_settings(config),
        "upsample": config.upsample.to_dict(),
        "data": {k: config.data[k] for k in data_keys},
    }


def output_dir(config, workdir, step: int) -> epath.Path:
    """workdir/upsample_step<N>_<sampler>_<hash of the settings>."""
    digest = evaluation.settings_digest(settings(config))
    return epath.Path(workdir) / f"upsample_step{step}_{evaluation.sampler_name(config)}_{digest}"


def save_grid(inputs: Inputs, bicubic, results, path) -> None:
    """One row per image (the first GRID_IMAGES): the low-res input (pixels repeated to full
    size), bicubic, up to GRID_SAMPLES results, and the original when known."""
    n = min(len(bicubic), GRID_IMAGES)
    factor = bicubic.shape[1] // inputs.low_res.shape[1]
    blocky = inputs.low_res[:n].repeat(factor, axis=1).repeat(factor, axis=2)
    columns = [blocky, bicubic[:n], *results[:n, :GRID_SAMPLES].transpose(1, 0, 2, 3, 4)]
    if inputs.originals is not None:
        columns.append(inputs.originals[:n])
    rows = np.stack(columns, axis=1)  # [n, columns, S, S, C]
    images.save_grid(rows.reshape(-1, *rows.shape[2:]), path, columns=len(columns))


def upsample(config: ml_collections.ConfigDict, workdir) -> dict:
    """--mode=upsample: writes upsampled.npz and grid.png; returns the npz's arrays.

    The npz holds positions [n], low_res [n, s, s, C], bicubic [n, S, S, C], results
    [n, samples_per_image, S, S, C] (uint8), the checkpoint's step, and originals and
    labels for a data split.
    """
    check_config(config)
    inputs = source_inputs(config)
    model, params, step = evaluation.load_ema_params(config, workdir)
    out_dir = output_dir(config, workdir, step)
    upsampler = make_upsampler(config, model)
    rng = jax.random.fold_in(jax.random.key(config.seed), UPSAMPLE_PURPOSE)
    per_image = config.upsample.samples_per_image
    num = len(inputs.low_res) * per_image

    def draw(mine):
        return upsampler(params, samplers.sample_keys(rng, mine), inputs.low_res[mine // per_image])

    chunks = evaluation.chunks(config, draw, num, out_dir / "chunks", "upsampling")
    results = np.concatenate(list(chunks))
    results = results.reshape(len(inputs.low_res), per_image, *results.shape[1:])
    bicubic = super_resolution.bicubic_upsample(inputs.low_res, config.data.image_size)
    out = {"positions": inputs.positions, "low_res": inputs.low_res, "bicubic": bicubic,
           "results": results, "step": np.int64(step)}  # fmt: skip
    if inputs.originals is not None:
        out.update(originals=inputs.originals, labels=inputs.labels)
    if jax.process_index() == 0:
        npz.save(out_dir / "upsampled.npz", **out)
        save_grid(inputs, bicubic, out["results"], out_dir / "grid.png")
        (out_dir / "settings.json").write_text(json.dumps(settings(config), indent=2, default=str))
        logging.info("Upsampled %d images x %d samples into %s", len(bicubic), per_image, out_dir)
    return out
