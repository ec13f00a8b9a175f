"""Training: the train loop of `train_and_evaluate`, its logs, checks and sample grids.

The loop starts from the newest readable checkpoint (or a new state), runs the pmap'd
update of `updates.py` one or training.steps_per_dispatch steps per call, and logs,
saves, draws sample grids and computes FID at their steps; a preemption signal saves
the step and stops, so a restart resumes exactly.
"""

import contextlib
import itertools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from etils import epath

from ddpm import (
    autoencoder_job,
    checkpointing,
    eval_job,
    images,
    input_pipeline,
    latent,
    samplers,
    sampling,
    updates,
)
from ddpm.factories import (
    TrainState,
    create_diffusion,
    create_model,
    create_optimizer,
    create_train_state,
    latent_shape,
    learning_rate_schedule,
    state_from_params,
    uses_text,
)


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


def steps_in_next_call(step: int, per_dispatch: int, periods, num_steps: int) -> int:
    """per_dispatch, or 1 where a multiple of a period (or num_steps) falls before the call's
    end: every log, save, grid and FID step ends a call, whatever the periods."""
    stop = min([num_steps] + [(step // p + 1) * p for p in periods if p > 0])
    return per_dispatch if step + per_dispatch <= stop else 1


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
    if config.training.steps_per_dispatch < 1:
        raise ValueError(
            f"training.steps_per_dispatch={config.training.steps_per_dispatch} must be >= 1"
        )
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
        task = _task(config, workdir)
    except BaseException:
        checkpointer.close()
        if created and jax.process_index() == 0:
            # Best effort: the start-up error is the one to report, not the clean-up's.
            with contextlib.suppress(Exception):
                workdir.rmtree()
        raise
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    return _train(config, workdir, checkpointer, state, train_iter, task)


def _task(config, workdir) -> updates.Task:
    model, tx = create_model(config), create_optimizer(config.optim)
    if config.pipeline == "autoencoder":
        return autoencoder_job.training_task(config, model, tx, workdir)
    diffusion, frozen, inputs = create_diffusion(config), None, None
    if config.pipeline == "latent":
        frozen = latent.load_frozen(config, workdir, copy=True)
        table = latent.prompt_table(config) if uses_text(config) else None
        inputs = latent.TrainingInputs(frozen, latent_shape(config), table)
    sampler = sampling.make_sampler(config, model, autoencoder=frozen)
    sample_rng = jax.random.split(jax.random.key(config.seed), 3)[2]

    def write_grid(state, step, logger):
        write_sample_grid(config, sampler, state, sample_rng, step, workdir, logger)

    return updates.Task(
        make_step=lambda steps: updates.make_train_step(
            config, model, diffusion, tx, steps=steps, latent_inputs=inputs
        ),
        frozen=None if frozen is None else frozen.params,
        write_grid=write_grid,
        training_fid=eval_job.training_fid(config, model, workdir, autoencoder=frozen)
        if config.training.fid_every
        else None,
    )


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


def _train(config, workdir, checkpointer, state, train_iter, task: updates.Task):
    """The train loop from `state` to training.num_train_steps; saves, logs and samples."""
    _, train_rng, _ = jax.random.split(jax.random.key(config.seed), 3)
    start_step = int(state.step)
    state = updates.replicated(state)
    frozen = None if task.frozen is None else updates.replicated(task.frozen)
    p_train_step = task.make_step(1)
    per_dispatch = config.training.steps_per_dispatch
    p_train_steps = task.make_step(per_dispatch)
    logger = _Logger(workdir, config.training.num_train_steps)
    preemption = checkpointing.PreemptionFlag()
    num_steps = config.training.num_train_steps
    last_logged = start_step
    fid_every, training_fid = config.training.fid_every, task.training_fid
    grid_every = config.training.sample_every if config.training.num_grid_samples else 0
    periods = (config.training.log_every, config.training.checkpoint_every, grid_every,
               fid_every if training_fid else 0)  # fmt: skip
    logging.info("Training from step %d to %d in %s", start_step, num_steps, workdir)
    finished = False
    try:
        step, in_flight = start_step, None
        while step < num_steps:
            if (n := steps_in_next_call(step, per_dispatch, periods, num_steps)) > 1:
                batches = updates.stack_steps([next(train_iter) for _ in range(n)])
                state, metrics = p_train_steps(state, batches, train_rng, frozen)
                step += n
            else:
                state, metrics = p_train_step(state, next(train_iter), train_rng, frozen)
                step += 1
            # At most two calls queued: the host would otherwise run ahead to the next log
            # step, and a preemption signal would wait for all the steps queued until then.
            jax.block_until_ready(in_flight)
            in_flight = metrics
            if step % config.training.log_every == 0 or step == num_steps:
                metrics = {k: float(v) for k, v in metrics.items()}
                check_finite(metrics, step, last_logged)
                lr = float(learning_rate_schedule(config.optim)(step - 1))
                logger.scalars(step, {**metrics, "learning_rate": lr}, config.training.batch_size)
                last_logged = step
            grid_due = step % config.training.sample_every == 0 or step == num_steps
            if config.training.num_grid_samples and grid_due:
                task.write_grid(state, step, logger)
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
        else:  # also when a restart finds the run done (a crash after its last save)
            finished = True
    finally:
        checkpointer.close()
        logger.close()
        preemption.restore_handlers()
    if finished and task.finish:  # after close(): the final checkpoint is on disk
        task.finish(state)
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
    keys = samplers.sample_keys(jax.random.fold_in(rng, step), jnp.arange(num_samples))
    samples = sampler(state.ema_params, keys, labels)
    if jax.process_index() == 0:
        path = workdir / "samples" / f"step_{step:08d}.png"
        logger.image(step, "samples", images.save_grid(samples, path, columns=columns))
    logging.info("Wrote a grid of %d samples at step %d", len(samples), step)
