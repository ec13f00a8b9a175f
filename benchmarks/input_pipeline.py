"""Resident memory and throughput of the training input pipeline: a folder vs. tfds.

Run from the repository root:

    .venv/bin/python benchmarks/input_pipeline.py --cache-dir /tmp/ddpm_bench_data \
        --sizes 10000 100000 --cases jpeg256 png32 jpeg32 --sources folder tfds

For every case (format and side: jpeg256 = 256x256 JPEG), size N and source it measures
`input_pipeline.create_train_iter` in a fresh subprocess, at --batch-size images per
step on one device (random flips on): images/s over --batches batches after --warmup
batches, and the process's resident memory from /proc/self/status (VmRSS: after the
imports, the baseline of TensorFlow and JAX, and after the last batch; VmHWM: the peak).
The data are made once and kept in --cache-dir:

- folder: N synthetic images (smooth colour fields plus mild noise, about the JPEG size of
  photos) in 10 class subfolders, written with PIL;
- tfds:   the same files, stored unchanged (no re-encoding) by a small tfds builder
  (`bench_images`, one config per case and size), prepared in array_record format;
- tfds_tfrecord: the same, prepared in tfds's default TFRecord format (read through the
  pipeline's record index).

- grain0 / grain2 (the peer): grain's DataLoader over tfds.data_source on the same
  ArrayRecord files (tfds decodes with PIL), in-process or with 2 worker processes; needs
  `pip install grain` (not a project requirement). RSS then adds the workers' RSS.

--old-module PATH also measures another input_pipeline.py (e.g. the version that decoded a
tfds split into memory: `git show f633434:ddpm/input_pipeline.py > /tmp/old.py`) on the
tfds_tfrecord data of the first size (it cannot read array_record).
"""

import argparse
import functools
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
CASES = {"jpeg256": ("jpeg", 256), "png32": ("png", 32), "jpeg32": ("jpeg", 32)}


# ---------------------------------------------------------------------------- data


def _synthetic_image(index: int, side: int) -> np.ndarray:
    """uint8 [side, side, 3]: a bicubic-upsampled random 6x6 colour field plus noise."""
    from PIL import Image

    rng = np.random.default_rng(index)
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), np.float32)
    noisy = smooth + rng.normal(0.0, 6.0, smooth.shape)
    return noisy.clip(0, 255).astype(np.uint8)


def _write_images(args) -> None:
    """Writes images [start, stop) of a folder (one worker's share)."""
    from PIL import Image

    root, fmt, side, start, stop = args
    for index in range(start, stop):
        path = root / str(index % NUM_CLASSES) / f"{index:06d}.{fmt}"
        if not path.exists():
            extra = {"quality": 90} if fmt == "jpeg" else {}
            tmp = path.with_suffix(".tmp")
            Image.fromarray(_synthetic_image(index, side)).save(tmp, fmt.upper(), **extra)
            tmp.rename(path)  # a killed run leaves no truncated image behind


def folder_path(cache_dir: pathlib.Path, case: str, size: int) -> pathlib.Path:
    return cache_dir / "folders" / f"{case}_{size}"


def ensure_folder(cache_dir: pathlib.Path, case: str, size: int, workers: int) -> pathlib.Path:
    """The folder of `size` images of `case`, written once (resumable)."""
    fmt, side = CASES[case]
    root = folder_path(cache_dir, case, size)
    done = root / ".complete"
    if done.exists():
        return root
    for label in range(NUM_CLASSES):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    chunk = 1000
    tasks = [(root, fmt, side, s, min(s + chunk, size)) for s in range(0, size, chunk)]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for i, _ in enumerate(pool.imap_unordered(_write_images, tasks), 1):
            print(f"\r{root.name}: {i * chunk}/{size} images", end="", file=sys.stderr)
    print(f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    done.touch()
    return root


SIZES = (1_000, 10_000, 100_000)


@functools.cache
def _define_builder():
    """Registers `bench_images`: config '<case>_<size>' stores folder_path(...)'s files as-is."""
    import tensorflow_datasets as tfds

    class BenchImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [
            tfds.core.BuilderConfig(name=f"{case}_{size}") for case in CASES for size in SIZES
        ]

        def _info(self):
            case = self.builder_config.name.split("_")[0]
            fmt, side = CASES[case]
            features = {
                "image": tfds.features.Image(shape=(side, side, 3), encoding_format=fmt),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            root = pathlib.Path(self.data_dir_root).parent / "folders" / self.builder_config.name
            return {"train": self._generate_examples(root)}

        def _generate_examples(self, root):
            for path in sorted(root.glob("*/*.*")):
                if path.suffix in (".png", ".jpeg"):  # a path: tfds stores the file's bytes
                    yield path.name, {"image": path, "label": int(path.parent.name)}

    return BenchImages


def ensure_tfds(cache_dir: pathlib.Path, case: str, size: int, file_format: str) -> str:
    """Prepares bench_images/<case>_<size> in `file_format` once; returns its data_dir."""
    import tensorflow_datasets as tfds

    _define_builder()
    data_dir = cache_dir / ("tfds" if file_format == "array_record" else f"tfds_{file_format}")
    builder = tfds.builder(f"bench_images/{case}_{size}", data_dir=str(data_dir))
    if not builder.is_prepared():
        start = time.perf_counter()
        builder.download_and_prepare(file_format=file_format)
        print(f"{builder.data_dir}: prepared in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)  # fmt: skip
    return str(data_dir)


# ---------------------------------------------------------------------------- measuring


def _memory_mib() -> dict:
    """VmRSS (resident now, this process and its worker processes) and VmHWM (this
    process's peak resident), MiB."""
    import psutil

    fields = {}
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB
    for child in psutil.Process().children(recursive=True):  # grain's workers
        fields["VmRSS"] += child.memory_info().rss / 2**20
    return fields


def _grain_batches(spec: dict):
    """The peer: grain's DataLoader over tfds.data_source (the same ArrayRecord files,
    decoded by tfds with PIL), shuffled, randomly flipped and batched by grain."""
    import grain.python as grain
    import tensorflow_datasets as tfds
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags (defaults: fine)
    data = spec["data"]
    source = tfds.data_source(data["dataset"], split="train", data_dir=data["data_dir"])

    class Flip(grain.RandomMapTransform):
        def random_map(self, example, rng):
            image = example["image"]
            return {"image": image[:, ::-1] if rng.integers(2) else image,
                    "label": example["label"]}  # fmt: skip

    sampler = grain.IndexSampler(len(source), grain.NoSharding(), shuffle=True, num_epochs=None,
                                 seed=0)  # fmt: skip
    loader = grain.DataLoader(
        data_source=source, sampler=sampler, worker_count=spec["grain_workers"],
        operations=[Flip(), grain.Batch(spec["batch_size"], drop_remainder=True)],
    )  # fmt: skip
    return iter(loader)


def _child(spec: dict) -> dict:
    """Runs in a fresh process: builds the iterator, reads batches, reports time and memory."""
    sys.path.insert(0, str(REPO))
    import importlib.util

    import ml_collections

    if spec["module"]:
        module_spec = importlib.util.spec_from_file_location("old_pipeline", spec["module"])
        pipeline = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(pipeline)
    else:
        from ddpm import input_pipeline as pipeline
    if spec["data"]["source"] == "tfds":
        _define_builder()
    baseline = _memory_mib()
    data = ml_collections.ConfigDict(spec["data"])
    start = time.perf_counter()
    if spec["source"].startswith("grain"):
        batches = _grain_batches(spec)
    else:
        batches = pipeline.create_train_iter(
            data, global_batch_size=spec["batch_size"], seed=0, process_index=0,
            process_count=1, local_device_count=1,
        )  # fmt: skip
    next(batches)
    first_batch_s = time.perf_counter() - start
    after_first = _memory_mib()
    for _ in range(spec["warmup"]):
        next(batches)
    start = time.perf_counter()
    for _ in range(spec["batches"]):
        next(batches)
    seconds = time.perf_counter() - start
    return {
        "first_batch_s": first_batch_s,
        "images_per_s": spec["batches"] * spec["batch_size"] / seconds,
        "rss_baseline_mib": baseline["VmRSS"],
        "rss_first_batch_mib": after_first["VmRSS"],
        "rss_end_mib": _memory_mib()["VmRSS"],
        "peak_rss_mib": _memory_mib()["VmHWM"],
        "load_avg": os.getloadavg(),
    }


def run_case(args, case: str, size: int, source: str, module: str = "") -> dict:
    fmt, side = CASES[case]
    data = dict(
        source=source, dataset="", data_dir="", path="", train_split="train", image_size=side,
        num_channels=3, random_flip=True, download=False, low_res_size=0,
    )  # fmt: skip
    ensure_folder(args.cache_dir, case, size, args.workers)
    if source == "folder":
        data["path"] = str(folder_path(args.cache_dir, case, size))
    else:  # tfds or grain (array_record), or tfds_tfrecord
        file_format = "tfrecord" if source == "tfds_tfrecord" else "array_record"
        data.update(source="tfds", dataset=f"bench_images/{case}_{size}",
                    data_dir=ensure_tfds(args.cache_dir, case, size, file_format))  # fmt: skip
    spec = dict(data=data, source=source, module=module, batch_size=args.batch_size,
                warmup=args.warmup, batches=args.batches,
                grain_workers=int(source[5:] if source.startswith("grain") else 0))  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"{case} {size} {source} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"case": case, "size": size, "source": source + (" (old module)" if module else ""),
            **result}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=pathlib.Path, help="where the data are kept")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000], choices=SIZES)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    sources = ["folder", "tfds", "tfds_tfrecord", "grain0", "grain2"]
    parser.add_argument("--sources", nargs="+", default=sources[:2], choices=sources)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5, help="batches before timing")
    parser.add_argument("--batches", type=int, default=20, help="timed batches")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="for writing data")
    parser.add_argument("--old-module", default="", help="an older input_pipeline.py to compare")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    if not args.cache_dir:
        parser.error("--cache-dir is required")
    runs = [(c, n, s, "") for c in args.cases for n in args.sizes for s in args.sources]
    if args.old_module:
        runs += [(c, args.sizes[0], "tfds_tfrecord", args.old_module) for c in args.cases]
    results = []
    header = (f"{'case':8} {'N':>7} {'source':20} {'images/s':>9} {'1st batch s':>11} "
              f"{'RSS base':>9} {'RSS end':>8} {'peak RSS':>9} {'load avg':>15}")  # fmt: skip
    print(header)
    for case, size, source, module in runs:
        r = run_case(args, case, size, source, module)
        results.append(r)
        print(
            f"{case:8} {size:>7} {r['source']:20} {r['images_per_s']:>9.0f} "
            f"{r['first_batch_s']:>11.1f} {r['rss_baseline_mib']:>8.0f}M {r['rss_end_mib']:>7.0f}M "
            f"{r['peak_rss_mib']:>8.0f}M {' '.join(f'{x:.1f}' for x in r['load_avg']):>15}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
