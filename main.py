"""Entry point: python main.py --config=configs/cifar.py --workdir=runs/cifar [--mode=train].

Parses flags, sets up logging, keeps TensorFlow (used for tf.data only) off the
accelerators, and hands over to the library. Any config field can be overridden:
--config.training.batch_size=64.
"""

from absl import app, flags
from ml_collections import config_flags

MODES = ("train", "sample", "eval", "inpaint", "convert", "upsample")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_string(
    "source", None, "--mode=convert: a diffusers UNet2DModel (or, for text2image, pipeline) folder."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    if FLAGS.mode == "convert" and not FLAGS.source:
        raise app.UsageError("--mode=convert needs --source=DIR (a diffusers model folder)")
    if config.pipeline == "autoencoder" and FLAGS.mode not in ("train", "eval"):
        raise app.UsageError(
            f"--mode={FLAGS.mode} is not available for config.pipeline='autoencoder': "
            "use --mode=train and --mode=eval (reconstruction PSNR, FID and accuracy)"
        )
    if config.pipeline == "text2image" and FLAGS.mode not in ("sample", "convert"):
        raise app.UsageError(
            f"--mode={FLAGS.mode} is not available for config.pipeline='text2image': "
            "use --mode=convert (a diffusers LDMTextToImagePipeline folder) and --mode=sample"
        )
    import tensorflow as tf

    from ddpm import platform

    # TensorFlow only feeds data: it must not claim GPU or TPU memory that JAX needs.
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
    if config.distributed:
        platform.initialize_distributed()
    platform.log_devices()

    from ddpm import convert, eval_job, evaluation, inpaint_job, super_resolution, text2image, train

    if config.pipeline == "autoencoder" and FLAGS.mode == "eval":
        from ddpm import autoencoder_job

        autoencoder_job.evaluate(config, FLAGS.workdir)
    elif config.pipeline == "text2image":
        if FLAGS.mode == "sample":
            text2image.sample(config, FLAGS.workdir)
        else:
            text2image.convert(config, FLAGS.source, FLAGS.workdir)
    elif FLAGS.mode == "upsample" or (
        FLAGS.mode == "eval" and super_resolution.is_super_resolution(config)
    ):
        from ddpm import sr_eval_job, upsample_job  # super-resolution (data.low_res_size > 0)

        (upsample_job.upsample if FLAGS.mode == "upsample" else sr_eval_job.evaluate)(
            config, FLAGS.workdir
        )
    elif FLAGS.mode == "train":
        train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        evaluation.sample(config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
        eval_job.evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "inpaint":
        inpaint_job.inpaint(config, FLAGS.workdir)
    else:
        convert.convert_checkpoint(config, FLAGS.source, FLAGS.workdir)


if __name__ == "__main__":
    from ddpm import xla_cpu

    xla_cpu.restart_with_huge_pages()  # glibc reads its malloc settings only at start
    app.run(main)
