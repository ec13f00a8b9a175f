"""Classifier-free guidance: the guided prediction, samplers with labels, label dropout."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
import tiny
from PIL import Image

from ddpm import diffusion as D
from ddpm import evaluation, factories, guidance, images, samplers, sampling, train, updates

NUM_CLASSES = 3


def cond_config(**overrides):
    return tiny.tiny_config({
        "model.num_classes": NUM_CLASSES, "sampling.method": "ddim", "sampling.num_steps": 10,
        "sampling.guidance_scale": 2.0, **overrides,
    })  # fmt: skip


def random_params(config):
    """The config's model and its params with every leaf perturbed, so the output depends on y."""
    model, tx = factories.create_model(config), factories.create_optimizer(config.optim)
    return model, tiny.random_params(config, model, tx)


def inputs(batch=4, t=5):
    x = jax.random.normal(jax.random.key(7), (batch, 8, 8, 3))
    return x, jnp.full((batch,), t, jnp.int32), jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES


@pytest.mark.parametrize("var_type", ["fixedlarge", "learned_range"])
@pytest.mark.parametrize("w", [0.5, 3.0])
def test_guided_output_is_the_formula_of_two_separate_calls(var_type, w):
    config = cond_config(**{"diffusion.var_type": var_type})
    model, params = random_params(config)
    x, t, y = inputs()
    guided = sampling.guided_denoiser(model, params, y, w, mean_channels=3)(x, t)
    cond = np.asarray(model.apply({"params": params}, x, t, y, train=False), np.float64)
    null = jnp.full_like(y, NUM_CLASSES)
    uncond = np.asarray(model.apply({"params": params}, x, t, null, train=False), np.float64)
    assert np.max(np.abs(cond - uncond)) > 1e-2  # the label does change the output
    expected = (1 + w) * cond - w * uncond
    # Learned variance channels are not guided: they are the conditional pass's.
    if var_type == "learned_range":
        expected[..., 3:] = cond[..., 3:]
    err = np.max(np.abs(np.asarray(guided) - expected)) / np.max(np.abs(expected))
    print(f"guided vs formula ({var_type}, w={w}): {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("mean_type", ["eps", "xstart", "v"])
def test_guidance_of_any_parameterisation_guides_the_implied_eps(mean_type):
    config = cond_config(**{"diffusion.mean_type": mean_type})
    d = factories.create_diffusion(config)
    model, params = random_params(config)
    x, t, y = inputs(t=5)
    w = 1.5

    def implied_eps(denoise_fn):
        out = D.p_mean_variance(d, D.model_output(d, denoise_fn, x, t), x, t, clip_denoised=False)
        return np.asarray(D.predict_eps_from_xstart(d, x, t, out.pred_xstart), np.float64)

    guided = implied_eps(sampling.guided_denoiser(model, params, y, w, mean_channels=3))
    cond = implied_eps(sampling.denoiser(model, params, y))
    uncond = implied_eps(sampling.denoiser(model, params, jnp.full_like(y, NUM_CLASSES)))
    expected = (1 + w) * cond - w * uncond
    err = np.max(np.abs(guided - expected)) / np.max(np.abs(expected))
    print(f"{mean_type}: implied eps vs (1+w) eps_y - w eps_null: {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_w_zero_is_exactly_the_conditional_model(method):
    config = cond_config(**{"sampling.method": method})
    model, params = random_params(config)
    keys = samplers.sample_keys(jax.random.key(3), np.arange(8))
    labels = np.arange(8, dtype=np.int32) % NUM_CLASSES
    sampler = sampling.make_sampler(config, model, devices=jax.devices()[:1])
    got = sampler(params, keys, labels, guidance_scale=0.0)
    d = sampling.sampling_diffusion(config)
    denoise_fn = sampling.denoiser(model, params, jnp.asarray(labels))
    run = samplers.ddim_sample if method == "ddim" else samplers.ddpm_sample
    direct = jax.jit(lambda k: run(d, denoise_fn, k, (8, 8, 3)))(keys)
    np.testing.assert_array_equal(got, images.to_uint8(direct))
    assert not np.array_equal(got, sampler(params, keys, labels, guidance_scale=2.0))


def test_guided_sampler_on_eight_devices_equals_one(capsys):
    config = cond_config()
    model, params = random_params(config)
    keys = samplers.sample_keys(jax.random.key(4), np.arange(16))
    labels = np.full(16, 1, np.int32)
    one = sampling.make_sampler(config, model, devices=jax.devices()[:1])(params, keys, labels)
    eight = sampling.make_sampler(config, model, devices=jax.devices())(params, keys, labels)
    with capsys.disabled():
        print(f"\nguided, 1 vs 8 devices: {np.mean(one != eight):.4f} of uint8 values differ")
    np.testing.assert_array_equal(one, eight)


def test_changing_w_does_not_recompile(monkeypatch):
    traces = []
    real = samplers.ddim_sample
    monkeypatch.setattr(samplers, "ddim_sample", lambda *a, **k: traces.append(1) or real(*a, **k))
    config = cond_config()
    model, params = random_params(config)
    sampler = sampling.make_sampler(config, model, devices=jax.devices()[:1])
    keys = samplers.sample_keys(jax.random.key(0), np.arange(2))
    outs = [sampler(params, keys, np.array([0, 1]), guidance_scale=w) for w in (0.0, 0.5, 4.0)]
    assert len(traces) == 1
    assert not np.array_equal(outs[1], outs[2])


def test_sample_labels_balanced_listed_and_null():
    balanced = guidance.sample_labels("", 3, np.arange(7))
    np.testing.assert_array_equal(balanced, [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(guidance.sample_labels("2,0", 3, [0, 1, 2, 5]), [2, 0, 2, 0])
    np.testing.assert_array_equal(guidance.sample_labels("null", 3, [0, 4]), [3, 3])
    np.testing.assert_array_equal(guidance.sample_labels(" 7 ", 10, [0, 1]), [7, 7])
    with pytest.raises(ValueError, match="class 3 is not in"):
        guidance.parse_labels("1,3", 3)
    with pytest.raises(ValueError, match="comma-separated class indices"):
        guidance.parse_labels("seven", 10)


def test_guidance_settings_an_unconditional_model_cannot_take():
    for field, value in (("guidance_scale", 1.0), ("labels", "3")):
        config = tiny.tiny_config({f"sampling.{field}": value})
        with pytest.raises(ValueError, match="needs a class-conditional model"):
            sampling.make_sampler(config, factories.create_model(config))
    with pytest.raises(ValueError, match="class 5 is not in"):
        sampling.check_conditioning(cond_config(**{"sampling.labels": "5"}))


def test_sampler_names_key_the_guidance_settings():
    names = {
        evaluation.sampler_name(cond_config(**{"sampling.guidance_scale": w, "sampling.labels": s}))
        for w in (0.0, 2.0) for s in ("", "1,2", "null")
    }  # fmt: skip
    assert len(names) == 6
    assert evaluation.sampler_name(cond_config()) == "ddim10_eta0.0_w2.0_balanced"


def test_label_dropout_rate_and_independence_of_the_split():
    labels = jnp.zeros(20_000, jnp.int32)
    index = jnp.arange(20_000)
    rng = jax.random.key(5)
    dropped = updates.drop_labels(labels, rng, index, rate=0.1, null_label=NUM_CLASSES)
    rate = float(jnp.mean(dropped == NUM_CLASSES))
    assert set(np.unique(dropped)) == {0, NUM_CLASSES}
    assert abs(rate - 0.1) < 5 * np.sqrt(0.1 * 0.9 / 20_000), rate  # 5 binomial std errors
    # Any slice of the batch draws the same choices for its examples.
    part = updates.drop_labels(labels[500:600], rng, index[500:600], rate=0.1, null_label=3)
    np.testing.assert_array_equal(part, dropped[500:600])


def _two_steps(config, labels):
    model, diffusion = factories.create_model(config), factories.create_diffusion(config)
    tx = optax.sgd(0.5)
    state = tiny.init_state(config, model, tx)
    step_fn = updates.make_train_step(config, model, diffusion, tx, devices=jax.devices()[:2])
    state = updates.replicated(state, jax.devices()[:2])
    image = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 8, 3), np.uint8)
    for _ in range(2):
        state, _ = step_fn(state, {"image": image, "label": labels}, jax.random.key(1))
    return state.params


def test_label_dropout_one_trains_a_model_blind_to_the_label():
    a, b = np.zeros((2, 8), np.int32), np.ones((2, 8), np.int32)
    for rate, same in ((1.0, True), (0.0, False)):
        config = cond_config(**{"training.label_dropout": rate})
        pa, pb = _two_steps(config, a), _two_steps(config, b)
        equal = all(
            np.array_equal(x, y) for x, y in zip(*map(jax.tree.leaves, (pa, pb)), strict=True)
        )
        assert equal == same, rate


def test_labels_out_of_range_fail_before_training_compiles_naming_the_file(tmp_path):
    for i, label in enumerate(["a", "b", "c", "d"]):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"{i}.png")
    config = cond_config(**{"data.source": "folder", "data.path": str(tmp_path / "images")})
    with pytest.raises(ValueError, match=r"1 of 4 examples .* outside \[0, 3\).*images/d/3.png"):
        train.train_and_evaluate(config, str(tmp_path / "workdir"))
    config = cond_config(**{"training.label_dropout": 1.5})
    with tfds.testing.mock_data(num_examples=16), pytest.raises(ValueError, match="label_dropout"):
        train.train_and_evaluate(config, str(tmp_path / "workdir"))


def test_grid_has_one_row_per_class():
    labels, columns = train.grid_labels(64, 10)
    assert columns == 6 and len(labels) == 60
    np.testing.assert_array_equal(labels.reshape(10, 6), np.repeat(np.arange(10), 6).reshape(10, 6))
    assert train.grid_labels(64, 0) == (None, None)
    assert train.grid_labels(4, 10)[1] == 1  # at least one sample per class


@pytest.mark.parametrize("name", ["mnist_cond", "cifar_cond"])
def test_conditional_configs_describe_a_guided_model(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.model.num_classes == 10 and config.training.label_dropout == 0.1
    sampling.check_conditioning(config)
    assert train.grid_labels(config.training.num_grid_samples, 10)[1] * 10 == (
        config.training.num_grid_samples
    )
