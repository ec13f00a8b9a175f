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

Examples are read from disk as the batches need them (ddpm/data_sources.py: a folder of
images, or a tfds split prepared in ArrayRecord or TFRecord files, downloaded once where
data.download), decoded and resized by parallel tf.data workers: host memory does not grow
with the data set beyond O(N) small integer arrays (the epoch's order, labels, file
offsets or paths).
"""

import itertools
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from ddpm import data_sources

# Keeps this stream apart from other uses of the same seed.
_ORDER_SALT = 0x5F1E


def area_downsample(images: tf.Tensor, low_res_size: int) -> tf.Tensor:
    """uint8 [N, S, S, C] -> uint8 [N, s, s, C], s = low_res_size: each pixel the mean of its
    k x k block (k = S / s), rounded half to even (improved-diffusion's area downsampling)."""
    _, size, _, channels = images.shape
    k = size // low_res_size
    blocks = tf.reshape(tf.cast(images, tf.float32), [-1, low_res_size, k, low_res_size, k,
                                                      channels])  # fmt: skip
    return tf.cast(tf.round(tf.reduce_mean(blocks, axis=[2, 4])), tf.uint8)


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
    source = data_sources.make_source(data, data.train_split)
    if num_classes:
        source.check_labels(num_classes)
    train_order = _TrainOrder(seed, source.num_examples)
    random_flip = bool(data.random_flip)
    offset = process_index * local_batch

    def batch_order(batch_number):
        """This process's share of step start_step + batch_number: indices, flips [L]."""
        step = start_step + batch_number
        return train_order(step * global_batch_size + offset + np.arange(local_batch))

    def index_stream():  # cheap: index arithmetic only, reading happens in the maps
        for batch_number in itertools.count():
            yield batch_order(batch_number)

    def decode(payload, label, flip):
        image = source.decode(payload)
        if random_flip:
            image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
        return {"image": image, "label": label}

    signature = (tf.TensorSpec([local_batch], tf.int64), tf.TensorSpec([local_batch], tf.bool))
    dataset = tf.data.Dataset.from_generator(index_stream, output_signature=signature)
    # One read per batch (one Python call for tfds), then decoding per example in parallel.
    dataset = dataset.map(lambda indices, flips: (*source.fetch(indices), flips),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)  # fmt: skip
    dataset = dataset.unbatch().map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
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
    source = data_sources.make_source(data, split)
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

    def fetch(batch_number):
        position = position_of(batch_number * local_batch + tf.range(local_batch, dtype=tf.int64))
        mask = position < n
        # Padding reads the first example (a batch's last few) and never decodes it.
        payloads, labels = source.fetch(tf.gather(positions_t, tf.where(mask, position, 0)))
        return payloads, tf.where(mask, labels, 0), mask

    def decode(payload, label, mask):
        image = tf.cond(mask, lambda: source.decode(payload), lambda: tf.zeros(shape, tf.uint8))
        return {"image": image, "label": label, "mask": mask}

    def indices_of_batch(batch_number):
        first = batch_number * local_batch
        found = [position_of(q) for q in range(first, first + local_batch)]
        return [positions[p] for p in found if p < n]

    dataset = tf.data.Dataset.range(num_batches).map(
        fetch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    dataset = dataset.unbatch().map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _batches(dataset, source, devices, per_device, indices_of_batch,
                    data.get("low_res_size", 0))  # fmt: skip


def load_examples(
    data: ml_collections.ConfigDict, split: str, *, batch_size: int = 256, positions=None
) -> tuple[np.ndarray, np.ndarray]:
    """All of `split` (or its examples `positions`) on this host, in stored order: uint8
    images [N, S, S, C], int32 labels [N].

    For data sets that fit in memory (a classifier's training set, a small FID reference).
    """
    batches = create_eval_iter(
        data, split=split, global_batch_size=batch_size, positions=positions, process_index=0,
        process_count=1, local_device_count=1,
    )  # fmt: skip
    found, labels = [], []
    for batch in batches:
        mask = batch["mask"].reshape(-1)
        found.append(batch["image"].reshape(-1, *batch["image"].shape[2:])[mask])
        labels.append(batch["label"].reshape(-1)[mask])
    return np.concatenate(found), np.concatenate(labels)
