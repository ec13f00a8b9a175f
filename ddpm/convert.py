"""Convert diffusers `UNet2DModel` checkpoints (the released DDPM weights) into our UNet.

The official DDPM weights live on in diffusers' format (google/ddpm-cifar10-32,
-celebahq-256, -church-256, -bedroom-256, -cat-256): a directory with config.json and
diffusion_pytorch_model.safetensors or .bin. `from_diffusers` reads one without torch:
safetensors through `safetensors.numpy`, .bin through `ddpm.torch_pickle`, a restricted
unpickler that runs no code from the file.

    unet_kwargs, params = from_diffusers("ddpm-cifar10-32")
    model = UNet(**unet_kwargs)
    eps = model.apply({"params": params}, x, t, train=False)
"""

import json
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy
from absl import logging
from etils import epath

from ddpm import checkpointing, param_trees
from ddpm.factories import create_model, create_optimizer, state_from_params
from ddpm.models.unet import NORM_EPS, NUM_GROUPS, UNet

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"

# Config values that define the DDPM layout, with diffusers' default for a missing key
# (a missing key means diffusers builds its default, which may not be DDPM's).
_REQUIRED = {
    "flip_sin_to_cos": (True, False),  # [sin, cos] order
    "freq_shift": (0, 1),  # frequencies exp(-ln(10000) i / (half_dim - 1))
    "downsample_padding": (1, 0),  # right/bottom padding only, as TF 'SAME'
    "norm_num_groups": (32, NUM_GROUPS),
    "time_embedding_type": ("positional", "positional"),
    "resnet_time_scale_shift": ("default", "default"),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"),
    "center_input_sample": (False, False),
    "mid_block_scale_factor": (1, 1),
    "add_attention": (True, True),
    "class_embed_type": (None, None),
}
_ATTN_BLOCKS = {"AttnDownBlock2D", "AttnUpBlock2D"}

# diffusers sub-layer name -> ours, per block kind. Attention has two namings: the
# current one and the legacy one that the released google/ddpm-* files use.
_RESNET_LAYERS = {
    "norm1": "norm_0",
    "conv1": "conv_0",
    "time_emb_proj": "temb_proj",
    "norm2": "norm_1",
    "conv2": "conv_1",
    "conv_shortcut": "shortcut",
}
_ATTN_LAYERS = {
    "group_norm": "norm",
    "to_q": "q",
    "query": "q",
    "to_k": "k",
    "key": "k",
    "to_v": "v",
    "value": "v",
    "to_out.0": "proj_out",
    "proj_attn": "proj_out",
}
_TOP_LAYERS = {
    "conv_in": "conv_in",
    "time_embedding.linear_1": "temb_dense_0",
    "time_embedding.linear_2": "temb_dense_1",
    "class_embedding": "class_embed",
    "conv_norm_out": "norm_out",
    "conv_out": "conv_out",
}


def unet_kwargs_from_diffusers_config(config: dict[str, Any]) -> dict[str, Any]:
    """Map a UNet2DModel config.json to our UNet fields; ValueError if it is not DDPM's layout.

    Returns:
      {ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv,
       out_channels, num_classes}; `UNet(**kwargs)` builds the matching model. dropout is
      config["dropout"] or 0.0: the released configs do not record the training dropout
      (0.1 for CIFAR-10), so set it yourself before fine-tuning.
    """
    problems = []
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        problems.append(f"_class_name is {name!r}, expected 'UNet2DModel'")
    for key, (default, wanted) in _REQUIRED.items():
        if config.get(key, default) != wanted:
            problems.append(f"{key}={config.get(key, default)!r} (DDPM needs {wanted!r})")
    if not math.isclose(config.get("norm_eps", 1e-5), NORM_EPS, rel_tol=1e-6):
        problems.append(f"norm_eps={config.get('norm_eps', 1e-5)} (DDPM needs {NORM_EPS})")
    if config.get("act_fn", "silu") not in ("silu", "swish"):
        problems.append(f"act_fn={config['act_fn']!r} (DDPM needs 'silu')")

    channels = list(config.get("block_out_channels", (224, 448, 672, 896)))
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    ch = channels[0]
    if any(c % ch for c in channels):
        problems.append(f"block_out_channels {channels} are not multiples of {ch}")
    if len(down) != len(channels) or len(up) != len(channels):
        problems.append(f"{len(channels)} levels but block types down={down}, up={up}")
    elif any(b not in ("DownBlock2D", "AttnDownBlock2D") for b in down) or any(
        b not in ("UpBlock2D", "AttnUpBlock2D") for b in up
    ):
        problems.append(f"block types down={down}, up={up}: DDPM uses only (Attn)Down/UpBlock2D")
    elif [b in _ATTN_BLOCKS for b in down] != [b in _ATTN_BLOCKS for b in reversed(up)]:
        problems.append(f"attention levels differ between down={down} and up={up}")
    if config.get("time_embedding_dim") not in (None, 4 * ch):
        problems.append(f"time_embedding_dim={config['time_embedding_dim']} (DDPM uses 4*{ch})")
    if config.get("attn_norm_num_groups") not in (None, NUM_GROUPS):
        problems.append(f"attn_norm_num_groups={config['attn_norm_num_groups']}")
    # diffusers: heads = channels // attention_head_dim (default 8); DDPM has one head.
    head_dim = config.get("attention_head_dim", 8)
    attn_channels = [c for c, b in zip(channels, down, strict=False) if b in _ATTN_BLOCKS]
    if head_dim is not None and any(c != head_dim for c in attn_channels + channels[-1:]):
        problems.append(f"attention_head_dim={head_dim} gives multi-head attention")

    sample_size = config.get("sample_size")
    if isinstance(sample_size, list | tuple):
        sample_size = sample_size[0]  # attention placement follows the height
    if not isinstance(sample_size, int):
        problems.append(f"sample_size={sample_size!r}: needed to place attention by resolution")
    elif sample_size % 2 ** (len(channels) - 1):
        problems.append(f"sample_size={sample_size} not divisible by 2**{len(channels) - 1}")
    if problems:
        raise ValueError("not a DDPM UNet2DModel config: " + "; ".join(problems))

    num_class_embeds = config.get("num_class_embeds")
    return dict(
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=int(config.get("layers_per_block", 2)),
        attn_resolutions=tuple(
            sample_size // 2**level for level, b in enumerate(down) if b in _ATTN_BLOCKS
        ),
        dropout=float(config.get("dropout", 0.0)),
        resamp_with_conv=True,
        out_channels=int(config.get("out_channels", 3)),
        # Our embedding has num_classes + 1 rows, the last meaning "no class".
        num_classes=None if num_class_embeds is None else int(num_class_embeds) - 1,
    )


def unet_layer_name(key: str, num_levels: int) -> str | None:
    """'up_blocks.0.attentions.1.query' -> 'up_{n-1}_attn_1/q'; None if not a UNet layer."""
    if key in _TOP_LAYERS:
        return _TOP_LAYERS[key]
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        path, index, kind, i, layer = m.groups()
        # diffusers numbers up blocks from the bottom; we number levels from the top.
        level = int(index) if path == "down" else num_levels - 1 - int(index)
        table = _RESNET_LAYERS if kind == "resnets" else _ATTN_LAYERS
        block = "block" if kind == "resnets" else "attn"
        return f"{path}_{level}_{block}_{i}/{table[layer]}" if layer in table else None
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(?:downsamplers|upsamplers)\.0\.conv", key)
    if m:
        path, index = m.group(1), int(m.group(2))
        level = index if path == "down" else num_levels - 1 - index
        return f"{path}_{level}_{path}sample/conv"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, i, layer = m.groups()
        if kind == "resnets" and layer in _RESNET_LAYERS:
            return f"mid_block_{i}/{_RESNET_LAYERS[layer]}"
        if kind == "attentions" and i == "0" and layer in _ATTN_LAYERS:
            return f"mid_attn/{_ATTN_LAYERS[layer]}"
    return None


def convert_array(layer: str, param: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Torch tensor -> (our leaf name, array): OIHW -> HWIO, [out, in] -> [in, out].

    layer: our layer path ('a/b/q'); its last part decides norms, embeddings and the
    Dense layers that torch may store as 1x1 convolutions.
    """
    value = np.asarray(value, dtype=np.float32)
    leaf = layer.rsplit("/", 1)[-1]
    if param == "bias":
        return "bias", value
    if leaf.startswith("norm"):
        return "scale", value
    if leaf == "class_embed" or leaf.startswith("embed_"):
        return "embedding", value
    if value.ndim == 4 and leaf in ("q", "k", "v", "proj_in", "proj_out"):
        value = value[:, :, 0, 0]  # attention / transformer projections stored as 1x1 convs
    if value.ndim == 4:
        return "kernel", value.transpose(2, 3, 1, 0)
    return "kernel", value.T


def place_tensors(
    state: dict[str, np.ndarray], layer_of: Callable[[str], str | None]
) -> tuple[dict[str, Any], list[str]]:
    """A torch state dict -> (our nested params, the keys that found no place).

    layer_of maps a module key ('down_blocks.0.resnets.1.conv1') to our layer path
    ('down_0_block_1/conv_0') or None; each tensor is converted by `convert_array`.
    """
    params: dict[str, Any] = {}
    unknown = []
    for key, value in state.items():
        module_key, _, param = key.rpartition(".")
        layer = layer_of(module_key)
        if layer is None or param not in ("weight", "bias"):
            unknown.append(key)
            continue
        leaf, array = convert_array(layer, param, value)
        param_trees.set_leaf(params, [*layer.split("/"), leaf], array)
    return params, sorted(unknown)


def convert_state_dict(state: dict[str, np.ndarray], num_levels: int) -> dict[str, Any]:
    """Rename and transpose a UNet2DModel state dict into our (nested) params dict.

    Raises ValueError listing every key that does not belong to a DDPM UNet2DModel.
    """
    params, unknown = place_tensors(state, lambda key: unet_layer_name(key, num_levels))
    if unknown:
        raise ValueError(f"checkpoint keys with no place in our UNet: {sorted(unknown)}")
    return params


def check_params_match(params: dict[str, Any], unet_kwargs: dict, image_shape: tuple) -> None:
    """ValueError unless `params` has exactly the names and shapes of UNet(**unet_kwargs).init.

    image_shape: (H, W, C_in) of the input the model is initialised with (no compute:
    shapes come from jax.eval_shape).
    """
    model = UNet(**unet_kwargs)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False))
    param_trees.check_fit(params, expected["params"], source="converted params", model="UNet")


def _resolve_dir(path: epath.Path) -> epath.Path:
    # A pipeline directory keeps the model under unet/; accept it as well.
    if not (path / "config.json").exists() and (path / "unet" / "config.json").exists():
        return path / "unet"
    return path


def load_diffusers_state_dict(
    model_dir: epath.PathLike, names: tuple[str, ...] = (SAFETENSORS_NAME, BIN_NAME)
) -> dict[str, np.ndarray]:
    """Read the first of `names` present in `model_dir` as {key: np.ndarray}.

    names: weight file names in order of preference; a name ending in .safetensors is
    read with safetensors, any other as a torch.save archive (through ddpm.torch_pickle,
    which runs no code from the file). diffusers models use the default names,
    transformers models (LDMBert) model.safetensors / pytorch_model.bin.
    """
    model_dir = epath.Path(model_dir)
    for name in names:
        path = model_dir / name
        if not path.exists():
            continue
        if name.endswith(".safetensors"):  # read whole: load_file takes local names only
            return safetensors.numpy.load(path.read_bytes())
        # Imported here: only .bin checkpoints need the torch-free pickle reader.
        from ddpm import torch_pickle

        return torch_pickle.load_state_dict(path)
    found = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    raise FileNotFoundError(f"no {' or '.join(names)} in {model_dir} (found: {found})")


def from_diffusers(path: epath.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a diffusers UNet2DModel checkpoint directory as our UNet's kwargs and params.

    Args:
      path: directory with config.json and diffusion_pytorch_model.{safetensors,bin}
        (or a pipeline directory with those under unet/).

    Returns:
      (unet_kwargs, params): `UNet(**unet_kwargs)` is the matching model and `params`
      the nested dict of float32 numpy arrays to use as `{"params": params}`.
    """
    model_dir = _resolve_dir(epath.Path(path))
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    config = json.loads(config_path.read_text())
    unet_kwargs = unet_kwargs_from_diffusers_config(config)
    state = load_diffusers_state_dict(model_dir)
    params = convert_state_dict(state, num_levels=len(unet_kwargs["ch_mult"]))
    size = config["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    check_params_match(params, unet_kwargs, (height, width, int(config.get("in_channels", 3))))
    return unet_kwargs, params


def convert_checkpoint(config: ml_collections.ConfigDict, source, workdir):
    """Writes a diffusers UNet2DModel (e.g. google/ddpm-cifar10-32) as step 0 of `workdir`.

    The config must describe the same network (configs/cifar.py for the CIFAR-10 release,
    configs/celebahq.py or configs/lsun_*.py for the 256x256 ones); dropout may differ.
    """
    unet_kwargs, params = from_diffusers(source)
    model = create_model(config)
    mismatched = {
        name: (getattr(model, name), value)
        for name, value in unet_kwargs.items()
        if name != "dropout" and getattr(model, name) != value
    }
    if mismatched:
        raise ValueError(
            f"{source} does not match the config's model; (config, checkpoint): {mismatched}"
        )
    state = state_from_params(jax.tree.map(jnp.asarray, params), create_optimizer(config.optim))
    checkpointer = checkpointing.Checkpointer(workdir)
    checkpointer.save(0, state, force=True)
    checkpointer.close()
    logging.info("Converted %s into %s (step 0)", source, workdir)
    return state
