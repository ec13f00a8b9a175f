"""Images at the edges: [-1, 1] floats <-> uint8, and sample grids as PNG files."""

import math

import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image


def to_model_range(images_uint8):
    """uint8 [0, 255] -> float32 [-1, 1] (the paper's x / 127.5 - 1)."""
    return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


def to_uint8(images):
    """float [-1, 1] -> uint8 [0, 255], rounding to the nearest of the 256 levels."""
    return np.asarray(np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255), np.uint8)


def make_grid(images_uint8: np.ndarray, *, columns: int | None = None, pad: int = 2):
    """Tiles uint8 images [N, H, W, C] into one [rows * (H + pad) + pad, ..., C] image."""
    n, h, w, c = images_uint8.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images_uint8):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


def save_grid(images_uint8: np.ndarray, path, **grid_kwargs) -> np.ndarray:
    """Writes a PNG grid of uint8 images [N, H, W, C] (C = 1 or 3); returns the grid."""
    path = epath.Path(path)  # local or gs://: PIL writes to the file object epath opens
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images_uint8, **grid_kwargs)
    with path.open("wb") as f:
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(f, format="PNG")
    return grid
