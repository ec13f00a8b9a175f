"""diffusers UNet2DModel checkpoints -> our UNet, checked against torch outputs.

The fixtures under tests/fixtures/unet_*/ come from tools/make_unet_fixtures.py: small
random diffusers models in the DDPM layout (every weight random, including the
zero-initialised layers) and the outputs torch computed for a fixed batch.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from ddpm import param_trees
from ddpm.convert import SAFETENSORS_NAME, from_diffusers, unet_kwargs_from_diffusers_config
from ddpm.models.unet import UNet

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# config.json of the released google/ddpm-cifar10-32 (as diffusers 0.16 writes it).
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "add_attention": True,
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "class_embed_type": None,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "out_channels": 3,
    "resnet_time_scale_shift": "default",
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
CELEBAHQ_CONFIG = {
    **CIFAR10_CONFIG,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    "sample_size": 256,
}
LEGACY = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


@pytest.mark.parametrize("name", ["a", "b_bin"])
def test_converted_fixture_matches_torch(name):
    kwargs, params = from_diffusers(FIXTURES / f"unet_{name}")
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))  # stored as f16
    data = np.load(FIXTURES / f"unet_{name}" / "inputs.npz")
    y = data["y"] if "y" in data else None
    apply = jax.jit(UNet(**kwargs).apply, static_argnames="train")
    out = np.asarray(apply({"params": params}, data["x"], data["t"], y, train=False))
    assert out.shape == data["out"].shape
    err = np.abs(out - data["out"]).max()
    print(
        f"unet_{name}: max abs error vs torch {err:.2e} (outputs up to "
        f"{np.abs(data['out']).max():.2f})"
    )
    # Both sides compute in float32 from identical weights; only summation order differs.
    assert err < 1e-4


def test_fixture_kwargs():
    assert from_diffusers(FIXTURES / "unet_a")[0] == dict(
        ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0,
        resamp_with_conv=True, out_channels=3, num_classes=None,
    )  # fmt: skip
    config = json.loads((FIXTURES / "unet_b_bin" / "config.json").read_text())
    assert unet_kwargs_from_diffusers_config(config) == dict(
        ch=64, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(8,), dropout=0.0,
        resamp_with_conv=True, out_channels=2, num_classes=10,
    )  # fmt: skip


def test_released_configs_give_the_paper_models():
    common = dict(num_res_blocks=2, dropout=0.0, resamp_with_conv=True, out_channels=3)
    assert unet_kwargs_from_diffusers_config(CIFAR10_CONFIG) == dict(
        ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), num_classes=None, **common
    )
    assert unet_kwargs_from_diffusers_config(CELEBAHQ_CONFIG) == dict(
        ch=128, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,), num_classes=None, **common
    )


def test_legacy_attention_names_convert_alike(tmp_path):
    # unet_a uses the current names (to_q, ..., to_out.0); unet_b_bin, a .bin, the legacy
    # ones. Here the legacy names go into a safetensors file.
    def to_legacy(state):
        legacy = {}
        for key, value in state.items():
            for new, old in LEGACY.items():
                key = key.replace(new, old)
            legacy[key] = value
        assert any(".proj_attn." in k for k in legacy) and not any(".to_q." in k for k in legacy)
        return legacy

    renamed = from_diffusers(copy_fixture(tmp_path / "legacy", state_edit=to_legacy))
    original = from_diffusers(FIXTURES / "unet_a")
    assert renamed[0] == original[0]
    jax.tree.map(np.testing.assert_array_equal, renamed[1], original[1])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
        ({"freq_shift": 0}, "freq_shift"),
        ({"downsample_padding": 1}, "downsample_padding"),
        ({"norm_num_groups": 16}, "norm_num_groups"),
        ({"norm_eps": 1e-5}, "norm_eps"),
        ({"attention_head_dim": 8}, "multi-head"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        (
            {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"] + ["DownBlock2D"] * 2},
            "block types",
        ),
        ({"up_block_types": ["UpBlock2D"] * 4}, "attention levels differ"),
        ({"_class_name": "UNet2DConditionModel"}, "_class_name"),
        ({"sample_size": None}, "sample_size"),
    ],
)
def test_non_ddpm_configs_are_rejected(change, message):
    with pytest.raises(ValueError, match=f"not a DDPM UNet2DModel config: .*{message}"):
        unet_kwargs_from_diffusers_config({**CIFAR10_CONFIG, **change})


def test_missing_keys_mean_diffusers_defaults_and_are_rejected():
    config = dict(CIFAR10_CONFIG)
    del config["freq_shift"], config["attention_head_dim"]  # defaults 0 and 8: not DDPM
    with pytest.raises(ValueError, match="freq_shift=0.*attention_head_dim=8"):
        unet_kwargs_from_diffusers_config(config)


def copy_fixture(tmp_path, state_edit=None, config_edit=None):
    source = FIXTURES / "unet_a"
    tmp_path.mkdir()
    state = safetensors.numpy.load_file(source / SAFETENSORS_NAME)
    config = json.loads((source / "config.json").read_text())
    edited = state_edit(state) if state_edit else state
    safetensors.numpy.save_file(edited, tmp_path / SAFETENSORS_NAME)
    (tmp_path / "config.json").write_text(json.dumps({**config, **(config_edit or {})}))
    return tmp_path


def test_weights_that_do_not_fit_are_reported(tmp_path):
    def drop(state):
        return {k: v for k, v in state.items() if k != "conv_out.bias"}

    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['conv_out/bias'\]"):
        from_diffusers(copy_fixture(tmp_path / "drop", drop))
    with pytest.raises(ValueError, match=r"shape mismatches.*conv_out/kernel"):
        from_diffusers(copy_fixture(tmp_path / "shape", config_edit={"out_channels": 6}))

    def add(state):
        return {**state, "down_blocks.0.extra.weight": state["conv_out.bias"]}

    with pytest.raises(ValueError, match=r"no place in our UNet: \['down_blocks.0.extra.weight'\]"):
        from_diffusers(copy_fixture(tmp_path / "extra", add))


def test_fit_check_names_extra_leaves_and_caps_long_lists():
    expected = {f"w{i:02d}": np.zeros(2) for i in range(12)}
    params = {"extra": {"kernel": np.zeros(1)}}
    with pytest.raises(ValueError) as error:
        param_trees.check_fit(params, expected, source="file.pt", model="Net")
    assert str(error.value) == (
        "file.pt does not fit the Net; missing from the checkpoint: "
        f"{[f'w{i:02d}' for i in range(10)]} and 2 more; not in the Net: ['extra/kernel']"
    )


def test_missing_weights_file(tmp_path):
    shutil.copy(FIXTURES / "unet_a" / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors"):
        from_diffusers(tmp_path)


def _config_for_unet_a():
    from configs import default

    config = default.get_config()
    config.data.image_size, config.data.num_channels = 16, 3
    config.model.update(ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(16,))
    return config


def test_convert_command_writes_a_checkpoint_the_modes_load(tmp_path):
    from ddpm import convert, evaluation

    config = _config_for_unet_a()
    convert.convert_checkpoint(config, FIXTURES / "unet_a", tmp_path)
    model, params, step = evaluation.load_ema_params(config, tmp_path)
    assert step == 0
    data = np.load(FIXTURES / "unet_a" / "inputs.npz")
    out = jax.jit(model.apply, static_argnames="train")(
        {"params": params}, data["x"], data["t"], train=False
    )
    assert np.abs(np.asarray(out) - data["out"]).max() < 1e-4

    config.model.ch = 64
    with pytest.raises(ValueError, match=r"does not match the config's model.*'ch': \(64, 32\)"):
        convert.convert_checkpoint(config, FIXTURES / "unet_a", tmp_path / "other")
