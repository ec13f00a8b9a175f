"""The training update: a pure data-parallel train step with EMA, and its pmap'd form.

The train step runs under one `jax.pmap` written the modern way: the state goes in
unmapped and comes out unmapped (in_axes=(None, 0, None), out_axes=None), the batch
is split over devices, and gradients and metrics are averaged with `lax.pmean`.
Randomness is a pure function of (seed, step, global example index), so the same
global batch gives the same update on any number of devices, and a resumed run
continues exactly as one that never stopped.

No TensorFlow here (train.py's loop, logs and data have it): benchmarks and other
programs that only step a model import this module alone.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm import diffusion as D
from ddpm import images, samplers, super_resolution
from ddpm.factories import TrainState

# fold_in purpose of the step's key for label dropout.
LABEL_DROPOUT_PURPOSE = 3


def drop_labels(labels, rng, global_index, *, rate: float, null_label: int):
    """Labels [b] with each replaced by `null_label` with probability `rate`.

    Example i's draw comes from fold_in(rng, global index i), like its t and noise, so the
    choice does not depend on how the batch is split over devices.
    """
    keys = samplers.sample_keys(rng, global_index)
    dropped = jax.vmap(lambda k: jax.random.bernoulli(k, rate))(keys)
    return jnp.where(dropped, null_label, labels)


def ema_decay_at(step, ema_decay: float, warmup: bool):
    """The EMA decay of update number `step` (0, 1, ...).

    With warm-up, min(ema_decay, (1 + step) / (10 + step)) (as tf.train's
    ExponentialMovingAverage with num_updates): 0.1 at the first update, 0.99 near step
    890, so the average leaves the random initial weights behind early in a short run.
    """
    if not warmup:
        return ema_decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def train_step(
    state: TrainState, batch, rng, frozen=None, *, model, diffusion, tx, ema_decay,
    ema_warmup=False, label_dropout=0.0, low_res_max_level=0, latent_inputs=None,
):  # fmt: skip
    """One update on this device's share of the global batch (run under pmap 'batch').

    Args:
      state: the replicated TrainState.
      batch: {'image': uint8 [b, H, W, C], 'label': int32 [b]} (+ 'low_res' uint8
        [b, h, w, C] for super-resolution), this device's share.
      rng: the run's key; folded with the step, and per example with its global index.
      frozen: params that the step uses but does not train (latent diffusion: the
        autoencoder's), or None.
      ema_decay, ema_warmup: the EMA's decay, and whether it warms up (`ema_decay_at`).
      label_dropout: for a class-conditional model, the probability of training an
        example with the null label (classifier-free guidance).
      low_res_max_level: a noise-conditioned super-resolution model's largest
        augmentation level (super_resolution.training_inputs).
      latent_inputs: None, or latent diffusion's (frozen, x, labels, step key, global
        index) -> (latents, condition) (latent.TrainingInputs): the same math on latents.
    Returns:
      (new state, metrics averaged over all devices).
    """
    per_device = batch["image"].shape[0]
    global_index = jax.lax.axis_index("batch") * per_device + jnp.arange(per_device)
    step_rng = jax.random.fold_in(rng, state.step)
    t_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
    x_start = images.to_model_range(batch["image"])
    t = samplers.per_example(
        t_rng, global_index, lambda k: jax.random.randint(k, (), 0, diffusion.num_timesteps)
    )
    labels = None
    if model.num_classes:
        # Its own stream: fold_in leaves the t, noise and dropout keys as they were.
        label_rng = jax.random.fold_in(step_rng, LABEL_DROPOUT_PURPOSE)
        null = model.num_classes
        labels = drop_labels(
            batch["label"], label_rng, global_index, rate=label_dropout, null_label=null
        )
    if latent_inputs is not None:
        x_start, labels = latent_inputs(frozen, x_start, labels, step_rng, global_index)
    noise = samplers.per_example(
        noise_rng, global_index, lambda k: jax.random.normal(k, x_start.shape[1:])
    )
    dropout_keys = samplers.sample_keys(dropout_rng, global_index)
    # Super-resolution: batch['low_res'] (noised to random levels up to low_res_max_level).
    low_res = super_resolution.training_inputs(
        model, diffusion, batch, step_rng, global_index, low_res_max_level
    )

    def loss_fn(params):
        def denoise_fn(x_t, model_t):
            return model.apply({"params": params}, x_t, model_t, labels, train=True,
                               dropout_keys=dropout_keys, **low_res)  # fmt: skip

        return jnp.mean(D.training_losses(diffusion, denoise_fn, x_start, t, noise)["loss"])

    return apply_gradients(state, jax.value_and_grad(loss_fn)(state.params), tx=tx,
                           ema_decay=ema_decay, ema_warmup=ema_warmup)  # fmt: skip


def apply_gradients(state: TrainState, loss_and_grads, *, tx, ema_decay, ema_warmup, extra=None):
    """The update of a step from this device's (loss, grads): gradients averaged over
    devices, the optimiser step and the EMA. Returns (new state, metrics averaged over all
    devices, with `extra` {name: this device's value} added)."""
    loss, grads = loss_and_grads
    grads = jax.lax.pmean(grads, "batch")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
    metrics = {
        "loss": jax.lax.pmean(loss, "batch"),
        **{name: jax.lax.pmean(value, "batch") for name, value in (extra or {}).items()},
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
    }
    new_state = TrainState(
        step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
    )
    return new_state, metrics


def replicated(tree, devices=None):
    """`tree` laid out as the pmap'd step returns its state: replicated over `devices`.

    Feeding the step a state with the layout it returns makes it compile once; a state on
    one device would make its second call compile again. The result is a copy, leaf by
    leaf: the step donates its state, which must neither delete the caller's `tree` nor
    hold one buffer twice (a new state's ema_params are its params).
    """
    mesh = jax.sharding.Mesh(np.asarray(devices or jax.local_devices()), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=sharding)(tree)


def make_train_step(config, model, diffusion, tx, devices=None, steps=1, latent_inputs=None):
    """The pmap'd train step: (state, batch [devices, b, ...], rng, frozen) -> (state, metrics).

    frozen: latent diffusion's autoencoder params (latent_inputs), else None.
    """
    step = functools.partial(
        train_step,
        model=model,
        diffusion=diffusion,
        tx=tx,
        ema_decay=config.training.ema_decay,
        ema_warmup=config.training.ema_warmup,
        label_dropout=config.training.label_dropout,
        low_res_max_level=super_resolution.max_noise_level(config),
        latent_inputs=latent_inputs,
    )
    return pmap_step(step, devices, steps)


def pmap_step(step, devices=None, steps=1):
    """step (state, batch, rng, frozen) -> (state, metrics), run under pmap 'batch'.

    steps > 1: `steps` updates in one call (training.steps_per_dispatch), scanned inside the
    compiled function, on batches [devices, steps, b, ...] (`stack_steps`); the same
    updates as `steps` single calls, with the last update's metrics. The state is donated:
    its buffers are reused for the new one, so the caller must not use it afterwards.
    """
    if steps > 1:
        single = step
        # A loop on every backend: the models' convolutions keep XLA:CPU's fast kernels
        # inside it (models/convolution.py), and it compiles as one step does.

        def step(state, batches, rng, frozen):
            body = lambda s, b: single(s, b, rng, frozen)  # noqa: E731
            state, metrics = jax.lax.scan(body, state, batches)
            return state, jax.tree.map(lambda m: m[-1], metrics)

    mapped = jax.pmap(
        step, axis_name="batch", in_axes=(None, 0, None, None), out_axes=None, devices=devices,
        donate_argnums=0,
    )  # fmt: skip
    return lambda state, batch, rng, frozen=None: mapped(state, batch, rng, frozen)


class Task(NamedTuple):
    """What the loop runs for config.pipeline: its step, grids, FID and last act."""

    make_step: Callable  # steps per call -> (state, batches, rng, frozen) -> (state, metrics)
    frozen: Any = None  # params the step takes but does not train (stage 2's autoencoder)
    write_grid: Callable | None = None  # (state, step, logger) -> None
    training_fid: Callable | None = None  # ema_params -> FID
    finish: Callable | None = None  # state at num_train_steps -> None (stage 1's scale)


def stack_steps(batches: list[dict]) -> dict:
    """Host batches of consecutive steps, each [devices, b, ...] -> [devices, steps, b, ...]."""
    return {k: np.stack([b[k] for b in batches], axis=1) for k in batches[0]}
