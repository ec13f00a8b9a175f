"""Latent diffusion's U-Net (diffusers UNet2DConditionModel) -> CondUNet, against torch.

tests/fixtures/ldm_tiny/ is a tiny random-weight LDMTextToImagePipeline written by
tools/make_ldm_fixtures.py with torch and diffusers, with the outputs diffusers computed
in tests/fixtures/ldm_tiny_outputs.npz; ldm_large_configs.json holds the released
CompVis/ldm-text2im-large-256 configs and ldm_tiny_outputs.json diffusers' own
parameter counts for them.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
import safetensors.numpy

from ddpm.convert_cond_unet import (
    cond_unet_from_diffusers,
    cond_unet_kwargs_from_diffusers_config,
    parameter_count,
)
from ddpm.models.cond_unet import CondUNet

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
UNET_DIR = FIXTURES / "ldm_tiny" / "unet"


def _tiny_config() -> dict:
    return json.loads((UNET_DIR / "config.json").read_text())


def _tiny_state() -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(UNET_DIR / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def tiny():
    """(apply, params, reference arrays) for the converted tiny fixture U-Net."""
    kwargs, params = cond_unet_from_diffusers(_tiny_config(), _tiny_state())
    apply = jax.jit(CondUNet(**kwargs).apply, static_argnames="train")
    return apply, params, dict(np.load(FIXTURES / "ldm_tiny_outputs.npz"))


def _relative_error(ours, reference) -> float:
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def test_tiny_fixture_matches_torch(tiny):
    apply, params, ref = tiny
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    out = apply(
        {"params": params},
        ref["unet_latents"],
        ref["unet_timesteps"],
        ref["unet_context"],
        train=False,
    )
    assert out.shape == ref["unet_out"].shape and out.dtype == np.float32
    err = _relative_error(out, ref["unet_out"])
    print(f"CondUNet vs diffusers UNet2DConditionModel: max relative error {err:.2e}")
    # Same float32 weights on both sides; only the order of summation differs.
    assert err < 1e-4


def test_context_and_timestep_change_the_output(tiny):
    """Fails if cross-attention ignored the context, or the residual blocks the time."""
    apply, params, ref = tiny
    x, t, context = ref["unet_latents"], ref["unet_timesteps"], ref["unet_context"]
    out = apply({"params": params}, x, t, context, train=False)
    other_context = apply({"params": params}, x, t, context[::-1], train=False)
    other_t = apply({"params": params}, x, (t + 300) % 1000, context, train=False)
    assert _relative_error(other_context, out) > 1e-2
    assert _relative_error(other_t, out) > 1e-2


def test_released_config_parameter_count():
    config = json.loads((FIXTURES / "ldm_large_configs.json").read_text())["unet"]
    expected = json.loads((FIXTURES / "ldm_tiny_outputs.json").read_text())["large_param_counts"]
    kwargs = cond_unet_kwargs_from_diffusers_config(config)
    assert kwargs["num_heads"] == 8 and kwargs["context_dim"] == 1280
    count = parameter_count(kwargs, config)
    print(f"released U-Net: {count} parameters (diffusers: {expected['unet']})")
    assert count == expected["unet"]


def test_tiny_config_kwargs():
    assert cond_unet_kwargs_from_diffusers_config(_tiny_config()) == dict(
        ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, cross_attn_levels=(True, True, False),
        num_heads=2, context_dim=32, transformer_depth=1, out_channels=4, num_groups=32,
        norm_eps=1e-5, dropout=0.0,
    )  # fmt: skip


# Tiny layout: 3 levels, so diffusers' up_blocks.1 is our level 1.
CROSS_K = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
PROJ_IN = "mid_block.attentions.0.proj_in.weight"
STRAY = "mid_block.attentions.0.transformer_blocks.0.attn3.to_q.weight"


def _missing(state):
    del state[CROSS_K]
    return "up_1_attn_0/block_0/cross_attn/k/kernel"


def _misshapen(state):
    state[PROJ_IN] = state[PROJ_IN][:-1]
    return "mid_attn/proj_in/kernel"


def _unknown(state):
    state[STRAY] = np.zeros((2, 2), np.float32)
    return STRAY


@pytest.mark.parametrize(
    "breakages", [[_missing], [_misshapen], [_unknown], [_missing, _misshapen, _unknown]]
)
def test_state_dict_problems_raise_one_error_naming_them(breakages):
    state = _tiny_state()
    names = [breakage(state) for breakage in breakages]
    with pytest.raises(ValueError) as error:
        cond_unet_from_diffusers(_tiny_config(), state)
    for name in names:
        assert name in str(error.value)


def test_unsupported_config_values_are_all_listed():
    config = {
        **_tiny_config(),
        "only_cross_attention": True,
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "attention_head_dim": [2, 4, 4],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
    }
    with pytest.raises(ValueError) as error:
        cond_unet_kwargs_from_diffusers_config(config)
    for words in ("only_cross_attention", "UNetMidBlock2DSimpleCrossAttn", "attention_head_dim"):
        assert words in str(error.value)
    assert "cross-attention levels differ" in str(error.value)


@pytest.mark.parametrize(
    "x_shape, t_shape, context_shape, message",
    [
        ((2, 6, 8, 4), (2,), (2, 5, 32), r"latent size 6x8 is not divisible by 4"),
        ((2, 8, 8, 4), (3,), (2, 5, 32), r"t must have shape \[2\]"),
        ((2, 8, 8, 4), (2,), (2, 5, 16), r"context must have shape \[2, L, 32\]"),
        ((2, 8, 8, 4), (2,), (1, 5, 32), r"context must have shape \[2, L, 32\]"),
        ((2, 8, 8, 4), (2,), (2, 32), r"context must have shape \[2, L, 32\]"),
    ],
)
def test_bad_inputs_raise_before_tracing(x_shape, t_shape, context_shape, message):
    model = CondUNet(**cond_unet_kwargs_from_diffusers_config(_tiny_config()))
    shapes = (jax.ShapeDtypeStruct(s, np.float32) for s in (x_shape, t_shape, context_shape))
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda *xtc: model.init(jax.random.key(0), *xtc, train=False), *shapes)
