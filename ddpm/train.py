"""Training: the train state with EMA, a pure data-parallel train step, and the train loop.

The train step runs under one `jax.pmap` written the modern way: the state goes in
unmapped and comes out unmapped (in_axes=(None, 0, None), out_axes=None), the batch
is split over devices, and gradients and metrics are averaged with `lax.pmean`.
Randomness is a pure function of (seed, step, global example index), so the same
global batch gives the same update on any number of devices, and a resumed run
continues exactly as one that never stopped.
"""

import contextlib
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from etils import epath

from ddpm import (
    checkpointing,
    eval_job,
    evaluation,
    images,
    input_pipeline,
    super_resolution,
)
from ddpm import diffusion as D
from ddpm.factories import (
    TrainState,
    create_diffusion,
    create_model,
    create_optimizer,
    create_train_state,
    learning_rate_schedule,
    state_from_params,
)

# fold_in purpose of the step's key for label dropout.
LABEL_DROPOUT_PURPOSE = 3


def drop_labels(labels, rng, global_index, *, rate: float, null_label: int):
    """Labels [b] with each replaced by `null_label` with probability `rate`.

    Example i's draw comes from fold_in(rng, global index i), like its t and noise, so the
    choice does not depend on how the batch is split over devices.
    """
    keys = evaluation.sample_keys(rng, global_index)
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
    state: TrainState, batch, rng, *, model, diffusion, tx, ema_decay, ema_warmup=False,
    label_dropout=0.0, low_res_max_level=0,
):  # fmt: skip
    """One update on this device's share of the global batch (run under pmap 'batch').

    Args:
      state: the replicated TrainState.
      batch: {'image': uint8 [b, H, W, C], 'label': int32 [b]} (+ 'low_res' uint8
        [b, h, w, C] for super-resolution), this device's share.
      rng: the run's key; folded with the step, and per example with its global index.
      ema_decay, ema_warmup: the EMA's decay, and whether it warms up (`ema_decay_at`).
      label_dropout: for a class-conditional model, the probability of training an
        example with the null label (classifier-free guidance).
      low_res_max_level: a noise-conditioned super-resolution model's largest
        augmentation level (super_resolution.training_inputs).
    Returns:
      (new state, metrics averaged over all devices).
    """
    per_device = batch["image"].shape[0]
    global_index = jax.lax.axis_index("batch") * per_device + jnp.arange(per_device)
    step_rng = jax.random.fold_in(rng, state.step)
    t_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
    x_start = images.to_model_range(batch["image"])
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, diffusion.num_timesteps))(
        evaluation.sample_keys(t_rng, global_index)
    )
    noise = jax.vmap(lambda k: jax.random.normal(k, x_start.shape[1:]))(
        evaluation.sample_keys(noise_rng, global_index)
    )
    labels = None
    if model.num_classes:
        # Its own stream: fold_in leaves the t, noise and dropout keys as they were.
        label_rng = jax.random.fold_in(step_rng, LABEL_DROPOUT_PURPOSE)
        null = model.num_classes
        labels = drop_labels(
            batch["label"], label_rng, global_index, rate=label_dropout, null_label=null
        )
    dropout_keys = evaluation.sample_keys(dropout_rng, global_index)
    # Super-resolution: batch['low_res'] (noised to random levels up to low_res_max_level).
    low_res = super_resolution.training_inputs(
        model, diffusion, batch, step_rng, global_index, low_res_max_level
    )

    def loss_fn(params):
        def denoise_one(x_t, model_t, label, dropout_key, low_res):
            """One example: its dropout masks come from its own key, as its t and noise do."""
            out = model.apply(
                {"params": params}, x_t[None], model_t[None],
                None if label is None else label[None], train=True,
                rngs={"dropout": dropout_key}, **jax.tree.map(lambda a: a[None], low_res),
            )  # fmt: skip
            return out[0]

        def denoise_fn(x_t, model_t):
            return jax.vmap(denoise_one)(x_t, model_t, labels, dropout_keys, low_res)

        return jnp.mean(D.training_losses(diffusion, denoise_fn, x_start, t, noise)["loss"])

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = jax.lax.pmean(grads, "batch")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
    metrics = {
        "loss": jax.lax.pmean(loss, "batch"),
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


def make_train_step(config, model, diffusion, tx, devices=None, steps=1):
    """The pmap'd train step: (state, batch [devices, b, ...], rng) -> (state, metrics).

    steps > 1: `steps` updates in one call (training.steps_per_dispatch), scanned inside the
    compiled function, on batches [devices, steps, b, ...] (`stack_steps`); the same
    updates as `steps` single calls, with the last update's metrics. The state is donated:
    its buffers are reused for the new one, so the caller must not use it afterwards.
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
    )
    if steps > 1:
        single = step
        # XLA:CPU runs convolutions inside a loop without its fast kernels (17x slower per
        # step, measured on this U-Net): unrolled there; a loop elsewhere.
        unroll = (devices or jax.local_devices())[0].platform == "cpu"

        def step(state, batches, rng):
            body = lambda s, b: single(s, b, rng)  # noqa: E731
            state, metrics = jax.lax.scan(body, state, batches, unroll=unroll)
            return state, jax.tree.map(lambda m: m[-1], metrics)

    return jax.pmap(
        step, axis_name="batch", in_axes=(None, 0, None), out_axes=None, devices=devices,
        donate_argnums=0,
    )  # fmt: skip


def stack_steps(batches: list[dict]) -> dict:
    """Host batches of consecutive steps, each [devices, b, ...] -> [devices, steps, b, ...]."""
    return {k: np.stack([b[k] for b in batches], axis=1) for k in batches[0]}


class _Logger:
    """Console lines and TensorBoard scalars/images; only process 0 writes."""

    def __init__(self, workdir, num_steps):
        self.active = jax.process_index() == 0
        self.num_steps = num_steps
        self.writer = tf.summary.create_file_writer(str(workdir)) if self.active else None
        self.last_time, self.last_step = time.time(), None

    def scalars(self, step, metrics, images_per_step):
        now, eta = time.time(), ""
        if self.last_step is not None and step > self.last_step:
            steps_per_sec = (step - self.last_step) / (now - self.last_time)
            metrics = {
                **metrics,
                "steps_per_sec": steps_per_sec,
                "images_per_sec": steps_per_sec * images_per_step,
            }
            eta = f"  ETA {(self.num_steps - step) / steps_per_sec / 60:.1f} min"
        logging.info(
            "step %d/%d  %s%s",
            step,
            self.num_steps,
            "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
            eta,
        )
        self.last_time, self.last_step = now, step
        if self.active:
            with self.writer.as_default():
                for name, value in metrics.items():
                    tf.summary.scalar(name, value, step=step)

    def scalar(self, step, name, value):
        if self.active:
            with self.writer.as_default():
                tf.summary.scalar(name, value, step=step)

    def image(self, step, name, image_uint8):
        if self.active:
            with self.writer.as_default():
                tf.summary.image(name, image_uint8[None], step=step)

    def close(self):
        if self.active:
            self.writer.flush()


def check_finite(metrics, step, last_step):
    if not all(np.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(
            f"non-finite metrics {metrics} between steps {last_step} and {step}: "
            "lower optim.learning_rate or check the data"
        )


def check_steps_per_dispatch(training: ml_collections.ConfigDict) -> None:
    """ValueError unless every periodic event falls at the end of a dispatch."""
    per_dispatch = training.steps_per_dispatch
    if per_dispatch < 1:
        raise ValueError(f"training.steps_per_dispatch={per_dispatch} must be at least 1")
    for name in ("log_every", "checkpoint_every", "sample_every", "fid_every"):
        if training[name] % per_dispatch:
            raise ValueError(
                f"training.{name}={training[name]} must be a multiple of "
                f"training.steps_per_dispatch={per_dispatch}: the steps in between run in "
                "one call, with nothing to log, save or sample between them"
            )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> TrainState:
    """Trains (resuming from `workdir` if it holds a checkpoint); returns the final state.

    A start-up that fails (a bad config, missing data, no readable checkpoint) removes the
    workdir again if it created it, so a typo leaves no empty run behind.
    """
    if not 0.0 <= config.training.label_dropout <= 1.0:
        raise ValueError(
            f"training.label_dropout must be in [0, 1], got {config.training.label_dropout}"
        )
    keep_every, checkpoint_every = config.training.keep_every, config.training.checkpoint_every
    if keep_every < 0 or keep_every % checkpoint_every:
        raise ValueError(
            f"training.keep_every={keep_every} must be 0 or a multiple of "
            f"training.checkpoint_every={checkpoint_every} (only saved steps can be kept)"
        )
    check_steps_per_dispatch(config.training)
    workdir = epath.Path(workdir)
    created = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the workdir {workdir}: {error.strerror or error}") from None
    checkpointer = checkpointing.Checkpointer(
        workdir, keep=config.training.keep_checkpoints, keep_every=config.training.keep_every
    )
    try:
        state, train_iter = _start(config, checkpointer)
        # Settings errors of sampling and FID also come before the first step.
        model = create_model(config)
        sampler = evaluation.make_sampler(config, model)
        training_fid = None
        if config.training.fid_every:
            training_fid = eval_job.training_fid(config, model, workdir)
    except BaseException:
        checkpointer.close()
        if created and jax.process_index() == 0:
            # Best effort: the start-up error is the one to report, not the clean-up's.
            with contextlib.suppress(Exception):
                workdir.rmtree()
        raise
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    return _train(config, workdir, checkpointer, state, train_iter, sampler, training_fid)


def _start(config, checkpointer):
    """(state, train batches) to start from: the newest readable checkpoint, or a new state.

    The checkpoint is only read and the data opened before anything compiles, so their
    errors (missing files, a batch not divisible) come first.
    """
    model, tx = create_model(config), create_optimizer(config.optim)
    init_rng = jax.random.split(jax.random.key(config.seed), 3)[0]
    init_fn = jax.jit(lambda: create_train_state(config, model, tx, init_rng))
    restored = checkpointer.restore_newest(jax.eval_shape(init_fn), set_aside_damaged=True)
    start_step = 0 if restored is None else restored[1]
    if restored is not None and int(restored[0].step) != start_step:
        raise ValueError(
            f"checkpoint {checkpointer.directory / str(start_step)} holds a train state at step "
            f"{int(restored[0].step)}, not {start_step}: it was not written by training (e.g. "
            "by --mode=convert). Train in another workdir with config.init_from set to this one."
        )
    train_iter = input_pipeline.create_train_iter(
        config.data,
        global_batch_size=config.training.batch_size,
        seed=config.seed,
        start_step=start_step,
        num_classes=config.model.num_classes,
    )
    # Decoded now: a file that does not decode fails the start, not the first step.
    train_iter = itertools.chain([next(train_iter)], train_iter)
    if restored is not None:
        logging.info("Resuming from %s, step %d", checkpointer.directory, start_step)
        return restored[0], train_iter
    state = checkpointing.initialize(
        init_fn, init_from=config.init_from, from_params=lambda p: state_from_params(p, tx)
    )
    return state, train_iter


def _train(config, workdir, checkpointer, state, train_iter, sampler, training_fid):
    """The train loop from `state` to training.num_train_steps; saves, logs and samples.

    training_fid: None, or ema_params -> FID, called every training.fid_every steps.
    """
    model, diffusion, tx = (
        create_model(config),
        create_diffusion(config),
        create_optimizer(config.optim),
    )
    _, train_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 3)
    start_step = int(state.step)
    state = replicated(state)
    p_train_step = make_train_step(config, model, diffusion, tx)
    per_dispatch = config.training.steps_per_dispatch
    p_train_steps = make_train_step(config, model, diffusion, tx, steps=per_dispatch)
    logger = _Logger(workdir, config.training.num_train_steps)
    preemption = checkpointing.PreemptionFlag()
    num_steps = config.training.num_train_steps
    last_logged = start_step
    fid_every = config.training.fid_every
    logging.info("Training from step %d to %d in %s", start_step, num_steps, workdir)
    try:
        step = start_step
        while step < num_steps:
            # steps_per_dispatch steps per call from multiples of it; single steps up to
            # the next multiple (a run resumed elsewhere) and past the last one.
            if per_dispatch > 1 and step % per_dispatch == 0 and step + per_dispatch <= num_steps:
                batches = stack_steps([next(train_iter) for _ in range(per_dispatch)])
                state, metrics = p_train_steps(state, batches, train_rng)
                step += per_dispatch
            else:
                state, metrics = p_train_step(state, next(train_iter), train_rng)
                step += 1
            if step % config.training.log_every == 0 or step == num_steps:
                metrics = {k: float(v) for k, v in metrics.items()}
                check_finite(metrics, step, last_logged)
                lr = float(learning_rate_schedule(config.optim)(step - 1))
                logger.scalars(step, {**metrics, "learning_rate": lr}, config.training.batch_size)
                last_logged = step
            grid_due = step % config.training.sample_every == 0 or step == num_steps
            if config.training.num_grid_samples and grid_due:
                write_sample_grid(config, sampler, state, sample_rng, step, workdir, logger)
            if training_fid and (step % fid_every == 0 or step == num_steps):
                value = training_fid(state.ema_params)
                logging.info("step %d  FID %.3f (EMA, %d samples)", step, value,
                             config.training.fid_num_samples)  # fmt: skip
                logger.scalar(step, "fid", value)
            # Read once (a signal between two reads would save the same step twice), and
            # agreed by all processes: all save this step and stop, or none does.
            stopping = checkpointing.agreed(preemption.is_set())
            if stopping or step % config.training.checkpoint_every == 0 or step == num_steps:
                checkpointer.save(step, state, force=True)
            if stopping:
                logging.warning("Stopped at step %d after a signal; a restart resumes here.", step)
                break
    finally:
        checkpointer.close()
        logger.close()
        preemption.restore_handlers()
    return state


def grid_labels(num_samples: int, num_classes: int) -> tuple[np.ndarray | None, int | None]:
    """(labels, columns) of a sample grid: one row per class, or (None, None) unconditional."""
    if not num_classes:
        return None, None
    per_class = max(1, num_samples // num_classes)
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class), per_class


def write_sample_grid(config, sampler, state, rng, step, workdir, logger):
    """EMA samples (the configured sampler) as samples/step_<step>.png and a TensorBoard image.

    A class-conditional model's grid has one row per class, at sampling.guidance_scale.
    """
    labels, columns = grid_labels(config.training.num_grid_samples, config.model.num_classes)
    num_samples = config.training.num_grid_samples if labels is None else len(labels)
    keys = evaluation.sample_keys(jax.random.fold_in(rng, step), jnp.arange(num_samples))
    samples = sampler(state.ema_params, keys, labels)
    if jax.process_index() == 0:
        path = workdir / "samples" / f"step_{step:08d}.png"
        logger.image(step, "samples", images.save_grid(samples, path, columns=columns))
    logging.info("Wrote a grid of %d samples at step %d", len(samples), step)
