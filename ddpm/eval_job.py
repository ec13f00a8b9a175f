"""--mode=eval: FID (and IS) of EMA samples, bits/dim of a data split, class accuracy.

Every input is checked before the first sample is drawn: the checkpoint, both splits,
the Inception weights and the reference statistics. Samples and bits/dim batches are
cached in folders named by a hash of every setting that changes them (evaluation.
settings_digest), so a rerun with another seed, sampler, batch size or clipping never
reuses a stale chunk, and the results file carries the same hash. Results are written
as they become available: FID first, then bits/dim.
"""

import copy
import json
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tqdm
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ddpm import data_sources, evaluation, images, input_pipeline, latent, samplers, sampling
from ddpm import diffusion as D
from ddpm.evaluation import BPD_PURPOSE, SAMPLE_PURPOSE
from ddpm.factories import create_diffusion
from ddpm.metrics import classifier, fid

TRAINING_FID_PURPOSE = 104  # fold_in purpose of the run's key (see evaluation's purposes)


def check_inputs(config: ml_collections.ConfigDict) -> None:
    """The splits that the job will read exist and the sampling settings are valid."""
    sampling.sampling_diffusion(config)
    sampling.check_conditioning(config)
    if config.pipeline == "latent" and config.eval.bpd_split:
        raise ValueError(
            "eval.bpd_split: a latent model's bound is on latents, not pixels, so it gives "
            "no bits/dim of images; set --config.eval.bpd_split=''"
        )
    fields = {"eval.bpd_split": config.eval.bpd_split}
    if config.eval.num_samples:
        fields["eval.split"] = config.eval.split
    for field, split in fields.items():
        if not split:
            continue
        try:
            data_sources.num_examples(config.data, split)
        except ValueError as error:
            raise ValueError(
                f"{field}={split!r} cannot be read from the data ({error}). Set --config.{field} "
                f"to a split of {config.data.dataset or config.data.path!r}"
                + (" or to '' to skip bits/dim." if field == "eval.bpd_split" else ".")
            ) from None


def bpd_batch_size(config) -> int:
    """eval.batch_size, or less when eval.bpd_num_examples needs fewer (whole devices)."""
    devices, limit = jax.device_count(), config.eval.bpd_num_examples
    if not limit:
        return config.eval.batch_size
    return min(config.eval.batch_size, -(-limit // devices) * devices)


def make_bpd_fn(config, model, devices=None) -> Callable:
    """pmap'd (params, uint8 images [devices, b, ...], key) -> total bits/dim [devices, b]."""
    d = create_diffusion(config)

    def bpd(params, image, rng):
        # A stochastic estimate (one x_t per term): each device draws its own noise.
        rng = jax.random.fold_in(rng, jax.lax.axis_index("batch"))
        x_start = images.to_model_range(image)
        return D.calc_bpd_loop(d, sampling.denoiser(model, params), x_start, rng).total_bpd

    return jax.pmap(bpd, axis_name="batch", in_axes=(None, 0, None), devices=devices)


def bits_per_dim(config, model, params, out_dir) -> tuple[float, int]:
    """(mean negative VLB in bits/dim, examples) over eval.bpd_split (calc_bpd_loop, eq. 5).

    Batch i's noise is fold_in(key, i) folded with the device: it depends on the batch
    size and the device count, so both name the cache folder.
    """
    bpd_fn = make_bpd_fn(config, model)
    rng = jax.random.fold_in(jax.random.key(config.seed), BPD_PURPOSE)
    limit, batch_size = config.eval.bpd_num_examples or None, bpd_batch_size(config)
    settings = {
        "split": config.eval.bpd_split, "batch_size": batch_size, "seed": config.seed,
        "devices": jax.device_count(), "diffusion": config.diffusion.to_dict(),
        "data": config.data.to_dict(),
    }  # fmt: skip
    cache = epath.Path(out_dir) / f"bpd_{evaluation.settings_digest(settings)}"
    batches = input_pipeline.create_eval_iter(
        config.data, split=config.eval.bpd_split, global_batch_size=batch_size
    )
    values = []
    for i, batch in enumerate(tqdm.tqdm(batches, desc="bits/dim", disable=jax.process_index())):
        if limit and sum(len(v) for v in values) >= limit:
            break

        def compute(batch=batch, i=i):
            bpd = bpd_fn(params, batch["image"], jax.random.fold_in(rng, i))
            gathered = multihost_utils.process_allgather(
                {"bpd": np.asarray(bpd), "mask": batch["mask"]}, tiled=True
            )
            return {k: np.asarray(v).reshape(-1) for k, v in gathered.items()}

        chunk = evaluation._cached_chunk(cache / f"batch_{i:05d}.npz", compute)
        values.append(chunk["bpd"][chunk["mask"].astype(bool)])
    values = np.concatenate(values)[:limit]
    return float(np.mean(values)), len(values)


def training_fid(config: ml_collections.ConfigDict, model, workdir, autoencoder=None) -> Callable:
    """ema_params -> FID of training.fid_num_samples samples: the curve that training logs.

    DDIM (eta 0) with training.fid_num_steps steps, the same keys at every call (so the
    curve follows the model, not the noise), against the eval.split statistics. The
    Inception weights and reference statistics are loaded here, before training starts.
    """
    c = config.training
    if c.fid_num_samples < 2:
        raise ValueError(f"training.fid_num_samples must be >= 2, got {c.fid_num_samples}")
    fid_config = copy.deepcopy(config)
    fid_config.sampling.update(method="ddim", num_steps=c.fid_num_steps, eta=0.0)
    sampling.sampling_diffusion(fid_config)  # checks fid_num_steps
    workdir = epath.Path(workdir)
    extractor = evaluation.FeatureExtractor(config.eval.inception_weights, workdir / "inception")
    reference = evaluation.reference_statistics(config, extractor, workdir)
    sampler = sampling.make_sampler(fid_config, model, autoencoder=autoencoder)
    rng = jax.random.fold_in(jax.random.key(config.seed), TRAINING_FID_PURPOSE)

    def compute(ema_params) -> float:
        stats = fid.RunningStatistics(2048)
        for start in range(0, c.fid_num_samples, config.sampling.batch_size):
            index = np.arange(start, min(c.fid_num_samples, start + config.sampling.batch_size))
            labels = evaluation.labels_of(config, index)
            samples = sampler(ema_params, samplers.sample_keys(rng, index), labels)
            stats.update(extractor(samples)[0])
        return fid.frechet_distance(*stats.mean_and_covariance(), *reference)

    return compute


def results_name(config, step: int) -> str:
    """eval_step<N>_<sampler>_<hash of every setting that changes the results>."""
    settings = {**evaluation.sampling_settings(config), "eval": config.eval.to_dict()}
    digest = evaluation.settings_digest(settings)
    return f"eval_step{step}_{evaluation.sampler_name(config)}_{digest}"


def write_results(workdir, name: str, results: dict) -> None:
    """The JSON file, rewritten as results arrive (an interrupted job keeps what it had)."""
    if jax.process_index() == 0:
        path = epath.Path(workdir) / f"{name}.json"
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(results, indent=2))
        partial.replace(path)  # over the previous results, atomically (gs://: copy, delete)


def fid_of_samples(config, model, params, extractor, reference, out_dir, scorer=None,
                   autoencoder=None) -> dict:  # fmt: skip
    """FID (and IS, class accuracy) of eval.num_samples EMA samples against `reference`."""
    stats, logits, predicted = fid.RunningStatistics(2048), [], []
    rng = jax.random.fold_in(jax.random.key(config.seed), SAMPLE_PURPOSE)
    sampler = sampling.make_sampler(config, model, autoencoder=autoencoder)
    num = config.eval.num_samples
    for chunk in evaluation.sample_chunks(config, sampler, params, rng, num, out_dir):
        features, chunk_logits = extractor(chunk)
        stats.update(features)
        logits.append(chunk_logits)
        if scorer:
            predicted.append(scorer.predict(chunk))
    mu, sigma = stats.mean_and_covariance()
    results = {
        "fid": fid.frechet_distance(mu, sigma, *reference),
        "fid_num_samples": stats.count,
        "fid_reference_split": config.eval.split,
        "fid_num_reference": config.eval.num_reference or "all",
    }
    if extractor.has_logits:
        score, spread = fid.inception_score(np.concatenate(logits))
        results.update(inception_score=score, inception_score_std=spread)
    else:
        results["inception_score"] = None
        results["inception_score_note"] = extractor.no_logits_reason
        logging.warning("Inception score not computed: %s", extractor.no_logits_reason)
    if scorer:
        requested = evaluation.labels_of(config, np.arange(stats.count))
        overall, per_class = classifier.accuracy(
            np.concatenate(predicted), requested, config.model.num_classes
        )
        results.update(
            class_accuracy=overall,
            class_accuracy_per_class=per_class,
            classifier_held_out_accuracy=scorer.held_out_accuracy,
        )
    return results


def evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """--mode=eval: FID (and IS) of EMA samples and bits/dim of eval.bpd_split.

    Results go to the console, TensorBoard (workdir/eval/<name>) and <name>.json, with
    <name> from results_name.
    """
    workdir = epath.Path(workdir)
    model, params, step = evaluation.load_ema_params(config, workdir)
    check_inputs(config)
    name = results_name(config, step)
    out_dir = workdir / f"eval_step{step}"
    results = {"step": step, "sampler": evaluation.sampler_name(config)}
    if config.model.num_classes:
        results.update(guidance_scale=config.sampling.guidance_scale, labels=config.sampling.labels)
    results["settings"] = {**evaluation.sampling_settings(config), "eval": config.eval.to_dict()}
    if config.eval.num_samples:
        extractor = evaluation.FeatureExtractor(
            config.eval.inception_weights, workdir / "inception"
        )
        reference = evaluation.reference_statistics(config, extractor, workdir)
        scorer = None
        if config.eval.class_accuracy:
            scorer = evaluation.load_or_train_classifier(config, workdir)
        digest = evaluation.settings_digest(evaluation.sampling_settings(config))
        samples_dir = out_dir / f"samples_{results['sampler']}_{digest}"
        results.update(fid_of_samples(config, model, params, extractor, reference, samples_dir,
                                      scorer, latent.frozen_of(config, workdir)))  # fmt: skip
        write_results(workdir, name, results)
        logging.info("FID at step %d: %.4f", step, results["fid"])
    if config.eval.bpd_split:
        results["bpd"], results["bpd_num_examples"] = bits_per_dim(config, model, params, out_dir)
        write_results(workdir, name, results)
    logging.info("Evaluation at step %d: %s", step, results)
    if jax.process_index() == 0:
        with tf.summary.create_file_writer(str(workdir / "eval" / name)).as_default():
            for key, value in results.items():
                if isinstance(value, float):
                    tf.summary.scalar(key, value, step=step)
    return results
