"""Input pipeline: tfds or a folder of images -> per-process, per-device uint8 batches.

Batches are dicts of numpy arrays, uint8 at the edge (the trainer scales to [-1, 1]):
  'image': uint8 [local_device_count, per_device_batch, image_size, image_size, num_channels]
  'label': int32 [local_device_count, per_device_batch]
  'mask':  bool  [local_device_count, per_device_batch]   (evaluation only)
  'low_res': uint8 [local_device_count, per_device_batch, low_res_size, low_res_size,
             num_channels]   (super-resolution, data.low_res_size > 0: 'image' area-
             downsampled, after any flip, see area_downsample)

Training order is a pure function of (seed, step), so a restarted run resumes exactly.
Global position p = step * global_batch_size + i (0 <= i < global_batch_size) holds
example order_e[p % N] of epoch e = p // N, where order_e is a fresh permutation drawn
from (seed, e), and is flipped if flip_e[p % N] (also drawn from (seed, e)): both are
functions of (seed, p) alone (see _TrainOrder). Skipping to `start_step` is index
arithmetic; nothing skipped is read. Process k of P takes the k-th contiguous share of
every global batch, then splits it over its local devices, so the global batch does
not depend on the number of processes or devices.

Random access to examples:
  folder: files found recursively (png/jpg/jpeg, any case), sorted by relative path;
    decoded with tf.io (JPEG with the accurate integer DCT, as PIL does); label = index of
    the first-level subdirectory among all first-level subdirectories in sorted order,
    0 for files directly in the root.
  tfds:   the split is decoded, converted and resized once into host memory as a uint8
    array: N * image_size**2 * num_channels bytes (CIFAR-10 train 147 MiB, MNIST train at
    32x32x1 59 MiB), plus a transient second copy while loading. Meant for MNIST/CIFAR/
    CelebA-64-sized data; use a folder for larger sets.

Resizing (both sources): the short side is resized to image_size with antialiased
bicubic (Keys a=-0.5, the same kernel as PIL BICUBIC), the long side to
round(long * image_size / short), then a centre crop (offset (new - size) // 2).
Images already image_size x image_size pass through unchanged.
"""

import itertools
import os
import re
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddpm import super_resolution

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Keeps this stream apart from other uses of the same seed.
_ORDER_SALT = 0x5F1E
_LOAD_BATCH = 1024

# A loader maps an int64 example index to (uint8 [S, S, C] image, int32 label).
_Loader = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


class _Source:
    """Random access to N examples, already resized to [S, S, C] uint8."""

    def __init__(self, load: _Loader, labels: np.ndarray, describe, find_unreadable=None):
        self.num_examples = len(labels)
        self.load = load
        self.labels = labels  # int [N], on the host: checked before anything is decoded
        self.describe = describe  # index -> how a user finds the example ("file ...")
        # indices -> message naming a file that does not decode, or None.
        self.find_unreadable = find_unreadable or (lambda indices: None)

    def check_labels(self, num_classes: int) -> None:
        """Raises a ValueError naming the first example whose label is not in [0, num_classes)."""
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= num_classes))
        if bad.size:
            raise ValueError(
                f"{bad.size} of {self.num_examples} examples have labels outside [0, {num_classes})"
                f" (model.num_classes={num_classes}); the first is {self.describe(bad[0])} with "
                f"label {self.labels[bad[0]]}. Set model.num_classes to the number of classes."
            )


# ---------------------------------------------------------------------------- images


def _to_channels(image: tf.Tensor, num_channels: int) -> tf.Tensor:
    """uint8 [H, W, c] with c in {1, 3, 4} -> uint8 [H, W, num_channels]."""
    channels = image.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"Cannot convert images with {channels} channels to {num_channels}.")
    if channels == num_channels:
        return image
    if channels == 1:
        return tf.tile(image, [1, 1, 3])
    rgb = image[..., :3]  # drop alpha
    if num_channels == 3:
        return rgb
    # ITU-R 601-2 luma, as PIL's 'L' conversion.
    gray = tf.image.rgb_to_grayscale(tf.cast(rgb, tf.float32))
    return tf.cast(tf.round(tf.clip_by_value(gray, 0.0, 255.0)), tf.uint8)


def _resize_and_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [H, W, C] -> uint8 [size, size, C]: short side to size, then centre crop."""
    num_channels = image.shape[-1]
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    short = tf.minimum(height, width)
    # Round half up in integer arithmetic: no float ties to disagree about.
    new_height = (height * size + short // 2) // short
    new_width = (width * size + short // 2) // short
    resized = tf.image.resize(image, [new_height, new_width], method="bicubic", antialias=True)
    # Bicubic overshoots near edges; clip before the cast so it cannot wrap around.
    resized = tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    cropped = resized[top : top + size, left : left + size]
    return tf.ensure_shape(cropped, [size, size, num_channels])


def area_downsample(images: tf.Tensor, low_res_size: int) -> tf.Tensor:
    """uint8 [N, S, S, C] -> uint8 [N, s, s, C], s = low_res_size: each pixel the mean of its
    k x k block (k = S / s), rounded half to even (improved-diffusion's area downsampling)."""
    _, size, _, channels = images.shape
    k = size // low_res_size
    blocks = tf.reshape(tf.cast(images, tf.float32), [-1, low_res_size, k, low_res_size, k,
                                                      channels])  # fmt: skip
    return tf.cast(tf.round(tf.reduce_mean(blocks, axis=[2, 4])), tf.uint8)


def _decode(encoded: tf.Tensor, num_channels: int) -> tf.Tensor:
    """Encoded png/jpeg bytes -> uint8 [H, W, num_channels] (the decoder converts)."""
    return tf.cond(
        tf.io.is_jpeg(encoded),
        # The default fast DCT differs from libjpeg's reference (and PIL) by up to ~6.
        lambda: tf.io.decode_jpeg(encoded, channels=num_channels, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=num_channels, expand_animations=False),
    )


# ---------------------------------------------------------------------------- sources


def _list_images(path: str) -> tuple[list[str], list[int]]:
    """Sorted image paths under `path` and their first-level-subdirectory labels."""
    if not path:
        raise ValueError("data.path must name a folder of images when data.source='folder'.")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Image folder data.path={path!r} does not exist.")
    subdirs = sorted(
        entry.name
        for entry in os.scandir(path)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    class_index = {name: i for i, name in enumerate(subdirs)}
    relative = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                relative.append(os.path.relpath(os.path.join(root, name), path))
    # os.walk order depends on the file system; sort on a platform-neutral key.
    relative.sort(key=lambda rel: rel.replace(os.sep, "/"))
    if not relative:
        raise FileNotFoundError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}, any case) found under data.path={path!r}."
        )
    labels = [class_index.get(rel.split(os.sep)[0], 0) if os.sep in rel else 0 for rel in relative]
    return [os.path.join(path, rel) for rel in relative], labels


def _op_message(error: tf.errors.OpError) -> str:
    """The reason of a TensorFlow op error, without its '{{function_node ...}}' and '[Op:...]'."""
    message = re.sub(r"\{\{function_node [^}]*\}\}", "", error.message)
    return re.sub(r"\s*\[Op:\w+\].*$", "", message, flags=re.S).strip()


def _folder_source(data: ml_collections.ConfigDict) -> _Source:
    paths, labels = _list_images(data.path)
    paths_t = tf.constant(paths)
    labels_t = tf.constant(labels, tf.int32)

    def load(index):
        image = _decode(tf.io.read_file(paths_t[index]), data.num_channels)
        return _resize_and_center_crop(image, data.image_size), labels_t[index]

    def find_unreadable(indices):
        for index in dict.fromkeys(int(i) for i in indices):
            try:
                _decode(tf.io.read_file(paths[index]), data.num_channels)
            except tf.errors.OpError as error:
                return f"Cannot decode image file {paths[index]!r}: {_op_message(error)}"
        return None

    return _Source(load, np.asarray(labels), lambda i: f"file {paths[i]!r}", find_unreadable)


def _tfds_builder(data: ml_collections.ConfigDict):
    try:
        return tfds.builder(data.dataset, data_dir=data.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown tfds dataset data.dataset={data.dataset!r}. Check the name, or use "
            "data.source='folder' with data.path set to a folder of images."
        ) from None


def _open_tfds_split(data: ml_collections.ConfigDict, split: str):
    """Returns (builder, tf.data.Dataset of the split in stored order); never downloads."""
    builder = _tfds_builder(data)
    known = set(builder.info.splits)
    # 'train[:10%]+test' names the splits 'train' and 'test'.
    names = {part.split("[")[0].strip() for part in str(split).split("+")}
    if known and not names <= known:
        raise ValueError(
            f"tfds dataset {data.dataset!r} has no split {sorted(names - known)}; "
            f"it has {sorted(known)}."
        )
    try:
        return builder, builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError as error:  # tfds's way of saying "not prepared"; never download here.
        if "could not find data" not in str(error):
            raise
        raise ValueError(
            f"tfds dataset {data.dataset!r} is not prepared in data_dir={data.data_dir!r} and "
            "is not available offline (this pipeline never downloads). On a connected machine "
            f"run `tfds build {data.dataset} --data_dir=DIR` (or tfds.builder(...)"
            ".download_and_prepare()), copy DIR here and set data.data_dir=DIR; or use "
            "data.source='folder' with data.path set to a folder of images."
        ) from None


def _load_tfds_split(data: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns images uint8 [N, S, S, C] and labels int32 [N] of a prepared tfds split."""
    builder, dataset = _open_tfds_split(data, split)
    features = builder.info.features
    if "image" not in features:
        raise ValueError(f"tfds dataset {data.dataset!r} has no 'image' feature: {features}")
    has_label = "label" in features
    size, channels = data.image_size, data.num_channels

    def convert(example):
        image = _to_channels(example["image"], channels)
        if tuple(image.shape) != (size, size, channels):
            image = _resize_and_center_crop(image, size)
        label = tf.cast(example["label"], tf.int32) if has_label else tf.constant(0, tf.int32)
        return image, label

    dataset = dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)
    chunks = list(dataset.batch(_LOAD_BATCH).prefetch(2).as_numpy_iterator())
    if not chunks:
        raise ValueError(f"tfds split {data.dataset}:{split} is empty.")
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def _tfds_source(data: ml_collections.ConfigDict, split: str) -> _Source:
    images, labels = _load_tfds_split(data, split)
    # Captured by reference in the tf.data graph (no second copy is kept).
    images_t, labels_t = tf.convert_to_tensor(images), tf.convert_to_tensor(labels)
    return _Source(
        lambda index: (images_t[index], labels_t[index]),
        labels,
        lambda index: f"example {index} of tfds split {data.dataset}:{split}",
    )


def _check_data(data: ml_collections.ConfigDict) -> None:
    if data.source not in ("tfds", "folder"):
        raise ValueError(f"Unknown data.source={data.source!r}; expected 'tfds' or 'folder'.")
    if not isinstance(data.image_size, int) or data.image_size < 1:
        raise ValueError(f"data.image_size must be a positive int, got {data.image_size!r}.")
    if data.num_channels not in (1, 3):
        raise ValueError(f"data.num_channels must be 1 or 3, got {data.num_channels!r}.")
    super_resolution.check_low_res_size(data)


def _make_source(data: ml_collections.ConfigDict, split: str) -> _Source:
    _check_data(data)
    if data.source == "folder":  # a folder is a single split: `split` is not used
        return _folder_source(data)
    return _tfds_source(data, split)


def num_examples(data: ml_collections.ConfigDict, split: str) -> int:
    """Number of examples in `split` (a folder has one split: all the images found)."""
    _check_data(data)
    if data.source == "folder":
        return len(_list_images(data.path)[0])
    dataset = _open_tfds_split(data, split)[1]
    count = int(dataset.cardinality())  # tfds records it; no image is decoded
    return count if count >= 0 else int(dataset.reduce(0, lambda n, _: n + 1))


# ---------------------------------------------------------------------------- batching


def _shares(global_batch_size, process_index, process_count, local_device_count):
    """Validates the batch split; returns (process_index, local_batch, devices, per_device)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    devices = jax.local_device_count() if local_device_count is None else local_device_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    if global_batch_size < 1 or global_batch_size % (process_count * devices):
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count * local_device_count = {process_count} * {devices} = "
            f"{process_count * devices}."
        )
    local_batch = global_batch_size // process_count
    return process_index, local_batch, devices, local_batch // devices


def _batches(
    dataset, source, devices, per_device, indices_of_batch, low_res_size=0
) -> Iterator[dict]:
    """Batches `dataset`, reshapes to devices, and names the file behind a decode error.

    low_res_size > 0 adds 'low_res', the area-downsampled images (super-resolution).
    """

    def to_devices(example):
        if low_res_size:
            example = {**example, "low_res": area_downsample(example["image"], low_res_size)}
        return {k: tf.reshape(v, [devices, per_device, *v.shape[1:]]) for k, v in example.items()}

    dataset = dataset.batch(devices * per_device, drop_remainder=True).map(to_devices)
    iterator = dataset.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
    batch_number = 0
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as error:
            message = source.find_unreadable(indices_of_batch(batch_number))
            raise ValueError(message or f"Input pipeline failed: {error.message}") from None
        batch_number += 1
        yield batch


class _TrainOrder:
    """The training order: global positions -> (example indices, flips), pure in (seed, p).

    Epoch e orders the N examples by N raw 64-bit draws of PCG64 seeded with
    SeedSequence([seed, SALT, e]) and flips with the top bit of N more: NumPy promises
    these bit streams stay the same across versions (unlike Generator.permutation), so a
    run resumes bit-exactly after an upgrade. One epoch costs O(N log N) once (~8 ms for
    N = 50k); only the epochs in use are kept.
    """

    def __init__(self, seed: int, num_examples: int):
        self.seed, self.n = seed % 2**64, num_examples  # SeedSequence needs non-negative
        self._epochs = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._epochs:
            seeds = np.random.SeedSequence([self.seed, _ORDER_SALT, epoch])
            bits = np.random.PCG64(seeds).random_raw(2 * self.n)
            order = np.argsort(bits[: self.n], kind="stable")
            self._epochs = {e: v for e, v in self._epochs.items() if e > epoch - 2}
            self._epochs[epoch] = (order, (bits[self.n :] >> 63).astype(bool))
        return self._epochs[epoch]

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 [K] global positions -> (int64 [K] example indices, bool [K] flips)."""
        indices = np.empty(positions.shape, np.int64)
        flips = np.empty(positions.shape, bool)
        epochs, within = np.divmod(positions, self.n)
        for epoch in np.unique(epochs):
            order, epoch_flips = self._epoch(int(epoch))
            sel = epochs == epoch
            indices[sel], flips[sel] = order[within[sel]], epoch_flips[within[sel]]
        return indices, flips


def create_train_iter(
    data: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    num_classes: int = 0,
) -> Iterator[dict]:
    """Infinite training batches from `data.train_split`, starting at step `start_step`.

    With num_classes > 0 every label must be in [0, num_classes), else a ValueError names
    the first file or example that is not.

    Yields {'image': uint8 [D, B, S, S, C], 'label': int32 [D, B]} with D the local device
    count (default jax.local_device_count()) and B = global_batch_size / (process_count *
    D). The k-th batch yielded is the batch of step start_step + k, identical to what a
    fresh iterator yields at that step. Flips (data.random_flip) are horizontal.
    """
    process_index, local_batch, devices, per_device = _shares(
        global_batch_size, process_index, process_count, local_device_count
    )
    source = _make_source(data, data.train_split)
    if num_classes:
        source.check_labels(num_classes)
    train_order = _TrainOrder(seed, source.num_examples)
    random_flip = bool(data.random_flip)
    offset = process_index * local_batch

    def batch_order(batch_number):
        """This process's share of step start_step + batch_number: indices, flips [L]."""
        step = start_step + batch_number
        return train_order(step * global_batch_size + offset + np.arange(local_batch))

    def index_stream():  # cheap: index arithmetic only, decoding happens in the map
        for batch_number in itertools.count():
            yield batch_order(batch_number)

    def load(index, flip):
        image, label = source.load(index)
        if random_flip:
            image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
        return {"image": image, "label": label}

    signature = (tf.TensorSpec([local_batch], tf.int64), tf.TensorSpec([local_batch], tf.bool))
    dataset = tf.data.Dataset.from_generator(index_stream, output_signature=signature)
    dataset = dataset.unbatch().map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _batches(dataset, source, devices, per_device, lambda b: batch_order(b)[0],
                    data.get("low_res_size", 0))  # fmt: skip


def create_eval_iter(
    data: ml_collections.ConfigDict,
    *,
    split: str,
    global_batch_size: int,
    positions: np.ndarray | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
) -> Iterator[dict]:
    """One pass over `split` in stored order (or over its examples `positions`, in that
    order): no shuffle, no flip.

    Yields ceil(N / global_batch_size) batches on every process (N examples, or
    len(positions)), each {'image': uint8 [D, B, S, S, C], 'label': int32 [D, B], 'mask':
    bool [D, B]}; padding positions past the end have mask False, a zero image and label 0.
    """
    process_index, local_batch, devices, per_device = _shares(
        global_batch_size, process_index, process_count, local_device_count
    )
    source = _make_source(data, split)
    if positions is None:
        positions = np.arange(source.num_examples)
    positions = np.asarray(positions, np.int64)
    if positions.size and not 0 <= positions.min() <= positions.max() < source.num_examples:
        raise ValueError(f"positions outside the {source.num_examples} examples of {split!r}")
    n = len(positions)
    positions_t = tf.constant(positions)
    num_batches = -(-n // global_batch_size)
    shape = (data.image_size, data.image_size, data.num_channels)

    def position_of(local_position):
        step, i = local_position // local_batch, local_position % local_batch
        return step * global_batch_size + process_index * local_batch + i

    def load(local_position):
        position = position_of(local_position)
        mask = position < n
        image, label = tf.cond(
            mask,
            lambda: source.load(positions_t[position]),
            lambda: (tf.zeros(shape, tf.uint8), tf.constant(0, tf.int32)),
        )
        return {"image": image, "label": label, "mask": mask}

    def indices_of_batch(batch_number):
        first = batch_number * local_batch
        found = [position_of(q) for q in range(first, first + local_batch)]
        return [positions[p] for p in found if p < n]

    dataset = tf.data.Dataset.range(num_batches * local_batch)
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _batches(dataset, source, devices, per_device, indices_of_batch,
                    data.get("low_res_size", 0))  # fmt: skip


def load_examples(
    data: ml_collections.ConfigDict, split: str, *, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """All of `split` on this host, in stored order: uint8 images [N, S, S, C], int32 labels [N].

    For data sets that fit in memory (a classifier's training set, a small FID reference).
    """
    batches = create_eval_iter(
        data, split=split, global_batch_size=batch_size, process_index=0, process_count=1,
        local_device_count=1,
    )  # fmt: skip
    found, labels = [], []
    for batch in batches:
        mask = batch["mask"].reshape(-1)
        found.append(batch["image"].reshape(-1, *batch["image"].shape[2:])[mask])
        labels.append(batch["label"].reshape(-1)[mask])
    return np.concatenate(found), np.concatenate(labels)
