"""Random access to the examples of a data set, read from disk as batches need them.

A Source reads the examples at a batch of indices (`fetch`: one call per batch, the
encoded images and int32 labels) and decodes one encoded image to uint8 [S, S, C]
(`decode`: TensorFlow ops only, so tf.data runs many in parallel, without the GIL).
Nothing but O(N) small integer arrays (labels, record offsets, the folder's path list) is
held in host memory, whatever the size of the data set.

  folder: files found recursively (png/jpg/jpeg, any case), sorted by relative path;
    label = index of the first-level subdirectory among all first-level subdirectories in
    sorted order, 0 for files directly in the root.
  tfds:   the serialized records of the prepared split, in tfds's stored order, read
    through `builder.as_data_source` (ArrayRecord files: what data.download prepares), or,
    for a split prepared in tfds's default TFRecord format, through an index of record
    offsets built from the records' 12-byte headers on first use. Only the 'image' and
    'label' features are parsed; the labels (for checking them up-front) are read without
    decoding any image. A data set that is not prepared is downloaded and prepared once
    where data.download (process 0 prepares, the other processes wait).

Both decode with tf.io (JPEG with the accurate integer DCT, as PIL does), convert the
channels (grayscale replicated to RGB; RGB to gray with ITU-R 601-2 luma, as PIL's 'L'),
then resize: the short side to image_size with antialiased bicubic (Keys a=-0.5, the same
kernel as PIL BICUBIC), the long side to round(long * image_size / short), then a centre
crop (offset (new - size) // 2). Images already image_size x image_size pass through
unchanged.
"""

import functools
import os
import re
import struct
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddpm import platform, super_resolution

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_LABEL_CHUNK = 4096  # records parsed per call when reading the labels of a tfds split

# fetch: int64 [K] example indices -> (string [K] payloads, int32 [K] labels), one call per
# batch (for tfds one Python call reads K records); decode: one payload -> uint8 [S, S, C],
# run per example by parallel tf.data workers (TF ops only, no Python, no GIL).
Fetch = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
Decode = Callable[[tf.Tensor], tf.Tensor]


class Source:
    """Random access to N examples, resized to [S, S, C] uint8 as they are decoded."""

    def __init__(self, fetch: Fetch, decode: Decode, num_examples: int, read_labels, describe):
        self.num_examples = num_examples
        self.fetch = fetch
        self.decode = decode
        self._read_labels = read_labels  # () -> int [N], without decoding any image
        self.describe = describe  # index -> how a user finds the example ("file ...")

    def load(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """int64 [] index -> (uint8 [S, S, C] image, int32 [] label)."""
        payloads, labels = self.fetch(tf.reshape(tf.cast(index, tf.int64), [1]))
        return self.decode(payloads[0]), labels[0]

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """int32 [N]: read on first use (a tfds split reads every record's label once)."""
        return np.asarray(self._read_labels(), np.int32)

    def check_labels(self, num_classes: int) -> None:
        """Raises a ValueError naming the first example whose label is not in [0, num_classes)."""
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= num_classes))
        if bad.size:
            raise ValueError(
                f"{bad.size} of {self.num_examples} examples have labels outside [0, {num_classes})"
                f" (model.num_classes={num_classes}); the first is {self.describe(bad[0])} with "
                f"label {self.labels[bad[0]]}. Set model.num_classes to the number of classes."
            )

    def find_unreadable(self, indices) -> str | None:
        """A message naming the first of `indices` that does not load, or None."""
        for index in dict.fromkeys(int(i) for i in indices):
            try:
                self.load(tf.constant(index, tf.int64))
            except tf.errors.OpError as error:
                return f"Cannot decode {self.describe(index)}: {op_message(error)}"
        return None


def op_message(error: tf.errors.OpError) -> str:
    """The reason of a TensorFlow op error, without its '{{function_node ...}}' and '[Op:...]'."""
    message = re.sub(r"\{\{function_node [^}]*\}\}", "", error.message)
    return re.sub(r"\s*\[Op:\w+\].*$", "", message, flags=re.S).strip()


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

    def resize():
        short = tf.minimum(height, width)
        # Round half up in integer arithmetic: no float ties to disagree about.
        new_height = (height * size + short // 2) // short
        new_width = (width * size + short // 2) // short
        resized = tf.image.resize(image, [new_height, new_width], method="bicubic", antialias=True)
        # Bicubic overshoots near edges; clip before the cast so it cannot wrap around.
        resized = tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)
        top, left = (new_height - size) // 2, (new_width - size) // 2
        return resized[top : top + size, left : left + size]

    # Resizing to the same size is the identity but costs most of a 256^2 JPEG's decoding.
    same = tf.logical_and(tf.equal(height, size), tf.equal(width, size))
    return tf.ensure_shape(tf.cond(same, lambda: image, resize), [size, size, num_channels])


def _decode(encoded: tf.Tensor, num_channels: int) -> tf.Tensor:
    """Encoded png/jpeg/gif/bmp bytes -> uint8 [H, W, num_channels] (the decoder converts)."""
    return tf.cond(
        tf.io.is_jpeg(encoded),
        # The default fast DCT differs from libjpeg's reference (and PIL) by up to ~6.
        lambda: tf.io.decode_jpeg(encoded, channels=num_channels, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=num_channels, expand_animations=False),
    )


# ---------------------------------------------------------------------------- folder


def list_images(path: str) -> tuple[list[str], list[int]]:
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


def _folder_source(data: ml_collections.ConfigDict) -> Source:
    paths, labels = list_images(data.path)
    # Only the tensors outlive this call: the paths are kept once, not also as Python
    # strings (which would double their memory, ~12 MB per 100k images).
    paths_t, labels_t = tf.constant(paths), tf.constant(labels, tf.int32)

    def fetch(indices):
        return tf.gather(paths_t, indices), tf.gather(labels_t, indices)

    def decode(path):
        image = _decode(tf.io.read_file(path), data.num_channels)
        return _resize_and_center_crop(image, data.image_size)

    def describe(index):
        return f"image file {paths_t[int(index)].numpy().decode()!r}"

    return Source(fetch, decode, int(paths_t.shape[0]), labels_t.numpy, describe)


# ---------------------------------------------------------------------------- tfds


class _TFRecordRecords:
    """Random access to the records of uncompressed TFRecord shards (tfds's default format).

    tfds reads TFRecord only sequentially. The first read builds an index of every record's
    (shard, offset, length) by reading its 12-byte header (uint64 length, uint32 CRC) and
    seeking past its data and CRC: O(N) integers, one pass over the headers, no data read.
    """

    def __init__(self, file_instructions):
        self._instructions = list(file_instructions)  # one per shard (or part of one)
        self._length = sum(instruction.take for instruction in self._instructions)
        self._lock = threading.Lock()
        self._index = None  # (instruction int32 [N], offset int64 [N], length int64 [N])
        self._files = {}  # instruction -> open GFile (closed with this object)

    def __len__(self) -> int:
        return self._length

    def _build_index(self):
        parts, offsets, lengths = [], [], []
        for part, instruction in enumerate(self._instructions):
            stop = instruction.skip + instruction.take
            found_offsets, found_lengths = _scan_tfrecord(os.fspath(instruction.filename), stop)
            parts.append(np.full(instruction.take, part, np.int32))
            offsets.append(found_offsets[instruction.skip :])
            lengths.append(found_lengths[instruction.skip :])
        return tuple(np.concatenate(arrays) for arrays in (parts, offsets, lengths))

    def __getitem__(self, index: int) -> bytes:
        with self._lock:  # reads are short (a batch is one Python call): one lock suffices
            if self._index is None:
                self._index = self._build_index()
            parts, offsets, lengths = self._index
            part, length = int(parts[index]), int(lengths[index])
            if part not in self._files:
                self._files[part] = tf.io.gfile.GFile(self._instructions[part].filename, "rb")
            self._files[part].seek(int(offsets[index]))
            record = self._files[part].read(length)
        if len(record) != length:
            path = os.fspath(self._instructions[part].filename)
            raise ValueError(f"TFRecord file {path!r} ends inside record {index}.")
        return record


def _scan_tfrecord(path: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 data offsets [count] and lengths [count] of the first `count` records in `path`."""
    offsets, lengths, position = [], [], 0
    size = tf.io.gfile.stat(path).length
    with tf.io.gfile.GFile(path, "rb") as file:
        while len(offsets) < count and position < size:
            file.seek(position)
            header = file.read(12)
            (length,) = struct.unpack("<Q", header[:8]) if len(header) == 12 else (size,)
            position += 16 + length
            if position > size:
                raise ValueError(
                    f"{path!r} is not an uncompressed TFRecord file: record {len(offsets)} "
                    "runs past its end."
                )
            offsets.append(position - 4 - length)
            lengths.append(length)
    if len(offsets) < count:
        raise ValueError(
            f"TFRecord file {path!r} has {len(offsets)} records; tfds expects {count}."
        )
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def tfds_builder(data: ml_collections.ConfigDict):
    """The tfds builder of data.dataset: its metadata (splits, features); reads no example."""
    try:
        return tfds.builder(data.dataset, data_dir=data.data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown tfds dataset data.dataset={data.dataset!r}. Check the name, or use "
            "data.source='folder' with data.path set to a folder of images."
        ) from None


def _not_prepared(builder, data: ml_collections.ConfigDict, reason: str) -> ValueError:
    given = repr(data.data_dir) if data.data_dir else "'' (empty: tfds's default)"
    return ValueError(
        f"tfds dataset {data.dataset!r} is not prepared in {builder.data_dir_root} "
        f"(--config.data.data_dir={given}) and is not available offline: {reason}. On a "
        "connected machine run the same command with data.download=True (the default), or "
        f"tfds.builder({data.dataset!r}, data_dir=DIR).download_and_prepare("
        "file_format='array_record'), copy DIR here and set --config.data.data_dir=DIR; or "
        "use data.source='folder' with data.path set to a folder of images."
    )


def _check_reachable(urls) -> None:
    """Raises OSError at once when none of the (up to 3) hosts of `urls` answers.

    Offline, tfds's downloader retries 10 times with exponential backoff (~200 s) before it
    gives up; one HEAD request per host (any HTTP answer counts) fails in milliseconds
    when names do not resolve, and within its timeout when packets are dropped.
    """
    parts = [urllib.parse.urlsplit(url) for url in urls]
    hosts = list(dict.fromkeys(f"{p.scheme}://{p.netloc}/" for p in parts if p.scheme in
                               ("http", "https")))[:3]  # fmt: skip
    failures = []
    for host in hosts:
        try:
            urllib.request.urlopen(urllib.request.Request(host, method="HEAD"), timeout=10).close()
            return
        except urllib.error.HTTPError:  # the server answered
            return
        except OSError as error:  # URLError, timeouts, refused connections
            failures.append(f"{host}: {getattr(error, 'reason', error)}")
    if failures:
        raise OSError(f"cannot reach {'; '.join(failures)}")


def _download_and_prepare(builder) -> None:
    """Downloads and prepares `builder` in array_record format (random access)."""
    make_download_manager = getattr(builder, "_make_download_manager", None)
    if make_download_manager is not None:
        # tfds has no public hook before its first request; this one runs inside the real
        # download_and_prepare only (tfds.testing.mock_data replaces that with a no-op).
        def checked(*args, **kwargs):
            _check_reachable(builder.url_infos or {})
            return make_download_manager(*args, **kwargs)

        builder._make_download_manager = checked
    # GCS-hosted copies are TFRecord only; asking for them costs a request and a timeout.
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    builder.download_and_prepare(file_format="array_record", download_config=config)


# (data.dataset, data.data_dir) that every process has agreed are prepared, in this run.
_READY = set()


def _prepared_builder(data: ml_collections.ConfigDict, split: str):
    """The builder of data.dataset, prepared on disk: downloaded first where data.download.

    A split that the metadata does not list fails before any download (a registered data
    set's metadata can list its splits before it is prepared) and again after preparing.
    Process 0 downloads and prepares while the others wait; then every process reads the
    shared data_dir. The first call for a data set is a barrier of all processes (each
    makes it, as every process builds the same pipelines in the same order); later calls
    are not.
    """
    builder = tfds_builder(data)
    check_split(builder, data, split)
    if not data.get("download", True):
        if not builder.is_prepared():
            raise _not_prepared(builder, data, "data.download=False")
        return builder
    key = (data.dataset, data.data_dir)
    if key in _READY:
        return builder
    failure = None
    if jax.process_index() == 0 and not builder.is_prepared():
        try:
            _download_and_prepare(builder)
        except OSError as error:  # requests' ConnectionError, _check_reachable, disk errors
            failure = _not_prepared(builder, data, f"downloading it failed ({error})")
        except Exception as error:  # raised below, once the others are released
            failure = error
    # Downloading and preparing LSUN takes hours: the others wait up to a day.
    platform.wait_for_all_processes(f"prepare {data.dataset}", timeout_s=24 * 3600)
    if failure is not None:
        raise failure
    builder = tfds_builder(data)  # reads the metadata that preparing wrote
    check_split(builder, data, split)
    if jax.process_index() != 0 and not builder.is_prepared():
        raise _not_prepared(
            builder, data, "process 0 did not prepare it (see its log), or prepared it in a "
            "data_dir this process does not see (every process must share data.data_dir)"
        )  # fmt: skip
    if builder.is_prepared():  # (not so under tfds.testing.mock_data)
        _READY.add(key)
    return builder


def check_split(builder, data: ml_collections.ConfigDict, split: str) -> None:
    """Raises a ValueError for a split that the builder's metadata does not list (metadata
    that lists no splits, as a data set not yet prepared may have, passes)."""
    known = set(builder.info.splits)
    # 'train[:10%]+test' names the splits 'train' and 'test'.
    names = {part.split("[")[0].strip() for part in str(split).split("+")}
    if known and not names <= known:
        raise ValueError(
            f"tfds dataset {data.dataset!r} has no split {sorted(names - known)}; "
            f"it has {sorted(known)}."
        )


def _tfds_records(data: ml_collections.ConfigDict, split: str):
    """(builder, Sequence of the split's serialized tf.train.Example records, stored order)."""
    builder = _prepared_builder(data, split)
    try:
        raw = tfds.decode.DeserializeMethod.RAW_BYTES
        return builder, builder.as_data_source(split=split, deserialize_method=raw)
    except NotImplementedError:  # prepared as TFRecord: tfds gives no random access to it
        return builder, _TFRecordRecords(builder.info.splits[split].file_instructions)


def _scalar_spec(features, name: str, kind: str, data) -> tf.io.FixedLenFeature:
    """The parsing spec of a scalar feature stored as `kind` ('string' or 'integer')."""
    info = features[name].get_serialized_info()
    dtype = tf.as_dtype(getattr(info, "dtype", tf.variant))
    stored_as_kind = dtype == tf.string if kind == "string" else dtype.is_integer
    if getattr(info, "shape", None) != () or not stored_as_kind:
        raise ValueError(f"tfds dataset {data.dataset!r}: feature {name!r} is not stored as "
                         f"one {kind} ({info}).")  # fmt: skip
    return tf.io.FixedLenFeature([], dtype)


def _tfds_source(data: ml_collections.ConfigDict, split: str) -> Source:
    builder, records = _tfds_records(data, split)
    features = builder.info.features
    if "image" not in features:
        raise ValueError(f"tfds dataset {data.dataset!r} has no 'image' feature: {features}")
    image_feature = features["image"]
    if image_feature.np_dtype != np.uint8:
        raise ValueError(f"tfds dataset {data.dataset!r}: images must be uint8, not "
                         f"{image_feature.np_dtype}.")  # fmt: skip
    # Decode to the stored channels, then convert as the folder does (PIL's luma for gray).
    stored_channels = image_feature.shape[-1] or data.num_channels
    spec = {"image": _scalar_spec(features, "image", "string", data)}
    if "label" in features:
        spec["label"] = _scalar_spec(features, "label", "integer", data)
    num_examples = len(records)
    if not num_examples:
        raise ValueError(f"tfds split {data.dataset}:{split} is empty.")

    def read(indices):  # int64 [K] -> object [K] of bytes
        found = np.empty(len(indices), object)
        found[:] = _read_many(records, indices)
        return found

    def fetch(indices):
        encoded = tf.reshape(tf.numpy_function(read, [indices], tf.string, stateful=False), [-1])
        example = tf.io.parse_example(encoded, spec)
        if "label" not in spec:
            return example["image"], tf.zeros(tf.shape(indices), tf.int32)
        return example["image"], tf.cast(example["label"], tf.int32)

    def decode(encoded):
        image = _to_channels(_decode(encoded, stored_channels), data.num_channels)
        return _resize_and_center_crop(image, data.image_size)

    def read_labels():
        if "label" not in spec:
            return np.zeros(num_examples, np.int32)
        chunks = []
        for start in range(0, num_examples, _LABEL_CHUNK):
            chunk = _read_many(records, range(start, min(start + _LABEL_CHUNK, num_examples)))
            parsed = tf.io.parse_example(tf.constant(chunk), {"label": spec["label"]})
            chunks.append(parsed["label"].numpy())
        return np.concatenate(chunks)

    return Source(fetch, decode, num_examples, read_labels,
                  lambda i: f"example {i} of tfds split {data.dataset}:{split}")  # fmt: skip


def _read_many(records, indices) -> list[bytes]:
    """The records at `indices`, in one batched read where the source has one."""
    keys = [int(i) for i in indices]
    read_batch = getattr(records, "__getitems__", None)  # ArrayRecord: parallel, per shard
    if read_batch is not None:
        try:
            return read_batch(keys)
        except TypeError:  # tfds.testing.mock_data's data source has a broken __getitems__
            pass
    return [records[key] for key in keys]


# ---------------------------------------------------------------------------- entry points


def check_data(data: ml_collections.ConfigDict) -> None:
    if data.source not in ("tfds", "folder"):
        raise ValueError(f"Unknown data.source={data.source!r}; expected 'tfds' or 'folder'.")
    if not isinstance(data.image_size, int) or data.image_size < 1:
        raise ValueError(f"data.image_size must be a positive int, got {data.image_size!r}.")
    if data.num_channels not in (1, 3):
        raise ValueError(f"data.num_channels must be 1 or 3, got {data.num_channels!r}.")
    super_resolution.check_low_res_size(data)


def make_source(data: ml_collections.ConfigDict, split: str) -> Source:
    """The examples of `split` (a folder is a single split: `split` is not used)."""
    check_data(data)
    if data.source == "folder":
        return _folder_source(data)
    return _tfds_source(data, split)


def num_examples(data: ml_collections.ConfigDict, split: str) -> int:
    """Number of examples in `split`, without reading any (a folder: the images found)."""
    check_data(data)
    if data.source == "folder":
        return len(list_images(data.path)[0])
    return len(_tfds_records(data, split)[1])
