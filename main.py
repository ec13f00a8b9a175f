"""Entry point: python main.py --config=configs/cifar.py --workdir=runs/cifar [--mode=train].

Parses flags, sets up logging, keeps TensorFlow (used for tf.data only) off the
accelerators, and hands over to the library. Any config field can be overridden:
--config.training.batch_size=64.
"""

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "sample", "eval", "inpaint", "convert")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_string("source", None, "--mode=convert: a diffusers UNet2DModel directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import tensorflow as tf

    # TensorFlow only feeds data: it must not claim GPU or TPU memory that JAX needs.
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
    import jax

    config = FLAGS.config
    if config.distributed:
        jax.distributed.initialize()
    logging.info(
        "JAX process %d/%d, local devices: %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_devices(),
    )

    from ddpm import convert, evaluation, inpaint_job, train

    if FLAGS.mode == "train":
        train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        evaluation.sample(config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
        evaluation.evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "inpaint":
        inpaint_job.inpaint(config, FLAGS.workdir)
    else:
        if not FLAGS.source:
            raise app.UsageError("--mode=convert needs --source=DIR (a diffusers UNet2DModel)")
        convert.convert_checkpoint(config, FLAGS.source, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
