"""Stage 1 of latent diffusion: training the KL autoencoder (config.pipeline 'autoencoder',
configs/mnist_autoencoder.py) with train.py's loop, and its figures (--mode=eval).

The loss of an image is LDM's (LPIPSWithDiscriminator with its perceptual and adversarial
terms off and its learned log-variance at 0): the reconstruction error summed over
pixels (|x - x^|, or squared) plus kl_weight * KL(q(z|x) || N(0, I)) summed over the
latent, averaged over the batch. The decoder sees a posterior sample z = mean + std *
noise, example i's noise drawn from (step, global index i), as every random choice of
training is. When training reaches training.num_train_steps, the latent scale (1 / std
of the posterior samples of a fixed set of training images, LDM's scale_by_std) is
written next to the final checkpoint (latent.SCALE_FILE).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from ddpm import (
    data_sources,
    eval_job,
    evaluation,
    images,
    input_pipeline,
    latent,
    samplers,
    sampling,
    updates,
)
from ddpm.metrics import classifier, fid, sr
from ddpm.models.autoencoder import (
    AutoencoderKL,
    gaussian_kl_to_standard_normal,
    gaussian_sample,
)

# fold_in purpose of the run's key for the posterior samples of the scale.
SCALE_PURPOSE = 105
LOSSES = ("l1", "l2")


def reconstruction_error(x, reconstruction, kind: str) -> jax.Array:
    """Per image [B]: sum over pixels of |x - x^| ('l1') or (x - x^)^2 ('l2')."""
    diff = reconstruction - x
    error = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
    return error.reshape(error.shape[0], -1).sum(axis=1)


def posterior_sample(model: AutoencoderKL, params, x, rng, global_index):
    """(z, (mean, logvar)) for images x in [-1, 1]: z = mean + std * noise, example i's noise
    drawn from fold_in(rng, global index i)."""
    mean, logvar = model.apply({"params": params}, x, method=AutoencoderKL.encode)
    noise = samplers.per_example(rng, global_index, lambda k: jax.random.normal(k, mean.shape[1:]))
    return gaussian_sample(mean, logvar, noise), (mean, logvar)


def train_step(state, batch, rng, frozen=None, *, model: AutoencoderKL, tx, ema_decay,
               ema_warmup, kl_weight, loss):  # fmt: skip
    """One update on this device's share of the batch (under pmap 'batch'); `frozen` unused.

    Metrics: loss, and the batch means of the reconstruction error and the KL.
    """
    del frozen
    per_device = batch["image"].shape[0]
    global_index = jax.lax.axis_index("batch") * per_device + jnp.arange(per_device)
    x = images.to_model_range(batch["image"])
    step_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        z, (mean, logvar) = posterior_sample(model, params, x, step_rng, global_index)
        reconstruction = model.apply({"params": params}, z, method=AutoencoderKL.decode)
        error = reconstruction_error(x, reconstruction, loss)
        kl = gaussian_kl_to_standard_normal(mean, logvar)
        return jnp.mean(error + kl_weight * kl), {"reconstruction": error.mean(), "kl": kl.mean()}

    (value, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return updates.apply_gradients(state, (value, grads), tx=tx, ema_decay=ema_decay,
                                   ema_warmup=ema_warmup, extra=aux)  # fmt: skip


def check_config(config) -> None:
    a = config.autoencoder
    if a.loss not in LOSSES:
        raise ValueError(f"autoencoder.loss must be one of {LOSSES}, got {a.loss!r}")
    if a.kl_weight < 0:
        raise ValueError(f"autoencoder.kl_weight must be >= 0, got {a.kl_weight}")
    if config.training.fid_every:
        raise ValueError("training.fid_every: an autoencoder draws no samples; use --mode=eval")
    if config.model.num_classes:
        raise ValueError("model.num_classes: the autoencoder is not class-conditional; set 0")


def fixed_examples(data, split: str, num: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [n, S, S, C], labels [n]): the split's first `num` of a fixed random
    order (seed 0), so every job and every process sees the same ones."""
    total = data_sources.num_examples(data, split)
    positions = np.sort(np.random.default_rng(0).permutation(total)[:num])
    return input_pipeline.load_examples(data, split, positions=positions)


def make_reconstructor(model: AutoencoderKL, devices=None):
    """(params, uint8 images [N, H, W, C]) -> uint8 reconstructions from the posterior mean."""

    def reconstruct(params, x):
        mean, _ = model.apply({"params": params}, images.to_model_range(x),
                              method=AutoencoderKL.encode)  # fmt: skip
        return model.apply({"params": params}, mean, method=AutoencoderKL.decode)

    mapped = sampling.over_devices(reconstruct, num_replicated=1, devices=devices)
    return lambda params, x: images.to_uint8(mapped(params, np.asarray(x)))


def latent_scale(config, model: AutoencoderKL, params) -> tuple[float, int]:
    """(1 / std of posterior samples, images used): LDM's scale_by_std, over the first
    autoencoder.scale_examples images of data.train_split in a fixed random order."""
    x, _ = fixed_examples(config.data, config.data.train_split, config.autoencoder.scale_examples)
    rng = jax.random.fold_in(jax.random.key(config.seed), SCALE_PURPOSE)

    def sample(params, x, index):
        return posterior_sample(model, params, images.to_model_range(x), rng, index)[0]

    mapped = sampling.over_devices(sample, num_replicated=1)
    z = np.concatenate([
        np.asarray(mapped(params, x[s : s + 256], np.arange(s, min(s + 256, len(x)))))
        for s in range(0, len(x), 256)
    ])  # fmt: skip
    return float(1.0 / np.std(z.astype(np.float64), ddof=1)), len(x)


def training_task(config, model: AutoencoderKL, tx, workdir) -> updates.Task:
    """What train.py's loop runs for pipeline 'autoencoder': the step, grids, the scale."""
    check_config(config)
    a = config.autoencoder
    step = functools.partial(train_step, model=model, tx=tx, ema_decay=config.training.ema_decay,
                             ema_warmup=config.training.ema_warmup, kl_weight=a.kl_weight,
                             loss=a.loss)  # fmt: skip
    originals = None
    if config.training.num_grid_samples:
        originals, _ = fixed_examples(config.data, config.data.train_split,
                                      config.training.num_grid_samples)  # fmt: skip
    reconstruct = make_reconstructor(model)

    def write_grid(state, step_number, logger):
        """Rows of 8 originals, each followed by the row of their reconstructions (EMA)."""
        recon = reconstruct(state.ema_params, originals)
        rows = [part for s in range(0, len(originals), 8)
                for part in (originals[s : s + 8], recon[s : s + 8])]  # fmt: skip
        rows = [np.concatenate([r, np.zeros((8 - len(r), *r.shape[1:]), r.dtype)]) for r in rows]
        if jax.process_index() == 0:
            path = epath.Path(workdir) / "samples" / f"step_{step_number:08d}.png"
            grid = images.save_grid(np.concatenate(rows), path, columns=8)
            logger.image(step_number, "reconstructions", grid)

    def finish(state):
        scale, count = latent_scale(config, model, state.ema_params)
        latent.write_scale(workdir, int(state.step), scale, count)
        logging.info("Latent scale %.5f (1 / std of %d images' latents) for step %d",
                     scale, count, int(state.step))  # fmt: skip

    return updates.Task(
        make_step=lambda steps: updates.pmap_step(step, steps=steps),
        write_grid=write_grid,
        finish=finish,
    )


def evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """--mode=eval: the EMA autoencoder's reconstructions of eval.num_samples images of
    eval.split (posterior mean): PSNR, FID against the split's statistics (and the same
    images' own FID, the floor at this count), and, with eval.class_accuracy, the
    accuracy of a digit classifier on them and on the originals."""
    workdir = epath.Path(workdir)
    model, params, step = evaluation.load_ema_params(config, workdir)
    originals, labels = fixed_examples(config.data, config.eval.split, config.eval.num_samples)
    reconstruct = make_reconstructor(model)
    recon = np.concatenate([reconstruct(params, originals[s : s + 250])
                            for s in range(0, len(originals), 250)])  # fmt: skip
    results = {
        "step": step,
        "num_images": len(originals),
        "split": config.eval.split,
        "psnr": float(np.mean(sr.psnr(recon, originals))),
        "scale_factor": latent.read_scale(workdir, step),
    }
    extractor = evaluation.FeatureExtractor(config.eval.inception_weights, workdir / "inception")
    reference = evaluation.reference_statistics(config, extractor, workdir)
    for name, batch in (("fid", recon), ("fid_of_originals", originals)):
        statistics = fid.feature_statistics(extractor(batch)[0])
        results[name] = fid.frechet_distance(*statistics, *reference)
    if config.eval.class_accuracy:
        num_classes = int(labels.max()) + 1
        scorer = evaluation.load_or_train_classifier(config, workdir, num_classes=num_classes)
        for name, batch in (("class_accuracy", recon), ("class_accuracy_of_originals", originals)):
            results[name] = classifier.accuracy(scorer.predict(batch), labels, num_classes)[0]
        results["classifier_held_out_accuracy"] = scorer.held_out_accuracy
    name = f"eval_step{step}_autoencoder_{evaluation.settings_digest(config.eval.to_dict())}"
    eval_job.write_results(workdir, name, results)
    logging.info("Autoencoder at step %d: %s", step, results)
    return results
