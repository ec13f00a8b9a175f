"""Latent diffusion trained in two stages: the autoencoder (stage 1) and a label- or
prompt-conditioned diffusion model of its latents (stage 2), on 8 fake CPU devices."""

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny
from PIL import Image
from test_train import image_folder

from configs import mnist_autoencoder, mnist_ldm
from ddpm import (
    autoencoder_job,
    eval_job,
    evaluation,
    factories,
    latent,
    samplers,
    train,
    updates,
)
from ddpm.models.autoencoder import AutoencoderKL
from ddpm.schedules import get_beta_schedule

DATA = {"data.source": "folder", "data.image_size": 8, "data.num_channels": 3}
TRAINING = {
    "training.batch_size": 8, "training.num_train_steps": 4, "training.log_every": 2,
    "training.checkpoint_every": 2, "training.sample_every": 4, "training.num_grid_samples": 4,
    "training.steps_per_dispatch": 1, "optim.warmup_steps": 2,
}  # fmt: skip
AUTOENCODER = {
    "autoencoder.ch": 8, "autoencoder.ch_mult": (1, 2), "autoencoder.num_res_blocks": 1,
    "autoencoder.num_groups": 4, "autoencoder.scale_examples": 16,
}  # fmt: skip
LDM = {
    "model.ch": 16, "model.num_heads": 2, "model.context_dim": 16, "model.num_groups": 4,
    "model.num_classes": 2, "latent.class_names": "zero,one", "text_encoder.d_model": 16,
    "text_encoder.num_layers": 1, "text_encoder.num_heads": 2, "text_encoder.head_dim": 8,
    "text_encoder.ffn_dim": 32, "diffusion.num_timesteps": 10, "sampling.num_steps": 5,
    "sampling.batch_size": 8, "eval.num_samples": 8, "eval.class_accuracy": False,
}  # fmt: skip


class PixelFeatures:
    """A stand-in for the Inception: the pixels (8x8x3 here), zero-padded to 2048 features."""

    has_logits, no_logits_reason = False, "a stand-in"

    def __init__(self, *unused_args):
        pass

    def __call__(self, images_uint8):
        pixels = images_uint8.reshape(len(images_uint8), -1).astype(np.float64)
        return np.pad(pixels, ((0, 0), (0, 2048 - pixels.shape[1]))), None


def ae_config(data_path="", overrides=None):
    config = mnist_autoencoder.get_config()
    return tiny.overridden(config, DATA, TRAINING, AUTOENCODER, {"data.path": str(data_path)},
                           overrides)  # fmt: skip


def ldm_config(data_path="", stage1="", overrides=None):
    config = mnist_ldm.get_config()
    paths = {"data.path": str(data_path), "latent.autoencoder": str(stage1)}
    return tiny.overridden(config, DATA, TRAINING, AUTOENCODER, LDM, paths, overrides)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """(image folder, a stage-1 workdir trained for 4 steps, its final state)."""
    data = image_folder(tmp_path_factory.mktemp("digits"))
    workdir = tmp_path_factory.mktemp("autoencoder")
    state = train.train_and_evaluate(ae_config(data), str(workdir))
    return data, workdir, state


def random_frozen(config) -> latent.Frozen:
    module = factories.create_autoencoder(config)
    params = tiny.random_params(config, module, optax.sgd(0.1))
    return latent.Frozen(module, params, scale=0.7, step=0)


def float64(x):
    return np.asarray(x, np.float64)


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_autoencoder_loss_is_reconstruction_plus_weighted_kl(loss):
    """The step's loss against float64 numpy: sum over pixels of |x - x^| (or squared) plus
    w * KL(N(mean, e^logvar) || N(0, I)), averaged over the batch; the decoder sees the
    posterior sample drawn with example i's key fold_in(step key, i)."""
    config = ae_config(overrides={"autoencoder.loss": loss, "autoencoder.kl_weight": 0.3})
    model = factories.create_autoencoder(config)
    params = tiny.random_params(config, model, optax.sgd(0.1))
    state = factories.state_from_params(params, optax.sgd(0.0))
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), np.uint8)
    step = updates.pmap_step(
        lambda s, b, r, f: autoencoder_job.train_step(
            s, b, r, f, model=model, tx=optax.sgd(0.0), ema_decay=0.9, ema_warmup=False,
            kl_weight=0.3, loss=loss,
        ),
        devices=jax.devices()[:1],
    )  # fmt: skip
    _, metrics = step(updates.replicated(state, jax.devices()[:1]),
                      {"image": images[None]}, jax.random.key(5))  # fmt: skip

    x = images.astype(np.float64) / 127.5 - 1
    mean, logvar = model.apply({"params": params}, jnp.asarray(x, jnp.float32),
                               method=AutoencoderKL.encode)  # fmt: skip
    mean, logvar = float64(mean), float64(logvar)
    step_key = jax.random.fold_in(jax.random.key(5), 0)
    noise = float64([jax.random.normal(jax.random.fold_in(step_key, i), mean.shape[1:])
                     for i in range(4)])  # fmt: skip
    z = mean + np.exp(0.5 * logvar) * noise
    recon = float64(model.apply({"params": params}, jnp.asarray(z, jnp.float32),
                                method=AutoencoderKL.decode))  # fmt: skip
    error = np.abs(recon - x) if loss == "l1" else (recon - x) ** 2
    kl = 0.5 * (mean**2 + np.exp(logvar) - 1 - logvar)
    expected = np.mean(error.sum(axis=(1, 2, 3)) + 0.3 * kl.sum(axis=(1, 2, 3)))
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx(kl.sum(axis=(1, 2, 3)).mean(), rel=1e-5)


@pytest.mark.parametrize("condition", ["label", "text"])
def test_latent_step_is_the_pixel_steps_math_on_scaled_posterior_samples(condition):
    """eps-MSE at z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps (float64 abar of the linear
    schedule), z_0 = scale * (mean + std * n): the pixel step's t and eps keys, n from the
    posterior purpose, and (text) each label's prompt in the phrasing its key draws."""
    config = ldm_config(overrides={"latent.condition": condition,
                                   "training.label_dropout": 0.0})  # fmt: skip
    model, diffusion = factories.create_model(config), factories.create_diffusion(config)
    frozen = random_frozen(config)
    table = latent.prompt_table(config) if condition == "text" else None
    inputs = latent.TrainingInputs(frozen, factories.latent_shape(config), table)
    tx = optax.sgd(0.0)
    params = tiny.random_params(config, model, tx)
    step = updates.make_train_step(config, model, diffusion, tx, jax.devices()[:1],
                                   latent_inputs=inputs)  # fmt: skip
    rng = np.random.default_rng(1)
    batch = {"image": rng.integers(0, 256, (4, 8, 8, 3), np.uint8),
             "label": np.array([0, 1, 1, 0], np.int32)}  # fmt: skip
    state = updates.replicated(factories.state_from_params(params, tx), jax.devices()[:1])
    _, metrics = step(state, {k: v[None] for k, v in batch.items()}, jax.random.key(3),
                      updates.replicated(frozen.params, jax.devices()[:1]))  # fmt: skip

    step_key = jax.random.fold_in(jax.random.key(3), 0)
    t_key, noise_key, _ = jax.random.split(step_key, 3)
    posterior_key = jax.random.fold_in(step_key, latent.POSTERIOR_PURPOSE)
    x = jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1
    mean, logvar = (float64(a) for a in frozen.module.apply(
        {"params": frozen.params}, x, method=AutoencoderKL.encode))  # fmt: skip
    abar = np.cumprod(1 - get_beta_schedule("linear", num_timesteps=10, beta_start=1e-4,
                                            beta_end=0.02))  # fmt: skip
    losses = []
    for i in range(4):
        t = int(jax.random.randint(jax.random.fold_in(t_key, i), (), 0, 10))
        eps = float64(jax.random.normal(jax.random.fold_in(noise_key, i), mean.shape[1:]))
        n = float64(jax.random.normal(jax.random.fold_in(posterior_key, i), mean.shape[1:]))
        z0 = 0.7 * (mean[i] + np.exp(0.5 * logvar[i]) * n)
        z_t = np.sqrt(abar[t]) * z0 + np.sqrt(1 - abar[t]) * eps
        y = batch["label"][i : i + 1]
        if condition == "text":
            k = jax.random.fold_in(jax.random.fold_in(posterior_key, i), latent.PHRASING_PURPOSE)
            y = table[y[0], int(jax.random.randint(k, (), 0, table.shape[1]))][None]
        pred = model.apply({"params": params}, jnp.asarray(z_t[None], jnp.float32),
                           jnp.array([t]), jnp.asarray(y), train=False)  # fmt: skip
        losses.append(np.mean((float64(pred[0]) - eps) ** 2))
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)


@pytest.mark.parametrize("pipeline", ["autoencoder", "latent"])
def test_both_stages_update_alike_on_one_and_eight_devices(pipeline):
    config = (ae_config if pipeline == "autoencoder" else ldm_config)(
        overrides={"training.label_dropout": 0.5} if pipeline == "latent" else None
    )
    # SGD (see test_train's device test); the autoencoder's loss is a sum over pixels,
    # whose gradients are ~1e3 times larger.
    model = factories.create_model(config)
    tx = optax.sgd(0.5 if pipeline == "latent" else 1e-4)
    frozen = random_frozen(config) if pipeline == "latent" else None
    if pipeline == "latent":
        inputs = latent.TrainingInputs(frozen, factories.latent_shape(config), None)
        diffusion = factories.create_diffusion(config)
        make = lambda devices: updates.make_train_step(  # noqa: E731
            config, model, diffusion, tx, devices, latent_inputs=inputs)  # fmt: skip
    else:
        make = lambda devices: updates.pmap_step(  # noqa: E731
            lambda s, b, r, f: autoencoder_job.train_step(
                s, b, r, f, model=model, tx=tx, ema_decay=0.9, ema_warmup=True,
                kl_weight=0.01, loss="l1"), devices)  # fmt: skip
    state = tiny.init_state(config, model, tx)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (16, 8, 8, 3), np.uint8),
                "label": rng.integers(0, 2, 16).astype(np.int32)} for _ in range(2)]  # fmt: skip
    results = {}
    for n in (1, 8):
        devices = jax.devices()[:n]
        s, step = updates.replicated(state, devices), make(devices)
        f = None if frozen is None else updates.replicated(frozen.params, devices)
        for batch in batches:
            s, _ = step(s, {k: v.reshape(n, -1, *v.shape[1:]) for k, v in batch.items()},
                        jax.random.key(1), f)  # fmt: skip
        results[n] = s.params
    for a, b in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[8]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), results[8], state.params)
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_stage_one_writes_reconstruction_grids_and_the_scale_of_its_final_latents(stage1):
    data, workdir, state = stage1
    config = ae_config(data)
    assert int(state.step) == 4
    grid = np.asarray(Image.open(workdir / "samples" / "step_00000004.png"))
    assert grid.shape == (2 + 2 * 10, 2 + 8 * 10, 3)  # 4 originals over their reconstructions
    record = json.loads((workdir / latent.SCALE_FILE).read_text())
    assert record["step"] == 4 and record["num_examples"] == 16
    # The oracle: 1 / std (float64, n - 1) of scale_examples posterior samples.
    originals, _ = autoencoder_job.fixed_examples(config.data, "train", 16)
    model = factories.create_autoencoder(config)
    mean, logvar = model.apply({"params": state.ema_params}, originals / 127.5 - 1,
                               method=AutoencoderKL.encode)  # fmt: skip
    key = jax.random.fold_in(jax.random.key(config.seed), autoencoder_job.SCALE_PURPOSE)
    noise = np.stack([jax.random.normal(jax.random.fold_in(key, i), mean.shape[1:])
                      for i in range(16)])  # fmt: skip
    z = float64(mean) + np.exp(0.5 * float64(logvar)) * float64(noise)
    assert record["scale_factor"] == pytest.approx(1 / np.std(z, ddof=1), rel=1e-5)
    # A restart of a finished run (a crash after its last save) writes the scale again.
    (workdir / latent.SCALE_FILE).unlink()
    train.train_and_evaluate(config, str(workdir))
    assert json.loads((workdir / latent.SCALE_FILE).read_text()) == record


def test_stage_one_resumes_exactly(stage1, tmp_path):
    data, _, uninterrupted = stage1
    config = ae_config(data, {"training.num_train_steps": 2})
    train.train_and_evaluate(config, str(tmp_path))
    config.training.num_train_steps = 4
    resumed = train.train_and_evaluate(config, str(tmp_path))
    # The scale follows the run's final checkpoint.
    assert json.loads((tmp_path / latent.SCALE_FILE).read_text())["step"] == 4
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def stage2(stage1, tmp_path_factory):
    """(config, a prompt-conditioned stage-2 workdir trained for 4 steps, its final state)."""
    data, stage1_dir, _ = stage1
    config = ldm_config(data, stage1_dir, {"latent.condition": "text"})
    workdir = tmp_path_factory.mktemp("latent")
    return config, workdir, train.train_and_evaluate(config, str(workdir))


def test_stage_two_resumes_exactly_from_its_own_copy_of_the_autoencoder(stage1, stage2, tmp_path):
    _, stage1_dir, stage1_state = stage1
    config, workdir, whole = stage2
    assert (workdir / "samples" / "step_00000004.png").exists()
    kept = latent.load_frozen(config, workdir)
    assert kept.step == 4
    scale = json.loads((stage1_dir / latent.SCALE_FILE).read_text())["scale_factor"]
    assert kept.scale == pytest.approx(scale, rel=1e-7)
    for a, b in zip(jax.tree.leaves(kept.params), jax.tree.leaves(stage1_state.ema_params),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    config = ldm_config(config.data.path, stage1_dir, {
        "latent.condition": "text", "training.num_train_steps": 2,
        "training.num_grid_samples": 0})  # fmt: skip
    train.train_and_evaluate(config, str(tmp_path))
    config.training.num_train_steps = 4
    config.latent.autoencoder = str(tmp_path / "gone")  # the resume reads its copy only
    resumed = train.train_and_evaluate(config, str(tmp_path))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(a, b)


def test_latent_samples_are_decoded_and_scored(stage2, monkeypatch):
    """--mode=sample with a prompt and --mode=eval: samples are the decoder's images of the
    sampled latents (divided by the scale); FID is of those images."""
    monkeypatch.setattr(evaluation, "FeatureExtractor", PixelFeatures)
    config, tmp_path, _ = stage2
    config = copy.deepcopy(config)
    config.sampling.update(prompt="the digit one", num_samples=8)
    samples = evaluation.sample(config, tmp_path)
    (saved,) = tmp_path.glob("samples_step4_*/samples.npz")
    ids = np.load(saved)["token_ids"]
    np.testing.assert_array_equal(ids, latent.make_tokenizer(config)(["the digit one"] * 8))
    # The oracle: the same chain by hand, decoded with the stage-1 params over the scale.
    model, params, _ = evaluation.load_ema_params(config, tmp_path)
    frozen = latent.load_frozen(config, tmp_path)
    d = factories.create_diffusion(config, use_timesteps=samplers.ddim_timesteps(10, 5))
    null = np.broadcast_to(latent.prompt_table(config)[-1, 0], ids.shape)
    w = config.sampling.guidance_scale

    def denoise(x, t):
        both = model.apply({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                           jnp.concatenate([ids, null]), train=False)  # fmt: skip
        return (1 + w) * both[:8] - w * both[8:]

    rng = jax.random.fold_in(jax.random.key(config.seed), evaluation.SAMPLE_PURPOSE)
    z = samplers.sample(d, denoise, samplers.sample_keys(rng, jnp.arange(8)), (4, 4, 2), "ddim",
                        eta=1.0, clip_denoised=False)  # fmt: skip
    expected = frozen.module.apply({"params": frozen.params}, z / frozen.scale,
                                   method=AutoencoderKL.decode)  # fmt: skip
    expected = np.clip(np.round((float64(expected) + 1) * 127.5), 0, 255)
    assert np.mean(np.abs(samples.astype(np.float64) - expected)) < 0.05  # rounding ties only
    config.sampling.prompt = ""
    results = eval_job.evaluate(config, tmp_path)
    assert results["fid_num_samples"] == 8 and np.isfinite(results["fid"])


def test_autoencoder_eval_reports_psnr_of_mean_reconstructions(stage1, monkeypatch):
    monkeypatch.setattr(evaluation, "FeatureExtractor", PixelFeatures)
    data, workdir, state = stage1
    config = ae_config(data, {"eval.num_samples": 12, "eval.class_accuracy": False})
    results = autoencoder_job.evaluate(config, workdir)
    originals, _ = autoencoder_job.fixed_examples(config.data, "test", 12)
    model = factories.create_autoencoder(config)
    mean, _ = model.apply({"params": state.ema_params}, originals / 127.5 - 1,
                          method=AutoencoderKL.encode)  # fmt: skip
    recon = model.apply({"params": state.ema_params}, mean, method=AutoencoderKL.decode)
    recon = np.clip(np.round((float64(recon) + 1) * 127.5), 0, 255)
    mse = ((recon - originals) ** 2).mean(axis=(1, 2, 3))
    assert results["psnr"] == pytest.approx(np.mean(10 * np.log10(255**2 / mse)), rel=1e-3)
    assert results["num_images"] == 12 and results["fid"] > 0 and results["step"] == 4


def test_prompts_are_the_class_names_in_each_phrasing_and_the_null_is_empty():
    config = ldm_config(overrides={"latent.condition": "text"})
    table, tokenizer = latent.prompt_table(config), latent.make_tokenizer(config)
    vocab = tokenizer.tokenizer.get_vocab()
    assert table.shape == (3, 5, 8)
    cls, sep, pad = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]
    np.testing.assert_array_equal(
        table[1, 1], [cls, vocab["the"], vocab["digit"], vocab["one"], sep, pad, pad, pad]
    )
    np.testing.assert_array_equal(table[2], np.tile([cls, sep] + [pad] * 6, (5, 1)))
    assert tokenizer(["a zebra"])[0][2] == vocab["[UNK]"]  # out of the vocabulary


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"latent.condition": "image"}, "latent.condition must be 'label' or 'text'"),
        ({"latent.condition": "text", "latent.class_names": "zero"}, "class_names has 1 names"),
        ({"latent.condition": "text", "text_encoder.vocab_size": 10}, "the prompts need 15 tok"),
        ({"latent.autoencoder": ""}, "latent.autoencoder must name"),
    ],
)
def test_stage_two_settings_fail_before_training(stage1, tmp_path, overrides, message):
    data, stage1_dir, _ = stage1
    config = ldm_config(data, stage1_dir, overrides)
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_stage_two_needs_the_scale_of_a_finished_autoencoder(stage1, tmp_path):
    data, stage1_dir, _ = stage1
    shutil.copytree(stage1_dir, tmp_path / "ae")
    (tmp_path / "ae" / latent.SCALE_FILE).unlink()  # as a run preempted before its end
    with pytest.raises(ValueError, match="has no latent scale for its checkpoint 4"):
        train.train_and_evaluate(ldm_config(data, tmp_path / "ae"), str(tmp_path / "ldm"))
    with pytest.raises(ValueError, match="a latent model's bound is on latents"):
        eval_job.check_inputs(ldm_config(data, overrides={"eval.bpd_split": "test"}))
