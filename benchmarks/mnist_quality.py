"""FID of an MNIST model against its training wall-clock: the first-contact protocol.

Trains a config with `main.py` on a folder of digit PNGs for a wall-clock budget, keeps
the exact step reached at each of the given minutes (training is stopped there by
SIGTERM, which saves, and resumed for the next mark), then for each keep draws
--num_samples samples with the config's sampler and reports the Inception FID against
*all* the folder's digits at 28x28 (the project's Inception, statistics cached in
--stats_dir), with the step, the training images/s, the sampling time and the number of
"noise squares" (samples with over 25% mid-grey pixels; no real digit has 12%).

  python tools/mnist_to_folder.py --images t10k-images-idx3-ubyte.gz \\
      --labels t10k-labels-idx1-ubyte.gz --out_dir /tmp/mnist_png
  python benchmarks/mnist_quality.py --config=configs/mnist.py --digits=/tmp/mnist_png \\
      --workdir=/tmp/mnist_quality --minutes=10,20,30 [--config.model.ch=48 ...]

Run it on an otherwise idle machine: the budget is wall-clock, compiles included, as a
user would run main.py. --config.* overrides go to the training run and to sampling.
Results: a table on stdout and WORKDIR/results.json; sample grids WORKDIR/at_<m>min.png.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from ddpm import checkpointing, evaluation, images, samplers, sampling  # noqa: E402
from ddpm.metrics import fid  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/mnist.py", "The config to train.")
flags.DEFINE_string("digits", None, "A folder of digit PNGs (tools/mnist_to_folder.py).")
flags.DEFINE_string("workdir", None, "Where the run, the kept checkpoints and results go.")
flags.DEFINE_list("minutes", ["10", "20", "30"], "Training minutes at which to keep a model.")
flags.DEFINE_integer("num_samples", 1000, "Samples per kept model for FID.")
flags.DEFINE_string(
    "stats_dir", "", "Cache of the digits' Inception statistics (default: workdir)."
)
flags.mark_flags_as_required(["digits", "workdir"])

REFERENCE_SIZE = 28  # MNIST's own resolution: samples of any size are compared with it
# A "noise square": a sample with more than this fraction of mid-grey pixels (64..191).
# Of the 10,000 real test digits none has more than 0.11; Gaussian noise has about 0.68.
NOISY_GREY_FRACTION = 0.25


def newest_checkpoint(directory: epath.Path) -> epath.Path | None:
    """The newest finished orbax step folder (unfinished ones carry a suffix)."""
    steps = [p for p in directory.glob("*") if p.name.isdigit()] if directory.exists() else []
    return max(steps, key=lambda p: int(p.name), default=None)


def keep(run_dir: epath.Path, keep_dir: epath.Path) -> int:
    """Copies the run's newest checkpoint into keep_dir (a workdir of its own); its step."""
    source = newest_checkpoint(run_dir / checkpointing.CHECKPOINT_DIR)
    if source is None:
        raise RuntimeError(f"no checkpoint in {run_dir} yet: train longer before the first keep")
    shutil.copytree(source, keep_dir / checkpointing.CHECKPOINT_DIR / source.name)
    return int(source.name)


def train(config_overrides: list[str], run_dir: epath.Path, minutes: list[float]) -> list[dict]:
    """Trains until each mark in turn; returns [{'minutes', 'step', 'dir'}] per mark.

    Each mark is reached by one main.py run, stopped by SIGTERM (its save is exact) and
    resumed by the next, so no periodic checkpoints slow training down; a mark counts the
    wall-clock time of all runs so far, from each start to its final save (start-ups and
    compiles included, the process's exit not: it trains no more).
    """
    main_py = epath.Path(__file__).parent.parent / "main.py"
    never = 10**9  # no periodic checkpoints, and no end before the last SIGTERM
    command = [
        sys.executable, str(main_py), f"--config={FLAGS['config'].config_filename}",
        *config_overrides, f"--workdir={run_dir}", "--config.data.source=folder",
        f"--config.data.path={FLAGS.digits}", f"--config.training.num_train_steps={never}",
        f"--config.training.checkpoint_every={never}",
    ]  # fmt: skip
    log = (run_dir.parent / "train.log").open("w")
    checkpoints = run_dir / checkpointing.CHECKPOINT_DIR
    trained, kept = 0.0, []
    for mark in minutes:
        start = time.monotonic()
        before = newest_checkpoint(checkpoints)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(max(0.0, 60 * mark - trained))
        if process.poll() is not None:
            raise RuntimeError(f"training exited early ({process.returncode}): see {log.name}")
        process.send_signal(signal.SIGTERM)
        while newest_checkpoint(checkpoints) == before and process.poll() is None:
            time.sleep(0.2)  # the final save, renamed into place when complete
        trained += time.monotonic() - start
        if process.wait() != 0:
            raise RuntimeError(f"training failed on SIGTERM: see {log.name}")
        keep_dir = run_dir.parent / f"at_{mark:g}min"
        shutil.rmtree(keep_dir, ignore_errors=True)
        kept.append({"minutes": mark, "trained_minutes": trained / 60,
                     "step": keep(run_dir, keep_dir), "dir": keep_dir})  # fmt: skip
        logging.info("kept step %d at %g min (%.2f min trained)", kept[-1]["step"], mark,
                     trained / 60)  # fmt: skip
    return kept


def evaluate(config, kept: dict, reference: tuple, extractor) -> dict:
    """Samples FLAGS.num_samples from a kept model; FID, sampling time, a grid."""
    model, params, step = evaluation.load_ema_params(config, kept["dir"])
    sampler = sampling.make_sampler(config, model)
    rng = jax.random.fold_in(jax.random.key(config.seed), evaluation.SAMPLE_PURPOSE)
    batch = config.sampling.batch_size
    start, samples = time.monotonic(), []
    for first in range(0, FLAGS.num_samples, batch):
        indices = np.arange(first, min(first + batch, FLAGS.num_samples))
        samples.append(sampler(params, samplers.sample_keys(rng, indices)))
    samples = np.concatenate(samples)
    sampling_s = time.monotonic() - start
    images.save_grid(samples[:100], epath.Path(f"{kept['dir']}.png"))
    stats = fid.RunningStatistics(2048)
    stats.update(extractor(samples)[0])  # FeatureExtractor feeds Inception chunk by chunk
    score = fid.frechet_distance(*stats.mean_and_covariance(), *reference)
    grey = np.mean((samples > 63) & (samples < 192), axis=(1, 2, 3))
    noisy = int(np.sum(grey > NOISY_GREY_FRACTION))
    return {"minutes": kept["minutes"], "step": step, "fid": score, "noisy": noisy,
            "sampling_s": sampling_s}  # fmt: skip


def main(argv):
    del argv
    config = FLAGS.config
    workdir = epath.Path(FLAGS.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    minutes = sorted(float(m) for m in FLAGS.minutes)
    config.data.update(source="folder", path=FLAGS.digits)
    kept = train(overrides, workdir / "run", minutes)

    # The reference: every digit of the folder at 28x28, whatever size the model makes.
    reference_config = config.copy_and_resolve_references()
    reference_config.data.image_size = REFERENCE_SIZE
    reference_config.eval.num_reference = 0
    extractor = evaluation.FeatureExtractor(config.eval.inception_weights, None)
    stats_dir = FLAGS.stats_dir or str(workdir)
    reference = evaluation.reference_statistics(reference_config, extractor, stats_dir)

    batch = config.training.batch_size
    results = []
    for entry in kept:
        result = evaluate(config, entry, reference, extractor)
        result["trained_minutes"] = entry["trained_minutes"]
        result["train_images_per_s"] = result["step"] * batch / (60 * entry["trained_minutes"])
        results.append(result)
        logging.info("%s", result)
    summary = {
        "config": FLAGS["config"].config_filename,
        "overrides": overrides,
        "sampler": evaluation.sampler_name(config),
        "num_samples": FLAGS.num_samples,
        "results": results,
    }
    (workdir / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{summary['config']} {' '.join(overrides)} | {summary['sampler']}, "
          f"{FLAGS.num_samples} samples, FID against all digits at 28x28")  # fmt: skip
    print("| minutes | trained min | step | train img/s | FID | noise squares | sampling s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['minutes']:g} | {r['trained_minutes']:.2f} | {r['step']} | "
              f"{r['train_images_per_s']:.1f} | {r['fid']:.1f} | {r['noisy']} | "
              f"{r['sampling_s']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
