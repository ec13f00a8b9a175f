"""Inpainting masks: float32 [N, S, S, 1], 1 where a pixel is known, 0 where it is to be filled.

`inpaint.mask` is one of the generated kinds or a folder of mask PNGs:
  bottom_half  the lower half unknown (rows S//2 and below).
  center       a centred square of side S//2 unknown.
  lines        every second row unknown (RePaint's "alternating lines").
  strokes      free-form brush strokes (2 to 4 random walks), different for every image:
               drawn from (seed, image index) alone.
  a folder     mask i is the i-th PNG in sorted order (cycled if there are fewer masks
               than images); white (>= 128) means known. Each must be S x S.
"""

import numpy as np
from etils import epath
from PIL import Image

KINDS = ("bottom_half", "center", "lines", "strokes")


def _bottom_half(size):
    mask = np.ones((size, size), np.float32)
    mask[size // 2 :] = 0
    return mask


def _center(size):
    mask = np.ones((size, size), np.float32)
    lo = size // 4
    mask[lo : lo + size // 2, lo : lo + size // 2] = 0
    return mask


def _lines(size):
    mask = np.ones((size, size), np.float32)
    mask[1::2] = 0
    return mask


def _strokes(size, rng):
    """2-4 strokes, each a walk of 3-6 segments of a round brush of width about S/6."""
    mask = np.ones((size, size), np.float32)
    pixels = np.stack(np.mgrid[:size, :size], axis=-1).astype(np.float64)  # [S, S, 2]
    radius = max(size / 12, 1.0)
    for _ in range(rng.integers(2, 5)):
        point = rng.uniform(0, size, 2)
        for _ in range(rng.integers(3, 7)):
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(size / 6, size / 3)
            end = np.clip(point + length * np.array([np.sin(angle), np.cos(angle)]), 0, size - 1)
            # Pixels within `radius` of the segment point -> end are painted over.
            direction = end - point
            along = (pixels - point) @ direction / max(direction @ direction, 1e-9)
            nearest = point + np.clip(along, 0, 1)[..., None] * direction
            mask[np.sum((pixels - nearest) ** 2, axis=-1) <= radius**2] = 0
            point = end
    return mask


def _folder(path, indices, size):
    folder = epath.Path(path)
    names = sorted(
        p.name for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")
    )
    if not names:
        raise ValueError(f"inpaint.mask={path!r}: no PNG or JPEG masks in the folder")
    masks = []
    for i in indices:
        name = folder / names[i % len(names)]
        with name.open("rb") as f, Image.open(f) as image:
            mask = np.asarray(image.convert("L"))
        if mask.shape != (size, size):
            raise ValueError(
                f"mask {name} is {mask.shape[1]}x{mask.shape[0]}, but the images are "
                f"{size}x{size} (data.image_size)"
            )
        masks.append((mask >= 128).astype(np.float32))
    return masks


def make_masks(spec: str, indices, size: int, *, seed: int = 0) -> np.ndarray:
    """The masks of images `indices` [n]: float32 [n, size, size, 1], 1 = known.

    Raises ValueError for an unknown kind, a mask of the wrong size, and a mask with no
    known pixel or no unknown one (nothing to condition on, or nothing to fill).
    """
    indices = np.asarray(indices)
    if spec in KINDS:
        if spec == "strokes":
            masks = [_strokes(size, np.random.default_rng([seed, int(i)])) for i in indices]
        else:
            masks = [{"bottom_half": _bottom_half, "center": _center, "lines": _lines}[spec](size)]
            masks = masks * len(indices)
    elif epath.Path(spec).is_dir():
        masks = _folder(spec, indices, size)
    else:
        raise ValueError(f"inpaint.mask={spec!r} must be one of {KINDS} or a folder of mask PNGs")
    masks = np.stack(masks)[..., None]
    for i, mask in zip(indices, masks, strict=True):
        if not mask.any():
            raise ValueError(f"inpaint.mask={spec!r}: mask of image {i} has no known pixel")
        if mask.all():
            raise ValueError(f"inpaint.mask={spec!r}: mask of image {i} has no pixel to fill")
    return masks
