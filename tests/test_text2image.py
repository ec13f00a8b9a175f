"""Latent text-to-image end to end against diffusers' LDMTextToImagePipeline.

The oracle is tests/fixtures/ldm_tiny_outputs.npz: a tiny random-weight pipeline run by
diffusers (tools/make_ldm_fixtures.py) on given starting latents, with DDIM eta 0 over
10 steps. Here the same folder goes through --mode=convert, and our compiled chain
starts from the same latents.
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from ddpm import samplers, text2image
from tests.tiny import tiny_text2image_config

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SOURCE = FIXTURES / "ldm_tiny"
EXPECTED = dict(np.load(FIXTURES / "ldm_tiny_outputs.npz"))
SETTINGS = json.loads((FIXTURES / "ldm_tiny_outputs.json").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(config, models, params, tokenizer, sampler) of the fixture converted into a workdir."""
    workdir = tmp_path_factory.mktemp("ldm_tiny")
    config = tiny_text2image_config()
    text2image.convert(config, SOURCE, workdir)
    models, params, tokenizer, step = text2image.load(config, workdir)
    assert step == 0
    return config, workdir, params, tokenizer, text2image.make_sampler(config, models, tokenizer)


def _pixels(images):
    """Our [-1, 1] output as the pipeline's [0, 1] image: (x / 2 + 0.5).clamp(0, 1)."""
    return np.clip(np.asarray(images) / 2 + 0.5, 0, 1)


@pytest.mark.parametrize(
    "diffusers_scale, expected_key", [(6.0, "pipe_images"), (1.0, "pipe_images_scale1")]
)
def test_pipeline_images_match_diffusers(converted, diffusers_scale, expected_key):
    """Guided (s = 6, so w = 5) and unguided (s = 1, w = 0) images from the same latents."""
    assert SETTINGS["pipe_guidance_scale"] == 6.0 and SETTINGS["pipe_eta"] == 0.0
    config, _, params, tokenizer, sampler = converted
    assert config.sampling.num_steps == SETTINGS["pipe_num_inference_steps"]
    ids = tokenizer(SETTINGS["pipe_prompts"])
    keys = jax.random.split(jax.random.key(0), len(ids))  # unused: eta 0 and x_T given
    ours = _pixels(
        sampler(params, keys, ids, guidance_scale=diffusers_scale - 1, x_T=EXPECTED["pipe_latents"])
    )
    error = np.abs(ours - EXPECTED[expected_key]) * 255
    print(
        f"s={diffusers_scale}: max |ours - diffusers| = {error.max():.4f}/255, "
        f"{np.mean(error <= 1):.4%} of values within 1/255"
    )
    # Measured: 0.0014/255 (s = 6) and 0.0003/255 (s = 1), float32 rounding through 10 steps.
    assert error.max() <= 0.1


def test_guidance_changes_the_images(converted):
    """The guided and unguided references differ: the test above can tell them apart."""
    gap = np.abs(EXPECTED["pipe_images"] - EXPECTED["pipe_images_scale1"]).max() * 255
    assert gap > 10


def test_convert_refuses_a_config_that_differs_from_the_release(tmp_path):
    config = tiny_text2image_config(
        {"model.num_heads": 4, "diffusion.beta_end": 0.02, "autoencoder.scaling_factor": 0.2}
    )
    with pytest.raises(ValueError) as error:
        text2image.convert(config, SOURCE, tmp_path)
    for name in ("model.num_heads", "diffusion.beta_end", "autoencoder.scaling_factor"):
        assert name in str(error.value)
    assert not (tmp_path / "checkpoints").exists()


def test_sample_mode_writes_prompts_and_images_and_resumes(converted, tmp_path):
    """--mode=sample with a prompt file: sample i of prompt i mod 2, equal to the sampler
    called directly with the same keys; a rerun reads the cached chunks."""
    config, workdir, params, tokenizer, sampler = converted
    prompts = ["a red car", "A Squirrel, eating!"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    config = tiny_text2image_config(
        {
            "sampling.prompt": str(tmp_path / "prompts.txt"),
            "sampling.num_samples": 3,
            "sampling.batch_size": 8,
        }
    )
    samples = text2image.sample(config, workdir)
    out_dir = text2image.output_dir(config, workdir, 0, prompts)
    saved = np.load(out_dir / "samples.npz")
    assert list(saved["prompts"]) == prompts
    assert list(saved["prompt_index"]) == [0, 1, 0]
    np.testing.assert_array_equal(saved["images"], samples)
    assert (out_dir / "grid.png").exists()

    rng = jax.random.fold_in(jax.random.key(config.seed), text2image.evaluation.SAMPLE_PURPOSE)
    keys = samplers.sample_keys(rng, np.arange(3))
    direct = sampler(params, keys, tokenizer([prompts[0], prompts[1], prompts[0]]))
    direct_uint8 = text2image.images.to_uint8(direct)
    assert np.mean(direct_uint8 != samples) < 0.01  # at most a rounding level apart

    # output_dir is an epath.Path (gs:// works); its stat() has no st_mtime_ns.
    chunks = sorted(pathlib.Path(out_dir, "chunks").glob("*.npz"))
    stamps = [c.stat().st_mtime_ns for c in chunks]
    np.testing.assert_array_equal(text2image.sample(config, workdir), samples)
    assert [c.stat().st_mtime_ns for c in chunks] == stamps


def test_prompt_spec_errors(tmp_path):
    assert text2image.read_prompts("a cat") == ["a cat"]
    with pytest.raises(FileNotFoundError, match="no such prompt file"):
        text2image.read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        text2image.read_prompts(str(tmp_path / "empty.txt"))
