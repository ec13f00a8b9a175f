"""Latent text-to-image (Rombach et al. 2022) from converted weights: --mode=convert and
--mode=sample for configs with pipeline='text2image' (configs/ldm_text2im.py).

The pipeline of diffusers' LDMTextToImagePipeline (CompVis/ldm-text2im-large-256):

    prompts --BERT WordPiece--> ids [N, 77] --LDMBert--> text states c [N, 77, D]
    z_T ~ N(0, I) [N, h, w, 4] --DDIM over CondUNet(z_t, t, c), guided with the empty
                                 prompt's states as the unconditional input--> z_0
    z_0 / scaling_factor --autoencoder decoder--> image [N, H, W, 3] in [-1, 1]

Guidance is the class-label formula of ddpm.guidance with text states as the condition:
eps = (1 + w) eps(z_t, c) - w eps(z_t, c_empty), w = sampling.guidance_scale. diffusers
writes eps_empty + s (eps_c - eps_empty): its guidance_scale s is 1 + w, so the
pipeline's documented s = 6 is w = 5, and its default s = 1 (no unconditional pass) is
w = 0. The whole chain and the decoder run as one compiled function per device.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from ddpm import checkpointing, evaluation, guidance, images, npz, samplers, sampling
from ddpm.convert_ldm import load_pipeline
from ddpm.factories import Text2ImageModels, create_text2image_models, latent_shape
from ddpm.models.autoencoder import AutoencoderKL
from ddpm.text_tokenizer import PromptTokenizer

TOKENIZER_DIR = "tokenizer"  # the converted workdir keeps the tokenizer's files here
PROMPT_FILE_SUFFIX = ".txt"


def abstract_params(config, models: Text2ImageModels):
    """The params tree {autoencoder, text_encoder, unet} as shapes (no compute)."""
    h, w, c = latent_shape(config)
    size, length = config.data.image_size, config.text_encoder.max_length

    def init():
        key = jax.random.key(0)
        ids = jnp.zeros((1, length), jnp.int32)
        return {
            "autoencoder": models.autoencoder.init(key, jnp.zeros((1, size, size, 3)))["params"],
            "text_encoder": models.text_encoder.init(key, ids)["params"],
            "unet": models.unet.init(
                key,
                jnp.zeros((1, h, w, c)),
                jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, length, config.model.context_dim)),
                train=False,
            )["params"],
        }

    return jax.eval_shape(init)


def read_prompts(spec: str) -> list[str]:
    """sampling.prompt -> prompts: one prompt, or a .txt file of prompts (one a line)."""
    spec = str(spec)
    if spec.endswith(PROMPT_FILE_SUFFIX):
        path = epath.Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"sampling.prompt={spec!r}: no such prompt file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"sampling.prompt={spec!r}: the file holds no prompt")
        return prompts
    return [spec]


def make_sampler(config, models: Text2ImageModels, tokenizer: PromptTokenizer, devices=None):
    """(params, keys [N], token ids [N, L], guidance_scale=None, x_T=None) -> images.

    Returns float32 images [N, H, W, 3] in [-1, 1] (decoded, unclipped). x_T [N, h, w, c]
    are the starting latents (default: the samplers' start noise of each key); w defaults
    to sampling.guidance_scale and is traced (another w reuses the compiled chain).
    """
    c = config.sampling
    d = sampling.sampling_diffusion(config)
    shape = latent_shape(config)
    scale = config.autoencoder.scaling_factor

    def draw(params, w, null_ids, keys, ids, x_T):
        def encode(token_ids):
            return models.text_encoder.apply({"params": params["text_encoder"]}, token_ids)

        def unet(z, t, context):
            return models.unet.apply({"params": params["unet"]}, z, t, context, train=False)

        denoise_fn = guidance.guided_denoiser(
            unet, encode(ids), encode(null_ids), w, mean_channels=shape[-1]
        )
        z0 = samplers.sample(
            d, denoise_fn, keys, shape, c.method, eta=c.eta, clip_denoised=c.clip_denoised, x_T=x_T
        )
        return models.autoencoder.apply(
            {"params": params["autoencoder"]}, z0 / scale, method=AutoencoderKL.decode
        )

    mapped = sampling.over_devices(draw, num_replicated=3, devices=devices)
    start_noise = jax.jit(lambda keys: samplers.start_noise(d, keys, shape))
    null_ids = tokenizer([""])  # the unconditional input: the empty prompt

    def run(params, keys, ids, guidance_scale=None, x_T=None):
        w = c.guidance_scale if guidance_scale is None else guidance_scale
        x_T = start_noise(keys) if x_T is None else x_T
        return mapped(params, np.float32(w), null_ids, keys, np.asarray(ids, np.int32), x_T)

    return run


def _mismatches(module, kwargs) -> dict:
    # Dropout is a training choice that the released files do not record.
    return {
        name: (getattr(module, name), value)
        for name, value in kwargs.items()
        if name != "dropout" and getattr(module, name) != value
    }


# DDIMScheduler settings that our chain reproduces (diffusers' defaults, which the
# release's scheduler_config.json of diffusers 0.0.4 predates): the last step goes to
# alpha_bar = 1 (our respaced chain's alpha_bar_prev at its first step), steps start at
# t = 0, and the model predicts eps.
SUPPORTED_SCHEDULER = {
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}


def _scheduler_mismatches(config, scheduler: dict, scaling_factor: float) -> dict:
    """Config fields that disagree with the release's scheduler config and latent scale,
    and scheduler settings that the samplers do not reproduce."""
    release = {
        ("diffusion", "schedule"): scheduler.get("beta_schedule", "linear"),
        ("diffusion", "beta_start"): scheduler.get("beta_start", 1e-4),
        ("diffusion", "beta_end"): scheduler.get("beta_end", 0.02),
        # diffusers 0.0.4 called it `timesteps`
        ("diffusion", "num_timesteps"): scheduler.get(
            "num_train_timesteps", scheduler.get("timesteps", 1000)
        ),
        ("autoencoder", "scaling_factor"): scaling_factor,
    }

    def differs(ours, theirs) -> bool:
        return ours != theirs if isinstance(theirs, str) else not np.isclose(ours, theirs)

    problems = {
        f"{section}.{field}": (config[section][field], value)
        for (section, field), value in release.items()
        if differs(config[section][field], value)
    }
    return problems | {
        f"scheduler.{name}": (supported, scheduler[name])
        for name, supported in SUPPORTED_SCHEDULER.items()
        if scheduler.get(name, supported) != supported
    }


def convert(config: ml_collections.ConfigDict, source, workdir) -> dict:
    """--mode=convert: a diffusers LDMTextToImagePipeline folder -> workdir (step 0).

    Writes the three networks' params as one orbax checkpoint and copies the tokenizer's
    files; the config must describe the same networks, schedule and latent scale (one
    error names every field that differs). Returns the params.
    """
    pipeline = load_pipeline(source)
    models = create_text2image_models(config)
    problems = {
        f"{part}.{name}": values
        for part, module, converted in [
            ("autoencoder", models.autoencoder, pipeline.vqvae),
            ("text_encoder", models.text_encoder, pipeline.bert),
            ("model", models.unet, pipeline.unet),
        ]
        for name, values in _mismatches(module, converted.kwargs).items()
    } | _scheduler_mismatches(config, pipeline.scheduler_config, pipeline.scaling_factor)
    if problems:
        raise ValueError(f"{source} does not match the config; (config, release): {problems}")
    params = jax.tree.map(
        jnp.asarray,
        {
            "autoencoder": pipeline.vqvae.params,
            "text_encoder": pipeline.bert.params,
            "unet": pipeline.unet.params,
        },
    )
    workdir = epath.Path(workdir)
    if jax.process_index() == 0:
        (workdir / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
        for file in (epath.Path(source) / TOKENIZER_DIR).iterdir():
            if not file.is_dir():
                file.copy(workdir / TOKENIZER_DIR / file.name, overwrite=True)
    checkpointer = checkpointing.Checkpointer(workdir)
    checkpointer.save(0, params, force=True)
    checkpointer.close()
    logging.info("Converted %s into %s (step 0)", source, workdir)
    return params


def load(config, workdir):
    """(models, params, tokenizer, step) of the newest checkpoint in a converted workdir."""
    models = create_text2image_models(config)
    params, step = checkpointing.restore_newest_in(
        workdir,
        abstract_params(config, models),
        how_to_make_one="write one with --mode=convert --source=DIR (a pipeline folder)",
    )
    tokenizer = PromptTokenizer.from_folder(
        epath.Path(workdir) / TOKENIZER_DIR, max_length=config.text_encoder.max_length
    )
    return models, params, tokenizer, step


def output_dir(config, workdir, step, prompts) -> epath.Path:
    """workdir/text2image_step<N>_<sampler>_w<w>_<hash of prompts and settings>."""
    c = config.sampling
    digest = evaluation.settings_digest(
        {"prompts": prompts, **evaluation.sampling_settings(config)}
    )
    name = f"text2image_step{step}_{evaluation.sampler_name(config)}_w{float(c.guidance_scale)}"
    return epath.Path(workdir) / f"{name}_{digest}"


def sample(config: ml_collections.ConfigDict, workdir) -> np.ndarray:
    """--mode=sample: sampling.num_samples images, sample i of prompt i mod len(prompts).

    Writes samples.npz (images uint8, prompts, prompt_index) and grid.png; chunks of
    sampling.batch_size are cached, so an interrupted job resumes.
    """
    prompts = read_prompts(config.sampling.prompt)
    models, params, tokenizer, step = load(config, workdir)
    ids = tokenizer(prompts)
    out_dir = output_dir(config, workdir, step, prompts)
    rng = jax.random.fold_in(jax.random.key(config.seed), evaluation.SAMPLE_PURPOSE)
    sampler = make_sampler(config, models, tokenizer)

    def draw(indices):
        keys = samplers.sample_keys(rng, indices)
        return images.to_uint8(sampler(params, keys, ids[indices % len(prompts)]))

    num = config.sampling.num_samples
    samples = np.concatenate(list(evaluation.chunks(config, draw, num, out_dir / "chunks")))
    if jax.process_index() == 0:
        npz.save(
            out_dir / "samples.npz",
            images=samples,
            prompts=np.asarray(prompts),
            prompt_index=np.arange(num) % len(prompts),
        )
        images.save_grid(samples, out_dir / "grid.png")
        logging.info("Wrote %d images to %s", num, out_dir)
    return samples
