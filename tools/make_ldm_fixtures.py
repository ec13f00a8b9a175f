"""Write a tiny random-weight LDMTextToImagePipeline (ldm-text2im-large-256 layout) and outputs.

Run from the repository root with the tools environment:

    python3 -m venv .venv-tools
    .venv-tools/bin/pip install torch==2.13.0   # the CPU wheel
    .venv-tools/bin/pip install diffusers==0.35.2 transformers==4.57.6 huggingface_hub==0.36.2 \
        tokenizers==0.22.2 safetensors==0.8.0 numpy==2.4.6
    .venv-tools/bin/python tools/make_ldm_fixtures.py [--out_dir tests/fixtures]

Versions used to make the committed fixtures: torch 2.13.0+cpu, diffusers 0.35.2, transformers
4.57.6 (whose BertTokenizer is the pure-Python WordPiece tokenizer that saves vocab.txt, as the
released pipeline's tokenizer folder has), huggingface_hub 0.36.2, tokenizers 0.22.2,
safetensors 0.8.0, numpy 2.4.6. (diffusers 0.42 needs transformers 5, whose BertTokenizer saves
tokenizer.json instead of vocab.txt; transformers 4.57 needs huggingface_hub < 1, which diffusers
0.42 refuses; hence diffusers 0.35.2.) LDMBertModel/LDMBertConfig live in
diffusers/pipelines/latent_diffusion/pipeline_latent_diffusion.py in both.

What it writes under --out_dir:

- ldm_tiny/: the pipeline saved with save_pretrained (model_index.json, vqvae/, unet/ as float16
  safetensors, tokenizer/ vocab.txt + tokenizer_config.json + special_tokens_map.json,
  scheduler/scheduler_config.json), except that bert/ holds a legacy torch pickle
  pytorch_model.bin (float16 state dict) instead of model.safetensors.
- ldm_tiny_outputs.npz / .json: reference outputs (image-like arrays NHWC float32).
- ldm_large_configs.json: the released CompVis/ldm-text2im-large-256 config files, as far as
  they could be recovered (see its "notes"), with parameter counts computed from them on the
  meta device.

The tiny models follow the released configs except for the sizes: 32x32 RGB images, a KL
autoencoder with f = 4 (8x8x4 latents), a 3-level U-Net (32, 64, 64) with 2 heads, a 2-layer
LDMBert with d_model 32 and a ~100-token WordPiece vocabulary. Every weight is random (the
zero-initialised ones too) and rounded to a float16 value; the models are saved in float16 and
every reference output is computed in float32 from exactly those values.

Pipeline quirk: LDMTextToImagePipeline sizes its latents as height // 8 whatever the
autoencoder's factor, so with this f = 4 autoencoder the pipeline is called with
height = width = 64 to get 8x8 latents; it decodes them to 32x32 images.
The library and the tests never import torch or diffusers; only this script does.
"""

import argparse
import json
import pathlib
import shutil

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    LDMTextToImagePipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
    LDMBertConfig,
    LDMBertModel,
)
from transformers import BertTokenizer

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"
SEED = 0
MAX_LENGTH = 77  # the pipeline pads/truncates to 77 tokens itself

# ---------------------------------------------------------------------------------------------
# The released CompVis/ldm-text2im-large-256 configs (main branch). Sources in RELEASED_NOTES.
RELEASED_CONFIGS = {
    "model_index": {
        "_class_name": "LDMTextToImagePipeline",
        "_diffusers_version": "0.0.4",
        "bert": ["latent_diffusion", "LDMBertModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "tokenizer": ["transformers", "BertTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vqvae": ["diffusers", "AutoencoderKL"],
    },
    "vqvae": {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.1.3",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "out_channels": 3,
        "sample_size": 256,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "bert": {
        "_name_or_path": "fusing/latent-diffusion-text2im-large",
        "activation_dropout": 0.0,
        "activation_function": "gelu",
        "architectures": ["LDMBertModel"],
        "attention_dropout": 0.0,
        "classifier_dropout": 0.0,
        "d_model": 1280,
        "dropout": 0.1,
        "encoder_attention_heads": 8,
        "encoder_ffn_dim": 5120,
        "encoder_layerdrop": 0.0,
        "encoder_layers": 32,
        "head_dim": 64,
        "init_std": 0.02,
        "max_position_embeddings": 77,
        "model_type": "ldmbert",
        "num_hidden_layers": 32,
        "pad_token_id": 0,
        "scale_embedding": False,
        "torch_dtype": "float32",
        "transformers_version": "4.21.0.dev0",
        "use_cache": True,
        "vocab_size": 30522,
    },
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.0.4",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "down_block_types": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 32,
        "up_block_types": [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ],
    },
    "scheduler": {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.0.4",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "timestep_values": None,
        "timesteps": 1000,
        "trained_betas": None,
    },
    "tokenizer_config": {
        "cls_token": "[CLS]",
        "do_basic_tokenize": True,
        "do_lower_case": True,
        "mask_token": "[MASK]",
        "model_max_length": 512,
        "name_or_path": "fusing/latent-diffusion-text2im-large",
        "never_split": None,
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "special_tokens_map_file": None,
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer",
        "unk_token": "[UNK]",
    },
    "special_tokens_map": {
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "unk_token": "[UNK]",
    },
}

RELEASED_NOTES = {
    "model_index": (
        "verbatim: huggingface.co/CompVis/ldm-text2im-large-256/blob/main/model_index.json (376"
        " bytes, commit f9b5fe0 'Update model_index.json'; json.dumps(indent=2, sort_keys=True)"
        " of this dict is 376 bytes)."
    ),
    "bert": (
        "verbatim: .../blob/main/bert/config.json (662 bytes, commit 44daea0; re-serialised "
        "size matches). Also identical in DaichiT/path-to-save-model, a re-save of the released"
        " model."
    ),
    "tokenizer_config": (
        "verbatim: .../blob/44daea0/tokenizer/tokenizer_config.json (420 bytes, the only commit"
        " of tokenizer/; size matches). Note model_max_length 512: the pipeline itself passes "
        "max_length=77. The released tokenizer/ holds vocab.txt (bert-base-uncased, 30522 "
        "lines), tokenizer_config.json, special_tokens_map.json (125 bytes = this dict with "
        "indent=2, sorted)."
    ),
    "unet": (
        "reconstructed: the file (713 bytes, commit c073669 'convert weights', Jul 20 2022) was"
        " written by diffusers' scripts/change_naming_configs_and_checkpoints.py with the "
        "UNet2DConditionModel signature of diffusers 0.1.0 (git 0e5f2da); every value is that "
        "signature's default except sample_size 32 (latent 32x32 for 256 px, LDM txt2img-1p4B "
        "image_size 32). Its JSON (indent=2, sorted, trailing newline) is exactly 713 bytes "
        "with a 5-character _diffusers_version ('0.0.4' at that date). It has no "
        "cross_attention_dim (current default 1280 applies, matching context_dim 1280) and no "
        "mid_block_type (default UNetMidBlock2DCrossAttn). attention_head_dim 8 is the NUMBER "
        "of heads (legacy naming; LDM num_heads 8), so head width = channels / 8."
    ),
    "vqvae": (
        "reconstructed: the file (522 bytes, commit 31ff4ed 'add new config', Jul 28 2022) "
        "matches the AutoencoderKL signature of diffusers at that date (in/out_channels, "
        "down/up_block_types, block_out_channels, layers_per_block, act_fn, latent_channels, "
        "sample_size); values from DaichiT/path-to-save-model/vqvae/config.json (a diffusers "
        "0.28 re-save of the released model) and REFERENCE.md (ch 128, ch_mult 1,2,4,4). The "
        "JSON is exactly 522 bytes with a 5-character version; '0.1.3' (diffusers' version on "
        "Jul 28 2022) is a guess of that string. No scaling_factor/norm_num_groups keys: "
        "current defaults 0.18215 and 32 apply."
    ),
    "scheduler": (
        "BEST GUESS, not verbatim: the file is 252 bytes, uploaded once (commit 44daea0, Jul 18"
        " 2022, diffusers 0.0.4 whose DDIMScheduler took timesteps/num_train_timesteps, "
        "beta_start, beta_end, beta_schedule, trained_betas, timestep_values, clip_sample). "
        "This dict follows the verbatim CompVis/ldm-celebahq-256 scheduler_config.json of the "
        "same uploader and week (249 bytes; clip_sample false, 'timesteps' key, timestep_values"
        " null) with the text2im betas (0.00085, 0.012, scaled_linear, from REFERENCE.md and "
        "the LDM txt2img-1p4B yaml); it serialises to 249 bytes, so 3 bytes of the real file "
        "are unexplained. Whatever those bytes are, the file predates set_alpha_to_one, "
        "steps_offset, prediction_type and timestep_spacing, so current diffusers loads it with"
        " their defaults: set_alpha_to_one True, steps_offset 0, prediction_type epsilon, "
        "timestep_spacing leading, num_train_timesteps 1000 ('timesteps'/'timestep_values' are "
        "ignored as unexpected keys). clip_sample false is the one value not pinned by a "
        "verbatim source (LDM's own DDIM sampler never clips; diffusers' LDM text2im tests use "
        "clip_sample=False)."
    ),
}

# ---------------------------------------------------------------------------------------------
# Tiny vocabulary: the five specials first ([PAD] = 0), then punctuation, whole words and
# '##' pieces chosen so the prompts below exercise whole words, pieces, punctuation, accents
# and [UNK].
VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + ["!", "'", ",", "-", ".", "?"]
    + (
        "a an the of on in at with and by is to painting photo picture oil style squirrel "
        "eat eating burger cat dog horse bird fish tree house car boat street city table "
        "sky sun moon night day red blue green yellow small big old astronaut riding sitting "
        "mars cafe beach mountain river forest flower garden rain snow water fire light dark "
        "happy sad portrait drawing digital art high quality very beautiful over under"
    ).split()
    + [
        "##s",
        "##es",
        "##ed",
        "##ing",
        "##er",
        "##y",
        "##ly",
        "##set",
        "##rise",
        "##light",
        "##scape",
    ]
)

PROMPTS = [
    "",
    "a painting of a squirrel eating a burger",
    "A Squirrel, eating!",
    "a photo of a zebra riding horses at sunset",  # [UNK]; horse ##s; sun ##set
    "An astronaut's Café on MARS? moonlight-cityscape",  # apostrophe, accent, caps, hyphen, pieces
    "  the   cat\tsitting on the table...  ",  # runs of whitespace, repeated punctuation
    " ".join(
        ["a big red house with a small blue tree and a green car on the street,"] * 6
    ),  # 102 word pieces: truncated to 77 ids
]
PIPE_PROMPTS = ["a painting of a squirrel eating a burger", "A Squirrel, eating!"]
PIPE_GUIDANCE = 6.0
PIPE_STEPS = 10
PIPE_ETA = 0.0
UNET_TIMESTEPS = [1, 981]


def tiny_configs(vocab_size: int) -> dict:
    released = {k: dict(v) for k, v in RELEASED_CONFIGS.items()}
    unet = {k: v for k, v in released["unet"].items() if not k.startswith("_")}
    unet.update(
        sample_size=8,
        block_out_channels=[32, 64, 64],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32,
        attention_head_dim=2,  # legacy naming: 2 heads
        norm_num_groups=32,
    )
    vqvae = {k: v for k, v in released["vqvae"].items() if not k.startswith("_")}
    vqvae.update(
        block_out_channels=[32, 32, 64],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        sample_size=32,
        norm_num_groups=32,
        scaling_factor=0.18215,
    )
    bert = {
        k: v
        for k, v in released["bert"].items()
        if k
        not in (
            "_name_or_path",
            "architectures",
            "model_type",
            "torch_dtype",
            "transformers_version",
        )
    }
    bert.update(
        d_model=32,
        encoder_layers=2,
        num_hidden_layers=2,
        encoder_attention_heads=2,
        head_dim=16,
        encoder_ffn_dim=64,
        max_position_embeddings=77,
        vocab_size=vocab_size,
    )
    return {"unet": unet, "vqvae": vqvae, "bert": bert, "scheduler": released["scheduler"]}


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter: O(1) activations, no identity/zero layer; float16 values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):  # Group/LayerNorm scales
                value = 1.0 + 0.2 * noise
            elif p.ndim == 1:  # biases
                value = 0.1 * noise
            elif "embed_tokens" in name or "embed_positions" in name:
                value = noise
            else:  # conv / linear weights: fan-in scaling
                value = noise / np.sqrt(p[0].numel())
            p.copy_(value.half().float())


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()


def run_pipeline(pipe, prompts, latents_nhwc, guidance_scale):
    """Runs the pipeline, recording each DDIM step and the decoder input."""
    record = {
        "step_t": [],
        "model_output": [],
        "prev_sample": [],
        "decode_in": [],
        "unet_batch": [],
    }
    scheduler_step, vqvae_decode, unet_forward = (
        pipe.scheduler.step,
        pipe.vqvae.decode,
        pipe.unet.forward,
    )

    def step(model_output, timestep, sample, *args, **kwargs):
        out = scheduler_step(model_output, timestep, sample, *args, **kwargs)
        record["step_t"].append(int(timestep))
        record["model_output"].append(nhwc(model_output))
        record["prev_sample"].append(nhwc(out.prev_sample))
        return out

    def decode(z, *args, **kwargs):
        record["decode_in"].append(nhwc(z))
        return vqvae_decode(z, *args, **kwargs)

    def forward(sample, *args, **kwargs):
        record["unet_batch"].append(int(sample.shape[0]))
        return unet_forward(sample, *args, **kwargs)

    pipe.scheduler.step, pipe.vqvae.decode, pipe.unet.forward = step, decode, forward
    try:
        with torch.no_grad():
            images = pipe(
                prompts,
                height=64,  # latents are height // 8 = 8 (hard-coded 8); decoded with f = 4 to 32
                width=64,
                latents=nchw(latents_nhwc),
                guidance_scale=guidance_scale,
                num_inference_steps=PIPE_STEPS,
                eta=PIPE_ETA,
                output_type="np",
            ).images
    finally:
        del pipe.scheduler.step, pipe.vqvae.decode, pipe.unet.forward
    return np.asarray(images, np.float32), record


def large_param_counts() -> dict:
    counts = {}
    with torch.device("meta"):
        cfg = {k: v for k, v in RELEASED_CONFIGS["vqvae"].items() if not k.startswith("_")}
        counts["vqvae"] = sum(p.numel() for p in AutoencoderKL(**cfg).parameters())
        cfg = {k: v for k, v in RELEASED_CONFIGS["unet"].items() if not k.startswith("_")}
        counts["unet"] = sum(p.numel() for p in UNet2DConditionModel(**cfg).parameters())
        bert = LDMBertModel(LDMBertConfig(**RELEASED_CONFIGS["bert"]))
        counts["bert"] = sum(p.numel() for p in bert.parameters())
        counts["bert_without_to_logits"] = counts["bert"] - sum(
            p.numel() for p in bert.to_logits.parameters()
        )
    return {k: int(v) for k, v in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=str(FIXTURES))
    args = parser.parse_args()
    out_dir = pathlib.Path(args.out_dir)
    pipe_dir = out_dir / "ldm_tiny"
    shutil.rmtree(pipe_dir, ignore_errors=True)
    pipe_dir.mkdir(parents=True)
    torch.set_num_threads(1)
    torch.manual_seed(SEED)

    # Tokenizer from a tiny vocab.txt.
    vocab_file = out_dir / "_ldm_tiny_vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, model_max_length=MAX_LENGTH)
    vocab_file.unlink()
    assert len(tokenizer) == len(VOCAB) and tokenizer.pad_token_id == 0

    cfgs = tiny_configs(len(VOCAB))
    vqvae = AutoencoderKL(**cfgs["vqvae"]).eval()
    unet = UNet2DConditionModel(**cfgs["unet"]).eval()
    bert = LDMBertModel(LDMBertConfig(**cfgs["bert"])).eval()  # eval: dropout 0.1 in the config
    scheduler = DDIMScheduler.from_config(cfgs["scheduler"])
    for i, model in enumerate((vqvae, unet, bert)):
        randomise(model, torch.Generator().manual_seed(SEED + 1 + i))
    pipe = LDMTextToImagePipeline(
        vqvae=vqvae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)

    rng = np.random.default_rng(SEED)
    arrays, meta = {}, {}

    # Tokenizer and text encoder, exactly as the pipeline calls them (no attention mask).
    ids = tokenizer(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    arrays["token_ids"] = np.asarray(ids, np.int32)
    meta["prompts"] = PROMPTS
    meta["prompt_tokens"] = [
        tokenizer.convert_ids_to_tokens([i for i in row if i != tokenizer.pad_token_id])
        for row in ids
    ]
    meta["vocab"] = VOCAB
    with torch.no_grad():
        arrays["text_embeddings"] = (
            bert(torch.tensor(ids, dtype=torch.long))[0].numpy().astype(np.float32)
        )

    # U-Net alone.
    arrays["unet_latents"] = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    arrays["unet_timesteps"] = np.asarray(UNET_TIMESTEPS, np.int32)
    arrays["unet_context"] = rng.standard_normal((2, MAX_LENGTH, 32)).astype(np.float32)
    with torch.no_grad():
        arrays["unet_out"] = nhwc(
            unet(
                nchw(arrays["unet_latents"]),
                torch.from_numpy(arrays["unet_timesteps"]).long(),
                encoder_hidden_states=torch.from_numpy(arrays["unet_context"]),
            ).sample
        )

    # Autoencoder alone.
    arrays["vae_images"] = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    arrays["vae_latents"] = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        posterior = vqvae.encode(nchw(arrays["vae_images"])).latent_dist
        arrays["vae_posterior_mean"] = nhwc(posterior.mean)
        arrays["vae_posterior_logvar"] = nhwc(posterior.logvar)  # clamped to [-30, 20] by diffusers
        arrays["vae_decoded"] = nhwc(vqvae.decode(nchw(arrays["vae_latents"])).sample)

    # The whole pipeline.
    arrays["pipe_latents"] = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    images, rec = run_pipeline(pipe, PIPE_PROMPTS, arrays["pipe_latents"], PIPE_GUIDANCE)
    arrays["pipe_images"] = images
    arrays["pipe_final_latents"] = rec["prev_sample"][-1]
    arrays["pipe_step_latents"] = np.stack(rec["prev_sample"])  # after each DDIM step
    arrays["pipe_step_noise_pred"] = np.stack(rec["model_output"])  # guided eps fed to each step
    decode_in = rec["decode_in"][0]
    assert np.array_equal(
        decode_in, nhwc(1 / 0.18215 * torch.from_numpy(rec["prev_sample"][-1]).permute(0, 3, 1, 2))
    )
    unet_batch_6 = rec["unet_batch"]
    images1, rec1 = run_pipeline(pipe, PIPE_PROMPTS, arrays["pipe_latents"], 1.0)
    arrays["pipe_images_scale1"] = images1
    arrays["pipe_final_latents_scale1"] = rec1["prev_sample"][-1]
    arrays["scheduler_alphas_cumprod"] = scheduler.alphas_cumprod.numpy().astype(np.float32)

    meta.update(
        pipe_prompts=PIPE_PROMPTS,
        pipe_guidance_scale=PIPE_GUIDANCE,
        pipe_num_inference_steps=PIPE_STEPS,
        pipe_eta=PIPE_ETA,
        pipe_height_width_arg=64,
        pipe_timesteps=[int(t) for t in pipe.scheduler.timesteps],
        pipe_unet_batch_sizes={"guidance_6.0": unet_batch_6, "guidance_1.0": rec1["unet_batch"]},
        pipe_latents_scaled_by_init_noise_sigma=False,
        scheduler_init_noise_sigma=float(scheduler.init_noise_sigma),
        unet_timesteps=UNET_TIMESTEPS,
        scaling_factor=0.18215,
        tiny_configs={k: dict(pipe.components[k].config) for k in ("vqvae", "unet", "scheduler")}
        | {"bert": bert.config.to_diff_dict()},
        large_param_counts=large_param_counts(),
        notes=(
            "Image-like arrays are NHWC float32. Pipeline: tokenizer(prompt, "
            "padding='max_length', max_length=77, truncation=True); bert(input_ids)[0] without "
            "attention mask; if guidance_scale != 1: uncond = bert(tokenizer(['']*B))[0], U-Net "
            "on cat([latents]*2) with context cat([uncond, cond]), eps = u + s*(c - u); if "
            "guidance_scale == 1 the unconditional pass is skipped. latents are used as given (no"
            " init_noise_sigma multiply; DDIM's is 1.0). After the loop: image = "
            "vqvae.decode(latents / 0.18215).sample; (image/2 + 0.5).clamp(0, 1), NHWC. "
            "pipe_final_latents is the last DDIM prev_sample, before the 1/scaling_factor "
            "multiply. The pipeline was called with height=width=64 because it sizes latents as "
            "height//8 regardless of the autoencoder's factor (4 here)."
        ),
    )

    # Save: float16 weights (they hold float16 values already); bert as a legacy torch .bin.
    pipe.to(torch.float16)
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    pipe.to(torch.float32)
    for f in (pipe_dir / "bert").glob("*.safetensors"):
        f.unlink()
    state = {k: v.detach().half().contiguous() for k, v in bert.state_dict().items()}
    torch.save(state, pipe_dir / "bert" / "pytorch_model.bin")
    for sub in (
        "model_index.json",
        "vqvae",
        "bert",
        "unet",
        "tokenizer",
        "scheduler",
        "tokenizer/vocab.txt",
    ):
        assert (pipe_dir / sub).exists(), sub

    # Round trip through diffusers' own loader: the same outputs.
    reloaded = LDMTextToImagePipeline.from_pretrained(pipe_dir, torch_dtype=torch.float32)
    reloaded.set_progress_bar_config(disable=True)
    for m in (reloaded.vqvae, reloaded.unet, reloaded.bert):
        m.eval()
    again, _ = run_pipeline(reloaded, PIPE_PROMPTS, arrays["pipe_latents"], PIPE_GUIDANCE)
    assert np.array_equal(again, arrays["pipe_images"]), np.abs(again - arrays["pipe_images"]).max()
    assert type(reloaded.tokenizer).__name__ == "BertTokenizer"
    assert (
        reloaded.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        == ids
    )

    np.savez(out_dir / "ldm_tiny_outputs.npz", **arrays)
    (out_dir / "ldm_tiny_outputs.json").write_text(json.dumps(meta, indent=1) + "\n")
    large = dict(RELEASED_CONFIGS)
    large["notes"] = RELEASED_NOTES
    large["large_param_counts"] = meta["large_param_counts"]
    (out_dir / "ldm_large_configs.json").write_text(json.dumps(large, indent=1) + "\n")

    for path in sorted(p for p in pipe_dir.rglob("*") if p.is_file()):
        print(f"{path.relative_to(out_dir)}: {path.stat().st_size} bytes")
    for name in ("ldm_tiny_outputs.npz", "ldm_tiny_outputs.json", "ldm_large_configs.json"):
        print(f"{name}: {(out_dir / name).stat().st_size} bytes")
    for k, v in arrays.items():
        print(f"  {k}: {v.dtype} {list(v.shape)} |max| {np.abs(v).max():.4g} std {v.std():.4g}")
    print("pipe timesteps", meta["pipe_timesteps"], "unet batches", meta["pipe_unet_batch_sizes"])
    print("large param counts", meta["large_param_counts"])
    for p, toks in zip(PROMPTS, meta["prompt_tokens"], strict=True):
        print(repr(p[:50]), len(toks), toks[:14])


if __name__ == "__main__":
    main()
