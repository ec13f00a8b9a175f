"""Writes MNIST digits from the IDX files as PNGs, out_dir/<label>/<index>.png.

This is how the MNIST model is trained offline: point data.source='folder' and
data.path at out_dir. All ten label folders are created, even if `limit` leaves some
empty, so the folder pipeline's label (the index of the subdirectory in sorted order)
equals the digit.

  python tools/mnist_to_folder.py \\
    --images ../shared/data/mnist/t10k-images-idx3-ubyte.gz \\
    --labels ../shared/data/mnist/t10k-labels-idx1-ubyte.gz --out_dir data/mnist_png
"""

import argparse
import gzip
import os

import numpy as np
from PIL import Image

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
NUM_CLASSES = 10


def read_idx(path: str, magic: int) -> np.ndarray:
    """Reads a (gzipped) IDX file of unsigned bytes; [N, rows, cols] or [N] uint8."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        content = f.read()
    found = int.from_bytes(content[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic number is {found}, expected {magic}.")
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise ValueError(f"{path}: too short for an IDX header ({len(content)} bytes).")
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(content, np.uint8, offset=header_size)
    if body.size != np.prod(shape):
        raise ValueError(f"{path}: header says shape {shape}, but {body.size} bytes follow.")
    return body.reshape(shape)


def write_mnist_folder(
    images_gz: str, labels_gz: str, out_dir: str, limit: int | None = None
) -> int:
    """Writes the first `limit` (default all) digits as 28x28 grayscale PNGs.

    Files are out_dir/<label>/<index:05d>.png, index being the position in the IDX file.
    Returns the number of files written.
    """
    images = read_idx(images_gz, IMAGES_MAGIC)
    labels = read_idx(labels_gz, LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images in {images_gz} but {len(labels)} labels.")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{labels_gz}: label {labels.max()} is not a digit.")
    count = len(images) if limit is None else min(limit, len(images))
    for label in range(NUM_CLASSES):
        os.makedirs(os.path.join(out_dir, str(label)), exist_ok=True)
    for index in range(count):
        path = os.path.join(out_dir, str(labels[index]), f"{index:05d}.png")
        Image.fromarray(images[index]).save(path)
    return count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="IDX images file (.gz or raw)")
    parser.add_argument("--labels", required=True, help="IDX labels file (.gz or raw)")
    parser.add_argument("--out_dir", required=True, help="folder to write <label>/<index>.png")
    parser.add_argument("--limit", type=int, default=None, help="write only the first N digits")
    args = parser.parse_args(argv)
    count = write_mnist_folder(args.images, args.labels, args.out_dir, args.limit)
    print(f"Wrote {count} PNGs to {args.out_dir}")


if __name__ == "__main__":
    main()
