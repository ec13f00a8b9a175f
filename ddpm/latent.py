"""Latent diffusion training (Rombach et al. 2022): stage 2's network, its conditioning, and
the frozen stage-1 autoencoder that carries images to its latents and back.

    stage 1 (pipeline 'autoencoder', autoencoder_job.py): images -> AutoencoderKL; at
        the end, scale = 1 / std of the latents of a fixed set of training images
    stage 2 (pipeline 'latent'): image x -> z = scale * (mean + std * noise), the
        posterior sample LDM trains on -> the pixel train step's math on z, with
        LatentDenoiser(z_t, t, y) -> sampling z_0 -> decode(z_0 / scale) -> images

The condition y is a class label (one token of context, from a learned embedding) or a
short prompt (token ids through a small LDMBert trained jointly). Prompts are the class
names in a few phrasings ("the digit seven"); the null label of classifier-free guidance
is the empty prompt. Stage 2 copies the autoencoder and its scale into its own workdir
when it starts (FROZEN_DIR), so resuming, sampling and evaluating never depend on the
stage-1 workdir again.
"""

import dataclasses
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from ddpm import checkpointing, factories, samplers
from ddpm.models.autoencoder import AutoencoderKL, gaussian_sample

SCALE_FILE = "latent_scale.json"  # stage 1 writes it next to its checkpoints
FROZEN_DIR = "autoencoder"  # stage 2's copy of the autoencoder (an orbax checkpoint)
# fold_in purposes of a step's key: the posterior sample, and a prompt's phrasing.
POSTERIOR_PURPOSE, PHRASING_PURPOSE = 11, 12
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Frozen(NamedTuple):
    """Stage 1's autoencoder as stage 2 uses it: never trained, params passed to the step."""

    module: AutoencoderKL
    params: Any
    scale: float  # latents are z * scale (LDM's scale_factor)
    step: int  # the stage-1 checkpoint it came from

    def encode(self, params, x: jax.Array, noise: jax.Array) -> jax.Array:
        """Images [B, H, W, C] in [-1, 1] -> scaled posterior samples [B, h, w, c]."""
        mean, logvar = self.module.apply({"params": params}, x, method=AutoencoderKL.encode)
        return self.scale * gaussian_sample(mean, logvar, noise)

    def decode(self, params, z: jax.Array) -> jax.Array:
        """Scaled latents [B, h, w, c] -> images [B, H, W, C] (float32, unclipped)."""
        return self.module.apply({"params": params}, z / self.scale, method=AutoencoderKL.decode)


# ----------------------------------------------------------------------------- prompts


def prompt_texts(config) -> list[list[str]]:
    """[class][phrasing] prompts: each latent.phrasings template with the class's name."""
    names = [n.strip() for n in str(config.latent.class_names).split(",")]
    if len(names) != config.model.num_classes:
        raise ValueError(
            f"latent.class_names has {len(names)} names, model.num_classes is "
            f"{config.model.num_classes}"
        )
    phrasings = list(config.latent.phrasings)
    if not phrasings or any("{}" not in p for p in phrasings):
        raise ValueError(f"latent.phrasings must be templates with '{{}}', got {phrasings}")
    return [[p.format(name) for p in phrasings] for name in names]


def make_tokenizer(config):
    """BERT WordPiece over the words of the prompts (lowercased, split at punctuation).

    The vocabulary is a function of the config alone, so every job rebuilds the same ids;
    a word of a free prompt outside it is [UNK].
    """
    import tokenizers  # here: the train step and the sampler run where it is not installed

    from ddpm.text_tokenizer import PromptTokenizer

    split = tokenizers.pre_tokenizers.BertPreTokenizer()
    texts = [text.lower() for row in prompt_texts(config) for text in row]
    words = {word for text in texts for word, _ in split.pre_tokenize_str(text)}
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(words)])}
    if len(vocab) > config.text_encoder.vocab_size:
        raise ValueError(
            f"the prompts need {len(vocab)} tokens, text_encoder.vocab_size is "
            f"{config.text_encoder.vocab_size}"
        )
    return PromptTokenizer.from_vocab(vocab, max_length=config.text_encoder.max_length)


def prompt_table(config) -> np.ndarray:
    """int32 [num_classes + 1, phrasings, L]: the ids of every prompt; the last row (the
    null label) is the empty prompt."""
    tokenizer, texts = make_tokenizer(config), prompt_texts(config)
    table = np.stack([tokenizer(row) for row in texts + [[""] * len(texts[0])]])
    return table.astype(np.int32)


def prompt_ids(table: jax.Array, labels: jax.Array, keys: jax.Array) -> jax.Array:
    """Token ids [B, L] of labels [B] (num_classes: the empty prompt), each in the phrasing
    drawn from its own key [B] (so it does not depend on batches or devices)."""
    phrasing = jax.vmap(
        lambda k: jax.random.randint(jax.random.fold_in(k, PHRASING_PURPOSE), (), 0, table.shape[1])
    )(keys)
    return jnp.asarray(table)[labels, phrasing]


# ------------------------------------------------------------------- the training inputs


@dataclasses.dataclass(frozen=True)
class TrainingInputs:
    """What the pixel train step's hook turns into latents and conditions (updates.train_step).

    Example i's posterior noise and phrasing come from fold_in(step key + purpose, global
    index i), like its t and noise.
    """

    autoencoder: Frozen
    shape: tuple[int, int, int]  # latent_shape
    table: np.ndarray | None  # prompt_table, for text conditioning

    def __call__(self, frozen_params, x, labels, step_rng, global_index):
        """(x [b, H, W, C] in [-1, 1], labels [b] | None) -> (z_0 [b, h, w, c], y)."""
        keys = samplers.sample_keys(jax.random.fold_in(step_rng, POSTERIOR_PURPOSE), global_index)
        noise = jax.vmap(lambda k: jax.random.normal(k, self.shape))(keys)
        z = self.autoencoder.encode(frozen_params, x, noise)
        if self.table is not None:
            labels = prompt_ids(self.table, labels, keys)
        return z, labels


# ---------------------------------------------------------------- the frozen autoencoder


def read_scale(workdir, step: int) -> float:
    """Stage 1's latent scale for its checkpoint `step` (SCALE_FILE); a clear error if none."""
    path = epath.Path(workdir) / SCALE_FILE
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("step") != step:
        raise ValueError(
            f"the autoencoder {workdir} has no latent scale for its checkpoint {step} (found "
            f"{record or 'none'} in {SCALE_FILE}): train it to its training.num_train_steps, "
            "which writes the scale with the final checkpoint"
        )
    return float(record["scale_factor"])


def write_scale(workdir, step: int, scale: float, num_examples: int) -> None:
    if jax.process_index() == 0:
        path = epath.Path(workdir) / SCALE_FILE
        partial = path.with_suffix(".partial")
        record = {"step": step, "scale_factor": scale, "num_examples": num_examples}
        partial.write_text(json.dumps(record, indent=2))
        partial.replace(path)


def load_frozen(config, workdir, *, copy: bool = False) -> Frozen:
    """Stage 2's autoencoder: its copy in workdir, else (copy=True, training's first start)
    latent.autoencoder's newest EMA params and scale, copied into workdir first."""
    module = factories.create_autoencoder(config)
    abstract_params = jax.eval_shape(
        lambda: factories.init_params(config, module, jax.random.key(0))
    )
    target = epath.Path(workdir) / FROZEN_DIR
    abstract = {"params": abstract_params, "scale": jax.ShapeDtypeStruct((), jnp.float32)}
    # Agreed: a process that looked after another began the copy would read it half-made.
    if checkpointing.agreed((target / checkpointing.CHECKPOINT_DIR).exists()) or not copy:
        how = "train this config (its start copies latent.autoencoder here)"
        saved, step = checkpointing.restore_newest_in(target, abstract, how_to_make_one=how)
        return Frozen(module, saved["params"], float(saved["scale"]), step)
    source = str(config.latent.autoencoder)
    if not source:
        raise ValueError("latent.autoencoder must name a trained autoencoder's workdir (stage 1)")
    params, step = checkpointing.restore_ema_params(
        source, abstract_params,
        how_to_make_one="train one first (configs/mnist_autoencoder.py)",
    )  # fmt: skip
    scale = float(np.float32(read_scale(source, step)))  # as the copy keeps it: a resume
    checkpointer = checkpointing.Checkpointer(target)
    # trains on the same latents as the first start
    checkpointer.save(step, {"params": params, "scale": np.float32(scale)}, force=True)
    checkpointer.close()
    logging.info("Copied the autoencoder of %s (step %d, scale %.5f) to %s",
                 source, step, scale, target)  # fmt: skip
    return Frozen(module, params, scale, step)


def frozen_of(config, workdir) -> Frozen | None:
    """The autoencoder copy of a latent model's workdir (sample, eval); None for others."""
    return load_frozen(config, workdir) if config.pipeline == "latent" else None
