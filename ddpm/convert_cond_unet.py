"""Convert diffusers `UNet2DConditionModel` weights (latent diffusion's U-Net) into CondUNet.

CompVis/ldm-text2im-large-256 keeps its U-Net under unet/ (config.json and
diffusion_pytorch_model.safetensors); `ddpm.convert_ldm` reads the whole pipeline
folder and calls `cond_unet_from_diffusers` with the parsed config and the state dict:

    kwargs, params = cond_unet_from_diffusers(config, safetensors.numpy.load_file(path))
    eps = CondUNet(**kwargs).apply({"params": params}, z_t, t, text_states, train=False)

The residual blocks, resampling layers and the time MLP have the same names as in
DDPM's UNet2DModel, so their keys go through `ddpm.convert`'s mapping; this module
adds the spatial transformers (`*.attentions.{i}.*`).
"""

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm import param_trees
from ddpm.convert import place_tensors, unet_layer_name
from ddpm.models.cond_unet import CondUNet

_CROSS_ATTN_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_ATTN_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# Config values CondUNet fixes: key -> (diffusers' default for a missing key, accepted).
_FIXED = {
    "center_input_sample": (False, (False,)),
    "flip_sin_to_cos": (True, (True,)),
    "freq_shift": (0, (0,)),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", ("UNetMidBlock2DCrossAttn",)),
    "only_cross_attention": (False, (False,)),
    "mid_block_only_cross_attention": (None, (None, False)),
    "downsample_padding": (1, (1,)),  # one pixel on each side (Downsample pad_after_only=False)
    "mid_block_scale_factor": (1, (1,)),
    "act_fn": ("silu", ("silu", "swish")),
    "dual_cross_attention": (False, (False,)),
    # Both only say whether diffusers' spatial-transformer projections are Linear layers or
    # 1x1 convs (the same map), and whether attention logits are computed in float32
    # (ours always are).
    "use_linear_projection": (False, (False, True)),
    "upcast_attention": (False, (False, True)),
    "num_attention_heads": (None, (None,)),  # diffusers itself refuses it (legacy naming)
    "encoder_hid_dim": (None, (None,)),
    "encoder_hid_dim_type": (None, (None,)),
    "class_embed_type": (None, (None,)),
    "num_class_embeds": (None, (None,)),
    "addition_embed_type": (None, (None,)),
    "resnet_time_scale_shift": ("default", ("default",)),
    "resnet_skip_time_act": (False, (False,)),
    "resnet_out_scale_factor": (1.0, (1.0,)),
    "time_embedding_type": ("positional", ("positional",)),
    "time_embedding_act_fn": (None, (None,)),
    "timestep_post_act": (None, (None,)),
    "time_cond_proj_dim": (None, (None,)),
    "conv_in_kernel": (3, (3,)),
    "conv_out_kernel": (3, (3,)),
    "attention_type": ("default", ("default",)),
    "class_embeddings_concat": (False, (False,)),
    "cross_attention_norm": (None, (None,)),
    "reverse_transformer_layers_per_block": (None, (None,)),
}

# Per-level values that CondUNet holds as one number: key -> diffusers' default.
_ONE_PER_MODEL = {
    "layers_per_block": 2,
    "attention_head_dim": 8,  # diffusers' legacy name for the number of heads
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
}

# diffusers Transformer2DModel sub-layer -> ours (inside `*_attn_*`).
_TRANSFORMER_LAYERS = {
    "norm": "norm",
    "proj_in": "proj_in",
    "proj_out": "proj_out",
}
_TRANSFORMER_BLOCK_LAYERS = {
    "norm1": "norm_self_attn",
    "attn1.to_q": "self_attn/q",
    "attn1.to_k": "self_attn/k",
    "attn1.to_v": "self_attn/v",
    "attn1.to_out.0": "self_attn/out",
    "norm2": "norm_cross_attn",
    "attn2.to_q": "cross_attn/q",
    "attn2.to_k": "cross_attn/k",
    "attn2.to_v": "cross_attn/v",
    "attn2.to_out.0": "cross_attn/out",
    "norm3": "norm_ff",
    "ff.net.0.proj": "ff/proj",
    "ff.net.2": "ff/out",
}


def _one_per_model(config: dict[str, Any], key: str, num_levels: int, problems: list[str]):
    """config[key] as one value; diffusers also takes one per level, fine if all agree."""
    value = config.get(key, _ONE_PER_MODEL[key])
    if isinstance(value, list | tuple):
        if len(value) != num_levels or len(set(value)) != 1:
            problems.append(f"{key}={value}: CondUNet needs one value for all {num_levels} levels")
            return _ONE_PER_MODEL[key]
        value = value[0]
    if not isinstance(value, int):
        problems.append(f"{key}={value!r}: CondUNet needs an integer")
        return _ONE_PER_MODEL[key]
    return value


def cond_unet_kwargs_from_diffusers_config(config: dict[str, Any]) -> dict[str, Any]:
    """Map a UNet2DConditionModel config.json to CondUNet's fields.

    Keys this does not know are ignored, as diffusers ignores them.

    Returns:
      {ch, ch_mult, num_res_blocks, cross_attn_levels, num_heads, context_dim,
       transformer_depth, out_channels, num_groups, norm_eps, dropout};
      `CondUNet(**kwargs)` builds the matching model.

    Raises:
      ValueError listing every config value CondUNet does not support.
    """
    problems = []
    name = config.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        problems.append(f"_class_name is {name!r}, expected 'UNet2DConditionModel'")
    for key, (default, accepted) in _FIXED.items():
        if config.get(key, default) not in accepted:
            problems.append(f"{key}={config.get(key, default)!r} (supported: {list(accepted)})")

    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    ch, num_levels = channels[0], len(channels)
    if any(c % ch for c in channels):
        problems.append(f"block_out_channels {channels} are not multiples of {ch}")
    down = list(config.get("down_block_types", [_CROSS_ATTN_DOWN] * 3 + [_PLAIN_DOWN]))
    up = list(config.get("up_block_types", [_PLAIN_UP] + [_CROSS_ATTN_UP] * 3))
    cross_attn_levels = tuple(b == _CROSS_ATTN_DOWN for b in down)
    if len(down) != num_levels or len(up) != num_levels:
        problems.append(f"{num_levels} levels but block types down={down}, up={up}")
    elif set(down) - {_CROSS_ATTN_DOWN, _PLAIN_DOWN} or set(up) - {_CROSS_ATTN_UP, _PLAIN_UP}:
        problems.append(f"block types down={down}, up={up}: only (CrossAttn)Down/UpBlock2D")
    elif list(cross_attn_levels) != [b == _CROSS_ATTN_UP for b in reversed(up)]:
        problems.append(f"cross-attention levels differ between down={down} and up={up}")
    if config.get("time_embedding_dim") not in (None, 4 * ch):
        problems.append(f"time_embedding_dim={config['time_embedding_dim']} (CondUNet: 4*{ch})")
    num_groups = config.get("norm_num_groups", 32)
    if not isinstance(num_groups, int):
        problems.append(f"norm_num_groups={num_groups!r}: CondUNet needs GroupNorm")
    per_model = {key: _one_per_model(config, key, num_levels, problems) for key in _ONE_PER_MODEL}
    if problems:
        raise ValueError("config values CondUNet does not support: " + "; ".join(problems))

    return dict(
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=per_model["layers_per_block"],
        cross_attn_levels=cross_attn_levels,
        num_heads=per_model["attention_head_dim"],
        context_dim=per_model["cross_attention_dim"],
        transformer_depth=per_model["transformer_layers_per_block"],
        out_channels=int(config.get("out_channels", 4)),
        num_groups=num_groups,
        norm_eps=float(config.get("norm_eps", 1e-5)),
        dropout=float(config.get("dropout", 0.0)),
    )


def _transformer_layer(key: str, num_levels: int) -> str | None:
    """A spatial-transformer layer's key -> our layer path; None for any other key.

    'up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k' (4 levels)
    -> 'up_2_attn_2/block_0/cross_attn/k'.
    """
    m = re.fullmatch(r"(?:(down|up)_blocks\.(\d+)|mid_block)\.attentions\.(\d+)\.(.+)", key)
    if not m:
        return None
    path, index, i, layer = m.groups()
    if path is None:
        module = "mid_attn" if i == "0" else None
    else:
        # diffusers numbers up blocks from the bottom; we number levels from the top.
        level = int(index) if path == "down" else num_levels - 1 - int(index)
        module = f"{path}_{level}_attn_{i}"
    block = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", layer)
    if block and block.group(2) in _TRANSFORMER_BLOCK_LAYERS:
        inner = f"block_{block.group(1)}/{_TRANSFORMER_BLOCK_LAYERS[block.group(2)]}"
    else:
        inner = _TRANSFORMER_LAYERS.get(layer)
    return None if module is None or inner is None else f"{module}/{inner}"


def cond_unet_from_diffusers(
    config: dict[str, Any], state: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A UNet2DConditionModel (config.json, state dict) as CondUNet kwargs and params.

    Args:
      config: the parsed unet/config.json.
      state: {diffusers key: array}, e.g. from `safetensors.numpy.load_file` (any float
        dtype; stored as float32).

    Returns:
      (kwargs, params): `CondUNet(**kwargs)` and the nested dict of float32 numpy arrays
      to use as `{"params": params}`.

    Raises:
      ValueError: the config is not supported, or (one message for all) the state dict
        has keys CondUNet has no place for, or lacks or misshapes some of its params.
    """
    kwargs = cond_unet_kwargs_from_diffusers_config(config)
    num_levels = len(kwargs["ch_mult"])
    params, unknown = place_tensors(
        state, lambda key: _transformer_layer(key, num_levels) or unet_layer_name(key, num_levels)
    )
    for key in unknown:  # kept under its own name, so that check_fit lists it with the strays
        params[key] = np.asarray(state[key])
    param_trees.check_fit(
        params, expected_params(kwargs, config), source="the state dict", model="CondUNet"
    )
    return kwargs, params


def expected_params(kwargs: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """CondUNet(**kwargs)'s params as jax.ShapeDtypeStructs (jax.eval_shape: no compute)."""
    model = CondUNet(**kwargs)
    size = 2 ** (len(kwargs["ch_mult"]) - 1)  # parameter shapes do not depend on the size
    x = jnp.zeros((1, size, size, int(config.get("in_channels", 4))), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    context = jnp.zeros((1, 1, kwargs["context_dim"]), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, context, train=False))
    return variables["params"]


def parameter_count(kwargs: dict[str, Any], config: dict[str, Any]) -> int:
    """Number of parameters of CondUNet(**kwargs), without building any weights."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(expected_params(kwargs, config)))
