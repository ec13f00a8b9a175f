"""The KL autoencoder of latent diffusion, converted from diffusers, against torch's outputs.

tests/fixtures/ldm_tiny/ is a random-weight LDMTextToImagePipeline in diffusers' layout
and ldm_tiny_outputs.npz what torch computed with it (tools/make_ldm_fixtures.py).
"""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm import convert_ldm
from ddpm.models.autoencoder import AutoencoderKL, gaussian_sample

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
PIPELINE = FIXTURES / "ldm_tiny"
TOLERANCE = 1e-4  # max |ours - torch| / max |torch|: float32 on both sides


def relative_error(ours, reference, name: str) -> float:
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, name
    error = float(np.abs(ours - reference).max() / np.abs(reference).max())
    print(f"{name}: max relative error {error:.2e}")
    return error


def param_count(module, *init_args) -> int:
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *init_args))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


@pytest.fixture(scope="module")
def vqvae():
    return convert_ldm.load_component(PIPELINE / "vqvae", convert_ldm.autoencoder_from_diffusers)


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURES / "ldm_tiny_outputs.npz")


def test_encoder_gives_torchs_posterior(vqvae, reference):
    model = AutoencoderKL(**vqvae.kwargs)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))
    mean, logvar = encode(vqvae.params, reference["vae_images"])
    errors = [
        relative_error(mean, reference["vae_posterior_mean"], "vae_posterior_mean"),
        relative_error(logvar, reference["vae_posterior_logvar"], "vae_posterior_logvar"),
    ]
    assert max(errors) < TOLERANCE


def test_decoder_gives_torchs_images(vqvae, reference):
    model = AutoencoderKL(**vqvae.kwargs)
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))
    images = decode(vqvae.params, reference["vae_latents"])
    assert relative_error(images, reference["vae_decoded"], "vae_decoded") < TOLERANCE


def test_gaussian_sample_uses_the_given_noise():
    mean, logvar = jnp.full((1, 2, 2, 4), 0.5), jnp.full((1, 2, 2, 4), math.log(4.0))
    noise = jax.random.normal(jax.random.key(0), mean.shape)
    np.testing.assert_allclose(gaussian_sample(mean, logvar, noise), 0.5 + 2.0 * noise, rtol=1e-6)


def test_released_config_has_diffusers_parameter_count():
    data = json.loads((FIXTURES / "ldm_large_configs.json").read_text())
    counts = json.loads((FIXTURES / "ldm_tiny_outputs.json").read_text())["large_param_counts"]
    kwargs = convert_ldm.autoencoder_kwargs_from_diffusers_config(data["vqvae"])
    count = param_count(AutoencoderKL(**kwargs), jnp.zeros((1, 8, 8, kwargs["in_channels"])))
    print(f"vqvae: {count} parameters (diffusers: {counts['vqvae']})")
    assert count == counts["vqvae"]


def _tiny_config_and_state():
    config = json.loads((PIPELINE / "vqvae" / "config.json").read_text())
    return config, convert_ldm.load_diffusers_state_dict(PIPELINE / "vqvae")


def test_weights_that_do_not_fit_are_reported():
    config, state = _tiny_config_and_state()
    extra = {**state, "decoder.extra_layer.weight": state["decoder.conv_out.bias"]}
    with pytest.raises(ValueError, match=r"no place in our AutoencoderKL: \['decoder.extra_layer"):
        convert_ldm.autoencoder_from_diffusers(config, extra)

    missing = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(
        ValueError, match=r"missing from the checkpoint: \['decoder/conv_out/bias'\]"
    ):
        convert_ldm.autoencoder_from_diffusers(config, missing)

    misshapen = {**state, "quant_conv.bias": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"shape mismatches.*quant_conv/bias: \(3,\)"):
        convert_ldm.autoencoder_from_diffusers(config, misshapen)


def test_legacy_attention_names_convert_alike():
    # Files written by early diffusers name the mid-block attention query/key/value/
    # proj_attn and store the projections as 1x1 convs.
    config, state = _tiny_config_and_state()
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, old in legacy_names.items():
            if f".attentions.0.{new}.weight" in key:
                value = value[:, :, None, None]
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value
    assert any(".proj_attn." in key for key in legacy)
    _, ours = convert_ldm.autoencoder_from_diffusers(config, legacy)
    _, reference = convert_ldm.autoencoder_from_diffusers(config, state)
    jax.tree.map(np.testing.assert_array_equal, ours, reference)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"_class_name": "VQModel"}, "_class_name"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block"),
        ({"block_out_channels": [32, 48, 64]}, "not multiples"),
        ({"norm_num_groups": 24}, "groups"),
    ],
)
def test_unsupported_configs_are_rejected(change, message):
    config, _ = _tiny_config_and_state()
    with pytest.raises(ValueError, match=f"unsupported AutoencoderKL config: .*{message}"):
        convert_ldm.autoencoder_kwargs_from_diffusers_config({**config, **change})
