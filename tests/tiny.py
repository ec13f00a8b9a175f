"""The tiny model that the train and eval tests run: 8x8 images, two levels, T = 10."""

import os

import jax
import numpy as np

from configs import default
from ddpm import checkpointing, factories

# Dotted config overrides: applied by tiny_config, and passed as --config.<key>=<value>
# flags when a test runs main.py, so the two always describe the same run.
TINY = {
    "data.dataset": "cifar10",
    "data.image_size": 8,
    "data.num_channels": 3,
    "model.ch": 32,
    "model.ch_mult": (1, 2),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (4,),
    "model.dropout": 0.0,
    "diffusion.num_timesteps": 10,
    "training.batch_size": 16,
    "training.num_train_steps": 4,
    "training.log_every": 2,
    "training.checkpoint_every": 2,
    "training.sample_every": 4,
    "training.num_grid_samples": 4,
    "optim.warmup_steps": 2,
}


# compiler_options for a runtime-bound program: LLVM -O3 as outside the tests (conftest.py).
OPTIMIZED = {"xla_backend_optimization_level": 3}


def device_flags(count: int, *, optimized: bool = False) -> str:
    """This session's XLA_FLAGS with `count` fake CPU devices, for processes a test starts;
    `optimized`: without the session's -O0 (conftest.py), as outside the tests."""
    drop = ("host_platform_device_count",) + (("optimization_level",) if optimized else ())
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not any(d in f for d in drop)]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])


def overridden(config, *overrides):
    """config with each {dotted key: value} of `overrides` applied in turn."""
    for key, value in {k: v for o in overrides for k, v in (o or {}).items()}.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def tiny_config(overrides=None):
    """The default config with TINY applied, then `overrides` ({dotted key: value})."""
    return overridden(default.get_config(), TINY, overrides)


def flags(overrides=None) -> list[str]:
    """TINY and `overrides` as main.py flags (tuples written without spaces)."""
    return [
        f"--config.{key}={str(value).replace(' ', '')}"
        for key, value in {**TINY, **(overrides or {})}.items()
    ]


def init_state(config, model, tx):
    """factories.create_train_state (key 0) compiled, as training runs it: called op by op,
    a model's init compiles each of its ops on its own, several times slower."""
    return jax.jit(lambda: factories.create_train_state(config, model, tx, jax.random.key(0)))()


def random_params(config, model, tx):
    """Params of `model` moved off their zero-initialised layers (so outputs vary with
    the input): its initial params plus 0.05 N(0, 1) noise drawn on the host. (Drawn in
    the compiled program, a key per leaf made XLA take 2-3 times as long to compile it.)"""
    rng = np.random.default_rng(1)
    moved = jax.tree.map(
        lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape, np.float32),
        init_state(config, model, tx).params,
    )
    return jax.device_put(moved)


def write_random_checkpoint(config, workdir, step: int = 7) -> None:
    """A checkpoint at `step` of a random model (random_params): what the sample, eval,
    inpaint and upsample tests load."""
    model, tx = factories.create_model(config), factories.create_optimizer(config.optim)
    params = random_params(config, model, tx)
    checkpointer = checkpointing.Checkpointer(workdir)
    checkpointer.save(step, factories.state_from_params(params, tx), force=True)
    checkpointer.close()


def restore_state(config, workdir):
    """(newest TrainState in workdir, its step), the whole state as training restores it."""
    model, tx = factories.create_model(config), factories.create_optimizer(config.optim)
    abstract = jax.eval_shape(lambda: factories.create_train_state(config, model, tx,
                                                                   jax.random.key(0)))  # fmt: skip
    checkpointer = checkpointing.Checkpointer(workdir, create=False)
    try:
        return checkpointer.restore_newest(abstract)
    finally:
        checkpointer.close()


# The tiny LDMTextToImagePipeline of tests/fixtures/ldm_tiny (tools/make_ldm_fixtures.py)
# as overrides of configs/ldm_text2im.py: 32x32 images, f = 4, 8x8x4 latents.
TINY_TEXT2IMAGE = {
    "data.image_size": 32,
    "model.ch": 32,
    "model.ch_mult": (1, 2, 2),
    "model.cross_attn_levels": (True, True, False),
    "model.num_heads": 2,
    "model.context_dim": 32,
    "autoencoder.ch": 32,
    "autoencoder.ch_mult": (1, 1, 2),
    "text_encoder.vocab_size": 96,
    "text_encoder.d_model": 32,
    "text_encoder.num_layers": 2,
    "text_encoder.num_heads": 2,
    "text_encoder.head_dim": 16,
    "text_encoder.ffn_dim": 64,
    "sampling.num_steps": 10,
    "sampling.eta": 0.0,
}


def tiny_text2image_config(overrides=None):
    """configs/ldm_text2im.py with TINY_TEXT2IMAGE, then `overrides`, applied."""
    from configs import ldm_text2im

    return overridden(ldm_text2im.get_config(), TINY_TEXT2IMAGE, overrides)
