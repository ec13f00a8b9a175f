"""Sampling (--mode=sample) and what evaluation shares: cached chunks, names, FID pieces.

Samples are drawn on all local devices of every host (the compiled sampler is built in
sampling.py). Sample i of a run uses the key fold_in(key, i) alone, so the images for a
given seed do not depend on the number of devices or hosts. Work is done in chunks that
are written to disk as soon as they are done (samples, and bits/dim of each test batch),
so an interrupted job resumes at the first unfinished chunk.
"""

import hashlib
import json
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ddpm import (
    checkpointing,
    data_sources,
    guidance,
    images,
    input_pipeline,
    latent,
    npz,
    samplers,
    sampling,
)
from ddpm.factories import create_model, init_params, uses_text
from ddpm.metrics import classifier, fid, inception

# fold_in purposes of the run's key, kept apart from training's.
SAMPLE_PURPOSE, BPD_PURPOSE = 101, 102


def labels_of(config, indices) -> np.ndarray | None:
    """int32 labels of global sample indices under sampling.labels; None if unconditional."""
    if not config.model.num_classes:
        return None
    return guidance.sample_labels(config.sampling.labels, config.model.num_classes, indices)


def conditions_of(config, indices) -> np.ndarray | None:
    """What the sampler is told for global sample indices: labels_of, or the token ids
    [n, L] of sampling.prompt (sample i: prompt i mod count) for a prompt-conditioned
    latent model given prompts."""
    spec = str(config.sampling.get("prompt", "")).strip()
    if not spec:
        return labels_of(config, indices)
    if not (config.pipeline == "latent" and uses_text(config)):
        raise ValueError(f"sampling.prompt={spec!r} needs a config with latent.condition='text'")
    from ddpm import text2image  # the prompt-file reader

    prompts = text2image.read_prompts(spec)
    return latent.make_tokenizer(config)(prompts)[np.asarray(indices) % len(prompts)]


def sampler_name(config) -> str:
    """e.g. 'ddpm1000' or 'ddim50_eta0.0': names the folders that samples are kept in."""
    c = config.sampling
    name = f"{c.method}{c.num_steps or config.diffusion.num_timesteps}"
    if c.method == "ddim":
        name += f"_eta{c.eta}"
    if config.model.get("num_classes"):
        labels = str(c.labels).strip()
        labels = "labels" + labels.replace(",", "-") if labels else "balanced"
        if str(c.get("prompt", "")).strip():  # a latent model told prompts (in the digest)
            labels = "prompts"
        name += f"_w{float(c.guidance_scale)}_{labels}"
    return name


def settings_digest(settings: dict) -> str:
    """10 hex digits of a hash of `settings` (JSON-able): names folders of cached work, so
    a run with any setting changed never reads another run's chunks or results."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def sampling_settings(config) -> dict:
    """Everything besides the checkpoint that changes the samples of sample_chunks."""
    keys = ("method", "num_steps", "eta", "clip_denoised", "batch_size", "guidance_scale", "labels",
            "prompt")  # fmt: skip
    return {
        "sampling": {k: config.sampling[k] for k in keys if k in config.sampling},
        "diffusion": config.diffusion.to_dict(),
        "data": {k: config.data[k] for k in ("image_size", "num_channels")},
        "seed": config.seed,
    }


def _cached_chunk(path: epath.Path, compute: Callable[[], dict], indices=None) -> dict:
    """Loads path (.npz) if an earlier run finished it; else computes it and saves it.

    With `indices`, a cached chunk is used only if it holds those global indices (it
    need not: the last chunk of a run with another count wraps around differently).
    """
    if path.exists():
        cached = npz.load(path)
        if indices is None or np.array_equal(cached.get("indices"), indices):
            return cached
        logging.info("%s holds other indices (another sample count): computing it again", path)
    result = compute()
    if indices is not None:
        result["indices"] = np.asarray(indices)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        npz.save(partial, **result)
        # Atomic: a crash never leaves a half-written chunk behind (on gs://, a copy then
        # a delete). replace, not rename: it overwrites a chunk of other indices.
        partial.replace(path)
    return result


def chunks(config, draw: Callable, num: int, out_dir, desc: str = "sampling") -> Iterator:
    """Yields draw(indices) [chunk, ...] for global indices 0..num-1, chunk by chunk.

    Chunks hold sampling.batch_size indices; each process draws its share of a chunk
    (`draw` takes this process's indices and returns a uint8 array for them), the chunk
    is gathered on every process and cached in out_dir, so a rerun resumes. out_dir must
    be named by everything else that changes `draw` (see settings_digest).
    """
    chunk = config.sampling.batch_size
    if chunk % jax.device_count():
        raise ValueError(
            f"sampling.batch_size={chunk} must be a multiple of the {jax.device_count()} devices"
        )
    per_process = chunk // jax.process_count()
    num_chunks = -(-num // chunk)
    for c in tqdm.trange(num_chunks, desc=desc, disable=jax.process_index() != 0):
        start = c * chunk
        # Indices past `num` (in the last chunk) are drawn from valid ones and dropped.
        mine = (start + jax.process_index() * per_process + np.arange(per_process)) % num
        every = (start + np.arange(chunk)) % num

        def compute(mine=mine):
            local = draw(mine)
            return {"images": np.asarray(multihost_utils.process_allgather(local, tiled=True))}

        path = epath.Path(out_dir) / f"chunk_{c:05d}.npz"
        result = _cached_chunk(path, compute, every)["images"]
        yield result[: min(chunk, num - start)]


def sample_chunks(config, sampler, params, rng, num_samples, out_dir) -> Iterator[np.ndarray]:
    """Yields uint8 samples [chunk, H, W, C] for indices 0..num_samples-1, chunk by chunk."""

    def draw(mine):
        return sampler(params, samplers.sample_keys(rng, mine), conditions_of(config, mine))

    return chunks(config, draw, num_samples, out_dir)


def load_ema_params(config, workdir):
    """(model, EMA params, step) of the newest checkpoint: the paper evaluates EMA weights.

    Only the EMA params are read: a run trained with another optimiser config serves too.
    The checkpoint's step names the outputs; a converted checkpoint is step 0.
    """
    model = create_model(config)
    abstract = jax.eval_shape(lambda: init_params(config, model, jax.random.key(0)))
    params, step = checkpointing.restore_ema_params(
        workdir, abstract,
        how_to_make_one="train first, or write one with --mode=convert",
    )  # fmt: skip
    return model, params, step


def sample(config: ml_collections.ConfigDict, workdir) -> np.ndarray:
    """--mode=sample: sampling.num_samples EMA samples as samples.npz and a PNG grid."""
    workdir = epath.Path(workdir)
    model, params, step = load_ema_params(config, workdir)
    c = config.sampling
    digest = settings_digest(sampling_settings(config))
    name = f"samples_step{step}_{sampler_name(config)}_seed{config.seed}_{digest}"
    out_dir = workdir / name
    rng = jax.random.fold_in(jax.random.key(config.seed), SAMPLE_PURPOSE)
    sampler = sampling.make_sampler(config, model, autoencoder=latent.frozen_of(config, workdir))
    samples = np.concatenate(
        list(sample_chunks(config, sampler, params, rng, c.num_samples, out_dir / "chunks"))
    )
    if jax.process_index() == 0:
        labels = conditions_of(config, np.arange(len(samples)))
        extra = {} if labels is None else {"labels" if labels.ndim == 1 else "token_ids": labels}
        npz.save(out_dir / "samples.npz", images=samples, **extra)
        images.save_grid(samples, out_dir / "grid.png")
        logging.info("Wrote %d samples to %s", len(samples), out_dir)
    return samples


# Images per Inception call (FeatureExtractor): the fastest of the sizes measured on a CPU.
INCEPTION_BATCH = 25


class FeatureExtractor:
    """uint8 images [B, H, W, C] (C = 1 or 3) -> Inception pool3 features and logits."""

    def __init__(self, weights: str, cache_dir):
        try:
            variables = inception.load_inception_params(weights or None, cache_dir=cache_dir)
        except (OSError, RuntimeError, ValueError) as error:
            raise type(error)(
                f"{error} (the weights are set by --config.eval.inception_weights=PATH_OR_URL)"
            ) from None
        self.apply = inception.inception_fn(variables)
        self.has_logits = inception.num_classes_of(variables) > 0
        # Why there is no Inception score, for the results: said once, not left out silently.
        self.no_logits_reason = None
        if not self.has_logits:
            self.no_logits_reason = (
                f"the Inception weights {weights or inception.default_weights()!r} have no "
                "1008-way classifier layer (inception-2015-12-05.pt has one; set "
                "--config.eval.inception_weights to it for IS)"
            )

    def __call__(self, images_uint8):
        """Features [N, 2048] and logits [N, 1008] | None.

        On a CPU, at most INCEPTION_BATCH images per call, the last chunk padded so that
        every call has one shape: 25 images per call ran 1.03-1.06x as many images/s as 50
        or 100 (Inception at batch 200 was 1.7x slower still).
        """
        n = len(images_uint8)
        if images_uint8.shape[-1] == 1:  # grayscale: the network takes RGB
            images_uint8 = np.repeat(images_uint8, 3, axis=-1)
        size = min(n, INCEPTION_BATCH) if jax.default_backend() == "cpu" else n
        features, logits = [], []
        for start in range(0, n, size):
            chunk = images_uint8[start : start + size]
            padding = np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)
            chunk_features, chunk_logits = self.apply(jnp.asarray(np.concatenate([chunk, padding])))
            features.append(np.asarray(chunk_features))
            logits.append(None if chunk_logits is None else np.asarray(chunk_logits))
        features = np.concatenate(features)[:n]
        return features, None if logits[0] is None else np.concatenate(logits)[:n]


def _data_name(d: ml_collections.ConfigDict, split: str) -> str:
    """e.g. 'cifar10_train_32': names what is cached from a data split at a resolution."""
    source = d.dataset.replace("/", "_") if d.source == "tfds" else epath.Path(d.path).name
    return f"{source}_{split}_{d.image_size}"


def reference_subset(config) -> np.ndarray | None:
    """Sorted positions of the eval.num_reference FID reference images (None: the whole split).

    A fixed random subset (seed 0, whatever config.seed), so FIDs at the same
    num_reference are computed against the same images.
    """
    count = config.eval.num_reference
    if not count:
        return None
    n = data_sources.num_examples(config.data, config.eval.split)
    if count > n:
        raise ValueError(f"eval.num_reference={count} but split {config.eval.split!r} has {n}")
    return np.sort(np.random.default_rng(0).permutation(n)[:count])


def reference_statistics(config, extractor: FeatureExtractor, workdir) -> tuple:
    """Inception (mu, sigma) of the eval.split images, computed once and cached in workdir."""
    d, subset = config.data, reference_subset(config)
    name = _data_name(d, config.eval.split) + (f"_n{len(subset)}" if subset is not None else "")
    path = epath.Path(workdir) / "fid_stats" / f"{name}.npz"
    if path.exists():
        return fid.load_statistics(path)
    stats = fid.RunningStatistics(2048)
    batches = input_pipeline.create_eval_iter(
        d, split=config.eval.split, global_batch_size=config.eval.batch_size, positions=subset
    )
    for batch in tqdm.tqdm(batches, desc="reference statistics", disable=jax.process_index()):
        features = extractor(batch["image"].reshape(-1, *batch["image"].shape[2:]))[0]
        # Every process adds every process's features: the statistics are of the whole split.
        features, keep = (
            np.asarray(multihost_utils.process_allgather(x, tiled=True))
            for x in (features, batch["mask"].reshape(-1))
        )
        stats.update(features[keep])
    mu, sigma = stats.mean_and_covariance()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        fid.save_statistics(path, mu, sigma)
    return mu, sigma


def load_or_train_classifier(config, workdir, num_classes=None) -> classifier.Scorer:
    """The classifier of data.train_split's labels, trained once and cached in workdir.

    num_classes defaults to the model's (class accuracy of a conditional model).
    """
    d = config.data
    num_classes = num_classes or config.model.num_classes
    if not num_classes:
        raise ValueError("eval.class_accuracy needs a class-conditional model (model.num_classes)")
    path = epath.Path(workdir) / "classifier" / f"{_data_name(d, d.train_split)}.msgpack"
    if path.exists():
        return classifier.Scorer.load(path, (d.image_size, d.image_size, d.num_channels))
    examples, labels = input_pipeline.load_examples(d, d.train_split)
    scorer = classifier.fit_and_hold_out(examples, labels, num_classes)
    logging.info("Classifier held-out accuracy %.4f, cached in %s", scorer.held_out_accuracy, path)
    if jax.process_index() == 0:
        scorer.save(path)
    return scorer
