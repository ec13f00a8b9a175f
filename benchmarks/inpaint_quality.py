"""Inpainting on real digits: class accuracy, MSE in the filled region and seconds per image.

For each mask kind and method, `--mode=inpaint`'s job (ddpm/inpaint_job.py) fills
--num_images digits with the EMA weights of a trained run; a digit classifier trained
on the same folder (ddpm/metrics/classifier.py, cached in the workdir) then reads the
completed digits, and its accuracy against the true labels is reported with the MSE in
the filled region (pixels in [0, 1]) and the wall time per image (compile included; the
output folders are deleted first so nothing comes from a cache). Two reference rows:
the classifier on the original digits (the ceiling) and on the masked inputs with the
unknown pixels black (what a completion has to beat). Plain sampling of as many images
with the same chain is timed too, so RePaint's cost is a ratio to it.

Run from the repository root, after training (the folder from tools/mnist_to_folder.py):

    .venv/bin/python benchmarks/inpaint_quality.py --workdir runs/mnist --digits data/mnist \
        --num_images 200 --num_steps 250 --jump_length 10 --jump_n_sample 10
"""

import argparse
import json
import pathlib
import shutil
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import default  # noqa: E402
from ddpm import evaluation, inpaint_job, masks, samplers, sampling  # noqa: E402
from ddpm.metrics import classifier  # noqa: E402

NUM_CLASSES = 10


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained run (config.json, checkpoints)")
    parser.add_argument("--digits", required=True, help="a folder <label>/<image>.png")
    parser.add_argument("--num_images", type=int, default=200)
    parser.add_argument("--masks", default=",".join(masks.KINDS))
    parser.add_argument("--methods", default="repaint,replace")
    parser.add_argument("--num_steps", type=int, default=250)
    parser.add_argument("--jump_length", type=int, default=10)
    parser.add_argument("--jump_n_sample", type=int, default=10)
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    # The run's config over today's defaults (a run saved before a section existed lacks it).
    config = default.get_config()
    config.update(json.loads((pathlib.Path(args.workdir) / "config.json").read_text()))
    config.data.update(source="folder", path=args.digits, train_split="train")
    config.sampling.update(method=args.sampler, batch_size=args.num_images, eta=0.0)
    config.inpaint.update(
        source=args.digits, num_images=args.num_images, num_steps=args.num_steps,
        jump_length=args.jump_length, jump_n_sample=args.jump_n_sample,
    )  # fmt: skip
    workdir = pathlib.Path(args.workdir)
    scorer = evaluation.load_or_train_classifier(config, args.workdir, NUM_CLASSES)
    _, originals, labels = inpaint_job.source_images(config)

    def accuracy(images_uint8):
        return classifier.accuracy(scorer.predict(images_uint8), labels, NUM_CLASSES)[0]

    rows = [{"mask": "-", "method": "original digits", "accuracy": accuracy(originals)}]
    for kind in args.masks.split(","):
        mask = masks.make_masks(
            kind, np.arange(len(originals)), config.data.image_size, seed=config.seed
        )
        masked = np.where(mask > 0, originals, np.uint8(0))
        rows.append({"mask": kind, "method": "masked input", "accuracy": accuracy(masked)})
        for method in args.methods.split(","):
            config.inpaint.update(mask=kind, method=method)
            for cached in workdir.glob(inpaint_job.output_dir(config, workdir, "*").name):
                shutil.rmtree(cached)  # any step's: time the work, not a cache
            out, seconds = timed(lambda: inpaint_job.inpaint(config, workdir))
            mse = inpaint_job.filled_mse(out["originals"], out["masks"], out["results"])
            rows.append({
                "mask": kind, "method": method, "accuracy": accuracy(out["results"]),
                "mse_filled": mse,
                "s_per_image": seconds / len(originals),
            })  # fmt: skip
            print(rows[-1], flush=True)

    # Plain sampling with the same chain and batch, twice: compile, then the chain alone.
    model, params, _ = evaluation.load_ema_params(config, args.workdir)
    config.sampling.num_steps = args.num_steps
    sampler = sampling.make_sampler(config, model)
    keys = samplers.sample_keys(jax.random.key(0), np.arange(args.num_images))
    _, first = timed(lambda: sampler(params, keys))
    _, second = timed(lambda: sampler(params, keys))
    plain = {"first_call_s_per_image": first / args.num_images,
             "s_per_image": second / args.num_images, "compile_s": first - second}  # fmt: skip

    print(f"\n{args.num_images} digits, {args.sampler} inner step, chain of {args.num_steps} "
          f"steps, RePaint j={args.jump_length} r={args.jump_n_sample}; "
          f"classifier held-out accuracy {scorer.held_out_accuracy:.4f}\n")  # fmt: skip
    print("| mask | method | accuracy | MSE in the filled region | s/image | x plain sampling |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = [row["mask"], row["method"], f"{row['accuracy']:.3f}", "", "", ""]
        if "s_per_image" in row:
            cells[3] = f"{row['mse_filled']:.4f}"
            cells[4] = f"{row['s_per_image']:.3f}"
            cells[5] = f"{row['s_per_image'] / plain['first_call_s_per_image']:.1f}"
        print("| " + " | ".join(cells) + " |")
    print(f"\nplain {args.sampler} sampling, {args.num_steps} steps: "
          f"{plain['first_call_s_per_image']:.3f} s/image with compile, {plain['s_per_image']:.3f} "
          f"without ({plain['compile_s']:.1f} s of compile)")  # fmt: skip
    if args.json:
        results = {"args": vars(args), "rows": rows, "plain_sampling": plain}
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
