"""--mode=sample and --mode=eval on a tiny random model, on 8 fake CPU devices."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tiny
from PIL import Image

from ddpm import (
    data_sources,
    eval_job,
    evaluation,
    factories,
    images,
    input_pipeline,
    samplers,
    sampling,
)
from ddpm import diffusion as D


def tiny_config():
    return tiny.tiny_config({
        "sampling.num_steps": 10, "sampling.num_samples": 20, "sampling.batch_size": 16,
        "eval.num_samples": 0, "eval.bpd_split": "train", "eval.batch_size": 16,
        "eval.bpd_num_examples": 40,
    })  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A checkpoint of a random model, shared by the module's tests: each writes its
    outputs under its own name."""
    tmp_path = tmp_path_factory.mktemp("workdir")
    tiny.write_random_checkpoint(tiny_config(), tmp_path)
    return tmp_path


def test_sample_mode_writes_npz_and_grid_and_resumes(workdir):
    config = tiny_config()
    samples = evaluation.sample(config, workdir)
    (out,) = workdir.glob("samples_step7_ddpm10_seed0_*")  # + a hash of the settings
    saved = np.load(out / "samples.npz")["images"]
    np.testing.assert_array_equal(saved, samples)
    assert saved.shape == (20, 8, 8, 3) and saved.dtype == np.uint8 and saved.std() > 0
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (4 * 10 + 2, 5 * 10 + 2, 3)  # 20 samples: 5 columns, 4 rows
    np.testing.assert_array_equal(grid[2:10, 2:10], saved[0])
    # A rerun finds both chunks on disk: nothing is sampled again, the result is the same.
    chunks = sorted((out / "chunks").glob("chunk_*.npz"))
    assert [c.name for c in chunks] == ["chunk_00000.npz", "chunk_00001.npz"]
    stamp = [c.stat().st_mtime_ns for c in chunks]
    np.testing.assert_array_equal(evaluation.sample(config, workdir), samples)
    assert [c.stat().st_mtime_ns for c in chunks] == stamp


def test_samples_do_not_depend_on_the_device_count(workdir):
    config = tiny_config()
    model, params, _ = evaluation.load_ema_params(config, workdir)
    keys = samplers.sample_keys(jax.random.key(3), np.arange(8))
    one = sampling.make_sampler(config, model, devices=jax.devices()[:1])(params, keys)
    on_eight = sampling.make_sampler(config, model, devices=jax.devices())
    eight = on_eight(params, keys)
    # uint8 after rounding: a float32 difference in batched convolutions can at most move
    # a value across a rounding boundary, by one level.
    assert np.max(np.abs(one.astype(int) - eight.astype(int))) <= 1
    assert np.mean(one == eight) > 0.99
    # A count that does not split over the devices: padded, and the first five unchanged.
    five = on_eight(params, keys[:5])
    np.testing.assert_array_equal(five, eight[:5])


def test_eval_bits_per_dim_equals_calc_bpd_loop_called_directly(workdir):
    config = tiny_config()
    with tfds.testing.mock_data(num_examples=40):
        results = eval_job.evaluate(config, workdir)
        batches = list(evaluation.input_pipeline.create_eval_iter(
            config.data, split="train", global_batch_size=16))  # fmt: skip
    model, params, _ = evaluation.load_ema_params(config, workdir)
    d = factories.create_diffusion(config)
    rng = jax.random.fold_in(jax.random.key(config.seed), evaluation.BPD_PURPOSE)

    def denoise_fn(x, t):
        return model.apply({"params": params}, x, t, None, train=False)

    bpd_fn = jax.jit(lambda x, key: D.calc_bpd_loop(d, denoise_fn, x, key).total_bpd)
    direct = []
    for i, batch in enumerate(batches):
        for device in range(8):  # the eval job gives each device its own fold of the key
            x = images.to_model_range(batch["image"][device])
            key = jax.random.fold_in(jax.random.fold_in(rng, i), device)
            direct.append(np.asarray(bpd_fn(x, key))[batch["mask"][device]])
    direct = np.concatenate(direct)
    assert results["bpd_num_examples"] == len(direct) == 40
    np.testing.assert_allclose(results["bpd"], direct.mean(), rtol=1e-5)
    assert 0 < results["bpd"] < 100
    saved = json.loads((workdir / f"{eval_job.results_name(config, 7)}.json").read_text())
    assert saved == results and saved["step"] == 7


def test_eval_without_a_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first, or write one with --mode=convert"):
        eval_job.evaluate(tiny_config(), tmp_path)


def test_bad_sampling_settings_raise():
    config = tiny_config()
    config.sampling.num_steps = 11
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 10\] \(or 0 for all\)"):
        sampling.sampling_diffusion(config)
    config.sampling.update(num_steps=10, method="euler")
    with pytest.raises(ValueError, match="'ddpm' or 'ddim'"):
        sampling.sampling_diffusion(config)


def test_respaced_ddpm_sampler_walks_the_kept_steps():
    config = tiny_config()
    config.sampling.num_steps = 5
    d = sampling.sampling_diffusion(config)
    np.testing.assert_array_equal(d.timestep_map, D.space_timesteps(10, [5]))
    full = factories.create_diffusion(config)
    np.testing.assert_allclose(d.alphas_cumprod, full.alphas_cumprod[d.timestep_map], rtol=1e-6)
    assert jnp.all(d.betas > 0)


def index_draw(mine):
    """A stand-in sampler whose 'image' is its own global index: stale chunks show."""
    return np.asarray(mine, np.int32)[:, None]


@pytest.mark.parametrize("first,second", [((20, 16), (30, 16)), ((20, 16), (20, 8))])
def test_cached_chunks_never_serve_other_indices(tmp_path, first, second):
    # The same folder, another count or batch size: what comes back is still 0..n-1.
    for num, batch in (first, second, first):
        config = tiny_config()
        config.sampling.batch_size = batch
        got = np.concatenate(list(evaluation.chunks(config, index_draw, num, tmp_path)))
        np.testing.assert_array_equal(got[:, 0], np.arange(num))


def test_every_setting_that_changes_samples_changes_their_folder():
    base = evaluation.sampling_settings(tiny_config())
    changes = {
        "sampling.batch_size": 8, "sampling.method": "ddim", "sampling.num_steps": 5,
        "sampling.eta": 1.0, "sampling.clip_denoised": False, "sampling.guidance_scale": 2.0,
        "diffusion.schedule": "cosine",
    }  # fmt: skip
    digests = {evaluation.settings_digest(base)}
    for key, value in {**changes, "seed": 1}.items():
        config = tiny_config()
        if key == "seed":
            config.seed = value
        else:
            config[key.split(".")[0]][key.split(".")[1]] = value
        digests.add(evaluation.settings_digest(evaluation.sampling_settings(config)))
    assert len(digests) == len(changes) + 2


def test_two_seeds_keep_their_own_results_and_bpd_batches_shrink_to_the_examples(workdir):
    results = {}
    for seed in (0, 1):
        config = tiny_config()
        config.update(seed=seed)
        config.eval.update(bpd_num_examples=8, bpd_split="test")
        with tfds.testing.mock_data(num_examples=40):
            results[seed] = eval_job.evaluate(config, workdir)
        saved = json.loads((workdir / f"{eval_job.results_name(config, 7)}.json").read_text())
        assert saved == results[seed] and saved["settings"]["seed"] == seed
        # eval.bpd_num_examples=8 on 8 devices: one batch of 8, not eval.batch_size=16.
        assert eval_job.bpd_batch_size(config) == 8 and saved["bpd_num_examples"] == 8
    assert results[0]["bpd"] != results[1]["bpd"]  # each seed's own noise, not a cache hit


def test_a_missing_split_fails_before_anything_is_sampled(workdir, monkeypatch):
    # A prepared tfds dataset's metadata lists its splits (tfds's mock data lists none).
    info = types.SimpleNamespace(splits={"train": None, "test": None})
    builder = types.SimpleNamespace(info=info)
    monkeypatch.setattr(data_sources, "tfds_builder", lambda data: builder)
    config = tiny_config()
    config.eval.update(num_samples=10, bpd_split="validation")
    before = sorted(p.name for p in workdir.iterdir())
    message = r"eval.bpd_split='validation' cannot be read .*has no split \['validation'\]"
    with pytest.raises(ValueError, match=message):
        eval_job.evaluate(config, workdir)
    assert sorted(p.name for p in workdir.iterdir()) == before


@pytest.mark.parametrize("num_reference", [0, 13])
def test_reference_statistics_are_those_of_the_chosen_images(tmp_path, num_reference):
    """eval.num_reference picks a fixed subset; every image of it, and nothing else, counts
    (float64 numpy mean and covariance of the same features, taken from load_examples)."""
    config = tiny.overridden(tiny_config(), {"eval.num_reference": num_reference})
    projection = np.random.default_rng(0).standard_normal((8 * 8 * 3, 2048))

    def extractor(images_uint8):  # stands in for Inception: a fixed linear map
        return (images_uint8.reshape(len(images_uint8), -1) / 255.0) @ projection, None

    with tfds.testing.mock_data(num_examples=40):
        mu, sigma = evaluation.reference_statistics(config, extractor, tmp_path)
        real, _ = input_pipeline.load_examples(config.data, "train")
    chosen = real if not num_reference else real[np.sort(
        np.random.default_rng(0).permutation(40)[:num_reference])]  # fmt: skip
    features = (chosen.reshape(len(chosen), -1) / 255.0) @ projection
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("n,logits", [(120, True), (7, False)])
def test_feature_extractor_calls_inception_in_chunks_of_one_shape(monkeypatch, n, logits):
    """Any number of images: at most INCEPTION_BATCH per call, every call one shape (the
    last chunk padded), and the results those of the whole set, grayscale made RGB."""
    projection = np.random.default_rng(0).standard_normal((6 * 6 * 3, 2048))
    shapes = []

    def inception(images_uint8):  # stands in for the network: a fixed linear map
        shapes.append(images_uint8.shape)
        features = (np.asarray(images_uint8).reshape(len(images_uint8), -1) / 255.0) @ projection
        return features, features[:, :1008] if logits else None

    monkeypatch.setattr(evaluation.inception, "load_inception_params", lambda *a, **k: {})
    monkeypatch.setattr(evaluation.inception, "inception_fn", lambda variables: inception)
    monkeypatch.setattr(evaluation.inception, "num_classes_of", lambda variables: 1008)
    gray = np.random.default_rng(1).integers(0, 256, (n, 6, 6, 1), np.uint8)
    features, got_logits = evaluation.FeatureExtractor("", None)(gray)
    want = (np.repeat(gray, 3, axis=-1).reshape(n, -1) / 255.0) @ projection
    np.testing.assert_allclose(features, want, rtol=1e-12, atol=1e-12)
    if logits:
        np.testing.assert_allclose(got_logits, want[:, :1008], rtol=1e-12, atol=1e-12)
    else:
        assert got_logits is None
    size = min(n, evaluation.INCEPTION_BATCH)
    assert shapes == [(size, 6, 6, 3)] * -(-n // size)
