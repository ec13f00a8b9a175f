"""Prompt -> token ids -> LDMBert text states, against transformers' tokenizer and torch.

Fixtures from tools/make_ldm_fixtures.py: tests/fixtures/ldm_tiny/ (a random-weight
LDMTextToImagePipeline in diffusers' layout; bert/ is a legacy pytorch_model.bin) and
ldm_tiny_outputs.{npz,json} (token ids and text embeddings torch computed for the
prompts in the JSON).
"""

import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from ddpm import convert_ldm, text_tokenizer
from ddpm.models.ldmbert import LDMBert
from ddpm.text_tokenizer import PromptTokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
PIPELINE = FIXTURES / "ldm_tiny"
TOLERANCE = 1e-4  # max |ours - torch| / max |torch|: float32 on both sides


@pytest.fixture(scope="module")
def reference():
    outputs = np.load(FIXTURES / "ldm_tiny_outputs.npz")
    prompts = json.loads((FIXTURES / "ldm_tiny_outputs.json").read_text())["prompts"]
    return outputs, prompts


@pytest.fixture(scope="module")
def bert():
    return convert_ldm.load_component(
        PIPELINE / "bert", convert_ldm.ldmbert_from_diffusers, convert_ldm.TRANSFORMERS_WEIGHT_NAMES
    )


def test_tokenizer_gives_transformers_ids(reference):
    outputs, prompts = reference
    ids = PromptTokenizer.from_folder(PIPELINE / "tokenizer")(prompts)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, outputs["token_ids"])


def test_vocab_is_read_as_the_tokenizers_library_reads_it(tmp_path):
    """read_vocab (through epath, so gs:// works) gives the ids that `tokenizers` gives
    reading the file itself: CRLF, trailing white space (not \\x1c), blank lines, a
    duplicate, no final newline."""
    path = tmp_path / "vocab.txt"
    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b \t", "c\r", "d\xa0",
             "e\u3000", "f\x1c", "", "a", "\u2009g\u2009", "last"]  # fmt: skip
    path.write_bytes("\n".join(lines).encode())
    itself = tokenizers.BertWordPieceTokenizer(str(path)).get_vocab()
    assert tokenizers.BertWordPieceTokenizer(text_tokenizer.read_vocab(path)).get_vocab() == itself
    assert itself["f\x1c"] == 10 and itself["a"] == 12


def test_bert_gives_torchs_text_states(bert, reference):
    outputs, _ = reference
    apply = jax.jit(LDMBert(**bert.kwargs).apply)
    states = np.asarray(apply({"params": bert.params}, outputs["token_ids"]))
    expected = outputs["text_embeddings"]
    assert states.shape == expected.shape
    error = float(np.abs(states - expected).max() / np.abs(expected).max())
    print(f"text_embeddings: max relative error {error:.2e}")
    assert error < TOLERANCE


def test_bert_loads_from_safetensors_as_from_bin(bert, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    folder = tmp_path / "bert"
    folder.mkdir()
    shutil.copy(PIPELINE / "bert" / "config.json", folder)
    state = convert_ldm.load_diffusers_state_dict(
        PIPELINE / "bert", convert_ldm.TRANSFORMERS_WEIGHT_NAMES
    )
    safetensors_numpy.save_file(state, folder / "model.safetensors")
    converted = convert_ldm.load_component(
        folder, convert_ldm.ldmbert_from_diffusers, convert_ldm.TRANSFORMERS_WEIGHT_NAMES
    )
    assert converted.kwargs == bert.kwargs
    jax.tree.map(np.testing.assert_array_equal, converted.params, bert.params)


def test_released_config_has_transformers_parameter_count():
    data = json.loads((FIXTURES / "ldm_large_configs.json").read_text())
    counts = json.loads((FIXTURES / "ldm_tiny_outputs.json").read_text())["large_param_counts"]
    kwargs = convert_ldm.ldmbert_kwargs_from_diffusers_config(data["bert"])
    model = LDMBert(**kwargs)
    token_ids = jnp.zeros((1, kwargs["max_length"]), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), token_ids))
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))
    # transformers' count includes the masked-LM head (d_model -> vocab), which the
    # pipeline never runs and the converter drops by name.
    head = kwargs["d_model"] * kwargs["vocab_size"] + kwargs["vocab_size"]
    print(f"bert: {count} parameters + {head} in the unused head (transformers: {counts['bert']})")
    assert count + head == counts["bert"]


def test_weights_that_do_not_fit_are_reported(bert):
    config = json.loads((PIPELINE / "bert" / "config.json").read_text())
    state = convert_ldm.load_diffusers_state_dict(
        PIPELINE / "bert", convert_ldm.TRANSFORMERS_WEIGHT_NAMES
    )
    extra = {**state, "model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}
    with pytest.raises(ValueError, match=r"not in the LDMBert: \['layer_0/self_attn/q/bias'\]"):
        convert_ldm.ldmbert_from_diffusers(config, extra)

    unknown = {**state, "model.pooler.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match=r"no place in our LDMBert: \['model.pooler.weight'\]"):
        convert_ldm.ldmbert_from_diffusers(config, unknown)

    missing = {k: v for k, v in state.items() if not k.startswith("model.layer_norm.")}
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['norm_out/bias'"):
        convert_ldm.ldmbert_from_diffusers(config, missing)

    # The unused masked-LM head is optional: without it the params are the same.
    headless = {k: v for k, v in state.items() if not k.startswith("to_logits.")}
    assert len(headless) == len(state) - 2
    jax.tree.map(
        np.testing.assert_array_equal,
        convert_ldm.ldmbert_from_diffusers(config, headless)[1],
        convert_ldm.ldmbert_from_diffusers(config, state)[1],
    )

    misshapen = dict(state)
    misshapen["model.embed_positions.weight"] = state["model.embed_positions.weight"][:50]
    with pytest.raises(ValueError, match=r"shape mismatches.*embed_positions/embedding: \(50, "):
        convert_ldm.ldmbert_from_diffusers(config, misshapen)


def test_unsupported_configs_are_rejected():
    with pytest.raises(ValueError, match="unsupported LDMBert config: .*activation_function"):
        convert_ldm.ldmbert_kwargs_from_diffusers_config({"activation_function": "gelu_new"})
    with pytest.raises(ValueError, match="model_type='bert'"):
        convert_ldm.ldmbert_kwargs_from_diffusers_config({"model_type": "bert"})
