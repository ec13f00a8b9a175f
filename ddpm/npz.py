""".npz files at any path that etils.epath opens: local, or gs:// on a TPU pod.

numpy reads and writes file objects, not gs:// names. A gs:// file that epath opens for
writing (a tf.io.gfile.GFile) cannot seek, and np.savez's zip writer needs to, so the
archive is built in memory and written in one piece.
"""

import io

import numpy as np
from etils import epath


def save(path: epath.PathLike, **arrays) -> None:
    """Writes `arrays` as an uncompressed .npz at `path` (as np.savez)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    epath.Path(path).write_bytes(buffer.getvalue())


def load(path: epath.PathLike) -> dict[str, np.ndarray]:
    """Every array of the .npz at `path`, read at once."""
    with epath.Path(path).open("rb") as f, np.load(f) as data:
        return dict(data)
