"""Super-resolution: the low-res pipeline, the conditioned U-Net, training, metrics, jobs.

Oracles are independent of the code under test: block means written as loops, SSIM from
its definition with a 2-D window at every position, and closed forms.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
import tiny
from PIL import Image

from ddpm import evaluation, factories, input_pipeline, sr_eval_job, updates, upsample_job
from ddpm.metrics import sr

# TINY (8x8) as super-resolution from 4x4, with noise-conditioning augmentation up to T/2;
# one resolution level and no attention but the middle's, to keep compiles short (64
# channels: with one channel per norm group the time and level embeddings would vanish).
SR = {
    "model.ch_mult": (2,),
    "model.attn_resolutions": (),
    "data.low_res_size": 4,
    "model.low_res_noise": 0.5,
    "training.num_grid_samples": 0,
    "sampling.method": "ddim",
    "sampling.num_steps": 2,
    "sampling.batch_size": 8,
    "upsample.num_images": 3,
    "upsample.samples_per_image": 2,
}


def sr_config(overrides=None):
    return tiny.tiny_config({**SR, **(overrides or {})})


def block_means(image: np.ndarray, k: int) -> np.ndarray:
    """uint8 [S, S, C] -> uint8 [S/k, S/k, C], block by block, rounded half to even."""
    size = image.shape[0] // k
    out = np.empty((size, size, image.shape[2]), np.uint8)
    for i in range(size):
        for j in range(size):
            block = image[i * k : (i + 1) * k, j * k : (j + 1) * k].astype(np.float64)
            out[i, j] = np.round(block.sum(axis=(0, 1)) / (k * k))
    return out


# ---------------------------------------------------------------------------- pipeline


def test_pipeline_low_res_is_the_area_downsampled_image():
    # Flips on: the low-res image must be made from the flipped image the model sees.
    data = sr_config({"data.random_flip": True, "data.image_size": 16}).data
    with tfds.testing.mock_data(num_examples=20):
        train_batch = next(input_pipeline.create_train_iter(data, global_batch_size=16, seed=0,
                                                            local_device_count=2))  # fmt: skip
        eval_batch = next(input_pipeline.create_eval_iter(data, split="train",
                                                          global_batch_size=16,
                                                          local_device_count=2))  # fmt: skip
    for batch in (train_batch, eval_batch):
        assert batch["low_res"].shape == (2, 8, 4, 4, 3) and batch["low_res"].dtype == np.uint8
        found = batch["low_res"].reshape(-1, 4, 4, 3)
        expected = [block_means(image, 4) for image in batch["image"].reshape(-1, 16, 16, 3)]
        np.testing.assert_array_equal(found, np.stack(expected))


def test_a_low_res_size_that_does_not_divide_is_a_clear_error():
    data = sr_config({"data.low_res_size": 3}).data
    with pytest.raises(ValueError, match="low_res_size=3 must divide data.image_size=8"):
        input_pipeline.create_train_iter(data, global_batch_size=16, seed=0)
    with pytest.raises(ValueError, match="must divide"):
        factories.create_model(sr_config({"data.low_res_size": 3}))


# ---------------------------------------------------------------------------- model


def test_the_output_depends_on_the_low_res_image_and_its_noise_level():
    config = sr_config()
    model = factories.create_model(config)
    params = tiny.random_params(config, model, optax.sgd(1.0))
    rng = np.random.default_rng(0)
    x, t = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32), jnp.array([3, 7])
    low_res = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
    level = jnp.array([0, 4])

    @jax.jit
    def out(low_res, level):
        return model.apply({"params": params}, x, t, train=False, low_res=low_res,
                           low_res_level=level)  # fmt: skip

    base = out(low_res, level)
    for other in (
        out(-low_res, level),
        out(jnp.zeros_like(low_res), level),
        out(low_res, level + 3),
    ):
        assert float(jnp.max(jnp.abs(other - base))) > 1e-3
    # Example 1's low-res image does not reach example 0.
    changed = out(low_res.at[1].set(0.0), level)
    np.testing.assert_allclose(changed[0], base[0], atol=1e-6)
    # Only conv_in sees the extra channels; the unconditional model keeps its parameters.
    plain_config = tiny.tiny_config({k: SR[k] for k in ("model.ch_mult", "model.attn_resolutions")})
    plain_model, tx = factories.create_model(plain_config), optax.sgd(1.0)
    plain = jax.eval_shape(
        lambda: factories.create_train_state(plain_config, plain_model, tx, jax.random.key(0))
    ).params
    sizes = {
        jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(plain)
    }
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        if "low_res_level" in name:
            continue
        expected = (3, 3, 6, 32) if name == "['conv_in']['kernel']" else sizes.pop(name)
        assert leaf.shape == expected, name
    assert list(sizes) == ["['conv_in']['kernel']"]


def test_missing_or_unexpected_low_res_inputs_raise():
    config = sr_config()
    model = factories.create_model(config)
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="--mode=upsample"):
        model.init(jax.random.key(0), x, t, train=False)
    with pytest.raises(ValueError, match="low_res_level"):
        model.init(jax.random.key(0), x, t, train=False, low_res=jnp.zeros((1, 4, 4, 3)))
    plain = factories.create_model(tiny.tiny_config())
    with pytest.raises(ValueError, match="low_res_conditioned=False"):
        plain.init(jax.random.key(0), x, t, train=False, low_res=jnp.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="low_res_noise=0.5 needs a super-resolution"):
        factories.create_model(tiny.tiny_config({"model.low_res_noise": 0.5}))
    with pytest.raises(ValueError, match="num_grid_samples=0"):
        factories.create_model(sr_config({"training.num_grid_samples": 4}))


# ---------------------------------------------------------------------------- training


def test_sr_training_is_the_same_on_one_and_eight_devices_and_after_resuming():
    """test_train's 1-vs-8-device check with low-res inputs and their augmentation noise
    (per example, from the global index), on the pipeline's batches; and two steps, then a
    fresh pipeline and two more (what a restart does) equal four straight. SGD keeps the
    device comparison sharp (see test_train)."""
    config = sr_config()
    model, diffusion = factories.create_model(config), factories.create_diffusion(config)
    tx = optax.sgd(0.5)
    state = tiny.init_state(config, model, tx)

    def run(devices, start_state, start_step, num_steps):
        batches = input_pipeline.create_train_iter(
            config.data, global_batch_size=16, seed=0, start_step=start_step,
            local_device_count=devices,
        )  # fmt: skip
        step_fn = updates.make_train_step(config, model, diffusion, tx, jax.devices()[:devices])
        s = updates.replicated(start_state, jax.devices()[:devices])
        for _ in range(num_steps):
            s, metrics = step_fn(s, next(batches), jax.random.key(1))
        return s, metrics

    with tfds.testing.mock_data(num_examples=40):
        s1, m1 = run(1, state, 0, 3)
        s8, m8 = run(8, state, 0, 3)
        halfway, _ = run(8, state, 0, 1)
        resumed, _ = run(8, halfway, 1, 2)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(s8), strict=True):
        np.testing.assert_array_equal(a, b)
    # The low-res input is trained on: conv_in's weights on its channels moved.
    moved = s8.params["conv_in"]["kernel"][:, :, 3:] - state.params["conv_in"]["kernel"][:, :, 3:]
    assert float(jnp.max(jnp.abs(moved))) > 1e-4


# ---------------------------------------------------------------------------- metrics


def ssim_by_definition(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 with an 11x11 Gaussian (sigma 1.5) at every valid position, one
    channel [H, W], pixel range 255."""
    offsets = np.arange(11) - 5.0
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    window /= window.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = np.sum(window * pa), np.sum(window * pb)
            va, vb = np.sum(window * (pa - ma) ** 2), np.sum(window * (pb - mb) ** 2)
            cov = np.sum(window * (pa - ma) * (pb - mb))
            values.append(
                (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return float(np.mean(values))


def test_psnr_ssim_and_consistency_against_definitions_and_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 16, 14, 2), np.uint8)
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255).astype(np.uint8)
    expected = [
        np.mean([ssim_by_definition(a[n, ..., c].astype(float), b[n, ..., c]) for c in range(2)])
        for n in range(2)
    ]
    np.testing.assert_allclose(sr.ssim(b, a), expected, rtol=1e-10)
    mse = np.mean((a.astype(float) - b) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(sr.psnr(b, a), 10 * np.log10(255**2 / mse), rtol=1e-12)
    # Closed forms: identical images; a constant offset d gives 20 log10(255 / d).
    assert np.all(sr.ssim(a, a) == 1.0) and np.all(np.isinf(sr.psnr(a, a)))
    mid = rng.integers(20, 200, (3, 8, 8, 1), np.uint8)
    np.testing.assert_allclose(sr.psnr(mid + 5, mid), 20 * np.log10(255 / 5), rtol=1e-12)
    # Consistency: pixels repeated from the low-res image reproduce it exactly; an offset
    # of d everywhere costs (d / 255)^2.
    low = rng.integers(0, 200, (3, 4, 4, 1), np.uint8)
    blocky = low.repeat(2, axis=1).repeat(2, axis=2)
    assert np.all(sr.consistency(blocky, low) == 0.0)
    np.testing.assert_allclose(sr.consistency(blocky + 10, low), (10 / 255) ** 2, rtol=1e-12)


# ---------------------------------------------------------------------------- jobs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sr_workdir")
    tiny.write_random_checkpoint(sr_config(), tmp_path)
    return tmp_path


def low_res_folder(path, sizes):
    rng = np.random.default_rng(0)
    path.mkdir()
    for i, size in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(path / f"{i}.png")
    return path


def test_upsample_a_folder_writes_npz_and_grid_and_resumes(workdir, tmp_path, monkeypatch):
    config = sr_config({"upsample.source": str(low_res_folder(tmp_path / "in", [4] * 5))})
    out = upsample_job.upsample(config, workdir)
    assert out["results"].shape == (3, 2, 8, 8, 3) and out["results"].dtype == np.uint8
    assert "originals" not in out and int(out["step"]) == 7
    files = sorted((tmp_path / "in").iterdir())
    for position, low in zip(out["positions"], out["low_res"], strict=True):
        np.testing.assert_array_equal(low, np.asarray(Image.open(files[position])))
    # Two samples of one image differ (own keys); the model drew them, not bicubic.
    assert np.any(out["results"][:, 0] != out["results"][:, 1])
    out_dir = upsample_job.output_dir(config, workdir, 7)
    with np.load(out_dir / "upsampled.npz") as saved:
        np.testing.assert_array_equal(saved["results"], out["results"])
    grid = np.asarray(Image.open(out_dir / "grid.png"))
    assert grid.shape == (3 * 10 + 2, 4 * 10 + 2, 3)  # low-res, bicubic, 2 samples per row
    # A rerun reads every chunk back: nothing is drawn again.
    monkeypatch.setattr(upsample_job, "make_upsampler", lambda *a, **k: None)
    again = upsample_job.upsample(config, workdir)
    np.testing.assert_array_equal(again["results"], out["results"])


def test_a_source_image_of_another_size_is_a_clear_error(tmp_path):
    folder = low_res_folder(tmp_path / "in", [4, 4, 5])
    config = sr_config({"upsample.source": str(folder)})
    # Before anything loads: there is no checkpoint in tmp_path.
    with pytest.raises(ValueError, match=r"2.png is 5x5, but the model upsamples 4x4"):
        upsample_job.upsample(config, tmp_path)
    with pytest.raises(ValueError, match="needs a super-resolution config"):
        upsample_job.check_config(tiny.tiny_config())


class PixelFeatures:
    """A stand-in for the Inception: features are the pixels (cheap, and FID still moves)."""

    def __init__(self, *unused_args):
        pass

    def __call__(self, images_uint8):
        return images_uint8.reshape(len(images_uint8), -1).astype(np.float64), None


def test_eval_of_an_sr_config_scores_samples_and_bicubic(workdir, monkeypatch):
    monkeypatch.setattr(evaluation, "FeatureExtractor", PixelFeatures)
    config = sr_config()
    with tfds.testing.mock_data(num_examples=10):
        results = sr_eval_job.evaluate(config, workdir)
        originals, _ = input_pipeline.load_examples(config.data, "test")
    upsampled = np.load(upsample_job.output_dir(config, workdir, 7) / "upsampled.npz")
    np.testing.assert_array_equal(upsampled["originals"], originals[upsampled["positions"]])
    mean = np.round(upsampled["results"].mean(axis=1)).astype(np.uint8)
    for name, images in (("bicubic", upsampled["bicubic"]), ("mean_of_2_samples", mean)):
        assert results[name]["psnr"] == pytest.approx(
            np.mean(sr.psnr(images, upsampled["originals"])), rel=1e-12
        )
    for name in ("bicubic", "sample", "mean_of_2_samples"):
        assert set(results[name]) == {"psnr", "ssim", "consistency", "fid"}
    (path,) = workdir.glob("eval_step7_ddim2_*.json")
    assert json.loads(path.read_text())["sample"] == results["sample"]
