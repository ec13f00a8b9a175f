"""Reading a whole diffusers LDMTextToImagePipeline folder (tests/fixtures/ldm_tiny/)."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from ddpm import convert_ldm

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
PIPELINE = FIXTURES / "ldm_tiny"


def test_pipeline_folder_loads_every_component():
    pytest.importorskip("ddpm.convert_cond_unet")
    pipeline = convert_ldm.load_pipeline(PIPELINE)
    vqvae_config = json.loads((PIPELINE / "vqvae" / "config.json").read_text())
    assert pipeline.scaling_factor == vqvae_config.get("scaling_factor", 0.18215)
    scheduler = json.loads((PIPELINE / "scheduler" / "scheduler_config.json").read_text())
    assert pipeline.scheduler_config == scheduler
    reference = np.load(FIXTURES / "ldm_tiny_outputs.npz")
    prompts = json.loads((FIXTURES / "ldm_tiny_outputs.json").read_text())["prompts"]
    np.testing.assert_array_equal(pipeline.tokenizer(prompts), reference["token_ids"])
    vqvae = convert_ldm.load_component(PIPELINE / "vqvae", convert_ldm.autoencoder_from_diffusers)
    assert pipeline.vqvae.kwargs == vqvae.kwargs
    jax.tree.map(np.testing.assert_array_equal, pipeline.vqvae.params, vqvae.params)
    assert pipeline.unet.params and pipeline.bert.params


def _copy_with_index(tmp_path, change):
    folder = tmp_path / "pipeline"
    shutil.copytree(PIPELINE, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **change}))
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        ({"_class_name": "StableDiffusionPipeline"}, "_class_name is 'StableDiffusionPipeline'"),
        ({"vqvae": ["diffusers", "VQModel"]}, "vqvae is a VQModel"),
        ({"bert": None}, "no 'bert' component"),
    ],
)
def test_other_pipelines_are_rejected(tmp_path, change, message):
    folder = _copy_with_index(tmp_path, change)
    with pytest.raises(ValueError, match=f"not an LDM text-to-image pipeline: .*{message}"):
        convert_ldm.load_pipeline(folder)


def test_missing_component_folder_is_reported(tmp_path):
    folder = _copy_with_index(tmp_path, {})
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(ValueError, match="no tokenizer/ folder"):
        convert_ldm.load_pipeline(folder)
