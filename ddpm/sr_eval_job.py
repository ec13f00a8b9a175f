"""--mode=eval of a super-resolution config: PSNR, SSIM, consistency and FID against bicubic.

Upsamples the images of upsample.split (upsample_job, the same cached chunks and
outputs as --mode=upsample), then scores against the originals (ddpm/metrics/sr.py):
  bicubic                the low-res input, bicubic-upsampled (the model's own resize);
  sample                 the first of each image's samples;
  mean_of_<k>_samples    the pixel mean of its k samples (upsample.samples_per_image > 1),
                         rounded to uint8: closer to the posterior mean, so better PSNR
                         and worse FID than one sample.
FID: the project's Inception (eval.inception_weights), each set of n images against the
n originals themselves. Results go to the console and <workdir>/<name>.json, with <name>
naming the checkpoint step, the sampler and a hash of every setting.
"""

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from ddpm import eval_job, evaluation, upsample_job
from ddpm.metrics import fid, sr


def check_config(config: ml_collections.ConfigDict) -> None:
    """The eval settings the job cannot run with, before anything loads or compiles."""
    upsample_job.check_config(config)
    if config.upsample.source:
        raise ValueError(
            f"--mode=eval of a super-resolution config needs the originals, but "
            f"upsample.source={config.upsample.source!r} is a folder of low-res images: set "
            "--config.upsample.source='' to evaluate on the data's upsample.split"
        )


def features(extractor: evaluation.FeatureExtractor, images_uint8, batch_size: int):
    """Inception pool features [N, 2048] of uint8 images [N, H, W, C], batch by batch."""
    batches = range(0, len(images_uint8), batch_size)
    return np.concatenate([extractor(images_uint8[i : i + batch_size])[0] for i in batches])


def candidates(out: dict) -> dict[str, np.ndarray]:
    """{name: uint8 [n, S, S, C]} of what is scored, from upsample_job.upsample's arrays."""
    results = out["results"]  # [n, k, S, S, C]
    found = {"bicubic": out["bicubic"], "sample": results[:, 0]}
    if results.shape[1] > 1:
        mean = np.round(results.astype(np.float64).mean(axis=1)).astype(np.uint8)
        found[f"mean_of_{results.shape[1]}_samples"] = mean
    return found


def evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """--mode=eval for data.low_res_size > 0; returns (and writes) the results dict."""
    check_config(config)
    workdir = epath.Path(workdir)
    # Loaded first: missing Inception weights fail before any sample is drawn.
    extractor = evaluation.FeatureExtractor(config.eval.inception_weights, workdir / "inception")
    out = upsample_job.upsample(config, workdir)
    originals, batch = out["originals"], config.eval.batch_size
    reference = features(extractor, originals, batch)
    settings = {**upsample_job.settings(config), "inception": config.eval.inception_weights}
    sampler = evaluation.sampler_name(config)
    results = {
        "step": int(out["step"]),
        "sampler": sampler,
        "num_images": len(originals),
        "samples_per_image": config.upsample.samples_per_image,
        "sizes": f"{config.data.low_res_size} -> {config.data.image_size}",
        "settings": settings,
    }
    for name, found in candidates(out).items():
        scores = sr.scores(found, originals, out["low_res"])
        scores["fid"] = fid.frechet_distance_from_features(
            features(extractor, found, batch), reference
        )
        results[name] = scores
        logging.info("%s: %s", name, scores)
    name = f"eval_step{results['step']}_{sampler}_{evaluation.settings_digest(settings)}"
    eval_job.write_results(workdir, name, results)
    logging.info("Wrote %s", workdir / f"{name}.json")
    return results
