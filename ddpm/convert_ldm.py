"""Convert a diffusers LDMTextToImagePipeline folder (CompVis/ldm-text2im-large-256) without torch.

The folder holds model_index.json and one sub-folder per component:

    vqvae/      AutoencoderKL   config.json, diffusion_pytorch_model.{safetensors,bin}
    bert/       LDMBertModel    config.json, model.safetensors or pytorch_model.bin
    tokenizer/  BertTokenizer   vocab.txt, tokenizer_config.json
    unet/       UNet2DConditionModel (converted by ddpm.convert_cond_unet)
    scheduler/  DDIMScheduler   scheduler_config.json

    pipeline = load_pipeline("ldm-text2im-large-256")
    ids = pipeline.tokenizer(["a squirrel"])
    text = LDMBert(**pipeline.bert.kwargs).apply({"params": pipeline.bert.params}, ids)

Weights are read with safetensors or ddpm.torch_pickle (which runs no code from the
file). Every tensor must find its place and every parameter must be filled with the
right shape; otherwise one ValueError lists what does not fit.
"""

import dataclasses
import json
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddpm import param_trees
from ddpm.convert import (
    BIN_NAME,
    SAFETENSORS_NAME,
    load_diffusers_state_dict,
    place_tensors,
    unet_layer_name,
)
from ddpm.models.autoencoder import AutoencoderKL
from ddpm.models.ldmbert import LDMBert
from ddpm.models.transformer import LAYER_NORM_EPS
from ddpm.text_tokenizer import PromptTokenizer

PIPELINE_CLASS = "LDMTextToImagePipeline"
# model_index.json: component -> the classes we can read for it.
COMPONENT_CLASSES = {
    "vqvae": {"AutoencoderKL"},
    "bert": {"LDMBertModel"},
    "tokenizer": {"BertTokenizer", "BertTokenizerFast"},
    "unet": {"UNet2DConditionModel"},
    "scheduler": None,  # any: returned as its config for the sampler to interpret
}
TRANSFORMERS_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
DEFAULT_SCALING_FACTOR = 0.18215  # AutoencoderKL's default, LDM's 1 / std of latents

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ConvertedModel:
    """One network: `Module(**kwargs).apply({"params": params}, ...)` runs it.

    params: nested dict of float32 numpy arrays.
    """

    kwargs: dict[str, Any]
    params: Params


@dataclasses.dataclass(frozen=True)
class LDMPipeline:
    """Everything LDMTextToImagePipeline needs, read from its folder.

    Attributes:
      tokenizer: prompts -> int32 [N, 77] ids.
      vqvae: ddpm.models.autoencoder.AutoencoderKL.
      bert: ddpm.models.ldmbert.LDMBert.
      unet: ddpm.models.cond_unet.CondUNet.
      scaling_factor: diffusion latents = autoencoder latents * scaling_factor.
      scheduler_config: scheduler/scheduler_config.json as a dict.
    """

    tokenizer: PromptTokenizer
    vqvae: ConvertedModel
    bert: ConvertedModel
    unet: ConvertedModel
    scaling_factor: float
    scheduler_config: dict[str, Any]


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"unsupported {what} config: " + "; ".join(problems))


def autoencoder_kwargs_from_diffusers_config(config: dict[str, Any]) -> dict[str, Any]:
    """Map an AutoencoderKL config.json to AutoencoderKL fields; ValueError for what we lack.

    Missing keys take diffusers' defaults. scaling_factor, sample_size and the other
    pipeline-level keys do not change the network and are not looked at here.
    """
    problems = []
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        problems.append(f"_class_name is {config['_class_name']!r}, expected 'AutoencoderKL'")
    if config.get("act_fn", "silu") not in ("silu", "swish"):
        problems.append(f"act_fn={config['act_fn']!r} (only 'silu')")
    channels = [int(c) for c in config.get("block_out_channels", (64,))]
    down = list(config.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(config.get("up_block_types", ("UpDecoderBlock2D",)))
    if down != ["DownEncoderBlock2D"] * len(channels):
        problems.append(f"down_block_types={down} (only DownEncoderBlock2D, one per level)")
    if up != ["UpDecoderBlock2D"] * len(channels):
        problems.append(f"up_block_types={up} (only UpDecoderBlock2D, one per level)")
    ch = channels[0]
    if any(c % ch for c in channels):
        problems.append(f"block_out_channels {channels} are not multiples of {ch}")
    groups = int(config.get("norm_num_groups", 32))
    if any(c % groups for c in channels):
        problems.append(f"block_out_channels {channels} not divisible by {groups} groups")
    _raise_if(problems, "AutoencoderKL")
    return dict(
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=int(config.get("layers_per_block", 1)),
        latent_channels=int(config.get("latent_channels", 4)),
        in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)),
        num_groups=groups,
        mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
        use_quant_conv=bool(config.get("use_quant_conv", True)),
        use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
    )


def ldmbert_kwargs_from_diffusers_config(config: dict[str, Any]) -> dict[str, Any]:
    """Map an LDMBertConfig config.json to LDMBert fields; ValueError for what we lack.

    Missing keys take LDMBertConfig's defaults. Dropout rates are ignored: we run the
    encoder in eval mode only. scale_embedding is ignored because LDMBertEncoder ignores it.
    """
    problems = []
    if config.get("model_type", "ldmbert") != "ldmbert":
        problems.append(f"model_type={config['model_type']!r}, expected 'ldmbert'")
    # transformers' "gelu" is the exact erf GELU, which is what LDMBert implements.
    if config.get("activation_function", "gelu") != "gelu":
        problems.append(f"activation_function={config['activation_function']!r} (only 'gelu')")
    if not math.isclose(config.get("layer_norm_eps", LAYER_NORM_EPS), LAYER_NORM_EPS):
        problems.append(f"layer_norm_eps={config['layer_norm_eps']} (LDMBert uses 1e-5)")
    _raise_if(problems, "LDMBert")
    return dict(
        vocab_size=int(config.get("vocab_size", 30522)),
        max_length=int(config.get("max_position_embeddings", 77)),
        d_model=int(config.get("d_model", 1280)),
        num_layers=int(config.get("encoder_layers", 32)),
        num_heads=int(config.get("encoder_attention_heads", 8)),
        head_dim=int(config.get("head_dim", 64)),
        ffn_dim=int(config.get("encoder_ffn_dim", 5120)),
    )


def _check(params: Params, unknown: list[str], module, init_args, name: str) -> None:
    """One ValueError for unplaced keys and for params missing, extra or misshapen."""
    if unknown:
        raise ValueError(
            f"checkpoint keys with no place in our {name}: {param_trees.listed(unknown)}"
        )
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), *init_args))["params"]
    param_trees.check_fit(params, expected, source=f"the {name} checkpoint", model=name)


def autoencoder_from_diffusers(
    config: dict[str, Any], state: dict[str, np.ndarray]
) -> tuple[dict[str, Any], Params]:
    """AutoencoderKL config.json + state dict -> (AutoencoderKL kwargs, params).

    Accepts the current attention names (to_q, ..., to_out.0) and the legacy ones of
    older files (query, key, value, proj_attn), as linear or as 1x1-conv weights.
    """
    kwargs = autoencoder_kwargs_from_diffusers_config(config)
    num_levels = len(kwargs["ch_mult"])

    def our_layer(key: str) -> str | None:
        if key in ("quant_conv", "post_quant_conv"):
            return key
        side, _, rest = key.partition(".")
        # Encoder and decoder name their layers as the U-Net does (ddpm.convert's map).
        layer = unet_layer_name(rest, num_levels) if side in ("encoder", "decoder") else None
        return None if layer is None else f"{side}/{layer}"

    params, unknown = place_tensors(state, our_layer)
    size = 2 ** (num_levels - 1)
    images = jnp.zeros((1, size, size, kwargs["in_channels"]), jnp.float32)
    _check(params, unknown, AutoencoderKL(**kwargs), (images,), "AutoencoderKL")
    return kwargs, params


_BERT_LAYER_PARTS = {
    "self_attn.q_proj": "self_attn/q",
    "self_attn.k_proj": "self_attn/k",
    "self_attn.v_proj": "self_attn/v",
    "self_attn.out_proj": "self_attn/out",
    "self_attn_layer_norm": "norm_attn",
    "final_layer_norm": "norm_ffn",
    "fc1": "fc1",
    "fc2": "fc2",
}
_BERT_TOP = {
    "model.embed_tokens": "embed_tokens",
    "model.embed_positions": "embed_positions",
    "model.layer_norm": "norm_out",
}
# LDMBertModel's masked-language-model head: in the checkpoint, never used to encode.
_BERT_UNUSED = ("to_logits.weight", "to_logits.bias")


def _bert_layer(key: str) -> str | None:
    """'model.layers.3.self_attn.q_proj' -> 'layer_3/q'; None if not LDMBert's."""
    if key in _BERT_TOP:
        return _BERT_TOP[key]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
    if m and m.group(2) in _BERT_LAYER_PARTS:
        return f"layer_{m.group(1)}/{_BERT_LAYER_PARTS[m.group(2)]}"
    return None


def ldmbert_from_diffusers(
    config: dict[str, Any], state: dict[str, np.ndarray]
) -> tuple[dict[str, Any], Params]:
    """LDMBertModel config.json + state dict -> (LDMBert kwargs, params)."""
    kwargs = ldmbert_kwargs_from_diffusers_config(config)
    used = {key: value for key, value in state.items() if key not in _BERT_UNUSED}
    params, unknown = place_tensors(used, _bert_layer)
    token_ids = jnp.zeros((1, kwargs["max_length"]), jnp.int32)
    _check(params, unknown, LDMBert(**kwargs), (token_ids,), "LDMBert")
    return kwargs, params


def _read_json(path: epath.Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    return json.loads(path.read_text())


def load_component(
    model_dir: epath.PathLike,
    convert: Callable[[dict, dict], tuple[dict, Params]],
    weight_names: tuple[str, ...] = (SAFETENSORS_NAME, BIN_NAME),
) -> ConvertedModel:
    """Read config.json and the first of `weight_names` in model_dir, then convert them.

    convert: autoencoder_from_diffusers, ldmbert_from_diffusers or cond_unet_from_diffusers.
    """
    model_dir = epath.Path(model_dir)
    config = _read_json(model_dir / "config.json")
    state = load_diffusers_state_dict(model_dir, weight_names)
    return ConvertedModel(*convert(config, state))


def _check_model_index(index: dict[str, Any], folder: epath.Path) -> None:
    problems = []
    if index.get("_class_name") != PIPELINE_CLASS:
        problems.append(f"_class_name is {index.get('_class_name')!r}, expected {PIPELINE_CLASS!r}")
    for component, classes in COMPONENT_CLASSES.items():
        entry = index.get(component)
        if not (isinstance(entry, list | tuple) and len(entry) == 2):
            problems.append(f"no {component!r} component")
        elif classes is not None and entry[1] not in classes:
            problems.append(f"{component} is a {entry[1]}, expected one of {sorted(classes)}")
        elif not (folder / component).is_dir():
            problems.append(f"no {component}/ folder")
    if problems:
        raise ValueError(f"{folder} is not an LDM text-to-image pipeline: " + "; ".join(problems))


def load_pipeline(folder: epath.PathLike) -> LDMPipeline:
    """Read a diffusers LDMTextToImagePipeline folder (see the module docstring)."""
    folder = epath.Path(folder)
    _check_model_index(_read_json(folder / "model_index.json"), folder)
    # Imported here: the cross-attention U-Net's converter is only needed for whole pipelines.
    from ddpm.convert_cond_unet import cond_unet_from_diffusers

    vqvae_config = _read_json(folder / "vqvae" / "config.json")
    return LDMPipeline(
        tokenizer=PromptTokenizer.from_folder(folder / "tokenizer"),
        vqvae=load_component(folder / "vqvae", autoencoder_from_diffusers),
        bert=load_component(folder / "bert", ldmbert_from_diffusers, TRANSFORMERS_WEIGHT_NAMES),
        unet=load_component(folder / "unet", cond_unet_from_diffusers),
        scaling_factor=float(vqvae_config.get("scaling_factor", DEFAULT_SCALING_FACTOR)),
        scheduler_config=_read_json(folder / "scheduler" / "scheduler_config.json"),
    )
