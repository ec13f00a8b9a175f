"""--mode=inpaint: fill masked regions of real images with a trained or converted model.

The newest checkpoint's EMA weights fill `inpaint.num_images` images of `inpaint.source`
under `inpaint.mask` by `inpaint.method` ('repaint' or 'replace', ddpm/inpainting.py),
with the reverse step of `sampling.method` (DDPM or DDIM, sampling.eta,
sampling.clip_denoised) over a chain respaced to `inpaint.num_steps`. A conditional
model is run unconditionally (the null label). Work is done in chunks of
sampling.batch_size, cached on disk, so an interrupted job resumes; the output folder's
name carries a hash of every setting that changes the result.
"""

import json

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from ddpm import evaluation, images, inpainting, input_pipeline, masks, npz, samplers, sampling

INPAINT_PURPOSE = 103  # fold_in purpose of the run's key (see evaluation's purposes)
GRID_IMAGES, GRID_TRIPLETS_PER_ROW = 32, 4


def check_config(config: ml_collections.ConfigDict) -> list[int]:
    """Validates the inpaint settings before anything loads or compiles; the time list."""
    c = config.inpaint
    if c.num_images < 1:
        raise ValueError(f"inpaint.num_images must be >= 1, got {c.num_images}")
    # Checks method and steps; the plan walks the chain it makes, whose length can differ
    # from inpaint.num_steps (0: all T; DDIM's uniform stride when it does not divide T).
    chain_length = sampling.sampling_diffusion(config, "inpaint.num_steps").num_timesteps
    if c.source and not epath.Path(c.source).is_dir():
        raise ValueError(f"inpaint.source={c.source!r} is not a folder of images")
    if c.mask not in masks.KINDS and not epath.Path(c.mask).is_dir():
        raise ValueError(f"inpaint.mask={c.mask!r} must be one of {masks.KINDS} or a folder")
    return inpainting.inpaint_times(c.method, chain_length, c.jump_length, c.jump_n_sample)


def make_inpainter(config, model, times, devices=None):
    """(params, keys [N], images uint8 [N, H, W, C], masks [N, H, W, 1]) -> uint8 results."""
    d = sampling.sampling_diffusion(config, "inpaint.num_steps")
    c = config.sampling

    def fill(params, keys, originals, mask):
        denoise_fn = sampling.denoiser(model, params)
        step = samplers.reverse_step(
            d, denoise_fn, c.method, eta=c.eta, clip_denoised=c.clip_denoised
        )
        x0 = images.to_model_range(originals)
        return inpainting.inpaint(d, step, keys, x0, mask, times)

    mapped = sampling.over_devices(fill, num_replicated=1, devices=devices)
    return lambda params, keys, originals, mask: images.to_uint8(
        mapped(params, keys, originals, mask)
    )


def source_images(config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions [n], uint8 images [n, S, S, C], labels [n]) to inpaint.

    inpaint.num_images of the source: all of them in stored order if it has no more,
    else a fixed random subset (seed 0) in stored order, so every run sees the same ones.
    """
    c, data = config.inpaint, config.data
    if c.source:
        data = ml_collections.ConfigDict({**data.to_dict(), "source": "folder", "path": c.source})
    found, labels = input_pipeline.load_examples(data, c.split)
    positions = np.arange(len(found))
    if len(found) > c.num_images:
        positions = np.sort(np.random.default_rng(0).permutation(len(found))[: c.num_images])
    return positions, found[positions], labels[positions]


def _settings(config) -> dict:
    """Everything that changes the results, for the output folder's hash."""
    return {
        "inpaint": config.inpaint.to_dict(),
        "sampling": {
            k: config.sampling[k] for k in ("method", "eta", "clip_denoised", "batch_size")
        },
        "data": {k: config.data[k] for k in ("source", "dataset", "path", "image_size")},
        "seed": config.seed,
    }


def output_dir(config, workdir, step) -> epath.Path:
    """workdir/inpaint_step<N>_<method><steps>_<mask>_<hash of the settings>."""
    c = config.inpaint
    digest = evaluation.settings_digest(_settings(config))
    mask = c.mask if c.mask in masks.KINDS else epath.Path(c.mask).name
    return epath.Path(workdir) / f"inpaint_step{step}_{c.method}{c.num_steps}_{mask}_{digest}"


def save_grid(originals, mask, results, path) -> None:
    """Rows of (original, masked input with unknown pixels grey, result), first images."""
    n = min(len(originals), GRID_IMAGES)
    masked = np.where(mask[:n] > 0, originals[:n], np.uint8(128))
    triplets = np.stack([originals[:n], masked, results[:n]], axis=1)  # [n, 3, H, W, C]
    columns = 3 * min(n, GRID_TRIPLETS_PER_ROW)
    images.save_grid(triplets.reshape(-1, *originals.shape[1:]), path, columns=columns)


def filled_mse(originals, mask, results) -> float:
    """Mean squared error over the filled (mask 0) pixels, with pixels in [0, 1]."""
    error = (results.astype(np.float64) - originals) / 255.0
    return float(np.mean(error[mask[..., 0] == 0] ** 2))


def inpaint(config: ml_collections.ConfigDict, workdir) -> dict:
    """--mode=inpaint: writes inpainted.npz and grid.png; returns the npz's arrays."""
    times = check_config(config)
    positions, originals, labels = source_images(config)
    size = config.data.image_size
    mask = masks.make_masks(config.inpaint.mask, np.arange(len(originals)), size, seed=config.seed)
    model, params, step = evaluation.load_ema_params(config, workdir)
    out_dir = output_dir(config, workdir, step)
    inpainter = make_inpainter(config, model, times)
    rng = jax.random.fold_in(jax.random.key(config.seed), INPAINT_PURPOSE)

    def draw(mine):
        return inpainter(params, samplers.sample_keys(rng, mine), originals[mine], mask[mine])

    results = np.concatenate(
        list(evaluation.chunks(config, draw, len(originals), out_dir / "chunks", "inpainting"))
    )
    mse = filled_mse(originals, mask, results)
    out = {"positions": positions, "originals": originals, "masks": mask.astype(np.uint8),
           "results": results, "labels": labels}  # fmt: skip
    if jax.process_index() == 0:
        npz.save(out_dir / "inpainted.npz", **out)
        save_grid(originals, mask, results, out_dir / "grid.png")
        (out_dir / "settings.json").write_text(json.dumps(_settings(config), indent=2))
        logging.info(
            "Inpainted %d images (%d reverse steps each) into %s; MSE in the filled region %.5f",
            len(results), int(np.sum(np.diff(times) < 0)), out_dir, mse,
        )  # fmt: skip
    return out
