"""Tests for ddpm/input_pipeline.py and tools/mnist_to_folder.py.

Oracles are independent of the code under test: PIL (not tf.image) for decoding and
resizing, images whose pixels encode their own index, and raw IDX bytes for MNIST.
"""

import gzip
import importlib.util
import pathlib
import time

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from ddpm import input_pipeline

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"
NUM_INDEXED = 20  # examples in the indexed mock dataset


def make_data(**overrides) -> ml_collections.ConfigDict:
    data = dict(
        source="tfds",
        dataset="cifar10",
        data_dir=None,
        path="",
        train_split="train",
        image_size=32,
        num_channels=3,
        random_flip=False,
    )
    data.update(overrides)
    return ml_collections.ConfigDict(data)


def indexed_image(index: int) -> np.ndarray:
    """uint8 [32, 32, 3]: channel 0 encodes the index, 1 and 2 are ramps (1 is asymmetric)."""
    rows, cols = np.mgrid[0:32, 0:32]
    return np.stack([np.full((32, 32), index * 12), cols * 8, rows * 8], -1).astype(np.uint8)


def indexed_label(index: int) -> int:
    return (index * 7) % 10


def image_ids(images: np.ndarray) -> np.ndarray:
    """[..., 32, 32, 3] indexed images -> [...] their indices."""
    return images[..., 0, 0, 0].astype(int) // 12


def flat(batch: dict) -> dict:
    """[D, B, ...] -> [D * B, ...] for every field."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def take(iterator, count: int) -> list[dict]:
    return [flat(next(iterator)) for _ in range(count)]


@pytest.fixture
def indexed_tfds():
    """cifar10 mocked so that example i is indexed_image(i) with label indexed_label(i)."""

    def as_dataset(self, split, **kwargs):
        del self, split, kwargs
        indices = np.arange(NUM_INDEXED)
        return tf.data.Dataset.from_tensor_slices(
            {
                "id": [str(i) for i in indices],
                "image": np.stack([indexed_image(i) for i in indices]),
                "label": np.array([indexed_label(i) for i in indices], np.int64),
            }
        )

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        yield make_data()


# ---------------------------------------------------------------------------- tfds


def test_tfds_mock_cifar10_shapes_dtypes_and_determinism():
    with tfds.testing.mock_data(num_examples=10):
        data = make_data(random_flip=True)
        first = take(input_pipeline.create_train_iter(data, global_batch_size=16, seed=3), 3)
        again = take(input_pipeline.create_train_iter(data, global_batch_size=16, seed=3), 3)
        batch = next(input_pipeline.create_train_iter(data, global_batch_size=16, seed=3))
        assert input_pipeline.num_examples(data, "train") == 10
    assert batch["image"].shape == (8, 2, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (8, 2) and batch["label"].dtype == np.int32
    assert 0 <= batch["label"].min() and batch["label"].max() < 10
    # Mock pixels are uniform in [0, 255]: stays uint8 [0, 255], not rescaled.
    assert batch["image"].min() < 20 and batch["image"].max() > 235
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_tfds_mock_channel_conversion_shapes():
    with tfds.testing.mock_data(num_examples=4):
        mnist = make_data(dataset="mnist", image_size=32, num_channels=3)
        batch = next(input_pipeline.create_eval_iter(mnist, split="test", global_batch_size=8))
        cifar_gray = make_data(image_size=16, num_channels=1)
        gray = next(input_pipeline.create_eval_iter(cifar_gray, split="test", global_batch_size=8))
    assert batch["image"].shape == (8, 1, 32, 32, 3)
    # Grayscale replicated into RGB.
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
    assert gray["image"].shape == (8, 1, 16, 16, 1)


def test_tfds_resize_and_grayscale_match_pil(indexed_tfds):
    data = make_data(image_size=16, num_channels=1)
    batch = flat(next(input_pipeline.create_eval_iter(data, split="train", global_batch_size=24)))
    for i in range(NUM_INDEXED):
        pil = Image.fromarray(indexed_image(i)).convert("L").resize((16, 16), Image.BICUBIC)
        # PIL rounds its intermediate pass to 8 bits, TF does not: <= 2 on smooth ramps.
        diff = np.abs(batch["image"][i, ..., 0].astype(int) - np.asarray(pil))
        assert diff.max() <= 2, (i, diff.max())
        assert batch["label"][i] == indexed_label(i)


# ---------------------------------------------------------------------------- order


def test_every_example_once_per_epoch_and_seeds_differ(indexed_tfds):
    def epochs(seed):
        it = input_pipeline.create_train_iter(indexed_tfds, global_batch_size=8, seed=seed)
        batches = take(it, 10)  # 80 positions = 4 epochs of 20, batches straddle epochs
        ids = np.concatenate([image_ids(b["image"]) for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        np.testing.assert_array_equal(labels, [indexed_label(i) for i in ids])
        return ids.reshape(4, NUM_INDEXED)

    seed0 = epochs(0)
    for epoch in seed0:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(NUM_INDEXED))
    assert len({tuple(e) for e in seed0}) == 4, "each epoch needs a fresh permutation"
    assert not np.array_equal(seed0[0], np.arange(NUM_INDEXED))
    assert not np.array_equal(seed0, epochs(1))


@pytest.mark.parametrize("start_step", [3, 5])
def test_resume_equals_fresh_iterator(indexed_tfds, start_step):
    data = make_data(random_flip=True)
    fresh = take(input_pipeline.create_train_iter(data, global_batch_size=8, seed=7), 8)
    resumed = input_pipeline.create_train_iter(
        data, global_batch_size=8, seed=7, start_step=start_step
    )
    for expected in fresh[start_step:]:
        got = flat(next(resumed))
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])


def test_resume_at_huge_step_is_cheap_and_consistent(indexed_tfds):
    start = time.perf_counter()
    late = 10**12
    one_before = take(
        input_pipeline.create_train_iter(
            indexed_tfds, global_batch_size=8, seed=0, start_step=late - 1
        ),
        2,
    )
    at = take(
        input_pipeline.create_train_iter(
            indexed_tfds, global_batch_size=8, seed=0, start_step=late
        ),
        1,
    )
    assert time.perf_counter() - start < 20
    np.testing.assert_array_equal(one_before[1]["image"], at[0]["image"])


def test_flips_are_mirror_images_about_half_the_time(indexed_tfds):
    data = make_data(random_flip=True)
    batches = take(input_pipeline.create_train_iter(data, global_batch_size=8, seed=11), 25)
    images = np.concatenate([b["image"] for b in batches])
    flipped = []
    for image in images:
        reference = indexed_image(image_ids(image))
        is_flipped = not np.array_equal(image, reference)
        if is_flipped:
            np.testing.assert_array_equal(image, reference[:, ::-1])
        flipped.append(is_flipped)
    # 200 fair coins: the fraction is within 4.2 standard deviations (0.035) of 1/2.
    assert 0.35 < np.mean(flipped) < 0.65, np.mean(flipped)
    unflipped = take(
        input_pipeline.create_train_iter(indexed_tfds, global_batch_size=8, seed=11), 5
    )
    for batch in unflipped:
        for image in batch["image"]:
            np.testing.assert_array_equal(image, indexed_image(image_ids(image)))


# ---------------------------------------------------------------------------- sharding


LAYOUTS = [(1, 2), (2, 4), (4, 1)]  # (process_count, local_device_count) vs (1, 8)


def global_batches(make_iter, process_count, devices, steps):
    """Concatenates the shares of all processes: [steps] of flat global batches."""
    shares = [
        take(
            make_iter(process_index=k, process_count=process_count, local_device_count=devices),
            steps,
        )
        for k in range(process_count)
    ]
    for share in shares:
        assert share[0]["image"].shape[0] == 8 // process_count
    return [
        {key: np.concatenate([s[step][key] for s in shares]) for key in shares[0][step]}
        for step in range(steps)
    ]


def test_global_batch_independent_of_processes_and_devices(indexed_tfds):
    data = make_data(random_flip=True)

    def train_iter(**kwargs):
        return input_pipeline.create_train_iter(data, global_batch_size=8, seed=5, **kwargs)

    def eval_iter(**kwargs):
        return input_pipeline.create_eval_iter(data, split="test", global_batch_size=8, **kwargs)

    for make_iter, steps, layouts in [(train_iter, 4, LAYOUTS), (eval_iter, 3, LAYOUTS[-1:])]:
        reference = global_batches(make_iter, 1, 8, steps)
        for process_count, devices in layouts:
            other = global_batches(make_iter, process_count, devices, steps)
            for a, b in zip(reference, other, strict=True):
                for key in a:
                    np.testing.assert_array_equal(
                        a[key], b[key], err_msg=f"{process_count}, {devices}"
                    )


def test_per_device_shape_defaults_to_jax_local_devices(indexed_tfds):
    batch = next(input_pipeline.create_train_iter(indexed_tfds, global_batch_size=16, seed=0))
    assert batch["image"].shape == (8, 2, 32, 32, 3)  # conftest: 8 fake CPU devices
    sharded = input_pipeline.create_train_iter(
        indexed_tfds, global_batch_size=16, seed=0, process_index=1, process_count=2
    )
    assert next(sharded)["image"].shape == (8, 1, 32, 32, 3)


def test_eval_covers_split_once_with_mask(indexed_tfds):
    batches = global_batches(
        lambda **kw: input_pipeline.create_eval_iter(
            indexed_tfds, split="test", global_batch_size=8, **kw
        ),
        process_count=2,
        devices=2,
        steps=3,
    )
    mask = np.concatenate([b["mask"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(mask, np.arange(24) < NUM_INDEXED)
    np.testing.assert_array_equal(image_ids(images[mask]), np.arange(NUM_INDEXED))
    np.testing.assert_array_equal(labels[mask], [indexed_label(i) for i in range(NUM_INDEXED)])
    assert not images[~mask].any() and not labels[~mask].any()
    it = input_pipeline.create_eval_iter(
        indexed_tfds,
        split="test",
        global_batch_size=8,
        process_index=0,
        process_count=2,
        local_device_count=2,
    )
    assert len(list(it)) == 3  # one pass, then stops


# ---------------------------------------------------------------------------- folder


def ramp(height, width):
    rows, cols = np.mgrid[0:height, 0:width]
    wave = 128 + 100 * np.sin(cols / 5 + rows / 7)
    return np.stack([cols * 4, rows * 5, wave], -1).clip(0, 255).astype(np.uint8)


def save(path, array, mode, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(array).convert(mode).save(path, fmt, **extra)


# (relative path in sorted order, label, (height, width), mode, format)
FOLDER_FILES = [
    ("cats/a.png", 0, (40, 60), "RGB", "PNG"),
    ("cats/sub/c.jpeg", 0, (50, 30), "RGB", "JPEG"),
    ("dogs/B.JPG", 1, (33, 47), "L", "JPEG"),
    ("dogs/d.PNG", 1, (35, 35), "L", "PNG"),
    ("dogs/e_noise.png", 1, (30, 45), "RGB", "PNG"),  # high frequencies tell filters apart
    ("root.png", 0, (20, 28), "RGB", "PNG"),  # constant colour, upsampled
]
CONSTANT = (200, 100, 50)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for rel, _, (h, w), mode, fmt in FOLDER_FILES:
        if rel == "root.png":
            pixels = np.full((h, w, 3), CONSTANT, np.uint8)
        elif "noise" in rel:
            pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            pixels = ramp(h, w)
        save(root / rel, pixels, mode, fmt)
    (root / "notes.txt").write_text("not an image")
    save(root / ".hidden" / "x.png", ramp(8, 8), "RGB", "PNG")
    return root


def pil_oracle(path, size, channels):
    """PIL: convert, resize short side to `size` (BICUBIC), centre crop."""
    image = Image.open(path).convert("L" if channels == 1 else "RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = round(w * scale), round(h * scale)  # FOLDER_FILES sizes avoid .5 ties
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), np.int32)
    return array[..., None] if channels == 1 else array


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_pixels_and_labels_match_pil(image_folder, channels):
    data = make_data(source="folder", path=str(image_folder), image_size=24, num_channels=channels)
    assert input_pipeline.num_examples(data, "train") == len(FOLDER_FILES)
    batches = list(input_pipeline.create_eval_iter(data, split="train", global_batch_size=8))
    assert len(batches) == 1
    batch = flat(batches[0])
    assert batch["image"].shape == (8, 24, 24, channels) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["mask"], np.arange(8) < len(FOLDER_FILES))
    np.testing.assert_array_equal(batch["label"][: len(FOLDER_FILES)], [f[1] for f in FOLDER_FILES])
    for i, (rel, *_) in enumerate(FOLDER_FILES):
        got = batch["image"][i].astype(np.int32)
        if rel == "root.png":
            # A resampler preserves constants; gray = ITU-R 601 luma of CONSTANT = 124.2.
            expected = 124.2 if channels == 1 else np.array(CONSTANT)
            assert np.abs(got - expected).max() <= 1
            continue
        # PIL rounds and clips its intermediate (horizontal) pass to 8 bits, TF keeps float:
        # <= 2 on smooth ramps (+1 for libpng/libjpeg vs PIL RGB -> gray rounding; a crop
        # one pixel off costs >= 4). On noise, clipped bicubic overshoot differs by up to
        # ~15 at isolated pixels, but the mean stays ~0.25 (bilinear, area or Lanczos
        # filters give >= 4).
        diff = np.abs(got - pil_oracle(image_folder / rel, 24, channels))
        max_diff = 20 if "noise" in rel else 3
        assert diff.max() <= max_diff, (rel, diff.max())
        assert diff.mean() < 0.6, (rel, diff.mean())


def test_folder_train_iter(image_folder):
    data = make_data(source="folder", path=str(image_folder), image_size=16, random_flip=True)
    batch = next(input_pipeline.create_train_iter(data, global_batch_size=8, seed=0))
    assert batch["image"].shape == (8, 1, 16, 16, 3)
    # The first 6 positions are epoch 0: every file once.
    assert sorted(batch["label"].ravel()[: len(FOLDER_FILES)]) == sorted(f[1] for f in FOLDER_FILES)


# ---------------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path):
    data = make_data(source="folder", path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        input_pipeline.create_train_iter(data, global_batch_size=8, seed=0)


def test_error_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    data = make_data(source="folder", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="No images"):
        input_pipeline.create_eval_iter(data, split="train", global_batch_size=8)


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_error_corrupt_image_names_the_file(tmp_path, kind):
    save(tmp_path / "good.png", ramp(8, 8), "RGB", "PNG")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really a png")
    data = make_data(source="folder", path=str(tmp_path), image_size=8)
    if kind == "train":
        it = input_pipeline.create_train_iter(data, global_batch_size=8, seed=0)
    else:
        it = input_pipeline.create_eval_iter(data, split="train", global_batch_size=8)
    with pytest.raises(ValueError, match=r"Cannot decode image file .*bad\.png"):
        next(it)


def test_error_unknown_source_and_bad_fields():
    with pytest.raises(ValueError, match="Unknown data.source='hdf5'"):
        input_pipeline.create_train_iter(make_data(source="hdf5"), global_batch_size=8, seed=0)
    with pytest.raises(ValueError, match="num_channels must be 1 or 3"):
        input_pipeline.num_examples(make_data(num_channels=4), "train")


def test_error_tfds_not_prepared(tmp_path):
    data = make_data(dataset="mnist", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not available offline") as info:
        input_pipeline.create_train_iter(data, global_batch_size=8, seed=0)
    assert "download_and_prepare" in str(info.value) and "source='folder'" in str(info.value)
    with pytest.raises(ValueError, match="Unknown tfds dataset data.dataset='no_such_dataset'"):
        input_pipeline.num_examples(make_data(dataset="no_such_dataset"), "train")


def test_error_batch_not_divisible_before_reading(tmp_path):
    # The path does not exist: the batch check must come first.
    data = make_data(source="folder", path=str(tmp_path / "nope"))
    message = r"global_batch_size=12 .* process_count \* local_device_count = 1 \* 8 = 8"
    with pytest.raises(ValueError, match=message):
        input_pipeline.create_train_iter(data, global_batch_size=12, seed=0)
    with pytest.raises(ValueError, match=r"= 3 \* 2 = 6"):
        input_pipeline.create_eval_iter(
            data,
            split="test",
            global_batch_size=8,
            process_index=0,
            process_count=3,
            local_device_count=2,
        )


# ---------------------------------------------------------------------------- MNIST tool


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "mnist_to_folder", REPO_ROOT / "tools" / "mnist_to_folder.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="real MNIST not at ../shared/data/mnist")
def test_mnist_to_folder_matches_idx_bytes(tmp_path):
    images_gz = str(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels_gz = str(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    out = tmp_path / "mnist"
    assert load_tool().write_mnist_folder(images_gz, labels_gz, str(out), limit=100) == 100
    # Independent reading: fixed header sizes from the IDX spec.
    with gzip.open(images_gz) as f:
        raw_images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:100]
    with gzip.open(labels_gz) as f:
        raw_labels = np.frombuffer(f.read(), np.uint8, offset=8)[:100]
    written = sorted(out.rglob("*.png"))
    assert len(written) == 100
    assert sorted(p.name for p in out.iterdir()) == [str(d) for d in range(10)]
    for path in written:
        index = int(path.stem)
        assert int(path.parent.name) == raw_labels[index]
        np.testing.assert_array_equal(np.asarray(Image.open(path)), raw_images[index])

    # End to end through the folder pipeline: 28x28 passes through unresized.
    data = make_data(source="folder", path=str(out), image_size=28, num_channels=1)
    batches = [
        flat(b) for b in input_pipeline.create_eval_iter(data, split="train", global_batch_size=128)
    ]
    order = sorted(range(100), key=lambda i: (raw_labels[i], i))
    np.testing.assert_array_equal(batches[0]["image"][:100, ..., 0], raw_images[order])
    np.testing.assert_array_equal(batches[0]["label"][:100], raw_labels[order])


def test_mnist_to_folder_rejects_bad_magic(tmp_path):
    fake = tmp_path / "fake.gz"
    with gzip.open(fake, "wb") as f:
        f.write((2049).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x05")
    tool = load_tool()
    with pytest.raises(ValueError, match="magic number is 2049, expected 2051"):
        tool.write_mnist_folder(str(fake), str(fake), str(tmp_path / "out"))
