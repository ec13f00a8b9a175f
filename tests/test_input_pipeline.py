"""Tests for ddpm/input_pipeline.py and tools/mnist_to_folder.py.

Oracles are independent of the code under test: PIL (not tf.image) for decoding and
resizing, images whose pixels encode their own index, and raw IDX bytes for MNIST.
"""

import gzip
import importlib.util
import io
import pathlib
import time
import urllib.error

import jax
import ml_collections
import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds
from PIL import Image

from ddpm import data_sources, input_pipeline, platform

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
        download=True,  # a no-op under tfds.testing.mock_data
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


def mocked_cifar10_as_data_source(self, split, **kwargs):
    """For mock_data: serialized records whose example i is indexed_image(i)."""
    del split, kwargs
    return [
        self.info.features.serialize_example(
            {"id": str(i), "image": indexed_image(i), "label": indexed_label(i)}
        )
        for i in range(NUM_INDEXED)
    ]


@pytest.fixture
def indexed_tfds():
    """cifar10 mocked so that example i is indexed_image(i) with label indexed_label(i).

    Mocks tfds's random-access source (`builder.as_data_source`) with serialized records,
    as ArrayRecord files hold them.
    """

    with tfds.testing.mock_data(as_data_source_fn=mocked_cifar10_as_data_source):
        yield make_data()


# ---------------------------------------------------------------------------- tfds


def test_tfds_mock_cifar10_shapes_dtypes_and_determinism():
    with tfds.testing.mock_data(num_examples=10):
        data = make_data(random_flip=True)
        first = take(input_pipeline.create_train_iter(data, global_batch_size=16, seed=3), 3)
        again = take(input_pipeline.create_train_iter(data, global_batch_size=16, seed=3), 3)
        batch = next(input_pipeline.create_train_iter(data, global_batch_size=16, seed=3))
        assert data_sources.num_examples(data, "train") == 10
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


# ---------------------------------------------------------------------------- tfds on disk

CORRUPT = 3  # example of the 'corrupt' split whose image bytes are not an image


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


class TinyIndexed(tfds.core.GeneratorBasedBuilder):
    """A real tfds data set that prepares offline: example i of 'train' is indexed_image(i)."""

    VERSION = tfds.core.Version("1.0.0")
    prepared = 0  # download_and_prepare calls that generated the data

    def _info(self):
        features = {"image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(num_classes=10)}  # fmt: skip
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        del dl_manager
        type(self).prepared += 1
        return {
            "train": self._generate_examples(NUM_INDEXED),
            "corrupt": self._generate_examples(5, CORRUPT),
        }

    def _generate_examples(self, count, corrupt=None):
        for i in range(count):
            image = b"\x89PNG not really" if i == corrupt else png_bytes(indexed_image(i))
            yield i, {"image": image, "label": indexed_label(i)}


def tiny_data(data_dir, **overrides):
    return make_data(dataset="tiny_indexed", data_dir=str(data_dir), **overrides)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """{'array_record': data_dir, 'tfrecord': data_dir}: TinyIndexed prepared in each format."""
    dirs = {}
    for file_format in ("array_record", "tfrecord"):
        dirs[file_format] = tmp_path_factory.mktemp(file_format)
        builder = tfds.builder("tiny_indexed", data_dir=str(dirs[file_format]))
        builder.download_and_prepare(file_format=file_format)
    return dirs


def test_tfds_on_disk_reads_stored_pixels_labels_and_subsplits(tiny_dirs):
    found = {}
    for file_format, data_dir in tiny_dirs.items():
        data = tiny_data(data_dir, download=False)
        assert data_sources.num_examples(data, "train[5:15]") == 10
        found[file_format] = (
            input_pipeline.load_examples(data, "train", batch_size=8),
            input_pipeline.load_examples(data, "train[5:15]", batch_size=8),
            take(input_pipeline.create_train_iter(data, global_batch_size=8, seed=2), 3),
        )
    (images, labels), (sub_images, sub_labels), train = found["array_record"]
    # tfds stores examples in an order of its own (a hash of their keys).
    stored = image_ids(images)
    np.testing.assert_array_equal(np.sort(stored), np.arange(NUM_INDEXED))
    np.testing.assert_array_equal(images, [indexed_image(i) for i in stored])
    np.testing.assert_array_equal(labels, [indexed_label(i) for i in stored])
    np.testing.assert_array_equal(sub_images, images[5:15])
    np.testing.assert_array_equal(sub_labels, labels[5:15])
    # Training order: stored positions in the order of any source of 20 examples.
    with tfds.testing.mock_data(as_data_source_fn=mocked_cifar10_as_data_source):
        mocked = take(input_pipeline.create_train_iter(make_data(), global_batch_size=8, seed=2), 3)
    for a, b in zip(train, mocked, strict=True):
        np.testing.assert_array_equal(image_ids(a["image"]), stored[image_ids(b["image"])])
    # Read through the TFRecord index: the same examples in the same order.
    for a, b in zip(
        jax.tree.leaves(found["array_record"]), jax.tree.leaves(found["tfrecord"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_tfds_labels_are_read_without_decoding_images(tiny_dirs, monkeypatch):
    data = tiny_data(tiny_dirs["array_record"])

    def no_decoding(*args):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(data_sources, "_decode", no_decoding)
    source = data_sources.make_source(data, "train")
    # tfds's own decoding is the oracle (it stores examples in an order of its own).
    builder = tfds.builder("tiny_indexed", data_dir=data.data_dir)
    expected = [example["label"] for example in builder.as_data_source("train")]
    np.testing.assert_array_equal(source.labels, expected)
    first = next(i for i, label in enumerate(expected) if label >= 5)
    message = rf"the first is example {first} of tfds split tiny_indexed:train with label "
    with pytest.raises(ValueError, match=message + str(expected[first])):
        input_pipeline.create_train_iter(data, global_batch_size=8, seed=0, num_classes=5)


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_corrupt_record_names_the_example(tiny_dirs, file_format):
    data = tiny_data(tiny_dirs[file_format])
    it = input_pipeline.create_eval_iter(data, split="corrupt", global_batch_size=8)
    with pytest.raises(ValueError, match=rf"Cannot decode example {CORRUPT} of tfds split "
                       r"tiny_indexed:corrupt"):  # fmt: skip
        next(it)


def test_tfds_download_prepares_once_in_array_record(tmp_path):
    TinyIndexed.prepared = 0
    data = tiny_data(tmp_path)
    assert data_sources.num_examples(data, "train") == NUM_INDEXED
    assert data_sources.num_examples(data, "corrupt") == 5
    assert TinyIndexed.prepared == 1
    assert list(tmp_path.rglob("*.array_record-*")) and not list(tmp_path.rglob("*.tfrecord*"))


@pytest.mark.parametrize("process_index", [0, 1])
def test_tfds_process_zero_prepares_while_the_others_wait(tmp_path, monkeypatch, process_index):
    """Two processes sharing data_dir, seen from one of them (the barrier is faked)."""
    data = tiny_data(tmp_path)
    barriers = []

    def barrier(name, timeout_s):
        barriers.append((name, TinyIndexed.prepared))
        if process_index == 1:  # process 0 prepares while this one waits here
            tfds.builder("tiny_indexed", data_dir=str(tmp_path)).download_and_prepare(
                file_format="array_record"
            )

    TinyIndexed.prepared = 0
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process_index)
    monkeypatch.setattr(platform, "wait_for_all_processes", barrier)
    images, labels = input_pipeline.load_examples(data, "train")
    # One barrier; process 0 has prepared before it, process 1 never prepares.
    assert [prepared for _, prepared in barriers] == [1 - process_index]
    assert "tiny_indexed" in barriers[0][0] and TinyIndexed.prepared == 1
    ids = image_ids(images)  # in tfds's stored order
    np.testing.assert_array_equal(np.sort(ids), np.arange(NUM_INDEXED))
    np.testing.assert_array_equal(images, [indexed_image(i) for i in ids])
    np.testing.assert_array_equal(labels, [indexed_label(i) for i in ids])


def test_tfds_other_process_without_the_data_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(platform, "wait_for_all_processes", lambda name, timeout_s: None)
    with pytest.raises(ValueError, match="every process must share data.data_dir"):
        data_sources.num_examples(tiny_data(tmp_path), "train")


def test_tfds_offline_download_fails_fast_naming_the_data_dir(tmp_path, monkeypatch):
    TinyIndexed.prepared = 0
    # A data set with download URLs, on a machine whose names do not resolve.
    monkeypatch.setattr(TinyIndexed, "url_infos", {"https://data.example/tiny.tar.gz": None})

    def offline(request, timeout):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(data_sources.urllib.request, "urlopen", offline)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="not available offline") as info:
        input_pipeline.create_train_iter(tiny_data(tmp_path), global_batch_size=8, seed=0)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert f"not prepared in {tmp_path} (--config.data.data_dir='{tmp_path}')" in message
    assert "cannot reach https://data.example/" in message and "Name or service" in message
    assert "download_and_prepare" in message and "source='folder'" in message
    assert TinyIndexed.prepared == 0 and not list(tmp_path.rglob("*.array_record*"))


def test_tfds_connection_error_while_downloading_names_the_data_dir(tmp_path, monkeypatch):
    def split_generators(self, dl_manager):  # what tfds's downloader raises offline
        raise requests.exceptions.ConnectionError("Failed to resolve 'data.example'")

    monkeypatch.setattr(TinyIndexed, "_split_generators", split_generators)
    with pytest.raises(ValueError, match=r"downloading it failed \(Failed to resolve"):
        data_sources.num_examples(tiny_data(tmp_path), "train")


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
    assert data_sources.num_examples(data, "train") == len(FOLDER_FILES)
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
        data_sources.num_examples(make_data(num_channels=4), "train")


def test_error_tfds_not_prepared(tmp_path):
    data = tiny_data(tmp_path, download=False)
    with pytest.raises(ValueError, match="not available offline: data.download=False") as info:
        input_pipeline.create_train_iter(data, global_batch_size=8, seed=0)
    assert f"not prepared in {tmp_path} (--config.data.data_dir='{tmp_path}')" in str(info.value)
    assert "download_and_prepare" in str(info.value) and "source='folder'" in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing downloaded or prepared
    default = tiny_data("", download=False)
    with pytest.raises(ValueError, match=r"data_dir='' \(empty: tfds's default\)") as info:
        data_sources.num_examples(default, "train")
    root = tfds.builder("tiny_indexed").data_dir_root
    assert f"not prepared in {root} " in str(info.value)
    with pytest.raises(ValueError, match="Unknown tfds dataset data.dataset='no_such_dataset'"):
        data_sources.num_examples(make_data(dataset="no_such_dataset"), "train")


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
